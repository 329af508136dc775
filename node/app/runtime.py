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

Why one module: The runtime starts and stops every part of a node in order (store,
audit, trust, transport, registries, DICOM, control) and routes sealed messages between
them; its services live in their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import nacl.exceptions
import nacl.public

from consult.admission import Admission
from consult.errors import ConsultError
from consult.live import LiveHub
from consult.requests import Transition
from consult.store import ConsultDB
from crypto.envelope import SEALED_PREFIX, ReplayGuard, SignedEnvelope, open_sealed, seal
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from crypto.org import CERT_TYPE
from node.app import retention
from node.app.alerts import CriticalAlerts
from node.app.consults import ConsultService
from node.app.control import ControlServer, HomeLock
from node.app.errors import RuntimeError_
from node.app.guests import Guests
from node.app.operations import OPERATIONS, Operation
from node.app.transfers import TransferTracker
from node.core.audit import AuditError, AuditKind, AuditLog, open_audit
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.errors import NodeError
from node.core.private import private_dir, restrict_umask
from node.core.replay_store import PersistentReplayGuard
from node.core.sequence import RecordSequence
from node.core.supervise import Supervisor
from node.dicom.net import DicomListener
from node.dicom.store import InstanceConflict, Store, open_store
from node.dicom.wirecache import KEY_PURPOSE as WIRECACHE_KEY
from node.dicom.wirecache import open_cache
from peer_transport.connection import Transport, TransportOptions
from peer_transport.errors import SignalingError
from peer_transport.rtc import IceServer, RtcOptions
from peer_transport.signaling import SIGNAL_TYPE
from registry.client import (
    MultiRegistry,
    RegistryClient,
    RegistryConnection,
    publish_catching_up,
)
from registry.directory import MdnsFinder, PeerDirectory, RegistryFinder
from registry.errors import RegistryError, RemoteRegistryError, StaleRecord
from registry.lan import LanEndpoint, post_signal
from registry.limits import StrangerGate
from registry.mdns import LanDiscovery
from registry.records import MAX_CERT, Availability, LanPointer, NodeRecord
from registry.trust import TrustState, TrustStore

log = logging.getLogger(__name__)

NODE_MSG = "node-msg"
NODE_MSG_TTL = 7 * 24 * 3600  # as long as a registry mailbox keeps it
MAX_NODE_MSG = 60 * 1024
QUEUE_SIZE = 256
RECORD_TTL = 3600
TURN_RETRY = 30.0  # seconds before asking a registry again for TURN credentials
TURN_ASK_AGAIN = 3600.0  # ...when it said it offers no relay
TRUST_POLL = 0.5  # seconds between looks for trust changes other processes wrote
TRUST_SWEEP = 30.0  # seconds between re-checks of every connected peer (certificates expire)
LEARN_AGAIN = 60.0  # seconds before an untrusted sender's record is looked up again
MAX_LEARNING = 1024  # untrusted senders remembered for LEARN_AGAIN
MAX_LOOKUPS = 4  # untrusted senders' records looked up at once (more: not looked up)
GC_INTERVAL = 6 * 3600.0  # store clean-up (orphan blobs) at start and this often
GC_MAX_REMOVE = 10_000  # blobs one clean-up removes at most (the next one goes on)
AUDIT_CHECKPOINT_INTERVAL = 60.0  # seconds: unsigned audit records wait at most this long
MessageHandler = Callable[[NodeId, str, bytes], Awaitable[None]]


