"""``radmesh doctor``: check this machine and node, and say what to fix."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import socket
import sqlite3
import stat
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crypto import keyfile
from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.org import CERT_TYPE, NodeCertificate
from node.app import control
from node.cli.identity import home_of
from node.core.audit import audit_state
from node.core.config import CONFIG_NAME, NodeConfig, NodeHome
from node.core.errors import NodeError
from node.core.private import loose_modes, tighten
from node.core.sequence import RecordSequence

PACS_TIMEOUT = 5.0  # seconds for the C-ECHO of the configured PACS
MODES_SHOWN = 5  # loose paths named in the report; the fix covers all
DEFAULT_NAME = NodeConfig().display_name  # "radmesh node": what `init` gives without --name


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


def running_node(home: NodeHome) -> dict[str, Any] | None:
    """What this home's running node says of itself (``status.get``), or None if none runs."""
    try:
        found, result = asyncio.run(control.ask_running(home, "status.get", {}, lambda _: None))
    except (NodeError, OSError):
        return None
    return result if found and isinstance(result, dict) else None


def _dicom(config: NodeConfig, running: dict[str, Any] | None = None) -> Check:
    d = config.dicom
    if not d.enabled:
        return Check(
            "DICOM listener",
            True,
            "disabled in config",
            "set [dicom] enabled = true to receive from the PACS",
            required=False,
        )
    if not (d.allowed_calling_aets or d.allowed):
        return Check(
            "DICOM listener",
            False,
            "no calling AE titles allowed: the PACS will be refused",
            'add the PACS to [dicom] allowed = ["PACSAE@its.ip.address"]',
        )
    if not _port_free(d.host, d.port) and running is not None and running.get("dicom"):
        return Check(
            "DICOM listener",
            True,
            f"{d.host}:{d.port} is held by this home's running node ({running['dicom']})",
        )
    if not _port_free(d.host, d.port):
        return Check(
            "DICOM listener",
            False,
            f"port {d.host}:{d.port} is in use",
            "stop the other program or change [dicom] port (a running node uses it too)",
        )
    return Check("DICOM listener", True, f"{d.ae_title} on {d.host}:{d.port}")


def _pacs(config: NodeConfig) -> Check:
    """C-ECHO the configured PACS from this node's AE title, as sending a study would."""
    d = config.dicom
    if not (d.pacs_host and d.pacs_port and d.pacs_ae_title):
        return Check(
            "PACS",
            True,
            "none configured: reports and studies are not sent back by DICOM",
            "set [dicom] pacs_host, pacs_port and pacs_ae_title to the hospital PACS",
            required=False,
        )
    from node.dicom.net import DicomNetError, echo  # pynetdicom: only when there is a PACS

    where = f"{d.pacs_ae_title}@{d.pacs_host}:{d.pacs_port}"
    try:
        status = echo(d.pacs_host, d.pacs_port, d.pacs_ae_title, d.ae_title, timeout=PACS_TIMEOUT)
    except DicomNetError as exc:
        return Check(
            "PACS",
            False,
            f"C-ECHO to {where} failed: {exc}",
            "check that the PACS runs and listens there, and that it knows this node's AE "
            f"title {d.ae_title} and address; then fix [dicom] pacs_* in the config",
        )
    if status != 0:
        return Check(
            "PACS",
            False,
            f"C-ECHO to {where} answered status 0x{status:04X}",
            f"ask the PACS administrator to allow AE title {d.ae_title} from this machine",
        )
    return Check("PACS", True, f"{where} answers C-ECHO")


