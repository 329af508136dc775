"""Live consultation sessions over the peer transport: shared state, presence, invites.

A :class:`LiveConsult` is one participant's side of a live session on a consult:
a :class:`~consult.shared.SharedState` (annotations, chat, report) and a
:class:`~consult.presence.Presence` (cursors, viewports, presenter), bound to a
full mesh of :class:`~peer_transport.connection.PeerConnection` s, one per other
participant (up to :data:`MAX_PARTICIPANTS`).

:class:`LiveHub` is the node's side: it sends and answers invites, attaches the
live and presence channels of each connection and routes what arrives to the
right consult. Several consults may share one connection, so every live and
presence payload starts with the consult id.

Wire (both are frozen dataclasses with ``to_wire``/``from_wire``):

- :class:`LiveFragment` on the live channel (ordered, reliable): a y-sync
  message is split into fragments that fit one transport frame, each carrying
  a message id, index and count. A late joiner's full state (173 KiB for 1,000
  annotations) needs several. The :class:`Reassembler` caps the declared count,
  the total size and the number of messages in progress before buffering a byte.
- :class:`PresenceEnvelope` on the presence channel (unordered, lossy): one
  y-awareness message. Before it reaches pycrdt, :func:`check_presence` makes
  sure every state in it claims the node id the connection was authenticated
  as, and that a connection speaks for one awareness client only.

Trust: the transport admits only trusted peers, invites go only to peers
``is_trusted`` accepts, and a connection joins a consult only through an
invite or a join request this node sent or answered (never by merely sending
data for it), and only if the admission check lets it in: the consult's
parties and the guests they both approved (:mod:`consult.admission`). A
trusted node that merely knows a consult id is refused, and the refusal audited.
Every live and presence message is checked again; a peer no longer trusted is
dropped from every session (:meth:`LiveHub.drop_peer`).

Why one module: One participant's side of a live session: joining, admission, the sync
protocol and presence share the session's state and its checks per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from consult.errors import LocalConsultError, MalformedMessage, RemoteConsultError
from consult.presence import (
    MAX_PRESENCE_MESSAGE,
    Cursor,
    Participant,
    Presence,
    Viewport,
    check_state,
)
from consult.shared import (
    MAX_SYNC_MESSAGE,
    Annotation,
    AnnotationKind,
    ChatMessage,
    LiveSession,
    Point,
    SharedState,
    SyncKind,
    SyncMessage,
    changed_span,
)
from consult.ywire import read_varuint
from crypto import canonical
from crypto.errors import BadSignature
from crypto.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, NodeId, verify_signature
from peer_transport import frames
from peer_transport.connection import PeerConnection, RequestRefused, Transport

log = logging.getLogger(__name__)

MAX_PARTICIPANTS = 8
MAX_CONSULT_ID = 64
MAX_INVITE = 4096
LIVE_MAGIC = b"L1"
PRESENCE_MAGIC = b"P1"
_HEADER = 2 + 1 + MAX_CONSULT_ID + 4 + 2 + 2
FRAGMENT_SIZE = frames.MAX_PAYLOAD - _HEADER - 16
MAX_MESSAGE = MAX_SYNC_MESSAGE
MAX_FRAGMENTS = -(-MAX_MESSAGE // FRAGMENT_SIZE)
MAX_PARTIAL_MESSAGES = 4  # per connection: messages whose fragments are still arriving
SEND_QUEUE = 1024  # messages per peer waiting for the live channel
TICK_S = 1 / 30  # presence tick: coalesced cursor moves, heartbeats, expiry
WATCH_S = 0.25  # how often a connection's state is checked (reconnect, close)
INVITE_KIND = "live.invite"
JOIN_KIND = "live.join"
TICKET_DOMAIN = b"radmesh/live-ticket/v1"
NOT_ADMITTED = "not-admitted"
MAX_INVITED_SESSIONS = 16  # sessions one peer's invites may open on this node at once
MAX_AUDITED_REFUSALS = 20  # refused invites/joins audited and logged per peer per window
REFUSAL_WINDOW_S = 60.0
MAX_REFUSING = 1024  # peers whose refusals are being counted
PALETTE = ("#00d7ff", "#ff5f87", "#afff5f", "#ffaf00", "#af87ff", "#5fffd7", "#ff8700", "#d7d7d7")

Listener = Callable[[], None]


def _check_consult_id(consult_id: str) -> bytes:
    raw = consult_id.encode()
    if not raw or len(raw) > MAX_CONSULT_ID:
        raise LocalConsultError(f"a consult id is 1 to {MAX_CONSULT_ID} bytes")
    return raw


def _read_consult_id(data: bytes, offset: int) -> tuple[str, int]:
    if len(data) <= offset:
        raise MalformedMessage("live message is truncated")
    size = data[offset]
    end = offset + 1 + size
    if size == 0 or size > MAX_CONSULT_ID or end > len(data):
        raise MalformedMessage("live message has a bad consult id")
    try:
        return data[offset + 1 : end].decode(), end
    except UnicodeDecodeError as exc:
        raise MalformedMessage("live message has a bad consult id") from exc


# --- wire ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveFragment:
    """``L1`` | id length (1) | consult id | message id (4) | index (2) | count (2) | chunk."""

    consult_id: str
    message_id: int
    index: int
    count: int
    chunk: bytes

    def to_wire(self) -> bytes:
        cid = _check_consult_id(self.consult_id)
        return b"".join(
            (
                LIVE_MAGIC,
                bytes([len(cid)]),
                cid,
                self.message_id.to_bytes(4, "big"),
                self.index.to_bytes(2, "big"),
                self.count.to_bytes(2, "big"),
                self.chunk,
            )
        )

    @classmethod
    def from_wire(cls, data: bytes) -> LiveFragment:
        if len(data) > frames.MAX_PAYLOAD:
            raise MalformedMessage(f"live fragment is {len(data)} bytes")
        if data[:2] != LIVE_MAGIC:
            raise MalformedMessage("not a live fragment")
        consult_id, at = _read_consult_id(data, 2)
        if len(data) < at + 8:
            raise MalformedMessage("live fragment header is truncated")
        message_id = int.from_bytes(data[at : at + 4], "big")
        index = int.from_bytes(data[at + 4 : at + 6], "big")
        count = int.from_bytes(data[at + 6 : at + 8], "big")
        if not 0 < count <= MAX_FRAGMENTS or index >= count:
            raise MalformedMessage(f"live fragment {index} of {count} is out of range")
        return cls(consult_id, message_id, index, count, data[at + 8 :])


def fragment(consult_id: str, message_id: int, message: bytes) -> list[LiveFragment]:
    """Split one live message into fragments that each fit a transport frame."""
    if len(message) > MAX_MESSAGE:
        raise LocalConsultError(f"live message of {len(message)} bytes exceeds {MAX_MESSAGE}")
    count = max(1, -(-len(message) // FRAGMENT_SIZE))
    return [
        LiveFragment(
            consult_id,
            message_id & 0xFFFFFFFF,
            i,
            count,
            message[i * FRAGMENT_SIZE : (i + 1) * FRAGMENT_SIZE],
        )
        for i in range(count)
    ]


@dataclass
class _Partial:
    count: int
    next_index: int = 0
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class Reassembler:
    """Joins the fragments of one connection back into messages (sans-IO).

    The live channel is ordered, so a message's fragments arrive in order; one
    out of order, a count that changes, more than :data:`MAX_PARTIAL_MESSAGES`
    messages in progress or more than :data:`MAX_MESSAGE` buffered bytes is a
    misbehaving peer.
    """

    def __init__(self) -> None:
        self._partials: dict[tuple[str, int], _Partial] = {}
        self._buffered = 0

    def feed(self, piece: LiveFragment) -> bytes | None:
        if piece.count == 1:
            return piece.chunk
        key = (piece.consult_id, piece.message_id)
        partial = self._partials.get(key)
        if partial is None:
            if piece.index != 0:
                raise MalformedMessage("live fragment arrived without its first part")
            if len(self._partials) >= MAX_PARTIAL_MESSAGES:
                raise MalformedMessage("too many live messages in progress at once")
            partial = self._partials[key] = _Partial(piece.count)
        if piece.count != partial.count or piece.index != partial.next_index:
            raise MalformedMessage("live fragments arrived out of order")
        self._buffered += len(piece.chunk)
        if self._buffered > MAX_MESSAGE:
            raise MalformedMessage(f"live messages in progress exceed {MAX_MESSAGE} bytes")
        partial.chunks.append(piece.chunk)
        partial.size += len(piece.chunk)
        partial.next_index += 1
        if partial.next_index < partial.count:
            return None
        del self._partials[key]
        self._buffered -= partial.size
        return b"".join(partial.chunks)

    def forget(self, consult_id: str) -> None:
        """Drop the messages in progress for one consult (its sender was expelled from it)."""
        for key in [k for k in self._partials if k[0] == consult_id]:
            self._buffered -= self._partials.pop(key).size

    def reset(self) -> None:
        """The connection was re-established: fragments in progress are gone for good."""
        self._partials.clear()
        self._buffered = 0


@dataclass(frozen=True)
class PresenceEnvelope:
    """``P1`` | id length (1) | consult id | y-awareness message."""

    consult_id: str
    message: bytes

    def to_wire(self) -> bytes:
        cid = _check_consult_id(self.consult_id)
        return PRESENCE_MAGIC + bytes([len(cid)]) + cid + self.message

    @classmethod
    def from_wire(cls, data: bytes) -> PresenceEnvelope:
        if len(data) > MAX_PRESENCE_MESSAGE + _HEADER:
            raise MalformedMessage(f"presence message is {len(data)} bytes")
        if data[:2] != PRESENCE_MAGIC:
            raise MalformedMessage("not a presence envelope")
        consult_id, at = _read_consult_id(data, 2)
        return cls(consult_id, data[at:])


@dataclass(frozen=True)
class Invite:
    """Sent by a participant on the control channel: join ``consult_id``; the others are
    ``members`` (public keys), connect to them too. A join request has no members."""

    consult_id: str
    members: tuple[bytes, ...] = ()
    title: str = ""
    study_uid: str = ""  # as the invitee knows it (pseudonymised when shared de-identified)
    # The inviter's key and its signature over (consult id, invitee key): the invitee shows
    # both in its joins, so members who admitted the inviter admit the invitee too.
    by: bytes = b""
    ticket: bytes = b""

    def to_wire(self) -> bytes:
        _check_consult_id(self.consult_id)
        raw: dict[str, Any] = {
            "consult": self.consult_id,
            "members": list(self.members),
            "title": self.title,
            "study": self.study_uid,
        }
        if self.ticket:
            raw.update(by=self.by, ticket=self.ticket)
        return canonical.encode(raw)

    @classmethod
    def from_wire(cls, data: bytes) -> Invite:
        if len(data) > MAX_INVITE:
            raise MalformedMessage(f"live invite is {len(data)} bytes, limit is {MAX_INVITE}")
        try:
            raw = canonical.decode(data, max_size=MAX_INVITE)
            consult_id, members, title = raw["consult"], raw["members"], raw["title"]
            study_uid = raw.get("study", "")
            by, ticket = raw.get("by", b""), raw.get("ticket", b"")
            ok = (
                isinstance(consult_id, str)
                and 0 < len(consult_id.encode()) <= MAX_CONSULT_ID
                and isinstance(members, list)
                and len(members) < MAX_PARTICIPANTS
                and all(isinstance(m, bytes) and len(m) == 32 for m in members)
                and isinstance(title, str)
                and len(title) <= 200
                and isinstance(study_uid, str)
                and len(study_uid) <= 64
                and isinstance(by, bytes)
                and len(by) in (0, PUBLIC_KEY_SIZE)
                and isinstance(ticket, bytes)
                and len(ticket) in (0, SIGNATURE_SIZE)
            )
        except Exception as exc:  # canonical raises its own CryptoError family
            raise MalformedMessage(f"live invite does not parse: {exc}") from exc
        if not ok:
            raise MalformedMessage("live invite has the wrong shape")
        return cls(consult_id, tuple(members), title, study_uid, by, ticket)


def ticket_input(consult_id: str, joiner: bytes) -> bytes:
    """What an inviter signs so that ``joiner`` may join the session's other members."""
    return TICKET_DOMAIN + canonical.encode([consult_id, joiner])