def sealed_signer(identity: Identity, sealed: bytes) -> tuple[str, bytes] | None:
    """(message type, signer key) of ``sealed`` once its signature checks, or None.

    Enough to decide who pays for a message before anything else is done with it;
    the consumer still opens it with every check (recipient, expiry, replay)."""
    try:
        inner = nacl.public.SealedBox(identity.x25519_private()).decrypt(sealed)
        envelope = SignedEnvelope.from_wire(inner)
        envelope.verify(envelope.type)
    except (nacl.exceptions.CryptoError, CryptoError, ValueError):
        return None
    return envelope.type.removeprefix(SEALED_PREFIX), envelope.signer


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
        # Offers from keys this node does not trust wait in their own small queue,
        # read only when no trusted signal is waiting: strangers never starve peers.
        self._rtc_strangers: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE // 8)
        self._arrived = asyncio.Event()
        self.errors = 0  # messages whose handling failed unexpectedly (logged, loop went on)

    async def feed(self, sealed: bytes) -> None:
        """Take one sealed message from any source; never raises (one bad message must
        not end the loop that feeds this)."""
        try:
            await self._feed(sealed)
        except Exception:
            self.errors += 1
            log.exception("a sealed message could not be handled; dropped it and went on")

    async def _feed(self, sealed: bytes) -> None:
        if len(sealed) > MAX_NODE_MSG:
            return
        rt = self._runtime
        opened = sealed_signer(rt.identity, sealed)
        if opened is None:
            log.info("dropped a sealed message this node cannot open")
            return
        kind, signer = opened
        trusted = rt.trust.is_trusted(signer, rt.now())
        if not trusted and not rt.strangers.allow(signer, rt.clock()):
            return  # over the unknown-key budget: dropped quietly, counted by the gate
        if kind == SIGNAL_TYPE and not trusted and (sender := rt._to_learn(sealed)) is not None:
            rt.spawn(self._learn_then_queue(sender, signer, sealed))
        elif kind == SIGNAL_TYPE:
            with contextlib.suppress(asyncio.QueueFull):
                (self._rtc if trusted else self._rtc_strangers).put_nowait(sealed)
                self._arrived.set()
        elif kind == NODE_MSG:
            await rt._on_node_message(sealed)
        else:
            log.info("dropped a sealed message this node cannot use (%s)", kind)

    async def _learn_then_queue(self, sender: NodeId, signer: bytes, sealed: bytes) -> None:
        """A call from a node we do not trust yet: its record may carry a certificate from
        an organisation we trust (a consortium member we never looked up)."""
        rt = self._runtime
        await rt.learn_certificate(sender)
        trusted = rt.trust.is_trusted(signer, rt.now())
        with contextlib.suppress(asyncio.QueueFull):
            (self._rtc if trusted else self._rtc_strangers).put_nowait(sealed)
            self._arrived.set()

    async def send(self, to: bytes, sealed: bytes) -> None:
        """Deliver a signal; a peer this node cannot reach now is the transport's
        :class:`SignalingError` (a reconnect then tries again later, it does not die)."""
        try:
            await self._runtime.send_sealed(to, sealed)
        except RuntimeError_ as exc:
            raise SignalingError(str(exc)) from exc

    async def receive(self) -> bytes:
        while True:
            for queue in (self._rtc, self._rtc_strangers):
                if not queue.empty():
                    return queue.get_nowait()
            self._arrived.clear()
            await self._arrived.wait()


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
        operations: Mapping[str, Operation] = OPERATIONS,
        warm_cache: bool = True,
        resume: bool = True,
    ) -> None:
        """``control``: answer `radmesh` commands run on this home meanwhile
        (:mod:`node.app.control`), as `radmesh node run` and the TUI do; ``operations``
        is what the control socket runs (the CLI's table, plus the TUI's when a TUI may
        attach). ``warm_cache``:
        code imported images for sending in the background (:mod:`node.dicom.wirecache`).
        ``resume``: take up at start what the node was doing when it stopped (fetches cut
        short, the critical-result timer); a node brought up for one command does not, it
        would stop them seconds later.

        The node's services (:attr:`consulting`, :attr:`guests`, :attr:`alerts`) are built
        here and their message handlers registered before :meth:`start` takes any message
        in: a started runtime is a whole node."""
        self.home = home
        self.identity = identity
        self.config = config or home.load_config()
        self.clock = clock
        self._mdns_interfaces = mdns_interfaces
        self._transport_options = transport_options
        self.router = SignalRouter(self)
        self.guard: ReplayGuard = ReplayGuard()  # on disk once started (PersistentReplayGuard)
        self.strangers = StrangerGate()  # budget of messages from keys this node does not trust
        self.supervisor = Supervisor()  # restarts a receive loop that crashed
        self.handlers: dict[str, MessageHandler] = {}
        self.notifications: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.registry_connections: dict[str, RegistryConnection] = {}
        self.registry_state: dict[str, str] = {}
        self._turn: dict[str, tuple[IceServer, float]] = {}  # registry -> (server, expiry)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sequence = 0
        self._seq = RecordSequence(home)  # shared with every publisher on this home
        self.lan_url = ""
        self.record: NodeRecord | None = None
        self.discovery: LanDiscovery | None = None
        self.dicom: DicomListener | None = None
        self._live_hub: LiveHub | None = None
        self.reports: dict[str, str] = {}  # consult id -> SOP instance UID of the filed SR
        self.transfers = TransferTracker(clock)  # fed by the study desk, read by the TUI
        self._resume = resume
        self.consulting = ConsultService(self)
        self.consulting.install()
        self.guests = Guests(self)
        self.guests.install()
        self.alerts = CriticalAlerts(self, self.consulting.reports.resend_report)
        self._home_lock = HomeLock(home)
        self.control = ControlServer(self, operations) if control else None
        self._warm_cache = warm_cache
        self._cert_stamp: tuple[int, int] | None = None  # node.cert as last read
        self._cert: bytes | None = None
        self._learned: dict[NodeId, float] = {}  # untrusted sender -> when its record was sought
        self._lookups = 0
        self.audit_checkpoint_interval = AUDIT_CHECKPOINT_INTERVAL

    # -- lifecycle --------------------------------------------------------------------
    def now(self) -> int:
        return int(self.clock())

    async def start(self) -> None:
        self._home_lock.acquire()  # one node per home: raises HomeBusy while another runs
        try:
            if self.control is not None:
                self.control.bind()  # refuses a squatted socket before anything starts
            await self._start()
        except BaseException:
            if self.control is not None:
                await self.control.close()
            self._home_lock.release()
            raise

    async def _start(self) -> None:
        restrict_umask()  # the home's databases, spools and sockets: 0600, directories 0700
        data = private_dir(self.home.data_dir)
        self.store: Store = open_store(self.home, self.identity)
        cache = open_cache(data, self.identity.derive_key(WIRECACHE_KEY))
        self.store.use_wire_cache(cache, warm=self._warm_cache)
        self.audit: AuditLog = open_audit(self.home, self.identity)
        self.trust = TrustStore(self.home.trust_db)
        self.guard = PersistentReplayGuard.in_data_dir(data)
        self.consults = ConsultDB.in_data_dir(data, audit=self._audit_consult)
        network = self.config.network
        self.registries = MultiRegistry(
            [
                RegistryClient(url, self.identity, ca_file=network.registry_ca_file)
                for url in network.registries
            ]
        )
        finders: list[Any] = [RegistryFinder(self.registries)] if network.registries else []
        if network.mdns:
            self.discovery = LanDiscovery(
                interfaces=self._mdns_interfaces or network.mdns_interfaces or None,
                own_id=self.identity.node_id,
                on_found=self._found_on_lan,
                clock=self.clock,
                is_trusted=lambda key: self.trust.is_trusted(key, self.now()),
            )
            finders.append(MdnsFinder(self.discovery))
        self.directory = PeerDirectory(self.home.peers_db, self.trust, finders)
        self.lan = LanEndpoint(self._own_record, self.router.feed)
        self.lan_url = await self.lan.start(network.listen_host, network.listen_port)
        self._sequence = self._seq.next(self.now())
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
            replay_guard=self.guard,
        )
        await self.transport.start()
        self.consulting.serve()  # the accepted consultants' fetches
        self.live_hub()  # answers live-session invites from trusted peers
        self.trust.subscribe(self._trust_changed)
        self.transport.on_untrusted = self._drop_untrusted  # refused by a per-message check
        self.spawn(self._watch_trust())
        # One round before returning, so a started node can be found at once.
        await asyncio.gather(*(self._registry_step(url) for url in network.registries))
        for url in network.registries:
            self.spawn(
                self.supervisor.run(f"registry {url} loop", partial(self._registry_loop, url))
            )
            self.spawn(self.supervisor.run(f"registry {url} TURN", partial(self._turn_loop, url)))
        if self.discovery is not None:
            await self.discovery.start()
            await self.discovery.advertise(
                LanPointer.create(self.identity, self.lan_url, self._sequence)
            )
            await self.discovery.browse()
        if self.config.dicom.enabled:
            self.dicom = DicomListener(
                self.config.dicom,
                on_stream=self._dicom_stream,
                spool_dir=data / "incoming",
                bad_data_errors=(InstanceConflict,),  # the stored one stays: a retry cannot help
                archive=self.store if self.config.dicom.query_retrieve else None,
                audit=self._audit_dicom,
            )
            self.dicom.start()
        self.spawn(self._audit_checkpoints())
        if self.control is not None:
            await self.control.start()
        self.spawn(self._gc_loop())  # blobs a crashed writer left behind
        self.spawn(self._retention_loop())  # consultant studies past [retention] days
        if self._resume:
            self.spawn(self.alerts.run())  # re-sends and escalations of critical results
            self.consulting.studies.resume_all()  # fetches a restart cut short
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
        self._sign_audit()
        if isinstance(self.guard, PersistentReplayGuard):
            self.guard.close()
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
            availability=Availability(c.availability),
            endpoints=endpoints,
            org_certificate=self._own_certificate(),
        )

    def _own_certificate(self) -> bytes | None:
        """The organisation certificate installed in the home (`radmesh org install`), if it
        is this node's; peers that trust the organisation trust this node through it. Read
        again only when the file changes."""
        try:
            info = self.home.cert_path.stat()
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        if stamp != self._cert_stamp:
            self._cert_stamp, self._cert = stamp, None
            if stamp is not None:
                self._cert = self._read_certificate()
        return self._cert

    def _read_certificate(self) -> bytes | None:
        try:
            with self.home.cert_path.open("rb") as handle:
                cert = handle.read(MAX_CERT + 1)
            if len(cert) > MAX_CERT:
                raise CryptoError(f"it is larger than {MAX_CERT} bytes")
            body = SignedEnvelope.from_wire(cert).verify(CERT_TYPE)
        except (OSError, CryptoError) as exc:
            log.warning("the organisation certificate in this home is unusable: %s", exc)
            return None
        if isinstance(body, dict) and body.get("node") == self.identity.public_key:
            return cert
        log.warning("the organisation certificate in this home belongs to another node: ignored")
        return None

    def _own_record(self) -> NodeRecord:
        record = self.record
        if (
            record is None
            or record.expires_at - self.now() < RECORD_TTL // 2
            or self._seq.current() > record.sequence  # another publisher signed since
        ):
            self._sequence = self._seq.next(self.now())
            record = self.record = self._make_record()
        return record

    async def republish(self) -> None:
        """Sign a new record now (the config changed, e.g. availability) and publish it
        to every registry and the LAN at once."""
        self._sequence = self._seq.next(self.now())
        self.record = self._make_record()
        await asyncio.gather(*(self._registry_step(u) for u in self.config.network.registries))
        if self.discovery is not None:
            await self.discovery.advertise(
                LanPointer.create(self.identity, self.lan_url, self._sequence)
            )

    def _record_after(self, held: int) -> NodeRecord:
        """A fresh record with a sequence above ``held`` (a registry holds that one)."""
        self._sequence = self._seq.advance_past(held, self.now())
        self.record = self._make_record()
        return self.record

    async def _registry_step(self, url: str) -> None:
        """Publish the record and make sure the signaling socket is open."""
        client = next(c for c in self.registries.clients if c.url == url)
        try:
            # A refusal is logged; the socket (relay, mailbox, TURN) opens all the same.
            with contextlib.suppress(StaleRecord):
                await publish_catching_up(client, self._own_record(), self._record_after)
            if url not in self.registry_connections:
                conn = client.connect()
                await conn.__aenter__()
                self.registry_connections[url] = conn
                self.spawn(self.supervisor.run(f"registry {url} pump", partial(self._pump, conn)))
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
                except RemoteRegistryError as exc:  # it answered: no relay there, or not yet
                    log.info("registry %s: %s", url, exc)
                    if "offers no TURN relay" in exc.error:
                        self._turn.pop(url, None)
                        wait = TURN_ASK_AGAIN
                    else:  # not for us yet (record not taken, asked too often): keep what we have
                        wait = TURN_RETRY * 4
                except (RegistryError, TimeoutError) as exc:
                    log.info("registry %s: no TURN credentials yet: %s", url, exc)
                self.transport.turn_servers = tuple(
                    server for server, until in self._turn.values() if until > self.clock()
                )
            await asyncio.sleep(wait)

    async def _pump(self, conn: RegistryConnection) -> None:
        async for message in conn:
            await self.router.feed(message.data)

    # -- trust changes ------------------------------------------------------------------
    def _trust_changed(self) -> None:
        """Drop at once every connection and live-session peer this node no longer trusts
        (a revocation here or from another process, an organisation's revocation list)."""
        now = self.now()
        peers = set(self.transport.peers())
        for live in self._live_hub.sessions.values() if self._live_hub is not None else ():
            peers.update(live.peers)
        for peer in peers:
            if not self.trust.is_trusted(peer, now):
                self._drop_untrusted(peer)

    def _drop_untrusted(self, peer: bytes) -> None:
        short = NodeId.from_public_key(peer).short()
        self.notify(f"{short} is no longer trusted: its connections and live sessions closed")
        if self._live_hub is not None:
            self._live_hub.drop_peer(peer)
        self.spawn(self.transport.drop_peer(peer, "this node no longer trusts you"))

    async def _watch_trust(self) -> None:
        """Apply trust changes written by other processes (`radmesh trust revoke`, `radmesh
        org revocations install`), certificates that expire, and a certificate installed
        in the home meanwhile (published at once)."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + TRUST_SWEEP
        while True:
            await asyncio.sleep(TRUST_POLL)
            try:
                if not self.trust.poll() and loop.time() >= next_sweep:
                    self._trust_changed()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + TRUST_SWEEP
                if self.record is not None and self.record.org_certificate != (
                    self._own_certificate()
                ):
                    self._sequence += 1
                    self.record = self._make_record()
                    for url in self.config.network.registries:
                        self.spawn(self._registry_step(url))
            except Exception:  # one bad round (a locked database) must not end the watch
                log.exception("checking for trust changes failed; trying again")

    def _to_learn(self, sealed: bytes) -> NodeId | None:
        """The (claimed, not yet verified) signer of a sealed signal if it is not trusted
        and its record was not looked up lately; None otherwise."""
        try:
            inner = nacl.public.SealedBox(self.identity.x25519_private()).decrypt(sealed)
            signer = SignedEnvelope.from_wire(inner).signer
            sender = NodeId.from_public_key(signer)
        except (nacl.exceptions.CryptoError, CryptoError, ValueError):
            return None
        if self.trust.is_trusted(signer, self.now()):
            return None
        if self.clock() - self._learned.get(sender, -LEARN_AGAIN) < LEARN_AGAIN:
            return None
        return sender if self._lookups < MAX_LOOKUPS else None

    async def learn_certificate(self, sender: NodeId) -> None:
        """Look up an untrusted sender's published record: the directory keeps the
        organisation certificate it carries, if one this node trusts vouches for it.
        At most once per LEARN_AGAIN per sender, so strangers cannot make us look up."""
        now = self.clock()
        if now - self._learned.get(sender, -LEARN_AGAIN) < LEARN_AGAIN:
            return
        if self._lookups >= MAX_LOOKUPS:
            return
        if len(self._learned) >= MAX_LEARNING:
            self._learned = {k: t for k, t in self._learned.items() if now - t < LEARN_AGAIN}
            if len(self._learned) >= MAX_LEARNING:
                return
        self._learned[sender] = now
        self._lookups += 1
        try:
            with contextlib.suppress(RegistryError):
                await self.directory.resolve(sender, self.now())
        finally:
            self._lookups -= 1

    async def _found_on_lan(self, record: NodeRecord) -> None:
        self.directory.remember(record, "mdns", self.now())

    async def send_sealed(self, to: bytes, sealed: bytes) -> str:
        """Deliver sealed bytes: LAN endpoint first, then registries (live or mailbox)."""
        node_id = NodeId.from_public_key(to)
        errors: list[str] = []
        for url in await self._lan_urls(to):
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

    async def _lan_urls(self, to: bytes) -> tuple[str, ...]:
        """A peer's LAN URLs, only when its key is trusted: the URL is the peer's choice,
        so an unknown key must not make this node contact anything (it is reached
        through a registry, which relays to the key and nowhere else; nor is its
        record looked up and kept for it)."""
        if not self.trust.is_trusted(to, self.now()):
            return ()
        peer = await self.directory.resolve(NodeId.from_public_key(to), self.now())
        return () if peer is None else peer.record.lan_urls

    # -- node messages (no live connection needed) --------------------------------------
    async def send_message(self, to: bytes, kind: str, wire: bytes) -> str:
        """Send a signed consult message (request, response, report) to a peer."""
        if self.trust.state(to, self.now()) is TrustState.REVOKED:
            raise RuntimeError_(
                f"{NodeId.from_public_key(to).short()} was revoked: nothing is sent to it"
            )
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
        except (CryptoError, NodeError, ConsultError, RegistryError) as exc:
            log.warning("refused a node message: %s", exc)

    def recheck_live(self, consult_id: str) -> None:
        """Whoever may no longer take part in a consult's live session leaves it (once live
        sessions run: a message can arrive while the node starts)."""
        if self._live_hub is not None:
            self._live_hub.recheck(consult_id)

    def notify(self, text: str) -> None:
        log.info("%s", text)
        with contextlib.suppress(asyncio.QueueFull):
            self.notifications.put_nowait(text)

    async def _gc_loop(self) -> None:
        """Remove store blobs no index row refers to: at start, then every GC_INTERVAL."""
        while True:
            try:
                removed = await asyncio.to_thread(self.store.gc, GC_MAX_REMOVE)
            except (OSError, NodeError) as exc:
                log.warning("store clean-up failed, retrying later: %s", exc)
            else:
                if removed:
                    log.info("store clean-up removed %d orphan blob(s)", removed)
                    self.audit.append(
                        AuditKind.DELETE,
                        now=self.clock(),
                        details={"gc": "orphan blobs", "removed": removed},
                    )
            await asyncio.sleep(GC_INTERVAL)

    def retention_tick(self, now: int | None = None) -> list[str]:
        """Purge the consultant studies due under [retention]; the consult ids purged."""
        db = retention.RetentionDB(self.home.data_dir)
        try:
            done = retention.purge_due(
                self.consults,
                db,
                self.store,
                self.audit,
                self.now() if now is None else now,
                self.config.retention.days,
            )
        finally:
            db.close()
        for purge, count in done:
            if count:
                log.info(
                    "retention: purged %d instance(s) of consult %s", count, purge.consult_id[:8]
                )
        return retention.ids(done)

    async def _retention_loop(self) -> None:
        while True:
            try:
                self.retention_tick()
            except (OSError, NodeError, AuditError, sqlite3.Error) as exc:
                log.warning("retention purge failed, retrying later: %s", exc)
            await asyncio.sleep(retention.RETENTION_INTERVAL)

    # -- DICOM and audit ----------------------------------------------------------------
    def _dicom_stream(self, stream: IO[bytes], size: int, calling_ae: str) -> None:
        result = self.store.add_stream(stream, size, source=f"dicom:{calling_ae}")
        if not result.duplicate:
            self.audit.append(
                AuditKind.RECEIVE,
                now=self.clock(),
                study_uid=result.study_uid,
                details={"from": f"dicom:{calling_ae}", "sop": result.sop_instance_uid},
            )

    def _audit_dicom(self, kind: str, details: dict[str, str]) -> None:
        """A workstation's query or retrieve (:mod:`node.dicom.qrscp`): what the store
        showed or sent, to whom; the keys asked for are not recorded (they may name a
        patient)."""
        if kind in ("dicom.find", "dicom.get", "dicom.move"):
            self.audit.append(AuditKind.EXPORT, now=self.clock(), details={"via": kind, **details})

    def _sign_audit(self) -> None:
        """Sign the audit log's unsigned records (whoever appended them: this node, or a
        command run on this home meanwhile)."""
        try:
            if self.audit.unsigned():
                self.audit.checkpoint(self.clock())
        except AuditError as exc:
            log.error("audit log not signed: %s; run `radmesh audit verify`", exc)

    async def _audit_checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.audit_checkpoint_interval)
            self._sign_audit()

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
                may_join=Admission(self.consults, self.identity.node_id).may_join,
                on_refused=self._audit_live_refusal,
            )
        return self._live_hub

    def _audit_live_refusal(self, consult_id: str, peer: bytes, how: str) -> None:
        self.audit.append(
            AuditKind.CONSULT,
            now=self.clock(),
            peer=str(NodeId.from_public_key(peer)),
            details={"consult": consult_id, "event": f"live-{how}-refused"},
        )

    def _registry_status(self, url: str) -> str:
        """What the last publish said, unless the signaling socket is down right now."""
        conn = self.registry_connections.get(url)
        if conn is not None and not conn.ready:
            return f"reconnecting: {conn.last_error or 'socket closed'}"
        return self.registry_state[url]

    def status(self) -> Status:
        return Status(
            node_id=str(self.identity.node_id),
            lan_url=self.lan_url,
            registries={url: self._registry_status(url) for url in self.registry_state},
            mdns=self.discovery is not None,
            dicom=(f"{self.dicom.ae_title} on port {self.dicom.port}" if self.dicom else "off"),
            turn=", ".join(f"relay from registry {url}" for url in self._turn) or "none",
        )