def _profile(config: NodeConfig) -> list[Check]:
    """What peers see of this node, and where it listens: defaults said out loud."""
    checks = []
    if config.display_name.strip() in ("", DEFAULT_NAME):
        checks.append(
            Check(
                "display name",
                False,
                f"still the default {DEFAULT_NAME!r}: peers cannot tell this node from others",
                f"set display_name in {CONFIG_NAME} (e.g. 'St. Brigid's CT')",
                required=False,
            )
        )
    if not config.country.strip():
        checks.append(
            Check(
                "country",
                False,
                "empty: consultants cannot see which jurisdiction this node is in",
                f"set country in {CONFIG_NAME} (a code such as IE)",
                required=False,
            )
        )
    for what, host in (
        ("network listener", config.network.listen_host),
        ("DICOM listener address", config.dicom.host if config.dicom.enabled else ""),
    ):
        if host in ("0.0.0.0", "::"):  # noqa: S104 - the value is what we warn about
            checks.append(
                Check(
                    what,
                    False,
                    f"bound to {host}: every interface, including any facing the internet",
                    "set it to the hospital-network address of this machine",
                    required=False,
                )
            )
    return checks


def _dicom_senders(config: NodeConfig) -> Check:
    """AE titles allowed from any address are a password sent in clear: say so when the
    listener is reachable from the network."""
    d = config.dicom
    loopback = d.host in ("127.0.0.1", "::1", "localhost")
    if not d.enabled or loopback or not d.allowed_calling_aets:
        return Check("DICOM senders", True, "each allowed by AE title and address")
    return Check(
        "DICOM senders",
        False,
        f"{', '.join(d.allowed_calling_aets)} may send from any address that reaches "
        f"{d.host}:{d.port}",
        'pin each to the PACS address: [dicom] allowed = ["PACSAE@10.0.0.5"] in place of '
        "allowed_calling_aets",
        required=False,
    )


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


def _modes(home: NodeHome) -> Check:
    """Other local users must not read the home (clinical questions, trust, audit)."""
    loose = loose_modes(home.root)
    if not loose:
        return Check("home permissions", True, "directories 0700, files 0600")
    shown = "; ".join(str(item) for item in loose[:MODES_SHOWN])
    more = f" and {len(loose) - MODES_SHOWN} more" if len(loose) > MODES_SHOWN else ""
    return Check(
        "home permissions",
        False,
        f"{len(loose)} path(s) readable or writable beyond their owner: {shown}{more}",
        f"radmesh doctor --fix (sets them 0700/0600), or chmod -R go-rwx {home.root}",
    )


AUDIT_STALE_AFTER = 600  # seconds: unsigned records older than a running node leaves them


def _audit(home: NodeHome, now: float) -> Check:
    """The audit log against its signed high-water mark, and how old its last signature is."""
    try:
        state = audit_state(home)
    except sqlite3.Error as exc:
        return Check("audit log", False, f"cannot be read: {exc}", "run `radmesh audit verify`")
    if state.problem is not None:
        return Check(
            "audit log",
            False,
            state.problem,
            "run `radmesh audit verify`, keep a copy of the data folder and tell your "
            "security officer",
        )
    if state.records == 0:
        return Check("audit log", True, "no records yet")
    age = None if state.last_checkpoint_ms is None else now - state.last_checkpoint_ms / 1000
    signed = "never" if age is None else f"{age / 60:.0f} min ago"
    detail = (
        f"{state.records} record(s), last checkpoint {signed}, high-water mark at record "
        f"{state.high_water if state.high_water is not None else '-'}"
    )
    if state.unsigned and (age is None or age > AUDIT_STALE_AFTER):
        return Check(
            "audit log",
            False,
            f"{detail}; {state.unsigned} record(s) not signed",
            "start the node (`radmesh node run`): it signs within a minute and on stop",
            required=False,
        )
    return Check("audit log", True, detail)


CERT_RENEW_DAYS = 30  # warn this long before the organisation certificate expires
MAX_CERT_FILE = 64 * 1024
SEQUENCE_AHEAD = 24 * 3600  # a record sequence this far past the clock was not signed in seconds


