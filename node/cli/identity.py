"""``radmesh init``, ``radmesh id`` and ``radmesh org ...``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crypto.envelope import SignedEnvelope
from crypto.identity import Identity, NodeId
from crypto.org import (
    REVOCATION_TYPE,
    NodeCertificate,
    RevocationList,
    issue_certificate,
    sign_revocations,
    verify_certificate,
    verify_revocations,
)
from crypto.safety import safety_number
from node.core.config import NodeConfig, NodeHome, resolve_home
from node.core.countries import parse_countries, parse_country
from node.core.errors import ConfigError, HomeError, KeyFileError
from node.core.keystore import PASSPHRASE_ENV, load_identity, save_identity
from registry.trust import TrustStore

ORG_KEY_NAME = "org.key"
CERT_NAME = "node.cert"
MAX_ORG_FILE = 1 << 20  # certificates and revocation lists are read up to this size
MAX_NAME = 128  # registry.records.MAX_TEXT: what a signed record carries
DEFAULT_NAME = NodeConfig().display_name  # what peers see when init was given no --name


def home_of(args: argparse.Namespace) -> NodeHome:
    return NodeHome(resolve_home(args.home))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _new_passphrase(args: argparse.Namespace) -> str | None:
    if args.no_passphrase:
        return None
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise KeyFileError(
            f"no passphrase: set {PASSPHRASE_ENV}, run interactively, or pass --no-passphrase "
            "to store the key unencrypted (0600)"
        )
    first = getpass.getpass("New key file passphrase: ")
    if first != getpass.getpass("Repeat passphrase: "):
        raise KeyFileError("the two passphrases differ; run `radmesh init` again")
    if not first:
        raise KeyFileError("empty passphrase; use --no-passphrase to opt out explicitly")
    return first


PROMPT_TRIES = 3


def _ask(question: str, parse: Callable[[str], str]) -> str:
    """Ask on the terminal until ``parse`` accepts the answer (a few tries)."""
    for attempt in range(PROMPT_TRIES):
        answer = input(question).strip()
        try:
            return parse(answer)
        except ConfigError as exc:
            if attempt == PROMPT_TRIES - 1:
                raise
            print(f"  {exc}")
    raise AssertionError("unreachable")


def _display_name(text: str) -> str:
    name = " ".join(text.split())
    if not name:
        raise ConfigError('a display name is needed: what peers see, e.g. "St. Brigid\'s CT"')
    if len(name) > MAX_NAME:
        raise ConfigError(f"a display name has at most {MAX_NAME} characters")
    return name


def _profile(args: argparse.Namespace) -> tuple[str, str]:
    """The display name and country: given, asked for on a terminal, else the defaults
    (which `init` then warns about)."""
    interactive = sys.stdin.isatty()
    name, country = args.name, args.country
    if name is None:
        name = (
            _ask(
                'Display name peers see (a person or a department, e.g. "Dr A. Okafor" or '
                '"St. Brigid\'s CT"): ',
                _display_name,
            )
            if interactive
            else DEFAULT_NAME
        )
    else:
        name = _display_name(name)
    if country is None:
        country = (
            _ask("Country the node works in (ISO 3166 code, e.g. IE): ", parse_country)
            if interactive
            else ""
        )
    else:
        country = parse_country(country)
    return name, country


def cmd_init(args: argparse.Namespace) -> int:
    home = home_of(args)
    if home.key_path.exists() and not args.force:
        raise HomeError(f"{home.root} already has an identity; use --force to replace it")
    jurisdictions = parse_countries(args.jurisdictions)
    name, country = _profile(args)
    config = NodeConfig(
        display_name=name,
        institution=args.institution,
        country=country,
        roles=_csv(args.roles),
        subspecialties=_csv(args.subspecialties),
        jurisdictions=jurisdictions,
        languages=_csv(args.languages) or ["en"],
    )
    if args.listen:  # default: loopback only, until the site names its address
        config.network.listen_host = config.dicom.host = args.listen
    config.network.mdns = not args.no_mdns
    identity = Identity.generate()
    save_identity(home.key_path, identity, _new_passphrase(args))
    home.save_config(config)
    print(f"Initialised radmesh node in {home.root}")
    print(f"Node id: {identity.node_id}")
    missing = [
        problem
        for problem, wanted in (
            (f'the display name is the default "{DEFAULT_NAME}" (--name)', name == DEFAULT_NAME),
            ("no country is set (--country, e.g. IE)", not country),
        )
        if wanted
    ]
    if missing:
        print(
            f"Warning: {'; '.join(missing)}. Peers see the name on every request, chat line "
            "and signed report, and a consult request needs the patient's country: set "
            f"display_name / country in {home.config_path} (or run init again with --force).",
            file=sys.stderr,
        )
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    identity = load_identity(home.key_path)
    print(f"Node id: {identity.node_id}")
    if args.peer:
        from node.cli.peers import known_ids, resolve_id  # peers imports this module

        peer_id = resolve_id(args.peer, known_ids(home))  # the short id `peers` prints too
        print(f"Peer id: {peer_id}")
        print(f"Safety number: {safety_number(identity.node_id, peer_id)}")
        print("Read it aloud with the other side: the numbers must match exactly.")
    if args.show_key:
        print(f"Public key: {identity.public_key.hex()}")
    return 0


def _org_identity(args: argparse.Namespace) -> Identity:
    path = Path(args.org_dir) / ORG_KEY_NAME
    return load_identity(path)


def cmd_org_init(args: argparse.Namespace) -> int:
    directory = Path(args.org_dir)
    path = directory / ORG_KEY_NAME
    if path.exists() and not args.force:
        raise HomeError(f"{path} already exists; use --force to replace it")
    org = Identity.generate()
    save_identity(path, org, _new_passphrase(args))
    (directory / "org.pub").write_text(org.public_key.hex() + "\n")
    print(f"Organisation key created in {directory}")
    print(f"Organisation public key: {org.public_key.hex()}")
    return 0


def cmd_org_sign(args: argparse.Namespace) -> int:
    org = _org_identity(args)
    node_key = bytes.fromhex(args.node_key)
    now = int(time.time())
    cert = NodeCertificate(
        node_key=node_key,
        org_key=org.public_key,
        institution=args.institution,
        display_name=args.name,
        roles=tuple(_csv(args.roles)),
        subspecialties=tuple(_csv(args.subspecialties)),
        jurisdictions=tuple(_csv(args.jurisdictions)),
        languages=tuple(_csv(args.languages)),
        not_before=now,
        not_after=now + args.days * 86400,
    )
    data = issue_certificate(org, cert)
    Path(args.out).write_bytes(data)
    print(f"Certificate for {NodeId.from_public_key(node_key)} written to {args.out}")
    print(f"Serial: {cert.serial.hex()}  valid {args.days} days")
    return 0


def cmd_org_revoke(args: argparse.Namespace) -> int:
    org = _org_identity(args)
    list_path = Path(args.org_dir) / "revocations.bin"
    previous = (
        verify_revocations(list_path.read_bytes(), org.public_key) if list_path.exists() else None
    )
    serials = set(previous.revoked_serials) if previous else set()
    nodes = set(previous.revoked_node_keys) if previous else set()
    for cert_path in args.cert:
        cert = _load_cert_unchecked(Path(cert_path))
        if cert.org_key != org.public_key:
            raise HomeError(f"{cert_path} was not issued by this organisation")
        serials.add(cert.serial)
    nodes.update(bytes.fromhex(key) for key in args.node_key)
    listing = RevocationList(
        org.public_key,
        (previous.sequence + 1) if previous else 1,
        int(time.time()),
        frozenset(serials),
        frozenset(nodes),
    )
    list_path.write_bytes(sign_revocations(org, listing))
    print(
        f"Revocation list #{listing.sequence} written to {list_path}: "
        f"{len(serials)} certificate(s), {len(nodes)} node key(s) revoked"
    )
    return 0


def cmd_org_install(args: argparse.Namespace) -> int:
    """Node side: keep this node's certificate in its home; the node publishes it in its
    record, and peers that trust the organisation then trust this node."""
    home = home_of(args)
    home.require()
    me = load_identity(home.key_path)
    with open(args.cert, "rb") as handle:
        data = handle.read(MAX_ORG_FILE)
    issued = _load_cert_unchecked(Path(args.cert))
    if issued.node_key != me.public_key:
        raise HomeError(
            f"{args.cert} was issued to node {issued.node_id.short()}, not to this node "
            f"({me.node_id.short()}): install it in that node's home"
        )
    # Signed by the organisation it names, for this key, valid now (not against our trust).
    verify_certificate(
        data, trusted_orgs={issued.org_key}, now=int(time.time()), node_key=me.public_key
    )
    tmp = home.cert_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(home.cert_path)
    print(f"Certificate from organisation {issued.org_key.hex()[:16]}… installed in {home.root}")
    print("The node publishes it in its record (a running node at once).")
    return 0


def cmd_org_revocations_install(args: argparse.Namespace) -> int:
    """Node side: apply an organisation's signed revocation list (`radmesh org revoke`
    output). A running node closes the revoked nodes' connections at once."""
    home = home_of(args)
    home.require()
    with open(args.file, "rb") as handle:
        data = handle.read(MAX_ORG_FILE)
    envelope = SignedEnvelope.from_wire(data)
    envelope.verify(REVOCATION_TYPE)
    home.data_dir.mkdir(parents=True, exist_ok=True)
    trust = TrustStore(home.trust_db)
    try:
        if envelope.signer not in trust.trusted_orgs():
            raise HomeError(
                f"this node does not trust organisation {envelope.signer.hex()[:16]}…, so its "
                "revocation list changes nothing here (`radmesh trust org add KEY` first)"
            )
        listing = trust.add_revocations(data, envelope.signer)
    finally:
        trust.close()
    print(
        f"Revocation list #{listing.sequence} applied: {len(listing.revoked_serials)} "
        f"certificate(s), {len(listing.revoked_node_keys)} node key(s) revoked, effective now"
    )
    return 0