def ticket_valid(consult_id: str, joiner: bytes, by: bytes, ticket: bytes) -> bool:
    try:
        verify_signature(by, ticket_input(consult_id, joiner), ticket)
    except BadSignature:
        return False
    return True


def _read_uint(data: bytes, offset: int) -> tuple[int, int]:
    """A y-protocols varuint of up to 53 bits (awareness client ids are that large)."""
    return read_varuint(data, offset, max_bytes=8, error="presence message has a bad number field")


def check_presence(message: bytes, node: str, bound_client: int | None) -> int | None:
    """Check a y-awareness message from the peer authenticated as ``node``.

    Every state in it must claim ``node``, and all must belong to one client
    id (``bound_client`` once known): a peer speaks only for itself. Returns
    that client id (None if the message holds no state).
    """
    if len(message) > MAX_PRESENCE_MESSAGE:
        raise MalformedMessage("presence message is too large")
    if not message or message[0] != 1:
        raise MalformedMessage("not a presence message")
    length, at = _read_uint(message, 1)
    if at + length != len(message):
        raise MalformedMessage("presence message length does not match its payload")
    count, at = _read_uint(message, at)
    if count > 1:
        raise MalformedMessage("a peer may only send its own presence")
    client = bound_client
    for _ in range(count):
        client_id, at = _read_uint(message, at)
        _clock, at = _read_uint(message, at)
        size, at = _read_uint(message, at)
        if at + size > len(message):
            raise MalformedMessage("presence state is truncated")
        try:
            state = json.loads(message[at : at + size])
        except ValueError as exc:
            raise MalformedMessage("presence state is not JSON") from exc
        at += size
        if client is not None and client_id != client:
            raise MalformedMessage("a peer may only send its own presence")
        client = client_id
        if state is not None and (not isinstance(state, dict) or state.get("node") != node):
            raise MalformedMessage(f"presence claims to be from another node than {node}")
        check_state(state)
    return client


