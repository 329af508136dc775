"""`radmesh registry run|add|publish`, `radmesh peers`, `radmesh trust` as a user runs them."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.identity import NodeId
from node.cli import main
from node.core.children import die_with_parent
from tests.registry.test_records import ALICE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry_url(tmp_path: Path) -> Iterator[str]:
    """The real `radmesh registry run` in its own process on 127.0.0.1."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "registry",
            "run",
            "--port",
            "0",
            "--db",
            str(tmp_path / "reg.db"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(),  # no orphan registry if the test run is killed
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _init(home: Path, name: str, subs: str, capsys: pytest.CaptureFixture[str]) -> NodeId:
    args = [
        "--home",
        str(home),
        "init",
        "--no-passphrase",
        "--name",
        name,
        "--subspecialties",
        subs,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    return NodeId.parse(
        next(x for x in out.splitlines() if x.startswith("Node id:")).split(":", 1)[1]
    )


@pytest.mark.slow
def test_publish_search_show_verify_revoke_through_a_real_registry(
    tmp_path: Path, registry_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _init(a, "Dr Referrer", "general", capsys)
    b_id = _init(b, "Dr Neuro", "neuro", capsys)
    for home in (a, b):
        assert main(["--home", str(home), "registry", "add", registry_url]) == 0
    assert (
        main(["--home", str(b), "registry", "publish", "--endpoint", "lan:http://127.0.0.1:7401"])
        == 0
    )
    assert "published" in capsys.readouterr().out

    assert main(["--home", str(a), "peers", "search", "--subspecialty", "neuro", "--online"]) == 0
    out = capsys.readouterr().out
    assert b_id.short() in out
    assert "Dr Neuro" in out
    assert "1 peer(s) found" in out
    assert main(["--home", str(a), "peers", "search", "--subspecialty", "msk"]) == 0
    assert "0 peer(s) found" in capsys.readouterr().out

    assert main(["--home", str(a), "peers", "show", str(b_id)]) == 0
    out = capsys.readouterr().out
    assert "lan:http://127.0.0.1:7401" in out
    assert "Trust:          unknown" in out

    assert main(["--home", str(a), "trust", "verify", str(b_id)]) == 1  # not a TTY: not confirmed
    assert "Safety number:" in capsys.readouterr().out
    assert main(["--home", str(a), "trust", "verify", str(b_id), "--yes"]) == 0
    capsys.readouterr()
    assert main(["--home", str(a), "peers", "list"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["--home", str(a), "trust", "revoke", str(b_id)]) == 0
    capsys.readouterr()
    assert main(["--home", str(a), "peers"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["--home", str(a), "trust", "allow", str(b_id)]) == 1  # revocation is final
    assert "revoked" in capsys.readouterr().err


def test_registry_add_and_trust_org_add_validate_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "n"
    _init(home, "N", "", capsys)
    assert main(["--home", str(home), "registry", "add", "ftp://x"]) == 1
    assert "http://" in capsys.readouterr().err
    assert main(["--home", str(home), "registry", "add", "http://127.0.0.1:9/"]) == 0
    assert main(["--home", str(home), "registry", "add", "http://127.0.0.1:9"]) == 0
    assert "already configured" in capsys.readouterr().out
    assert main(["--home", str(home), "trust", "org", "add", "zz"]) == 1
    assert main(["--home", str(home), "trust", "org", "add", ALICE.public_key.hex()]) == 0
    # An unreachable registry is reported, known peers still listed.
    assert main(["--home", str(home), "peers", "search"]) == 0
    assert "0 peer(s) found" in capsys.readouterr().out


def test_the_short_id_peers_prints_is_accepted_and_an_ambiguous_one_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _init(a, "Dr Referrer", "general", capsys)
    b_id = _init(b, "Dr Neuro", "neuro", capsys)
    assert main(["--home", str(a), "trust", "allow", str(b_id)]) == 0
    capsys.readouterr()
    short = b_id.short()  # what `peers list` and `peers search` print first on each line
    assert len(short) == 7

    assert main(["--home", str(a), "trust", "verify", short, "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"Peer:      {b_id}" in out
    assert f"{short} is now verified." in out
    assert main(["--home", str(a), "id", "--peer", short.lower()]) == 0
    assert f"Peer id: {b_id}" in capsys.readouterr().out
    assert main(["--home", str(a), "peers", "show", short]) == 1  # resolved, no record held
    assert f"No record for {b_id}" in capsys.readouterr().err

    # Two known ids that start alike: the prefix names neither, and the message lists both.
    twins = [NodeId(b_id.digest[:8] + bytes([i]) * 24) for i in (1, 2)]
    assert twins[0].short() == twins[1].short() == short
    monkeypatch.setattr("node.cli.peers.known_ids", lambda home: twins)
    assert main(["--home", str(a), "trust", "verify", short, "--yes"]) == 1
    err = capsys.readouterr().err
    assert f"2 known peers' ids start with {short}" in err
    assert str(twins[0]) in err
    assert str(twins[1]) in err
    monkeypatch.setattr("node.cli.peers.known_ids", lambda home: [])
    assert main(["--home", str(a), "peers", "show", short]) == 1
    assert f"no known peer's id starts with {short}" in capsys.readouterr().err
