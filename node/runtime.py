"""The running node: everything one hospital's node does, wired together.

:class:`NodeRuntime` opens the store, audit log, trust store, peer directory
and consult database of a node home; serves the LAN endpoint (its signed
record, direct signaling); advertises and browses mDNS; publishes its record to
its registries and keeps their signaling sockets open; runs the peer transport
and, when enabled, the DICOM listener for the hospital's PACS.

Two kinds of sealed messages reach a node, over the LAN endpoint or a registry
(relayed live, or kept in the registry's mailbox while the node is offline):
``rtc-signal`` (offer/answer, for the transport) and ``node-msg`` (consult
requests, responses and reports, which need no live connection). Both are
signed by the sender and sealed to the recipient; :class:`SignalRouter` reads
only the type of each one before handing it on, and the consumer opens it with
its checks (expiry, replay, signer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public

from consult.errors import ConsultError
from consult.intake import Intake, take_in
from consult.live import LiveHub
from consult.requests import ConsultResponse, Event, Transition
from consult.store import ConsultDB
from crypto.envelope import SEALED_PREFIX, ReplayGuard, SignedEnvelope, open_sealed, seal
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from node.audit import AuditKind, AuditLog, open_audit
from node.config import NetworkConfig, NodeConfig, NodeHome
from node.control import ControlServer, HomeLock
from node.dicom_net import DicomListener
from node.errors import NodeError
from node.store import InstanceConflict, Store, open_store
from node.transfers import TransferTracker
from node.wirecache import KEY_PURPOSE as WIRECACHE_KEY
from node.wirecache import open_cache
from peer_transport.connection import Transport, TransportOptions
from peer_transport.rtc import IceServer, RtcOptions
from peer_transport.signaling import SIGNAL_TYPE
from registry.client import MultiRegistry, RegistryClient, RegistryConnection
from registry.directory import MdnsFinder, PeerDirectory, RegistryFinder
from registry.errors import RegistryError, RemoteRegistryError
from registry.lan import LanEndpoint, post_signal
from registry.mdns import LanDiscovery
from registry.records import LanPointer, NodeRecord
from registry.trust import TrustStore

log = logging.getLogger(__name__)

NODE_MSG = "node-msg"
NODE_MSG_TTL = 7 * 24 * 3600  # as long as a registry mailbox keeps it
MAX_NODE_MSG = 60 * 1024
QUEUE_SIZE = 256
RECORD_TTL = 3600
TURN_RETRY = 30.0  # seconds before asking a registry again for TURN credentials
TURN_ASK_AGAIN = 3600.0  # ...when it said it offers no relay
MessageHandler = Callable[[NodeId, str, bytes], Awaitable[None]]


class RuntimeError_(NodeError):
    """The node could not start or do what was asked; the message says why."""


def sealed_type(identity: Identity, sealed: bytes) -> str | None:
    """The message type inside ``sealed`` (decrypts, does not verify), or None."""
    try:
        inner = nacl.public.SealedBox(identity.x25519_private()).decrypt(sealed)
        return SignedEnvelope.from_wire(inner).type.removeprefix(SEALED_PREFIX)
    except (nacl.exceptions.CryptoError, CryptoError, ValueError):
        return None


def seal_node_message(identity: Identity, to: bytes, kind: str, wire: bytes, now: int) -> bytes:
    return seal(identity, to, NODE_MSG, {"kind": kind, "wire": wire}, now=now, ttl=NODE_MSG_TTL)


class SignalRouter:
    """The transport's :class:`~peer_transport.signaling.Signaling`, and the node-msg inbox.

    Outgoing: straight to the peer's LAN endpoint when the directory knows one,
    else through the first registry that takes it. Incoming from every source:
    ``rtc-signal`` goes to the transport, ``node-msg`` to :attr:`on_node_message`.
    """

    def __init__(self, runtime: NodeRuntime) -> None:
        self._runtime = runtime
        self._rtc: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)

    async def feed(self, sealed: bytes) -> None:
        if len(sealed) > MAX_NODE_MSG:
            return
        kind = sealed_type(self._runtime.identity, sealed)
        if kind == SIGNAL_TYPE:
            with contextlib.suppress(asyncio.QueueFull):
                self._rtc.put_nowait(sealed)
        elif kind == NODE_MSG:
            await self._runtime._on_node_message(sealed)
        else:
            log.info("dropped a sealed message this node cannot use (%s)", kind or "undecryptable")

    async def send(self, to: bytes, sealed: bytes) -> None:
        await self._runtime.send_sealed(to, sealed)

    async def receive(self) -> bytes:
        return await self._rtc.get()


@dataclass
class Status:
    """What the home screen and `radmesh node run` show."""

    node_id: str
    lan_url: str
    registries: dict[str, str]
    mdns: bool
    dicom: str
    turn: str = "none"  # where this node's TURN relay credentials come from


def _ice_server(url: str, network: NetworkConfig) -> IceServer:
    if url.startswith(("turn:", "turns:")) and network.turn_username:
        return IceServer((url,), network.turn_username, network.turn_password)
    return IceServer((url,))


class NodeRuntime:
    def __init__(
        self,
        home: NodeHome,
        identity: Identity,
        config: NodeConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        mdns_interfaces: list[str] | None = None,
        transport_options: TransportOptions | None = None,
        control: bool = False,
        warm_cache: bool = True,
    ) -> None:
        """``control``: answer `radmesh` commands run on this home meanwhile
        (:mod:`node.control`), as `radmesh node run` and the TUI do. ``warm_cache``:
        code imported images for sending in the background (:mod:`node.wirecache`)."""
        self.home = home
        self.identity = identity
        self.config = config or home.load_config()
        self.clock = clock
        self._mdns_interfaces = mdns_interfaces
        self._transport_options = transport_options
        self.router = SignalRouter(self)
        self.guard = ReplayGuard()
        self.handlers: dict[str, MessageHandler] = {}
        self.notifications: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.registry_connections: dict[str, RegistryConnection] = {}
        self.registry_state: dict[str, str] = {}
        self._turn: dict[str, tuple[IceServer, float]] = {}  # registry -> (server, expiry)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sequence = 0
        self.lan_url = ""
        self.record: NodeRecord | None = None
        self.discovery: LanDiscovery | None = None
        self.dicom: DicomListener | None = None
        self._live_hub: LiveHub | None = None
        self.handlers["consult.request"] = self._on_consult_message
        self.handlers["consult.response"] = self._on_consult_message
        self.reports: dict[str, str] = {}  # consult id -> SOP instance UID of the filed SR
        self.transfers = TransferTracker(clock)  # fed by node.workflow, read by the TUI
        self._home_lock = HomeLock(home)
        self.control = ControlServer(self) if control else None
        self._warm_cache = warm_cache

    # -- lifecycle --------------------------------------------------------------------
    def now(self) -> int:
        return int(self.clock())

    async def start(self) -> None:
        self._home_lock.acquire()  # one node per home: raises HomeBusy while another runs
        try:
            await self._start()
        except BaseException:
            self._home_lock.release()
            raise

    async def _start(self) -> None:
        data = self.home.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.store: Store = open_store(self.home, self.identity)
        cache = open_cache(data, self.identity.derive_key(WIRECACHE_KEY))
        self.store.use_wire_cache(cache, warm=self._warm_cache)
        self.audit: AuditLog = open_audit(self.home, self.identity)
        self.trust = TrustStore(self.home.trust_db)
        self.consults = ConsultDB.in_data_dir(data, audit=self._audit_consult)
        network = self.config.network
        self.registries = MultiRegistry(
            [RegistryClient(url, self.identity) for url in network.registries]
        )
        finders: list[Any] = [RegistryFinder(self.registries)] if network.registries else []
        if network.mdns:
            self.discovery = LanDiscovery(
                interfaces=self._mdns_interfaces or network.mdns_interfaces or None,
                own_id=self.identity.node_id,
                on_found=self._found_on_lan,
                clock=self.clock,
            )
            finders.append(MdnsFinder(self.discovery))
        self.directory = PeerDirectory(self.home.peers_db, self.trust, finders)
        self.lan = LanEndpoint(self._own_record, self.router.feed)
        self.lan_url = await self.lan.start(network.listen_host, network.listen_port)
        self._sequence = max(self.now(), self._sequence + 1)
        self.record = self._make_record()
        options = self._transport_options or TransportOptions(
            rtc=RtcOptions(
                ice_servers=tuple(_ice_server(url, network) for url in network.ice_servers)
            )
        )
        self.transport = Transport(
            self.identity,
            self.router,
            is_trusted=lambda key: self.trust.is_trusted(key, self.now()),
            options=options,
            clock=self.clock,
        )
        await self.transport.start()
        self.live_hub()  # answers live-session invites from trusted peers
        # One round before returning, so a started node can be found at once.
        await asyncio.gather(*(self._registry_step(url) for url in network.registries))
        for url in network.registries:
            self.spawn(self._registry_loop(url))
            self.spawn(self._turn_loop(url))
        if self.discovery is not None:
            await self.discovery.start()
            await self.discovery.advertise(
                LanPointer.create(self.identity, self.lan_url, self._sequence)
            )
            await self.discovery.browse()
        if self.config.dicom.enabled:
            self.dicom = DicomListener(
                self.config.dicom,
                self._dicom_instance,
                bad_data_errors=(InstanceConflict,),  # the stored one stays: a retry cannot help
            )
            self.dicom.start()
        if self.control is not None:
            await self.control.start()
        log.info("node %s running, LAN endpoint %s", self.identity.node_id.short(), self.lan_url)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self._live_hub is not None:
            await self._live_hub.close()
        if self.dicom is not None:
            self.dicom.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()
        for conn in self.registry_connections.values():
            await conn.close()
        await self.registries.close()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.lan.stop()
        self.directory.close()
        self.consults.close()
        self.trust.close()
        self.audit.close()
        self.store.close()
        self._home_lock.release()

    async def __aenter__(self) -> NodeRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in the background until it ends or the node stops."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- identity on the network --------------------------------------------------------
    def _make_record(self) -> NodeRecord:
        c = self.config
        registries = (f"registry:{url}" for url in c.network.registries)
        endpoints = (f"lan:{self.lan_url}", *registries)
        return NodeRecord.create(
            self.identity,
            now=self.now(),
            sequence=self._sequence,
            ttl=RECORD_TTL,
            display_name=c.display_name,
            institution=c.institution,
            country=c.country,
            subspecialties=tuple(c.subspecialties),
            jurisdictions=tuple(c.jurisdictions),
            languages=tuple(c.languages),
            timezone=c.timezone,
            endpoints=endpoints,
        )

    def _own_record(self) -> NodeRecord:
        record = self.record
        if record is None or record.expires_at - self.now() < RECORD_TTL // 2:
            self._sequence += 1
            record = self.record = self._make_record()
        return record

    async def _registry_step(self, url: str) -> None:
        """Publish the record and make sure the signaling socket is open."""
        client = next(c for c in self.registries.clients if c.url == url)
        try:
            await client.publish(self._own_record())
            if url not in self.registry_connections:
                conn = client.connect()
                await conn.__aenter__()
                self.registry_connections[url] = conn
                self.spawn(self._pump(conn))
            self.registry_state[url] = "connected"
        except RegistryError as exc:
            self.registry_state[url] = f"unreachable: {exc}"
            log.warning("registry %s: %s", url, exc)

    async def _registry_loop(self, url: str) -> None:
        """Re-publish before the record expires; retry an unreachable registry soon."""
        while True:
            await asyncio.sleep(RECORD_TTL / 4 if self.registry_state[url] == "connected" else 5)
            await self._registry_step(url)

    async def _turn_loop(self, url: str) -> None:
        """Keep fresh TURN credentials from this registry if it offers a relay, so peers
        behind NATs that block direct paths still connect (through coturn)."""
        while True:
            wait = TURN_RETRY
            conn = self.registry_connections.get(url)
            if conn is not None:
                try:
                    creds = await conn.turn_credentials()
                    server = IceServer(tuple(creds.urls), creds.username, creds.password)
                    if url not in self._turn:
                        self.notify(f"TURN relay available through registry {url}")
                    self._turn[url] = (server, self.clock() + creds.ttl)
                    wait = max(TURN_RETRY, creds.ttl / 2)
                except RemoteRegistryError as exc:  # it answered: no relay there
                    log.info("registry %s: %s", url, exc)
                    self._turn.pop(url, None)
                    wait = TURN_ASK_AGAIN
                except (RegistryError, TimeoutError) as exc:
                    log.info("registry %s: no TURN credentials yet: %s", url, exc)
                self.transport.turn_servers = tuple(
                    server for server, until in self._turn.values() if until > self.clock()
                )
            await asyncio.sleep(wait)

    async def _pump(self, conn: RegistryConnection) -> None:
        async for message in conn:
            await self.router.feed(message.data)

    async def _found_on_lan(self, record: NodeRecord) -> None:
        self.directory.remember(record, "mdns", self.now())

    async def send_sealed(self, to: bytes, sealed: bytes) -> str:
        """Deliver sealed bytes: LAN endpoint first, then registries (live or mailbox)."""
        node_id = NodeId.from_public_key(to)
        peer = await self.directory.resolve(node_id, self.now())
        errors: list[str] = []
        for url in peer.record.lan_urls if peer is not None else ():
            try:
                await post_signal(url, sealed)
                return "delivered (LAN)"
            except RegistryError as exc:
                errors.append(f"LAN {url}: {exc}")
        for url, conn in list(self.registry_connections.items()):
            try:
                return f"{await conn.send(node_id, sealed)} (registry {url})"
            except RegistryError as exc:
                errors.append(f"registry {url}: {exc}")
        raise RuntimeError_(
            f"could not reach {node_id.short()}: "
            + ("; ".join(errors) or "no LAN address known and no registry connected")
            + ". Check `radmesh peers show` and `radmesh doctor`."
        )

    # -- node messages (no live connection needed) --------------------------------------
    async def send_message(self, to: bytes, kind: str, wire: bytes) -> str:
        """Send a signed consult message (request, response, report) to a peer."""
        return await self.send_sealed(
            to, seal_node_message(self.identity, to, kind, wire, self.now())
        )

    async def _on_node_message(self, sealed: bytes) -> None:
        try:
            opened = open_sealed(
                self.identity,
                sealed,
                NODE_MSG,
                now=self.now(),
                replay_guard=self.guard,
                max_size=MAX_NODE_MSG,
            )
            body = opened.body
            if not (
                isinstance(body, dict)
                and isinstance(body.get("kind"), str)
                and isinstance(body.get("wire"), bytes)
            ):
                raise RuntimeError_("node message has the wrong shape")
            handler = self.handlers.get(body["kind"])
            if handler is None:
                raise RuntimeError_(f"no handler for node message kind {body['kind']!r}")
            await handler(opened.sender_id, body["kind"], body["wire"])
        except (CryptoError, NodeError, ConsultError) as exc:
            log.warning("refused a node message: %s", exc)

    async def _on_consult_message(self, sender: NodeId, kind: str, wire: bytes) -> None:
        public_key = self._sender_key(sender, wire)
        trusted = public_key is not None and self.trust.is_trusted(public_key, self.now())
        if not trusted and kind != "consult.request":
            raise RuntimeError_(f"{sender.short()} is not trusted: {kind} ignored")
        if not trusted and public_key is not None:
            # First contact: a request may land in the inbox, nothing is shared back.
            self.trust.first_contact(public_key, self.now(), summary="consult request")
        intake: Intake = take_in(self.consults, wire, self.now(), sender=sender)
        self.notify(intake.summary)
        for peer in intake.withdraw:
            self.spawn(self._withdraw(intake.consult_id, peer))

    async def _withdraw(self, consult_id: str, peer: NodeId) -> None:
        """Tell an offered consultant the case is no longer theirs (someone accepted first)."""
        await self.send_withdrawal(consult_id, peer, "accepted by another")

    async def send_withdrawal(self, consult_id: str, peer: NodeId, reason: str) -> bool:
        """Send a signed WITHDRAW of ``consult_id`` to ``peer``; False if it could not go."""
        found = await self.directory.resolve(peer, self.now())
        if found is None:
            log.warning("cannot withdraw consult %s from %s: address unknown", consult_id, peer)
            return False
        response = ConsultResponse(
            consult_id, self.identity.node_id, Event.WITHDRAW, self.now(), reason
        )
        try:
            await self.send_message(
                found.record.public_key, "consult.response", response.to_wire(self.identity)
            )
        except NodeError as exc:
            log.warning("withdrawal of consult %s not sent: %s", consult_id[:8], exc)
            return False
        return True

    def _sender_key(self, sender: NodeId, wire: bytes) -> bytes | None:
        with contextlib.suppress(CryptoError):
            signer = SignedEnvelope.from_wire(wire).signer
            if NodeId.from_public_key(signer) == sender:
                return signer
        return None

    def notify(self, text: str) -> None:
        log.info("%s", text)
        with contextlib.suppress(asyncio.QueueFull):
            self.notifications.put_nowait(text)

    # -- DICOM and audit ----------------------------------------------------------------
    def _dicom_instance(self, data: bytes, calling_ae: str) -> None:
        result = self.store.add_bytes(data, source=f"dicom:{calling_ae}")
        if not result.duplicate:
            self.audit.append(
                AuditKind.RECEIVE,
                now=self.clock(),
                study_uid=result.study_uid,
                details={"from": f"dicom:{calling_ae}", "sop": result.sop_instance_uid},
            )

    def _audit_consult(self, consult_id: str, transition: Transition) -> None:
        self.audit.append(
            AuditKind.CONSULT,
            now=transition.at,
            peer=transition.actor or None,
            details={
                "consult": consult_id,
                "event": transition.event.value,
                "from": transition.source.value,
                "to": transition.target.value,
            },
        )

    def live_hub(self) -> LiveHub:
        """This node's live consultation sessions (created on first use, after start)."""
        if self._live_hub is None:
            self._live_hub = LiveHub(
                self.transport,
                self.identity,
                self.config.display_name,
                is_trusted=lambda key: self.trust.is_trusted(key, self.now()),
                notify=self.notify,
                clock=self.clock,
            )
        return self._live_hub

    def status(self) -> Status:
        return Status(
            node_id=str(self.identity.node_id),
            lan_url=self.lan_url,
            registries=dict(self.registry_state),
            mdns=self.discovery is not None,
            dicom=(f"{self.dicom.ae_title} on port {self.dicom.port}" if self.dicom else "off"),
            turn=", ".join(f"relay from registry {url}" for url in self._turn) or "none",
        )