def _load_cert_unchecked(path: Path) -> NodeCertificate:
    from crypto.envelope import SignedEnvelope
    from crypto.org import CERT_TYPE

    return NodeCertificate.from_body(SignedEnvelope.from_wire(path.read_bytes()).verify(CERT_TYPE))


def _add_profile(parser: argparse.ArgumentParser, *, name_default: str | None) -> None:
    parser.add_argument(
        "--name",
        default=name_default,
        help="display name peers see (init: asked for on a terminal)",
    )
    parser.add_argument("--institution", default="", help="institution name")
    parser.add_argument("--roles", default="", help="comma-separated roles")
    parser.add_argument("--subspecialties", default="", help="comma-separated subspecialties")
    parser.add_argument("--jurisdictions", default="", help="comma-separated licence countries")
    parser.add_argument("--languages", default="en", help="comma-separated languages")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="create a node identity and configuration",
        description="Create a node identity and configuration in the home.",
    )
    _add_profile(p, name_default=None)
    p.add_argument(
        "--country",
        default=None,
        help="where the node works, ISO 3166 alpha-2 (e.g. IE); asked for on a terminal",
    )
    p.add_argument(
        "--no-passphrase",
        action="store_true",
        help="store the key unencrypted (0600); for servers with disk encryption",
    )
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.add_argument(
        "--listen",
        metavar="ADDRESS",
        default="",
        help="address the LAN endpoint and DICOM listener bind to (default 127.0.0.1, this "
        "machine only; give the hospital-network address, or 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--no-mdns",
        action="store_true",
        help="neither announce this node nor look for peers on the local network (mDNS): "
        "a node reached through registries only, e.g. a consultant away from the hospital",
    )
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser(
        "id",
        help="show this node's id, or the safety number with a peer",
        description="Show this node's id; with --peer ID, the safety number with that peer.",
    )
    p.add_argument("--peer", metavar="ID", help="peer node id: print the pair's safety number")
    p.add_argument("--show-key", action="store_true", help="also print the public key")
    p.set_defaults(handler=cmd_id)

    org = sub.add_parser(
        "org",
        help="organisation keys: init, sign, revoke; install a certificate or revocation list",
        description="Manage an organisation key that certifies member nodes.",
    )
    org_sub = org.add_subparsers(dest="org_command", metavar="ORG_COMMAND", required=True)
    p = org_sub.add_parser("init", help="create an organisation key")
    p.add_argument("org_dir", help="directory for the organisation key")
    p.add_argument("--no-passphrase", action="store_true", help="store the key unencrypted")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=cmd_org_init)
    p = org_sub.add_parser("sign", help="issue a certificate for a member node")
    p.add_argument("org_dir")
    p.add_argument("node_key", help="the member node's public key (hex)")
    _add_profile(p, name_default="")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.add_argument("--out", default=CERT_NAME, help="where to write the certificate")
    p.set_defaults(handler=cmd_org_sign)
    p = org_sub.add_parser("revoke", help="revoke certificates or node keys")
    p.add_argument("org_dir")
    p.add_argument("--cert", action="append", default=[], help="certificate file to revoke")
    p.add_argument("--node-key", action="append", default=[], help="node public key (hex)")
    p.set_defaults(handler=cmd_org_revoke)
    p = org_sub.add_parser(
        "install", help="install this node's certificate (published in its record)"
    )
    p.add_argument("cert", help="the certificate `radmesh org sign` wrote for this node")
    p.set_defaults(handler=cmd_org_install)
    p = org_sub.add_parser("revocations", help="apply an organisation's revocation list here")
    rsub = p.add_subparsers(dest="revocations_command", metavar="COMMAND", required=True)
    p = rsub.add_parser("install", help="apply a signed list (`radmesh org revoke` output)")
    p.add_argument("file", help="revocations.bin from the organisation")
    p.set_defaults(handler=cmd_org_revocations_install)