# --- the connection, as this module needs it -----------------------------------------------


class LiveLink(Protocol):
    """What :class:`LiveConsult` needs of a PeerConnection (a fake in unit tests)."""

    @property
    def peer(self) -> bytes: ...
    @property
    def is_connected(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    async def send_live(self, data: bytes) -> None: ...
    def send_presence(self, data: bytes) -> bool: ...


class _Binding:
    """One peer in one consult: its sync session, outgoing queue and presence client."""

    def __init__(self, live: LiveConsult, link: LiveLink) -> None:
        self.link = link
        self.node = str(NodeId.from_public_key(link.peer))
        self.client: int | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE)
        self._live = live
        self.session = LiveSession(live.state, self.enqueue, self.node)
        self.sender = asyncio.ensure_future(self._send_loop())

    def enqueue(self, message: bytes) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # The peer fell far behind: replace the backlog by one full state (idempotent).
            log.warning("live queue to %s overflowed; resending the full state", self.node[:8])
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(
                SyncMessage(SyncKind.STEP2, self._live.state.full_update()).to_wire()
            )

    async def _send_loop(self) -> None:
        while True:
            message = await self.queue.get()
            for piece in fragment(self._live.consult_id, self._live.next_message_id(), message):
                try:
                    await self.link.send_live(piece.to_wire())
                except Exception as exc:  # the transport's errors: the watcher resyncs on return
                    log.info("live message to %s not sent: %s", self.node[:8], exc)
                    break

    def close(self) -> None:
        self.session.disconnect()
        self.sender.cancel()


