"""``radmesh peers``, ``radmesh trust ...`` and ``radmesh registry run|add|publish``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto.errors import InvalidNodeId
from crypto.identity import Identity, NodeId
from crypto.safety import safety_number
from node.app import control
from node.cli.identity import home_of
from node.cli.ids import known_ids, open_directory, open_trust, resolve_id
from node.core.audit import AuditKind, open_audit
from node.core.config import NodeConfig, NodeHome
from node.core.display import MAX_LINE_CHARS, MAX_NAME_CHARS, printable
from node.core.errors import ConfigError
from node.core.keystore import load_identity
from node.core.sequence import RecordSequence
from registry.errors import RegistryError, TrustError
from registry.own import CertificateFile, own_record
from registry.records import Availability, NodeRecord

if TYPE_CHECKING:
    from registry.client import MultiRegistry, SearchQuery
    from registry.directory import Peer


def _registries(config: NodeConfig) -> MultiRegistry:
    from registry.client import MultiRegistry, RegistryClient

    ca = config.network.registry_ca_file
    return MultiRegistry([RegistryClient(url, ca_file=ca) for url in config.network.registries])


def _now() -> int:
    return int(time.time())


def _line(peer: Peer) -> str:
    """One peer: the short id and trust state first, then what the peer says about itself
    (its name is only a claim: two records may carry the same one)."""
    r = peer.record
    stale = "" if peer.fresh else " (record expired: last known)"
    subs = printable(",".join(r.subspecialties), 20) or "-"
    return (
        f"{r.node_id.short()}  {peer.trust.value:<14} {printable(r.display_name, 28):<28} "
        f"{printable(r.institution, 24):<24} {subs:<20} {r.availability.value}{stale}"
    )


def _parse_id(text: str, home: NodeHome | None = None) -> NodeId:
    return resolve_id(text, known_ids(home) if home is not None else [])


def cmd_peers_list(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    directory = open_directory(home)
    peers = directory.list(_now())
    inbox = directory.trust.inbox()
    if not peers and not inbox:
        print("No known peers yet: `radmesh peers search --subspecialty neuro` asks registries.")
    for peer in peers:
        print(_line(peer))
    if inbox:
        print(f"\nInbox: {len(inbox)} first contact(s) waiting for you")
        for entry in inbox:
            print(f"  {entry.node_id}  {printable(entry.summary, MAX_LINE_CHARS)}")
        print("Check each with `radmesh trust verify ID`, or `radmesh trust allow ID`.")
    return 0


async def _search(home: NodeHome, config: NodeConfig, query: SearchQuery) -> list[Peer]:
    registries = _registries(config)
    try:
        return await open_directory(home, registries).search(query, _now())
    finally:
        await registries.close()


def cmd_peers_search(args: argparse.Namespace) -> int:
    from registry.client import SearchQuery

    home = home_of(args)
    config = home.load_config()
    query = SearchQuery(
        args.subspecialty, args.jurisdiction, args.language, args.online, args.on_call
    )
    if not config.network.registries:
        print("No registries configured (`radmesh registry add URL`); searching known peers.")
    peers = asyncio.run(_search(home, config, query))
    for peer in peers:
        print(_line(peer))
    print(f"{len(peers)} peer(s) found")
    return 0


async def _resolve(home: NodeHome, config: NodeConfig, node_id: NodeId) -> Peer | None:
    registries = _registries(config)
    try:
        return await open_directory(home, registries).resolve(node_id, _now())
    finally:
        await registries.close()


def cmd_peers_show(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = home.load_config()
    node_id = _parse_id(args.id, home)
    peer = asyncio.run(_resolve(home, config, node_id))
    if peer is None:
        print(f"No record for {node_id}: not in any registry nor remembered.", file=sys.stderr)
        return 1
    r = peer.record
    print(f"Node id:        {r.node_id}")
    print(f"Name:           {printable(r.display_name, MAX_LINE_CHARS)}  (as the peer says)")
    print(f"Institution:    {printable(f'{r.institution} ({r.country})', MAX_LINE_CHARS)}")
    print(f"Subspecialties: {printable(', '.join(r.subspecialties), MAX_LINE_CHARS)}")
    print(f"Licensed in:    {printable(', '.join(r.jurisdictions), MAX_LINE_CHARS)}")
    languages = printable(", ".join(r.languages), MAX_LINE_CHARS)
    print(f"Languages:      {languages}   time zone {printable(r.timezone, MAX_NAME_CHARS)}")
    print(f"Availability:   {r.availability.value}")
    print(f"Endpoints:      {printable(' '.join(r.endpoints), MAX_LINE_CHARS) or '-'}")
    print(f"Org cert:       {'yes' if r.org_certificate else 'no'}")
    print(f"Record:         seq {r.sequence}, expires {time.ctime(r.expires_at)} via {peer.source}")
    print(f"Trust:          {peer.trust.value}")
    return 0


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(prompt).strip().lower() in ("y", "yes")


def _audit_trust(
    home: NodeHome,
    event: str,
    peer: str | None,
    identity: Identity | None = None,
    **details: str | int,
) -> None:
    """A trust change is an audit record (who, what, which peer); signed on close.
    ``identity``: the node's, when the command has unlocked it already (asked once)."""
    identity = identity or load_identity(home.key_path)
    with open_audit(home, identity) as audit:
        audit.append(
            AuditKind.TRUST, now=time.time(), peer=peer, details={"event": event, **details}
        )


