"""The README's "Running it for real" runs as written, so it cannot rot.

Every ``sh`` block of that section is run in order, one command at a time, through
bash: a registry with its own TLS certificate, a hospital node and a consultant node
(two homes under tmp_path), all on 127.0.0.1. The only changes are the values of the
variables the README's first block exports (paths, the listen address, the registry's
host and port, where the TLS files are): this test exports its own instead. Commands
ending in ``&`` are the README's long-running services: started in the background,
waited for until they print that they are up, stopped at the end. ``$EDITOR`` is the
README's too: here it is the administrator's edit, which turns mDNS off (tests never
multicast on the host's interfaces). ``text`` blocks are reference listings, not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.tlscerts import make_pki

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Running it for real"
COMMAND_TIMEOUT = 240.0  # seconds, per command: the machine may be loaded
READY_TIMEOUT = 120.0  # a background service has printed its first line
STOP_TIMEOUT = 30.0
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Command:
    text: str  # one command, continuation lines joined, trailing comment dropped
    block: int  # which sh block of the section (1-based), for failure messages


def section(readme: str, title: str = SECTION) -> str:
    start = readme.index(title)
    end = readme.find("\n## ", start + len(title))
    return readme[start : end if end >= 0 else len(readme)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _drop_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a # outside quotes, after a blank)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(blocks: list[str]) -> list[Command]:
    found: list[Command] = []
    for number, block in enumerate(blocks, 1):
        pending = ""
        for raw in block.splitlines():
            line = _drop_comment(raw)
            if not line.strip():
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            found.append(Command((pending + line.strip()).strip(), number))
            pending = ""
        assert not pending, f"block {number} ends in a continuation line"
    return found


def _editor(tmp_path: Path) -> str:
    """What the administrator does in config.toml here: no mDNS on this machine."""
    script = tmp_path / "edit_config.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, tomllib, tomli_w
            path = sys.argv[1]
            with open(path, "rb") as handle:
                config = tomllib.load(handle)
            config["network"]["mdns"] = False
            with open(path, "wb") as handle:
                tomli_w.dump(config, handle)
            """
        )
    )
    return f"{sys.executable} {script}"


@dataclass
class Walkthrough:
    tmp_path: Path
    env: dict[str, str]
    overrides: dict[str, str]

    def __post_init__(self) -> None:
        self.services: list[tuple[Command, subprocess.Popen[bytes], Path]] = []
        self.transcript: list[str] = []

    def run(self, command: Command) -> None:
        text = command.text
        match = _ASSIGNMENT.match(text)
        if match and not text.startswith("$"):
            self._assign(command, match.group(1), match.group(2))
        elif text.endswith("&"):
            self._start(command, text[:-1].rstrip())
        else:
            out = self._bash(command, text)
            self.transcript.append(f"$ {text}\n{out}")

    def _bash(self, command: Command, script: str) -> str:
        done = subprocess.run(
            ["bash", "-c", f"set -eo pipefail\n{script}"],
            env=self.env,
            cwd=self.tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        assert done.returncode == 0, (
            f"README block {command.block}: `{command.text}` exited {done.returncode}:\n{out}"
            + self._service_logs()
        )
        return done.stdout.decode(errors="replace")

    def _assign(self, command: Command, name: str, value: str | None) -> None:
        if name in self.overrides:  # the values this test substitutes
            self.env[name] = self.overrides[name]
            return
        if value is None:
            return  # `export NAME`: nothing to set
        result = self._bash(command, f'{name}={value}\nprintf "%s" "${{{name}}}"')
        assert result, f"README block {command.block}: `{command.text}` gave {name} no value"
        self.env[name] = result

    def _start(self, command: Command, script: str) -> None:
        log = self.tmp_path / f"service{len(self.services)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {script}"],
                env=self.env,
                cwd=self.tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        self.services.append((command, process, log))
        deadline = time.monotonic() + READY_TIMEOUT
        while not log.read_bytes().strip():
            exited = process.poll()
            assert exited is None, (
                f"README block {command.block}: `{command.text}` exited {exited}:\n"
                + log.read_text(errors="replace")
            )
            assert time.monotonic() < deadline, (
                f"README block {command.block}: `{command.text}` said nothing within "
                f"{READY_TIMEOUT:.0f} s"
            )
            time.sleep(0.2)

    def _service_logs(self) -> str:
        return "".join(
            f"\n--- {c.text}\n{log.read_text(errors='replace')}" for c, _, log in self.services
        )

    def stop(self) -> None:
        for _, process, _ in reversed(self.services):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # the group this test started
        for _, process, _ in reversed(self.services):
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)


def test_the_section_has_the_whole_first_hour() -> None:
    """The walk-through covers what a hospital's IT person needs, in this order."""
    found = [c.text for c in commands(sh_blocks(section(README.read_text())))]
    steps = [
        "registry run",
        '"$H" init',
        '"$H" registry add',
        '"$H" doctor',
        '"$H" node run',
        '"$C" init',
        '"$C" node run',
        "trust verify",
        '"$H" import',
        '"$H" studies',
        "consult request",
        "consult accept",
        "consult fetch",
        "consult report",
        "consult ack",
    ]
    positions = [next(i for i, text in enumerate(found) if step in text) for step in steps]
    assert positions == sorted(positions), dict(zip(steps, positions, strict=True))
    init = next(text for text in found if '"$H" init' in text)
    assert "--name" in init
    assert "--country" in init
    assert "--tls-cert" in next(text for text in found if "registry run" in text)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_running_it_for_real_runs_as_written(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "tls", "127.0.0.1")
    assert {p.name for p in (pki.ca, pki.cert, pki.key)} == {
        "ca.pem",
        "registry.pem",
        "registry.key",
    }  # the names the README gives them
    overrides = {
        "H": str(tmp_path / "hospital"),
        "C": str(tmp_path / "consultant"),
        "LISTEN": "127.0.0.1",
        "REGISTRY_HOST": "127.0.0.1",
        "REGISTRY_PORT": str(free_port()),
        "REGISTRY_DB": str(tmp_path / "registry" / "registry.sqlite"),
        "TLS": str(tmp_path / "tls"),
        "DICOM": str(tmp_path / "dicom-in"),
        "RADMESH_PASSPHRASE": "readme walk-through passphrase",
    }
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "EDITOR": _editor(tmp_path),
    }
    walk = Walkthrough(tmp_path, env, overrides)
    try:
        for command in commands(sh_blocks(section(README.read_text()))):
            walk.run(command)
    finally:
        walk.stop()
    said = "\n".join(walk.transcript)
    # What the walk-through promises, end to end: verified peers, the study UID found,
    # a report signed, back at the hospital, acknowledged and exported.
    assert env["STUDY"].startswith(("1.", "2."))
    assert len(env["CONSULT"]) == 32
    assert "Study of consult" in said
    assert "received and stored" in said
    assert "Report of consult" in said
    assert "signed and" in said
    assert "Acute left subdural haematoma" in said  # `consult show` at the hospital
    assert "acknowledged by Dr Sean Murphy" in said
    assert (tmp_path / "report.html").stat().st_size > 0
    config = (tmp_path / "consultant" / "config.toml").read_text()
    assert 'display_name = "Dr A. Okafor"' in config