def _certificate(home: NodeHome, now: float) -> Check:
    """The organisation certificate this node publishes (`radmesh org install`), if any."""
    path = home.cert_path
    if not path.exists():
        return Check(
            "organisation certificate",
            True,
            "none: peers trust this node only after comparing its safety number",
            required=False,
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CERT_FILE + 1)
        if len(data) > MAX_CERT_FILE:
            raise CryptoError(f"it is larger than {MAX_CERT_FILE} bytes")
        envelope = SignedEnvelope.from_wire(data)
        cert = NodeCertificate.from_body(envelope.verify(CERT_TYPE))
        if envelope.signer != cert.org_key:
            raise CryptoError("it is signed by a key other than the organisation it names")
    except (OSError, CryptoError) as exc:
        return Check(
            "organisation certificate",
            False,
            f"{path} is unusable: {exc}",
            "ask the organisation for a new one and run `radmesh org install CERT`",
        )
    days = (cert.not_after - now) / 86400
    detail = (
        f"for node {cert.node_id.short()} ({cert.institution or 'no institution'}), "
        f"valid until {time.strftime('%Y-%m-%d', time.gmtime(cert.not_after))}"
    )
    if days <= 0:
        return Check(
            "organisation certificate",
            False,
            f"expired: {detail}",
            "ask the organisation to issue a new one, then `radmesh org install CERT`",
        )
    if now < cert.not_before:
        return Check(
            "organisation certificate", False, f"not valid yet: {detail}", "check the clock"
        )
    if days < CERT_RENEW_DAYS:
        return Check(
            "organisation certificate",
            False,
            f"expires in {days:.0f} day(s): {detail}",
            "ask the organisation to renew it",
            required=False,
        )
    return Check("organisation certificate", True, f"{detail}; compare the node with `radmesh id`")


def _sequence(home: NodeHome, now: float) -> Check:
    """The one record sequence every publisher of this home signs with (node.core.sequence)."""
    value = RecordSequence(home).current()
    if value == 0:
        return Check("record sequence", True, "nothing published yet")
    if value > now + SEQUENCE_AHEAD:
        return Check(
            "record sequence",
            False,
            f"{value} is {(value - now) / 86400:.0f} day(s) ahead of the clock",
            "nothing to do if the node runs: it signs past it and registries keep its records; "
            "check the clock if this grows",
            required=False,
        )
    return Check("record sequence", True, f"{value} (one sequence for every publisher)")


def retention_line(home: NodeHome, config: NodeConfig, now: int) -> str:
    """Studies held for consults, how many due, the next purge (`doctor`, `status`)."""
    from consult.store import DB_NAME, ConsultDB
    from node.app.retention import summary_for

    if not (home.data_dir / DB_NAME).exists():
        return "no consults on this node yet"
    with ConsultDB.in_data_dir(home.data_dir) as db:
        days = config.retention.days
        return summary_for(db, home.data_dir, now, days).line(days, now)


def _retention(home: NodeHome, config: NodeConfig) -> Check:
    try:
        return Check("retention", True, retention_line(home, config, int(time.time())))
    except (OSError, sqlite3.Error, NodeError) as exc:
        return Check("retention", False, f"cannot be read: {exc}", required=False)


def run_checks(home: NodeHome) -> list[Check]:
    home_check, config = _home(home)
    checks = [home_check]
    if config is not None:
        checks.append(_modes(home))
        checks.append(_key(home))
        checks.append(_audit(home, time.time()))
        checks.append(_certificate(home, time.time()))
        checks.append(_sequence(home, time.time()))
        checks.append(_retention(home, config))
        checks.extend(_profile(config))
        checks.append(_dicom(config, running_node(home)))
        checks.append(_dicom_senders(config))
        checks.append(_pacs(config))
        checks.extend(_network(config))
    checks.extend(_tools())
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    home = home_of(args)
    print_line: Callable[[str], None] = print
    if args.fix and home.root.is_dir():
        fixed = tighten(home.root)
        print_line(f"set {len(fixed)} path(s) under {home.root} to 0700/0600")
    checks = run_checks(home)
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
        description="Check identity, key file, home permissions, ports, DICOM, network, tools.",
    )
    p.add_argument(
        "--fix",
        action="store_true",
        help="first set everything under the home to 0700 (directories) / 0600 (files)",
    )
    p.set_defaults(handler=cmd_doctor)