def cmd_trust_verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    me = load_identity(home.key_path)
    peer_id = _parse_id(args.id, home)
    print(f"This node: {me.node_id}")
    print(f"Peer:      {peer_id}")
    print(f"Safety number: {safety_number(me.node_id, peer_id)}")
    print("Read it aloud with the other side (phone or in person): it must match exactly.")
    if not (args.yes or _confirm("Does it match? [y/N] ")):
        print("Not verified. Nothing changed.")
        return 1
    open_trust(home).mark_verified(peer_id, _now(), method="safety-number")
    _audit_trust(home, "verify", str(peer_id), me, method="safety-number")
    print(f"{peer_id.short()} is now verified.")
    return 0


def cmd_trust_allow(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    try:
        peer_id = NodeId.parse(args.id)
    except InvalidNodeId as exc:
        raise InvalidNodeId(
            f"{exc}. `trust allow` trusts a key without any check, so it takes only the full "
            "node id; `radmesh trust verify` accepts the short one"
        ) from exc
    open_trust(home).mark_verified(peer_id, _now(), method="allowed")
    _audit_trust(home, "verify", str(peer_id), method="allowed")
    print(f"{peer_id.short()} allowed (trusted without a safety-number check).")
    return 0


def cmd_trust_revoke(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    peer_id = _parse_id(args.id, home)
    open_trust(home).revoke(peer_id, _now())
    _audit_trust(home, "revoke", str(peer_id))
    print(f"{peer_id.short()} revoked: nothing more is shared with it, effective now.")
    return 0


def cmd_trust_org_add(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    try:
        key = bytes.fromhex(args.org_key)
    except ValueError as exc:
        raise TrustError("an organisation key is 64 hex characters (see org.pub)") from exc
    open_trust(home).add_org(key, _now())
    _audit_trust(home, "org-add", None, org=key.hex())
    print(f"Trusting certificates from organisation {key.hex()[:16]}…")
    return 0


def cmd_trust_org_revocations(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.require()
    with open(args.file, "rb") as handle:
        data = handle.read(1 << 20)
    listing = open_trust(home).add_revocations(data, bytes.fromhex(args.org_key))
    _audit_trust(home, "org-revocations", None, org=args.org_key, sequence=listing.sequence)
    print(f"Revocation list #{listing.sequence} applied.")
    return 0


def cmd_registry_run(args: argparse.Namespace) -> int:
    from registry.server import (
        Limits,
        RegistryServer,
        TurnConfig,
        run_forever,
        server_tls_context,
    )

    turn = None
    if args.turn_secret:
        urls = tuple(u for u in (args.turn_url, args.stun_url) if u)
        if not urls:
            raise ConfigError("--turn-secret needs --turn-url (and optionally --stun-url)")
        try:
            orgs = frozenset(bytes.fromhex(key) for key in args.turn_org)
            turn = TurnConfig(args.turn_secret, urls, args.turn_ttl, orgs)
        except ValueError as exc:
            raise ConfigError(f"TURN settings: {exc} (--turn-org takes org.pub's hex)") from exc
    sockets = Limits().address_sockets if args.address_sockets is None else args.address_sockets
    if sockets < 1:
        raise ConfigError("--address-sockets must be at least 1")
    limits = Limits(address_sockets=sockets)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both --tls-cert FILE and --tls-key FILE")
    tls = server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = RegistryServer(
        args.db,
        public_url=args.public_url or "",
        turn=turn,
        limits=limits,
        trusted_proxies=frozenset(args.trusted_proxy),
        tls=tls,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_forever(server, args.host, args.port))
    return 0


def cmd_registry_add(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = home.load_config()
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError("a registry URL starts with http:// or https://")
    if args.ca:
        from registry.httpclient import tls_context

        ca = str(Path(args.ca).expanduser().resolve())
        tls_context([ca])  # an unreadable or non-PEM file is refused now, not at connect
        if config.network.registry_ca_file not in ("", ca):
            raise ConfigError(
                f"this node already trusts {config.network.registry_ca_file} for its "
                "registries: put both CA certificates in one PEM file and give that"
            )
        config.network.registry_ca_file = ca
    if url in config.network.registries and not args.ca:
        print(f"{url} is already configured.")
        return 0
    if url not in config.network.registries:
        config.network.registries.append(url)
    home.save_config(config)
    print(f"Added registry {url} ({len(config.network.registries)} configured).")
    if args.ca:
        print(f"Its TLS certificate is checked against {args.ca} (and the system's CAs).")
    elif url.startswith("http://") and not _loopback(url):
        print(
            "Warning: plain http:// — what the registry carries is signed and sealed, but "
            "the connection itself is not private; prefer https://",
            file=sys.stderr,
        )
    return 0


def _loopback(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost")


def build_own_record(
    home: NodeHome,
    config: NodeConfig,
    endpoints: tuple[str, ...],
    availability: str,
    held: int = 0,
) -> NodeRecord:
    """This home's record, signed with the home's next sequence (above ``held``): the
    running node takes its sequences from the same place, so neither locks out the other."""
    identity = load_identity(home.key_path)
    now = _now()
    return own_record(
        identity,
        config,
        now=now,
        sequence=RecordSequence(home).advance_past(held, now),
        endpoints=endpoints,
        availability=availability,
        org_certificate=CertificateFile(home.cert_path, identity.public_key).current(),
    )


async def _publish(
    config: NodeConfig, record: NodeRecord, after: Callable[[int], NodeRecord]
) -> dict[str, RegistryError | None]:
    from registry.client import publish_catching_up

    results: dict[str, RegistryError | None] = {}
    registries = _registries(config)
    try:
        for client in registries.clients:
            try:
                record = await publish_catching_up(client, record, after)
                results[client.url] = None
            except RegistryError as exc:
                results[client.url] = exc
        return results
    finally:
        await registries.close()


def cmd_registry_publish(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = home.load_config()
    if not config.network.registries:
        raise ConfigError("no registries configured: `radmesh registry add URL` first")
    availability = args.availability or config.availability
    endpoints = tuple(args.endpoint)
    if not endpoints:  # the running node signs its own record, with its LAN endpoint
        found, result = asyncio.run(
            control.ask_running(home, "registry.publish", {"availability": availability}, print)
        )
        if found:
            print(f"The running node published: {result}")
            return 0
    record = build_own_record(home, config, endpoints, availability)
    results = asyncio.run(
        _publish(
            config,
            record,
            lambda held: build_own_record(home, config, endpoints, availability, held),
        )
    )
    failed = 0
    for url, error in results.items():
        print(f"{url}: {'published' if error is None else printable(error, MAX_LINE_CHARS)}")
        failed += error is not None
    return 0 if failed < len(results) else 1


def register(sub: Any) -> None:
    peers = sub.add_parser("peers", help="known peers: list, search, show")
    peers.set_defaults(handler=cmd_peers_list)
    psub = peers.add_subparsers(dest="peers_command", metavar="PEERS_COMMAND")
    p = psub.add_parser("list", help="known peers and the first-contact inbox")
    p.set_defaults(handler=cmd_peers_list)
    p = psub.add_parser("search", help="search registries and known peers")
    p.add_argument("--subspecialty", default="")
    p.add_argument("--jurisdiction", default="")
    p.add_argument("--language", default="")
    p.add_argument("--online", action="store_true", help="only peers online now")
    p.add_argument(
        "--on-call", action="store_true", help="only peers on call (with --online: either)"
    )
    p.set_defaults(handler=cmd_peers_search)
    p = psub.add_parser("show", help="a peer's verified record and trust state")
    p.add_argument("id", help="node id")
    p.set_defaults(handler=cmd_peers_show)

    trust = sub.add_parser("trust", help="verify, allow or revoke peers; trust org keys")
    tsub = trust.add_subparsers(dest="trust_command", metavar="TRUST_COMMAND", required=True)
    p = tsub.add_parser("verify", help="compare the safety number and mark the peer verified")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="the numbers were compared and match")
    p.set_defaults(handler=cmd_trust_verify)
    p = tsub.add_parser("allow", help="trust a peer without a safety-number check")
    p.add_argument("id")
    p.set_defaults(handler=cmd_trust_allow)
    p = tsub.add_parser("revoke", help="stop trusting a peer, effective immediately")
    p.add_argument("id")
    p.set_defaults(handler=cmd_trust_revoke)
    org = tsub.add_parser("org", help="organisation keys whose certificates this node trusts")
    osub = org.add_subparsers(dest="org_trust_command", metavar="ORG_COMMAND", required=True)
    p = osub.add_parser("add", help="trust an organisation public key (hex)")
    p.add_argument("org_key")
    p.set_defaults(handler=cmd_trust_org_add)
    p = osub.add_parser("revocations", help="apply an organisation's signed revocation list")
    p.add_argument("org_key")
    p.add_argument("file")
    p.set_defaults(handler=cmd_trust_org_revocations)

    reg = sub.add_parser("registry", help="run a registry, or add one to this node")
    rsub = reg.add_subparsers(dest="registry_command", metavar="REGISTRY_COMMAND", required=True)
    p = rsub.add_parser("run", help="run a registry server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7450)
    p.add_argument(
        "--db",
        default="registry.db",
        help="SQLite database path, or postgresql://USER@HOST/DB shared by several instances",
    )
    p.add_argument("--public-url", default="", help="URL nodes use to reach it (auth binding)")
    p.add_argument("--turn-secret", default="", help="coturn static-auth-secret")
    p.add_argument("--turn-url", default="", help="e.g. turn:127.0.0.1:3478")
    p.add_argument("--stun-url", default="", help="e.g. stun:127.0.0.1:3478")
    p.add_argument("--turn-ttl", type=int, default=1800, help="credential lifetime, seconds")
    p.add_argument(
        "--address-sockets",
        type=int,
        default=None,
        help="open connections allowed per client address (raise it for a large NAT'd site)",
    )
    p.add_argument(
        "--turn-org",
        action="append",
        default=[],
        metavar="ORG_KEY",
        help="relay only for nodes certified by this organisation key (hex; repeatable)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy in front (repeatable): limits count its X-Forwarded-For client",
    )
    p.add_argument(
        "--tls-cert",
        default="",
        metavar="FILE",
        help="serve HTTPS/WSS with this PEM certificate chain (with --tls-key); without "
        "them it serves plain HTTP: loopback, or behind a reverse proxy that terminates TLS",
    )
    p.add_argument("--tls-key", default="", metavar="FILE", help="the certificate's PEM key")
    p.set_defaults(handler=cmd_registry_run)
    p = rsub.add_parser("add", help="add a registry URL to this node's config")
    p.add_argument("url")
    p.add_argument(
        "--ca",
        default="",
        metavar="FILE",
        help="trust this CA (PEM) for the registries' TLS besides the system's: a registry "
        "with a private or self-signed certificate ([network] registry_ca_file)",
    )
    p.set_defaults(handler=cmd_registry_add)
    p = rsub.add_parser("publish", help="sign and publish this node's record to its registries")
    p.add_argument("--endpoint", action="append", default=[], help="e.g. lan:http://HOST:PORT")
    p.add_argument(
        "--availability",
        default="",
        choices=[a.value for a in Availability],
        help="default: the home's setting (`radmesh status`)",
    )
    p.set_defaults(handler=cmd_registry_publish)
