"""The running node: everything one hospital's node does, wired together.

:class:`NodeRuntime` opens the store, audit log, trust store, peer directory
and consult database of a node home; serves the LAN endpoint (its signed
record, direct signaling); advertises and browses mDNS; publishes its record to
its registries and keeps their signaling sockets open; runs the peer transport
and, when enabled, the DICOM listener for the hospital's PACS.

Sealed messages (signals for the transport, node messages for the services) come and
go through its :class:`~node.app.courier.Courier`.
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

from consult.admission import Admission
from consult.live import LiveHub
from consult.requests import Transition
from consult.store import ConsultDB
from crypto.envelope import ReplayGuard
from crypto.identity import Identity, NodeId
from node.app import retention
from node.app.alerts import CriticalAlerts
from node.app.consults import ConsultService
from node.app.control import ControlServer, HomeLock
from node.app.courier import Courier
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
from peer_transport.rtc import IceServer, RtcOptions
from registry.client import (
    MultiRegistry,
    RegistryClient,
    RegistryConnection,
    publish_catching_up,
)
from registry.directory import MdnsFinder, PeerDirectory, RegistryFinder
from registry.errors import KeyInUse, RegistryError, RemoteRegistryError, StaleRecord
from registry.lan import LanEndpoint
from registry.limits import StrangerGate
from registry.mdns import LanDiscovery
from registry.own import CertificateFile, own_record
from registry.records import LanPointer, NodeRecord
from registry.trust import TrustStore

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
RECORD_TTL = 3600
TURN_RETRY = 30.0  # seconds before asking a registry again for TURN credentials
TURN_ASK_AGAIN = 3600.0  # ...when it said it offers no relay
TRUST_POLL = 0.5  # seconds between looks for trust changes other processes wrote
TRUST_SWEEP = 30.0  # seconds between re-checks of every connected peer (certificates expire)
GC_INTERVAL = 6 * 3600.0  # store clean-up (orphan blobs) at start and this often
GC_MAX_REMOVE = 10_000  # blobs one clean-up removes at most (the next one goes on)
AUDIT_CHECKPOINT_INTERVAL = 60.0  # seconds: unsigned audit records wait at most this long


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
        self.courier = Courier(self)
        self.router = self.courier.router
        self.handlers = self.courier.handlers  # the services register theirs by kind
        self.send_message = self.courier.send_message
        self.send_sealed = self.courier.send_sealed
        self.learn_certificate = self.courier.learn_certificate
        self.guard: ReplayGuard = ReplayGuard()  # on disk once started (PersistentReplayGuard)
        self.strangers = StrangerGate()  # budget of messages from keys this node does not trust
        self.supervisor = Supervisor()  # restarts a receive loop that crashed
        self.notifications: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.registry_connections: dict[str, RegistryConnection] = {}
        self._registry_sockets: dict[str, RegistryConnection] = {}  # started, ready or not
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
        self._own_cert = CertificateFile(home.cert_path, identity.public_key)
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
        for conn in self._registry_sockets.values():
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
        return own_record(
            self.identity,
            self.config,
            now=self.now(),
            sequence=self._sequence,
            ttl=RECORD_TTL,
            endpoints=(f"lan:{self.lan_url}",),
            availability=self.config.availability,
            org_certificate=self._own_cert.current(),
        )

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
            conn = self._registry_sockets.get(url)
            if conn is None:
                # Kept from the first try (it reconnects): a second would replace it.
                conn = self._registry_sockets[url] = client.connect()
                conn.start()
                pump = partial(self._pump, url, conn)
                self.spawn(self.supervisor.run(f"registry {url} pump", pump))
            await conn.wait_ready()
            self.registry_connections[url] = conn  # for sending, once it has connected
            self.registry_state[url] = "connected"
        except KeyInUse as exc:
            self.registry_state[url] = f"stopped: {exc}"
        except RegistryError as exc:
            self.registry_state[url] = f"unreachable: {exc}"
            log.warning("registry %s: %s", url, exc)

    async def _registry_loop(self, url: str) -> None:
        """Re-publish before the record expires; retry an unreachable registry soon."""
        while True:
            soon = self.registry_state[url].startswith("unreachable")  # not when stopped
            await asyncio.sleep(5 if soon else RECORD_TTL / 4)
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

    async def _pump(self, url: str, conn: RegistryConnection) -> None:
        async for message in conn:
            await self.router.feed(message.data)
        if conn.stopped:  # another process holds this node's key at that registry
            self.registry_state[url] = f"stopped: {conn.stopped}"
            self.notify(f"Registry {url}: {conn.stopped}")

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
                    self._own_cert.current()
                ):
                    self._sequence += 1
                    self.record = self._make_record()
                    for url in self.config.network.registries:
                        self.spawn(self._registry_step(url))
            except Exception:  # one bad round (a locked database) must not end the watch
                log.exception("checking for trust changes failed; trying again")

    async def _found_on_lan(self, record: NodeRecord) -> None:
        self.directory.remember(record, "mdns", self.now())

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
        if conn is not None and conn.stopped:
            return f"stopped: {conn.stopped}"
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