class LiveConsult:
    """One participant's live session on a consult (see the module docstring)."""

    def __init__(
        self,
        consult_id: str,
        identity: Identity,
        name: str,
        colour: str,
        *,
        clock: Callable[[], float] = time.time,
        title: str = "",
        study_uid: str = "",
    ) -> None:
        _check_consult_id(consult_id)
        self.consult_id = consult_id
        self.study_uid = study_uid
        self.local_node = str(identity.node_id)
        self.title = title
        self.clock = clock
        self.state = SharedState(consult_id, identity)
        self.presence = Presence(self.local_node, name, colour, clock())
        self.finalised = False
        self._bindings: dict[bytes, _Binding] = {}
        self.expected: set[bytes] = set()  # invited or joined, their first message may race
        self._listeners: list[Listener] = []
        self._message_ids = 0
        self._tick: asyncio.Task[None] | None = None

    # -- participants -----------------------------------------------------------------
    def bind(self, link: LiveLink) -> bool:
        """Add a peer (idempotent); starts the sync with it. False if the session is full."""
        self.expected.discard(link.peer)
        if link.peer in self._bindings:
            return True
        if len(self._bindings) + 1 >= MAX_PARTICIPANTS:
            return False
        binding = self._bindings[link.peer] = _Binding(self, link)
        binding.session.connect()
        self._start_ticking()
        self._send_presence_now(force=True)
        return True

    def unbind(self, peer: bytes) -> None:
        binding = self._bindings.pop(peer, None)
        if binding is not None:
            binding.close()
            if binding.client is not None:
                # Connection gone: show them gone now rather than after the presence timeout.
                self.presence._awareness.remove_awareness_states([binding.client], "closed")
            self._changed()

    def resync(self, peer: bytes) -> None:
        """The connection to ``peer`` came back: exchange state vectors again."""
        binding = self._bindings.get(peer)
        if binding is not None:
            binding.session.connect()
            self._send_presence_now(force=True)

    @property
    def peers(self) -> list[bytes]:
        return list(self._bindings)

    def is_bound(self, peer: bytes) -> bool:
        return peer in self._bindings

    # -- incoming -------------------------------------------------------------------
    def receive_live(self, peer: bytes, message: bytes) -> None:
        binding = self._bindings.get(peer)
        if binding is None:
            return
        binding.session.receive(message)
        self._changed()

    def receive_presence(self, peer: bytes, message: bytes) -> None:
        binding = self._bindings.get(peer)
        if binding is None:
            return
        client = check_presence(message, binding.node, binding.client)
        if client is not None and binding.client is None and self._client_taken(client):
            raise MalformedMessage("presence uses the client id of another participant")
        binding.client = client
        before = self.presence.participants()
        self.presence.receive(message, self.clock())
        if self.presence.participants() != before:  # a heartbeat alone wakes nobody
            self._changed()

    def _client_taken(self, client: int) -> bool:
        """Whether an awareness client id is this node's own or bound to another peer (a
        peer taking it could hide that participant, or the presenter, from our view)."""
        return client == self.presence.client_id or any(
            b.client == client for b in self._bindings.values()
        )

    # -- local edits ------------------------------------------------------------------
    # Listeners are told once an edit returns, not from the document's observer: that runs
    # while the transaction is still open, and a listener reading the state there fails.
    def add_annotation(
        self,
        kind: AnnotationKind,
        sop_instance_uid: str,
        frame: int,
        points: tuple[Point, ...],
        *,
        text: str = "",
        values: Mapping[str, float] | None = None,
    ) -> Annotation:
        annotation = self.state.add_annotation(
            kind, sop_instance_uid, frame, points, self.clock(), text=text, values=values
        )
        self._changed()
        return annotation

    def remove_annotation(self, annotation_id: str) -> None:
        self.state.remove_annotation(annotation_id, self.clock())
        self._changed()

    def say(self, text: str) -> ChatMessage:
        message = self.state.say(text, self.clock())
        self._changed()
        return message

    def set_report_text(self, text: str) -> None:
        """Replace the draft by ``text`` as the smallest edit (common prefix and suffix kept),
        so a concurrent edit elsewhere in the text survives."""
        start, end_old, end_new = changed_span(self.state.report_text, text)
        if end_old > start:
            self.state.delete_report(start, end_old)
        if end_new > start:
            self.state.insert_report(start, text[start:end_new])
        if end_old > start or end_new > start:
            self._changed()

    def move_cursor(self, cursor: Cursor | None) -> None:
        self.presence.set_cursor(cursor, self.clock())
        self._send_presence_now()

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        self.presence.set_viewport(viewport, self.clock(), by_user=by_user)
        self._send_presence_now()

    def set_tool(self, tool: str) -> None:
        self.presence.set_tool(tool, self.clock())
        self._send_presence_now()

    def present(self, on: bool) -> None:
        self.presence.present(on, self.clock())
        self._send_presence_now()
        self._changed()

    def follow(self) -> None:
        self.presence.follow(self.clock())
        self._send_presence_now()
        self._changed()

    # -- reading --------------------------------------------------------------------
    def participants(self) -> list[Participant]:
        return self.presence.participants()

    def annotations(self) -> list[Annotation]:
        return self.state.annotations()

    def chat(self) -> list[ChatMessage]:
        return list(self.state.snapshot().chat)

    def report_text(self) -> str:
        return self.state.report_text

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    # -- lifecycle ------------------------------------------------------------------
    async def close(self) -> None:
        """Tell everyone we left, stop ticking, drop every peer."""
        goodbye = self.presence.leave(self.clock())
        for binding in self._bindings.values():
            binding.link.send_presence(PresenceEnvelope(self.consult_id, goodbye).to_wire())
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        for peer in list(self._bindings):
            self.unbind(peer)

    def next_message_id(self) -> int:
        self._message_ids += 1
        return self._message_ids

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("a live session listener failed")

    def _send_presence_now(self, *, force: bool = False) -> None:
        message = self.presence.poll(self.clock())
        if message is None and force:
            me = self.presence.me  # re-set the same state: sent now unless rate-limited
            self.presence.set_tool(me.tool, self.clock())
            message = self.presence.poll(self.clock())
        if message is None:
            return
        wire = PresenceEnvelope(self.consult_id, message).to_wire()
        for binding in self._bindings.values():
            binding.link.send_presence(wire)

    def _start_ticking(self) -> None:
        if self._tick is None or self._tick.done():
            self._tick = asyncio.ensure_future(self._ticker())

    async def _ticker(self) -> None:
        """Coalesced cursor moves, heartbeats and expiry; runs while the session is open."""
        while True:
            await asyncio.sleep(TICK_S)
            self._send_presence_now()
            if self.presence.expire(self.clock()):
                self._changed()


