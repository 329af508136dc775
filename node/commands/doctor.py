"""``radmesh doctor``: check this machine and node, and say what to fix."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import stat
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crypto import keyfile
from crypto.errors import CryptoError
from node.commands.identity import home_of
from node.config import NodeConfig, NodeHome
from node.errors import NodeError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _home(home: NodeHome) -> tuple[Check, NodeConfig | None]:
    try:
        config = home.load_config()
    except NodeError as exc:
        return Check("node home", False, str(exc), "run `radmesh init`"), None
    return Check("node home", True, f"{home.root} ({config.display_name})"), config


def _key(home: NodeHome) -> Check:
    try:
        data = home.key_path.read_bytes()
        encrypted = keyfile.is_encrypted(data)
    except (OSError, CryptoError) as exc:
        return Check("identity key", False, str(exc), "run `radmesh init`")
    mode = stat.S_IMODE(home.key_path.stat().st_mode)
    if mode & 0o077:
        return Check(
            "identity key",
            False,
            f"readable by others (mode {mode:o})",
            f"chmod 600 {home.key_path}",
        )
    if not encrypted:
        return Check(
            "identity key",
            True,
            "stored without passphrase (opt-out, mode 0600)",
            "re-run `radmesh init --force` with a passphrase unless the disk is encrypted",
            required=False,
        )
    return Check("identity key", True, "encrypted with a passphrase (Argon2id)")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _dicom(config: NodeConfig) -> Check:
    d = config.dicom
    if not d.enabled:
        return Check(
            "DICOM listener",
            True,
            "disabled in config",
            "set [dicom] enabled = true to receive from the PACS",
            required=False,
        )
    if not d.allowed_calling_aets:
        return Check(
            "DICOM listener",
            False,
            "no calling AE titles allowed: the PACS will be refused",
            "add the PACS AE title to [dicom] allowed_calling_aets",
        )
    if not _port_free(d.host, d.port):
        return Check(
            "DICOM listener",
            False,
            f"port {d.host}:{d.port} is in use",
            "stop the other program or change [dicom] port (a running node uses it too)",
        )
    return Check("DICOM listener", True, f"{d.ae_title} on {d.host}:{d.port}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A registry is untrusted: its 302 must not send this machine anywhere else."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None  # urllib then raises HTTPError for the 3xx itself


def _registry_reachable(url: str) -> Check:
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(  # the operator's own configured registry, redirects refused
            url.rstrip("/") + "/v1/health", timeout=3
        ) as response:
            ok = response.status == 200
    except (OSError, ValueError) as exc:
        return Check(
            f"registry {url}",
            False,
            f"unreachable: {exc}",
            "check the URL and the network; known peers stay reachable meanwhile",
            required=False,
        )
    return Check(f"registry {url}", ok, "answers /v1/health" if ok else "unhealthy", required=False)


def _network(config: NodeConfig) -> list[Check]:
    n = config.network
    checks = [
        Check(
            "registries",
            bool(n.registries),
            ", ".join(n.registries) if n.registries else "none configured",
            "add one with `radmesh registry add URL`, or rely on mDNS on the LAN",
            required=False,
        ),
        Check(
            "ICE servers (STUN/TURN)",
            bool(n.ice_servers),
            ", ".join(n.ice_servers) if n.ice_servers else "none: direct paths only",
            "add a TURN server (coturn), or use a registry that offers one (started with "
            "--turn-secret: nodes take its credentials by themselves)",
            required=False,
        ),
        Check(
            "mDNS",
            n.mdns,
            "enabled" if n.mdns else "disabled",
            "set [network] mdns = true to find peers on the LAN",
            required=False,
        ),
    ]
    checks.extend(_registry_reachable(url) for url in n.registries)
    return checks


def _tools() -> list[Check]:
    uvloop = importlib.util.find_spec("uvloop") is not None
    term = os.environ.get("TERM", "")
    graphics = (
        "kitty" in term or os.environ.get("KITTY_WINDOW_ID") or "WEZTERM" in "".join(os.environ)
    )
    checks = [
        Check(
            "uvloop",
            uvloop,
            "installed (faster data channels)" if uvloop else "not installed",
            "pip install uvloop (about 1.6x faster transfers)",
            required=False,
        ),
        Check(
            "terminal",
            sys.stdout.isatty(),
            f"TERM={term or '?'}; "
            + ("kitty graphics likely" if graphics else "half-block rendering"),
            "use a truecolor terminal (kitty, WezTerm, iTerm2) for full-resolution images",
            required=False,
        ),
    ]
    for tool, package in (("storescu", "dcmtk"), ("Orthanc", "orthanc"), ("turnserver", "coturn")):
        found = shutil.which(tool)
        checks.append(
            Check(
                f"{tool}",
                bool(found),
                found or "not found",
                f"optional: apt-get install {package}",
                required=False,
            )
        )
    return checks


def run_checks(home: NodeHome) -> list[Check]:
    home_check, config = _home(home)
    checks = [home_check]
    if config is not None:
        checks.append(_key(home))
        checks.append(_dicom(config))
        checks.extend(_network(config))
    checks.extend(_tools())
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(home_of(args))
    print_line: Callable[[str], None] = print
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print_line(f"[{mark}] {check.name}: {check.detail}")
        if check.fix and (not check.ok or "opt-out" in check.detail):
            print_line(f"       fix: {check.fix}")
    failed = [c for c in checks if c.required and not c.ok]
    print_line("all required checks passed" if not failed else f"{len(failed)} problem(s) to fix")
    return 1 if failed else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine and node and say what to fix",
        description="Check identity, key file, ports, DICOM, network, tools.",
    )
    p.set_defaults(handler=cmd_doctor)