# --- the node's side -----------------------------------------------------------------------


class LiveHub:
    """Every live session of one node, over its transport (see the module docstring).

    ``is_trusted(public_key)`` gates invites; ``notify(text)`` tells the person
    (the runtime's notifications). Invites from trusted peers are accepted
    automatically when ``auto_join`` (the TUI shows the session in the worklist).

    Admission: ``may_join(consult_id, public_key)`` (the runtime's
    :class:`~consult.admission.Admission`) says whether a peer may be bound to a
    session; None means no consult of that id is on record here, and then only
    the peers this node invited, the peer that invited it, the members that
    inviter named and joiners with a ticket signed by one of those are admitted.
    Every refused invite or join is reported to ``on_refused(consult_id,
    public_key, how)`` (the runtime audits it) and answered ``not-admitted``.
    """

    def __init__(
        self,
        transport: Transport,
        identity: Identity,
        name: str,
        *,
        is_trusted: Callable[[bytes], bool],
        notify: Callable[[str], None] = lambda _text: None,
        clock: Callable[[], float] = time.time,
        auto_join: bool = True,
        may_join: Callable[[str, bytes], bool | None] = lambda _consult, _peer: None,
        on_refused: Callable[[str, bytes, str], None] = lambda _consult, _peer, _how: None,
    ) -> None:
        self.may_join = may_join
        self.on_refused = on_refused
        # Consults with no record here: who this node admits, and the ticket it joins with.
        self._rosters: dict[str, set[bytes]] = {}
        self._tickets: dict[str, tuple[bytes, bytes]] = {}
        self._opened_by: dict[str, bytes] = {}  # session opened on a peer's invite -> that peer
        self._refusals: dict[bytes, tuple[float, int]] = {}  # peer -> (window start, count)
        self.transport = transport
        self.identity = identity
        self.own_key = identity.public_key
        self.local_node = str(identity.node_id)
        self.name = name
        self.is_trusted = is_trusted
        self.notify = notify
        self.clock = clock
        self.auto_join = auto_join
        self.sessions: dict[str, LiveConsult] = {}
        self._links: dict[bytes, PeerConnection] = {}
        self._reassemblers: dict[bytes, Reassembler] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        transport.handle(INVITE_KIND, self._on_invite)
        transport.handle(JOIN_KIND, self._on_join)

    # -- sessions -------------------------------------------------------------------
    def open(self, consult_id: str, title: str = "", study_uid: str = "") -> LiveConsult:
        """This node's session on ``consult_id`` (created if needed)."""
        live = self.sessions.get(consult_id)
        if live is None:
            colour = PALETTE[sum(self.own_key) % len(PALETTE)]
            live = LiveConsult(
                consult_id,
                self.identity,
                self.name,
                colour,
                clock=self.clock,
                title=title,
                study_uid=study_uid,
            )
            self.sessions[consult_id] = live
        return live

    async def leave(self, consult_id: str) -> None:
        self._rosters.pop(consult_id, None)
        self._tickets.pop(consult_id, None)
        self._opened_by.pop(consult_id, None)
        live = self.sessions.pop(consult_id, None)
        if live is not None:
            await live.close()

    async def invite(self, consult_id: str, peer: bytes) -> None:
        """Invite a trusted peer into this node's session on ``consult_id``.

        Raises LocalConsultError if the peer is not trusted or the session is
        full; the transport's errors if it cannot be reached or refuses.
        """
        if not self.is_trusted(peer):
            raise LocalConsultError(
                f"{NodeId.from_public_key(peer).short()} is not trusted: verify its safety "
                "number (`radmesh trust verify`) before inviting it to a live session"
            )
        verdict = self.may_join(consult_id, peer)
        if verdict is False:
            raise LocalConsultError(
                f"{NodeId.from_public_key(peer).short()} is not a party of consult "
                f"{consult_id[:8]}: the requesting hospital's node and the consultant's node "
                "must both approve it as a guest before it can be invited"
            )
        live = self.open(consult_id)
        if len(live.peers) + 2 > MAX_PARTICIPANTS:
            raise LocalConsultError(f"a live session holds at most {MAX_PARTICIPANTS} people")
        if verdict is None:
            self._rosters.setdefault(consult_id, set()).add(peer)
        conn = await self.transport.connect(peer)
        self._attach(conn)
        members = tuple(p for p in live.peers if p != peer)
        live.expected.add(peer)
        ticket = self.identity.sign(ticket_input(consult_id, peer))
        await conn.request(
            INVITE_KIND,
            Invite(consult_id, members, live.title, live.study_uid, self.own_key, ticket).to_wire(),
        )
        live.bind(conn)

    async def close(self) -> None:
        for consult_id in list(self.sessions):
            await self.leave(consult_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- requests from peers ------------------------------------------------------------
    async def _on_invite(self, conn: PeerConnection, body: bytes) -> bytes:
        invite = Invite.from_wire(body)
        consult_id = invite.consult_id
        if not self.auto_join and consult_id not in self.sessions:
            raise RequestRefused("declined", "this node does not join live sessions on invite")
        if consult_id not in self.sessions and self._invited_sessions(conn.peer) >= (
            MAX_INVITED_SESSIONS
        ):
            raise RequestRefused(
                "busy",
                f"your node already has {MAX_INVITED_SESSIONS} live sessions open on this node: "
                "ask its user to leave some first",
            )
        unrecorded = self.may_join(consult_id, conn.peer) is None
        if unrecorded and consult_id not in self.sessions:
            self._rosters.setdefault(consult_id, set()).add(conn.peer)  # a new session
        if not self._admits(consult_id, conn.peer) or not self._may_invite(
            consult_id, conn.peer, invite.members
        ):
            raise self._refuse(consult_id, conn.peer, "invite")
        if consult_id not in self.sessions:
            self._opened_by[consult_id] = conn.peer
        live = self.open(consult_id, invite.title, invite.study_uid)
        self._attach(conn)
        if not live.bind(conn):
            raise RequestRefused("full", f"the session already has {MAX_PARTICIPANTS} people")
        if unrecorded:  # the inviter vouches for the members it names
            self._rosters.setdefault(consult_id, set()).update(invite.members)
        if invite.ticket:
            self._tickets[consult_id] = (invite.by, invite.ticket)
        self.notify(
            f"{NodeId.from_public_key(conn.peer).short()} invited you to a live session "
            f"on consult {invite.consult_id[:8]}"
        )
        for member in invite.members:
            if member != self.own_key and not live.is_bound(member):
                self._spawn(self._join(invite.consult_id, member))
        return b"ok"

    async def _on_join(self, conn: PeerConnection, body: bytes) -> bytes:
        invite = Invite.from_wire(body)
        if not self._admits(
            invite.consult_id, conn.peer, invite.by, invite.ticket
        ) or not self._vouched(invite, conn.peer):
            raise self._refuse(invite.consult_id, conn.peer, "join")
        live = self.sessions.get(invite.consult_id)
        if live is None:
            raise RequestRefused("not-in-session", "this node is not in that live session")
        if invite.consult_id in self._rosters:
            self._rosters[invite.consult_id].add(conn.peer)
        self._attach(conn)
        if not live.bind(conn):
            raise RequestRefused("full", f"the session already has {MAX_PARTICIPANTS} people")
        return b"ok"

    async def _join(self, consult_id: str, member: bytes) -> None:
        """Complete the mesh: connect to a participant the inviter named."""
        if not self.is_trusted(member):
            self.notify(
                f"live session {consult_id[:8]}: {NodeId.from_public_key(member).short()} "
                "is not trusted by this node, so you will not see them"
            )
            return
        if not self._admits(consult_id, member):
            self.notify(
                f"live session {consult_id[:8]}: {NodeId.from_public_key(member).short()} "
                "is not a party of the consult nor a guest both parties approved, so this "
                "node does not share the session with it"
            )
            return
        by, ticket = self._tickets.get(consult_id, (b"", b""))
        try:
            conn = await self.transport.connect(member)
            self._attach(conn)
            live = self.sessions.get(consult_id)
            if live is not None:
                live.expected.add(member)
            await conn.request(JOIN_KIND, Invite(consult_id, by=by, ticket=ticket).to_wire())
        except Exception as exc:
            log.info("could not join %s in the live session: %s", member.hex()[:8], exc)
            return
        live = self.sessions.get(consult_id)
        if live is not None:
            live.bind(conn)

    # -- admission ------------------------------------------------------------------
    def _may_invite(self, consult_id: str, peer: bytes, named: tuple[bytes, ...] = ()) -> bool:
        """A session opened here on another peer's invite, with no consult on record:
        only its opener and peers already in it may invite this node to it again. The
        members the opener named are joined, not taken as inviters: else a stranger
        naming the consult's parties would have this node let them in and relay the
        consult to the stranger. One exception: a member the opener named whose own
        invite names the opener among its session's members (both parties inviting an
        approved guest at once, the second invite arriving before the mesh join). A
        real party names only peers in its own session, and it admits no stranger."""
        opener = self._opened_by.get(consult_id)
        live = self.sessions.get(consult_id)
        if opener is None or live is None or self.may_join(consult_id, peer) is not None:
            return True
        if peer == opener or live.is_bound(peer):
            return True
        return opener in named and peer in self._rosters.get(consult_id, set())

    def _vouched(self, invite: Invite, joiner: bytes) -> bool:
        """A consult on record here: the joiner shows the ticket of the node that invited
        it, and that node is admitted here too (a party or an approved guest). Else a
        stranger that invited an approved guest (who has no record of the consult, so
        takes its inviter's word) into the session would have the guest relay it."""
        if self.may_join(invite.consult_id, joiner) is None:
            return True  # no record here: the roster in _admits decides
        return (
            bool(invite.by)
            and self.may_join(invite.consult_id, invite.by) is True
            and ticket_valid(invite.consult_id, joiner, invite.by, invite.ticket)
        )

    def _invited_sessions(self, peer: bytes) -> int:
        """How many of this node's open sessions ``peer``'s invites opened."""
        return sum(1 for c, p in self._opened_by.items() if p == peer and c in self.sessions)

    def _admits(self, consult_id: str, peer: bytes, by: bytes = b"", ticket: bytes = b"") -> bool:
        """Whether ``peer`` may be bound to this node's session on ``consult_id``."""
        verdict = self.may_join(consult_id, peer)
        if verdict is not None:
            return verdict
        roster = self._rosters.get(consult_id, set())
        return peer in roster or (
            by in roster and bool(ticket) and ticket_valid(consult_id, peer, by, ticket)
        )

    def _worth_recording(self, peer: bytes) -> bool:
        """Whether a refusal of ``peer`` is audited and logged: at most
        MAX_AUDITED_REFUSALS per REFUSAL_WINDOW_S, so a flood of joins for made-up
        consult ids does not fill the audit log (each is still refused)."""
        now = self.clock()
        start, count = self._refusals.get(peer, (now, 0))
        if now - start >= REFUSAL_WINDOW_S:
            start, count = now, 0
        if peer not in self._refusals and len(self._refusals) >= MAX_REFUSING:
            self._refusals.clear()
        self._refusals[peer] = (start, count + 1)
        if count == MAX_AUDITED_REFUSALS:
            log.warning(
                "%s keeps asking for live sessions it is not admitted to: further refusals "
                "are not recorded for %.0f s",
                NodeId.from_public_key(peer).short(),
                REFUSAL_WINDOW_S,
            )
        return count < MAX_AUDITED_REFUSALS

    def _refuse(self, consult_id: str, peer: bytes, how: str) -> RequestRefused:
        if self._worth_recording(peer):
            log.warning(
                "refused a live %s from %s: not a party of that consult nor an approved guest",
                how,
                NodeId.from_public_key(peer).short(),
            )
            try:
                self.on_refused(consult_id, peer, how)
            except Exception:
                log.exception("recording a refused live %s failed", how)
        return RequestRefused(
            NOT_ADMITTED,
            "this node does not admit your node to that live session: only the consult's "
            "parties and the guests both of them approved take part",
        )

    # -- connections ----------------------------------------------------------------
    def _attach(self, conn: PeerConnection) -> None:
        peer: bytes = conn.peer
        if self._links.get(peer) is conn:
            return
        self._links[peer] = conn
        self._reassemblers[peer] = Reassembler()
        conn.set_receiver("live", lambda data: self._on_live(conn, data))
        conn.set_receiver("presence", lambda data: self._on_presence(conn, data))
        self._spawn(self._watch(conn))

    def drop_peer(self, peer: bytes) -> None:
        """``peer`` is no longer trusted: out of every session now, its connection closed.

        The runtime calls this when the trust store changes (a revocation, an
        organisation's revocation list); live messages are also checked one by one.
        """
        for live in self.sessions.values():
            live.expected.discard(peer)
            live.unbind(peer)
        conn = self._links.pop(peer, None)
        self._reassemblers.pop(peer, None)
        if conn is not None:
            self._spawn(conn.close("this node no longer trusts you"))

    def _refused(self, conn: PeerConnection) -> bool:
        """True (and the peer dropped) if a live message comes from a peer no longer trusted."""
        if self.is_trusted(conn.peer):
            return False
        log.warning("live message from %s refused: no longer trusted", conn.peer_id.short())
        self.drop_peer(conn.peer)
        return True

    def _on_live(self, conn: PeerConnection, data: bytes) -> None:
        if self._refused(conn):
            return
        try:
            piece = LiveFragment.from_wire(data)
            if self._withdrawn(piece.consult_id, conn.peer):
                return
            message = self._reassemblers[conn.peer].feed(piece)
            if message is None:
                return
            live = self.sessions.get(piece.consult_id)
            if live is None:
                return  # we left: late messages are dropped
            if not live.is_bound(conn.peer) and conn.peer in live.expected:
                live.bind(conn)  # its first message raced ahead of our request's answer
            live.receive_live(conn.peer, message)
        except RemoteConsultError as exc:
            self._misbehaved(conn, exc)

    def _on_presence(self, conn: PeerConnection, data: bytes) -> None:
        if self._refused(conn):
            return
        try:
            envelope = PresenceEnvelope.from_wire(data)
            if self._withdrawn(envelope.consult_id, conn.peer):
                return
            live = self.sessions.get(envelope.consult_id)
            if live is not None:
                live.receive_presence(conn.peer, envelope.message)
        except RemoteConsultError as exc:
            self._misbehaved(conn, exc)

    def expel(self, consult_id: str, peer: bytes) -> bool:
        """``peer`` is no longer admitted to the session on ``consult_id`` (a guest refused
        after its approval, the consult withdrawn): out of that session now. Its connection
        stays, for the other consults it may share with this node. True if it was in."""
        live = self.sessions.get(consult_id)
        if live is None:
            return False
        was_in = live.is_bound(peer) or peer in live.expected
        live.expected.discard(peer)
        live.unbind(peer)
        roster = self._rosters.get(consult_id)
        if roster is not None:
            roster.discard(peer)
        reassembler = self._reassemblers.get(peer)
        if reassembler is not None:
            reassembler.forget(consult_id)
        return was_in

    def recheck(self, consult_id: str) -> list[bytes]:
        """Ask the admission check again for everyone in the session on ``consult_id`` (the
        consult was withdrawn, a guest refused) and expel those it no longer lets in."""
        live = self.sessions.get(consult_id)
        if live is None:
            return []
        gone = [
            peer
            for peer in {*live.peers, *live.expected}
            if self.may_join(consult_id, peer) is False
        ]
        for peer in gone:
            self.expel(consult_id, peer)
        return gone

    def _withdrawn(self, consult_id: str, peer: bytes) -> bool:
        """True if the admission check no longer lets ``peer`` into this node's session on
        ``consult_id``: its message is dropped, and if it was still in the session it is
        expelled and the refusal reported (once). Asked for every live and presence
        message: admission is not only checked when a peer is bound."""
        live = self.sessions.get(consult_id)
        if live is None or self.may_join(consult_id, peer) is not False:
            return False
        if live.is_bound(peer) or peer in live.expected:  # reported once, when it goes
            log.warning(
                "live message from %s refused: no longer admitted to that session",
                NodeId.from_public_key(peer).short(),
            )
            self.expel(consult_id, peer)
            try:
                self.on_refused(consult_id, peer, "message")
            except Exception:
                log.exception("recording a refused live message failed")
        return True

    def _misbehaved(self, conn: PeerConnection, exc: Exception) -> None:
        log.warning("closing the connection to %s: %s", conn.peer_id.short(), exc)
        for live in self.sessions.values():
            live.unbind(conn.peer)
        self._spawn(conn.close(f"bad live message: {exc}"))

    async def _watch(self, conn: PeerConnection) -> None:
        """Resync after a reconnect; forget the peer once its connection is closed."""
        was_connected = conn.is_connected
        while not conn.closed and self._links.get(conn.peer) is conn:
            await asyncio.sleep(WATCH_S)
            now_connected = conn.is_connected
            if now_connected and not was_connected:
                self._reassemblers[conn.peer].reset()
                for live in self.sessions.values():
                    live.resync(conn.peer)
            was_connected = now_connected
        if self._links.get(conn.peer) is conn:
            del self._links[conn.peer]
            self._reassemblers.pop(conn.peer, None)
            for live in self.sessions.values():
                live.unbind(conn.peer)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = [
    "Invite",
    "LiveConsult",
    "LiveFragment",
    "LiveHub",
    "PresenceEnvelope",
    "Reassembler",
    "check_presence",
    "fragment",
]
