"""The live shared state of a consultation: annotations, chat and the report text.

One pycrdt ``Doc`` per consult holds
- ``annotations``: Map annotation id -> plain dict (kind, anchor, points, author, time, ...);
- ``chat``: Array of message dicts;
- ``report``: Text, the report draft everyone edits together.

Peers exchange the Yjs sync protocol (step 1 = my state vector, step 2 = what
you are missing, update = a local edit), so a late joiner gets everything in
one step 2 and edits made offline merge when the peer comes back. The codec is
the standard y-protocols framing, parsed here with bounds checks and a size cap
before pycrdt sees a byte.

Every annotation value and every chat message is signed by its author's node
key (Ed25519) over a canonical encoding of its fields, its id and the consult
id, and carries the author's public key (a node id is only its hash). On
receive, UPDATE and STEP2 alike, an annotation or chat message that does not
verify for the author it names is removed again (so it is never relayed on)
and the message is a forgery: :meth:`SharedState.receive` raises
:class:`~consult.errors.Forgery` and the hub drops that connection. So a STEP2
catch-up relayed by one peer (a late joiner gets everyone's edits from it) can
no longer slip in an annotation or message in another participant's name.

A Yjs delete set does not say who deleted, so a removal carries its own proof:
the author writes a signed tombstone (:class:`Removal`, in the ``removed`` map,
same transaction) and receivers accept the removal of an annotation only if a
tombstone signed by that annotation's author is there (whoever relayed it);
otherwise it is written back. Tombstones are never removed or changed (put
back), and an annotation whose id has its author's tombstone is removed again
whenever it reappears (a replay), so a removed annotation cannot be resurrected
by anyone, in an update or a catch-up. Nobody deletes a chat message: a
deleted one is put back where it was (from a mirror of the chat array kept per
transaction), and a put-back copy is recognised as the same signed message.
Changes are still checked by connection:
the live channel is authenticated per peer, and in the full mesh a peer's own
edits reach us only as UPDATE messages on its own connection. Before a peer's
message is applied the annotations are read; after it, any annotation of
another author that it changed is written back (a local edit, so every peer
gets it back too), and in an UPDATE a new annotation or chat message in another
author's name is removed even when correctly signed. In an UPDATE any of this
is a forgery; in a STEP2 (which may relay other participants' work) only
unsigned, malformed or replayed entries are.

Limits are applied on receive as well as locally (see the ``MAX_`` constants):
an update that would grow the document past :data:`MAX_DOCUMENT` is refused
before it is applied; entries past their field caps are malformed; what a
message adds past an author's annotation or chat cap, or past the report's
length, is undone (the same deletions on every participant). The sender of
any of it loses its connection (:class:`~consult.errors.LimitExceeded`).

Why one module: One CRDT document: the checks on every remote update (author signatures,
sizes, kinds) must see the whole schema they guard.
"""

from __future__ import annotations

import functools
import math
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Self

import pycrdt

from consult.errors import Forgery, LimitExceeded, LocalConsultError, MalformedMessage, NotAuthor
from consult.ywire import read_varuint, varuint
from crypto import canonical
from crypto.errors import BadSignature, EncodingError, InvalidNodeId
from crypto.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, NodeId, verify_signature

MAX_UPDATE_MESSAGE = 256 * 1024  # one local edit
MAX_STEP1_MESSAGE = 64 * 1024  # a state vector: a few bytes per client that ever edited
MAX_SYNC_MESSAGE = 16 * 1024 * 1024  # a full state for a late joiner
# The whole document, as its full update: half the catch-up cap, so a late joiner always
# gets it in one step 2 (repairs and delete sets included).
MAX_DOCUMENT = 8 * 1024 * 1024
MAX_CHAT_CHARS = 4000
MAX_LABEL_CHARS = 500
MAX_POINTS = 16
MAX_REPORT_CHARS = 100_000
MAX_ANNOTATIONS_PER_AUTHOR = 2000
MAX_CHAT_PER_AUTHOR = 2000
MAX_VALUES = 16  # measurement results on one annotation
MAX_VALUE_NAME = 64
MAX_UID_CHARS = 64  # a DICOM UID
MAX_ID_CHARS = 64  # annotation and chat message ids (this node makes 32 hex digits)
MAX_FRAME = 2**31 - 1
MAX_COORD = 1e9  # image pixels: larger than any image; two points' difference stays finite

Point = tuple[float, float]

ANNOTATION_DOMAIN = b"radmesh/live-annotation/v1"
CHAT_DOMAIN = b"radmesh/live-chat/v1"
REMOVAL_DOMAIN = b"radmesh/live-removal/v1"


def _exact(value: Any) -> Any:
    """crypto.canonical refuses floats (ambiguous encodings); sign each as its 8 IEEE-754 bytes."""
    if isinstance(value, float):
        return struct.pack(">d", value)
    if isinstance(value, list):
        return [_exact(v) for v in value]
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    return value


def _signing_input(domain: bytes, consult_id: str, fields: dict[str, Any]) -> bytes:
    """What an author signs: every field but ``sig``, and the consult id, so a signed
    annotation or message cannot be replayed into another consultation."""
    unsigned = {k: _exact(v) for k, v in fields.items() if k != "sig"}
    return domain + canonical.encode([consult_id, unsigned])


@functools.lru_cache(maxsize=64)
def _node_id_text(public_key: bytes) -> str:
    # A session has at most a few authors; printing a node id costs more than verifying.
    return str(NodeId.from_public_key(public_key))


def _authentic(domain: bytes, consult_id: str, fields: dict[str, Any]) -> bool:
    """True if ``fields["sig"]`` is the signature of the node named in ``author``."""
    key = fields["key"]
    try:
        if _node_id_text(key) != fields["author"]:
            return False
        verify_signature(key, _signing_input(domain, consult_id, fields), fields["sig"])
    except (BadSignature, InvalidNodeId, EncodingError):
        return False
    return True


def _is_panic(exc: BaseException) -> bool:
    """pycrdt is Rust: a panic on a malformed update comes out as pyo3's PanicException,
    a BaseException (not an Exception), which no ``except Exception`` handler stops."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def _author(raw: Any) -> Any:
    return raw.get("author") if isinstance(raw, dict) else None


def _tomb_key(annotation_id: str, author: Any) -> str:
    """Where the tombstone of ``author``'s annotation ``annotation_id`` is kept: keyed by
    its author too, so no participant can occupy the place of another's tombstone (node
    ids have no ``/``)."""
    return f"{author}/{annotation_id}"


def _writable(value: Any) -> Any:
    """pycrdt reads bytes back as bytearray but writes a bytearray as None."""
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, list):
        return [_writable(v) for v in value]
    if isinstance(value, dict):
        return {k: _writable(v) for k, v in value.items()}
    return value


def _key_and_sig(raw: dict[str, Any]) -> tuple[bytes, bytes]:
    key, sig = raw["key"], raw["sig"]
    if not isinstance(key, bytes | bytearray) or len(key) != PUBLIC_KEY_SIZE:
        raise TypeError("key is not a 32-byte public key")
    if not isinstance(sig, bytes | bytearray) or len(sig) != SIGNATURE_SIZE:
        raise TypeError("sig is not a 64-byte signature")
    return bytes(key), bytes(sig)


class _Signed:
    """Signing for the entries of the shared document: each kind signs its own fields
    under its own domain, bound to the consult (a copy into another consult is forged)."""

    DOMAIN: ClassVar[bytes]
    key: bytes
    sig: bytes

    def to_py(self) -> dict[str, Any]:
        raise NotImplementedError

    def _signed_fields(self) -> dict[str, Any]:
        return self.to_py()

    def signed(self, identity: Identity, consult_id: str) -> Self:
        unsigned = replace(self, key=identity.public_key, sig=b"")  # type: ignore[type-var]
        message = _signing_input(self.DOMAIN, consult_id, unsigned._signed_fields())
        return replace(unsigned, sig=identity.sign(message))  # type: ignore[type-var]

    def is_authentic(self, consult_id: str) -> bool:
        return _authentic(self.DOMAIN, consult_id, self._signed_fields())


class AnnotationKind(StrEnum):
    POINT = "point"
    ARROW = "arrow"
    LENGTH = "length"
    ANGLE = "angle"
    ELLIPSE = "ellipse"


_POINT_COUNT = {
    AnnotationKind.POINT: 1,
    AnnotationKind.ARROW: 2,
    AnnotationKind.LENGTH: 2,
    AnnotationKind.ANGLE: 3,  # vertex, arm a, arm b
    AnnotationKind.ELLIPSE: 2,  # centre, (radius x, radius y) corner offset
}


def point_count(kind: AnnotationKind) -> int:
    """How many points an annotation of this kind has."""
    return _POINT_COUNT[kind]


@dataclass(frozen=True)
class Annotation(_Signed):
    """A mark anchored in image coordinates (x = column, y = row) of one frame of one instance."""

    DOMAIN: ClassVar[bytes] = ANNOTATION_DOMAIN

    id: str
    kind: AnnotationKind
    sop_instance_uid: str
    frame: int
    points: tuple[Point, ...]
    author: str  # node id text
    at: float
    text: str = ""
    # Computed measurement results, e.g. {"length_mm": 12.3} or ROI stats in HU.
    values: Mapping[str, float] = field(default_factory=dict)
    key: bytes = b""  # the author's public key (a node id is only its hash)
    sig: bytes = b""  # the author's signature, see :meth:`signed`

    def __post_init__(self) -> None:
        if len(self.points) != _POINT_COUNT[self.kind]:
            raise LocalConsultError(
                f"a {self.kind.value} annotation has {_POINT_COUNT[self.kind]} point(s), "
                f"not {len(self.points)}"
            )
        if len(self.text) > MAX_LABEL_CHARS:
            raise LocalConsultError(f"annotation text is limited to {MAX_LABEL_CHARS} characters")
        if len(self.values) > MAX_VALUES or any(len(k) > MAX_VALUE_NAME for k in self.values):
            raise LocalConsultError(
                f"an annotation holds at most {MAX_VALUES} values, "
                f"named in at most {MAX_VALUE_NAME} characters"
            )
        if not (
            0 < len(self.id) <= MAX_ID_CHARS
            and len(self.sop_instance_uid) <= MAX_UID_CHARS
            and 0 <= self.frame <= MAX_FRAME
        ):
            raise LocalConsultError("annotation id, instance UID or frame is out of range")
        numbers = [*self.values.values(), self.at, *(c for p in self.points for c in p)]
        if not all(math.isfinite(n) for n in numbers):
            raise LocalConsultError("annotation points, time and values must be finite numbers")
        if any(abs(c) > MAX_COORD for p in self.points for c in p):
            raise LocalConsultError(f"annotation points are limited to ±{MAX_COORD:g} pixels")

    def to_py(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "sop": self.sop_instance_uid,
            "frame": self.frame,
            "points": [[float(x), float(y)] for x, y in self.points],
            "author": self.author,
            "at": float(self.at),
            "text": self.text,
            "values": {k: float(v) for k, v in self.values.items()},
            "key": self.key,
            "sig": self.sig,
        }

    def _signed_fields(self) -> dict[str, Any]:
        # The id is the map key, not in the value, but signed: a copy under another key is forged.
        return {**self.to_py(), "id": self.id}

    @classmethod
    def from_py(cls, annotation_id: str, raw: Any) -> Annotation:
        """Parse what a (possibly misbehaving) peer put in the shared doc (unverified)."""
        try:
            if not isinstance(raw, dict):
                raise TypeError("not an annotation")
            key, sig = _key_and_sig(raw)
            points = raw["points"]
            if not isinstance(points, list) or len(points) > MAX_POINTS:
                raise TypeError("points")
            values = raw.get("values", {})
            if not isinstance(values, dict):
                raise TypeError("values")
            return cls(
                id=annotation_id,
                kind=AnnotationKind(raw["kind"]),
                sop_instance_uid=str(raw["sop"]),
                frame=int(raw["frame"]),
                points=tuple((float(p[0]), float(p[1])) for p in points),
                author=str(raw["author"]),
                at=float(raw["at"]),
                text=str(raw.get("text", "")),
                values={str(k): float(v) for k, v in values.items()},
                key=key,
                sig=sig,
            )
        except (KeyError, TypeError, ValueError, IndexError, LocalConsultError) as exc:
            raise MalformedMessage(f"annotation {annotation_id!r} is malformed: {exc}") from exc


@dataclass(frozen=True)
class ChatMessage(_Signed):
    DOMAIN: ClassVar[bytes] = CHAT_DOMAIN
    id: str
    author: str
    at: float
    text: str
    key: bytes = b""  # as in Annotation
    sig: bytes = b""

    def __post_init__(self) -> None:
        if len(self.text) > MAX_CHAT_CHARS:
            raise LocalConsultError(f"a chat message is limited to {MAX_CHAT_CHARS} characters")
        if not 0 < len(self.id) <= MAX_ID_CHARS or not math.isfinite(self.at):
            raise LocalConsultError("chat message id or time is out of range")

    def to_py(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "author": self.author,
            "at": float(self.at),
            "text": self.text,
            "key": self.key,
            "sig": self.sig,
        }

    @classmethod
    def from_py(cls, raw: Any) -> ChatMessage:
        try:
            if not isinstance(raw, dict):
                raise TypeError("not a chat message")
            key, sig = _key_and_sig(raw)
            return cls(
                str(raw["id"]), str(raw["author"]), float(raw["at"]), str(raw["text"]), key, sig
            )
        except (KeyError, TypeError, ValueError, LocalConsultError) as exc:
            raise MalformedMessage(f"chat message is malformed: {exc}") from exc


@dataclass(frozen=True)
class Removal(_Signed):
    """A tombstone: the author of annotation ``id`` removed it (signed, like the annotation)."""

    DOMAIN: ClassVar[bytes] = REMOVAL_DOMAIN

    id: str
    author: str
    at: float
    key: bytes = b""
    sig: bytes = b""

    def to_py(self) -> dict[str, Any]:
        return {"author": self.author, "at": float(self.at), "key": self.key, "sig": self.sig}

    def _signed_fields(self) -> dict[str, Any]:
        return {**self.to_py(), "id": self.id}

    @classmethod
    def from_py(cls, annotation_id: str, raw: Any) -> Removal:
        try:
            if not isinstance(raw, dict) or len(annotation_id) > MAX_ID_CHARS:
                raise TypeError("not a removal")
            key, sig = _key_and_sig(raw)
            return cls(annotation_id, str(raw["author"]), float(raw["at"]), key, sig)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"removal of {annotation_id[:40]!r} is malformed") from exc


# --- wire ----------------------------------------------------------------------------------


class SyncKind(IntEnum):
    STEP1 = 0  # "here is my state vector"
    STEP2 = 1  # "here is everything you are missing"
    UPDATE = 2  # "here is an edit"


@dataclass(frozen=True)
class SyncMessage:
    """One y-protocols sync message: byte 0 (sync), kind, varuint length, payload."""

    kind: SyncKind
    payload: bytes

    def to_wire(self) -> bytes:
        return bytes([0, self.kind]) + varuint(len(self.payload)) + self.payload

    @classmethod
    def from_wire(cls, data: bytes) -> SyncMessage:
        if len(data) > MAX_SYNC_MESSAGE:
            raise MalformedMessage(
                f"live message is {len(data)} bytes, limit is {MAX_SYNC_MESSAGE}"
            )
        if len(data) < 3 or data[0] != 0 or data[1] not in (0, 1, 2):
            raise MalformedMessage("not a live sync message")
        kind = SyncKind(data[1])
        if kind == SyncKind.UPDATE and len(data) > MAX_UPDATE_MESSAGE:
            raise MalformedMessage(
                f"live update is {len(data)} bytes, limit is {MAX_UPDATE_MESSAGE}"
            )
        if kind == SyncKind.STEP1 and len(data) > MAX_STEP1_MESSAGE:
            raise MalformedMessage(
                f"live state vector is {len(data)} bytes, limit is {MAX_STEP1_MESSAGE}"
            )
        length, start = read_varuint(data, 2)
        if start + length != len(data):
            raise MalformedMessage("live message length does not match its payload")
        return cls(kind, data[start:])


def changed_span(old: str, new: str) -> tuple[int, int, int]:
    """(start, end in ``old``, end in ``new``): what lies between the common prefix and
    the common suffix of the two texts, the smallest edit from one to the other."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end_old, end_new = len(old), len(new)
    while end_old > start and end_new > start and old[end_old - 1] == new[end_new - 1]:
        end_old -= 1
        end_new -= 1
    return start, end_old, end_new


def _inserted(old: str, new: str) -> tuple[int, int]:
    """The range of ``new`` between its common prefix and suffix with ``old``."""
    start, _, end_new = changed_span(old, new)
    return start, end_new


def _utf8_offset(text: str, index: int) -> int:
    """pycrdt's Text counts UTF-8 bytes; people and the TUI count characters.

    An offset inside a multi-byte character corrupts the edit, so every index
    is converted here, never passed through.
    """
    return len(text[: max(0, index)].encode())


# --- the document --------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything a participant sees, as plain values: equal snapshots mean converged peers."""

    annotations: tuple[Annotation, ...]
    chat: tuple[ChatMessage, ...]
    report: str
    malformed: int  # entries a peer wrote that do not parse (shown to nobody, counted)


class SharedState:
    """One participant's copy of a consultation's live document."""

    def __init__(self, consult_id: str, identity: Identity, client_id: int | None = None) -> None:
        self.consult_id = consult_id
        self._identity = identity  # signs every annotation and chat message made here
        self.local_node = str(identity.node_id)
        self.doc: pycrdt.Doc[Any] = (
            pycrdt.Doc(client_id=client_id) if client_id is not None else pycrdt.Doc()
        )
        self._annotations = self.doc.get("annotations", type=pycrdt.Map)
        self._chat = self.doc.get("chat", type=pycrdt.Array)
        self._report = self.doc.get("report", type=pycrdt.Text)
        self._listeners: list[Callable[[bytes], None]] = []
        self._applying_remote = False
        self._subscription = self.doc.observe(self._on_transaction)
        # While a peer's message is applied: annotation id -> value before it (None: new),
        # and the indexes of the chat messages it inserted.
        self._touched: dict[str, Any] | None = None
        self._said: list[int] | None = None
        # Tombstones of removed annotations (id -> signed Removal), never removed themselves;
        # while a peer's message is applied: tombstone id -> value before it.
        self._removed = self.doc.get("removed", type=pycrdt.Map)
        self._buried: dict[str, Any] | None = None
        self._removed.observe(self._on_removed)
        self._size = len(self.doc.get_update())  # an upper bound on the full update, see _room
        self._annotations.observe(self._on_annotations)
        # Nobody deletes a chat message: the chat as last seen, to put back what a peer deleted.
        self._chat_mirror: list[Any] = []
        self._unsaid: list[tuple[int, list[Any]]] | None = None
        self._chat.observe(self._on_chat)

    # local edits ------------------------------------------------------------------------
    def add_annotation(
        self,
        kind: AnnotationKind,
        sop_instance_uid: str,
        frame: int,
        points: tuple[Point, ...],
        now: float,
        *,
        text: str = "",
        values: Mapping[str, float] | None = None,
    ) -> Annotation:
        if self._count_by(self._annotations.to_py().values())[self.local_node] >= (
            MAX_ANNOTATIONS_PER_AUTHOR
        ):
            raise LocalConsultError(
                f"a participant may make at most {MAX_ANNOTATIONS_PER_AUTHOR} annotations "
                "in one session: remove some first"
            )
        self._local_room(1024 + 4 * len(text))
        annotation = Annotation(
            uuid.uuid4().hex,
            kind,
            sop_instance_uid,
            frame,
            points,
            self.local_node,
            now,
            text,
            dict(values or {}),
        ).signed(self._identity, self.consult_id)
        self._annotations[annotation.id] = annotation.to_py()
        return annotation

    def remove_annotation(self, annotation_id: str, now: float = 0.0) -> None:
        raw = self._annotations.get(annotation_id)
        if raw is None:
            return
        if Annotation.from_py(annotation_id, raw).author != self.local_node:
            raise NotAuthor(
                "only the author can remove an annotation: ask them, or hide it in your own view"
            )
        removal = Removal(annotation_id, self.local_node, now)
        with self.doc.transaction():  # the signed tombstone travels with the removal
            self._removed[_tomb_key(annotation_id, self.local_node)] = removal.signed(
                self._identity, self.consult_id
            ).to_py()
            del self._annotations[annotation_id]

    def say(self, text: str, now: float) -> ChatMessage:
        if len(text) > MAX_CHAT_CHARS:
            raise LocalConsultError(f"a chat message is limited to {MAX_CHAT_CHARS} characters")
        if self._chat_counts()[self.local_node] >= MAX_CHAT_PER_AUTHOR:
            raise LocalConsultError(
                f"a participant may send at most {MAX_CHAT_PER_AUTHOR} chat messages in one session"
            )
        self._local_room(512 + 4 * len(text))
        message = ChatMessage(uuid.uuid4().hex, self.local_node, now, text).signed(
            self._identity, self.consult_id
        )
        self._chat.append(message.to_py())
        return message

    def insert_report(self, index: int, text: str) -> None:
        """Insert at a character index (clamped to the text)."""
        current = str(self._report)
        if len(current) + len(text) > MAX_REPORT_CHARS:
            raise LocalConsultError(f"the report draft is limited to {MAX_REPORT_CHARS} characters")
        self._local_room(64 + 4 * len(text))
        self._report.insert(_utf8_offset(current, index), text)

    def delete_report(self, start: int, end: int) -> None:
        """Delete characters [start, end) (clamped to the text)."""
        current = str(self._report)
        start_b, end_b = _utf8_offset(current, start), _utf8_offset(current, end)
        if start_b < end_b:
            del self._report[start_b:end_b]

    # reading ----------------------------------------------------------------------------
    @property
    def report_text(self) -> str:
        return str(self._report)

    def annotations(self) -> list[Annotation]:
        return list(self.snapshot().annotations)

    def snapshot(self) -> Snapshot:
        malformed = 0
        annotations = []
        removed = self._removed.to_py()
        for key, raw in self._annotations.to_py().items():
            if self._tombstone_matches(removed.get(_tomb_key(key, _author(raw))), raw):
                continue  # a resurrection not yet repaired: never shown
            try:
                annotations.append(Annotation.from_py(key, raw))
            except MalformedMessage:
                malformed += 1
        chat = []
        said: set[tuple[str, str]] = set()
        for raw in self._chat.to_py():
            try:
                message = ChatMessage.from_py(raw)
            except MalformedMessage:
                malformed += 1
                continue
            # A signed message replayed by another peer: shown once. By author and id: a
            # message under another author's id does not hide that author's message.
            if (message.author, message.id) not in said:
                said.add((message.author, message.id))
                chat.append(message)
        annotations.sort(key=lambda a: a.id)
        return Snapshot(tuple(annotations), tuple(chat), str(self._report), malformed)

    # sync ---------------------------------------------------------------------------------
    def on_local_update(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``listener(update message bytes)`` for every local edit; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _on_transaction(self, event: Any) -> None:
        self._size += len(event.update)
        if self._applying_remote:
            return  # full mesh: every peer hears an edit from its author, no re-broadcast
        update: bytes = event.update
        if update == b"\x00\x00":
            return
        wire = SyncMessage(SyncKind.UPDATE, update).to_wire()
        for listener in list(self._listeners):
            listener(wire)

    def sync_step1(self) -> bytes:
        return SyncMessage(SyncKind.STEP1, self.doc.get_state()).to_wire()

    def full_update(self) -> bytes:
        return self.doc.get_update()

    def receive(self, data: bytes, sender: str | None = None) -> bytes | None:
        """Apply a peer's sync message; return the reply to send back, if any.

        Every annotation and chat message it adds or changes must carry its
        author's signature; those that do not are removed again and receive
        raises :class:`Forgery`. ``sender`` is the node id the connection was
        authenticated as; with it, annotations of other authors that the message
        removed or changed are restored too (see the module docstring).
        """
        message = SyncMessage.from_wire(data)
        try:
            if message.kind == SyncKind.STEP1:
                return SyncMessage(SyncKind.STEP2, self.doc.get_update(message.payload)).to_wire()
            if message.payload == b"\x00\x00":
                return None
            if not self._fits(message.payload):
                raise LimitExceeded(
                    f"{sender[:8] if sender else 'a peer'} sent a live edit that would grow the "
                    f"shared document past {MAX_DOCUMENT} bytes: its connection is closed"
                )
            report_before = str(self._report)
            self._applying_remote = True
            self._touched, self._said, self._buried, self._unsaid = {}, [], {}, []
            try:
                self.doc.apply_update(message.payload)
            finally:
                self._applying_remote = False
                touched, self._touched = self._touched, None
                buried, self._buried = self._buried, None
                said, self._said = self._said, None
                unsaid, self._unsaid = self._unsaid, None
        except (ValueError, RuntimeError) as exc:
            raise MalformedMessage(f"live update from a peer does not apply: {exc}") from exc
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            try:
                self._sweep()
            except BaseException as again:  # the library fails again: the refusal stands
                if not _is_panic(again):
                    raise
            raise MalformedMessage(
                "live update from a peer made the CRDT library fail: its connection is closed"
            ) from exc
        own_edit = message.kind == SyncKind.UPDATE
        with self.doc.transaction():  # the repairs are one local edit, sent to every peer
            forged = self._rebury(buried)
            forged += self._repair(touched, sender, own_edit)
            forged += self._resay(unsaid, said)
            unsaid_count, chat_over = self._unsay(said, sender, own_edit)
            over = self._over_limits(touched, report_before) + chat_over
        who = sender[:8] if sender else "a peer"
        if forged + unsaid_count:
            raise Forgery(
                f"{who} sent {forged + unsaid_count} annotation(s) or chat message(s) that are "
                "malformed, over the session's size limits or not signed by their author, or "
                "removed or changed another participant's annotation: its connection is closed"
            )
        if over:
            raise LimitExceeded(
                f"{who} sent {over} edit(s) past the session's limits (at most "
                f"{MAX_ANNOTATIONS_PER_AUTHOR} annotations and {MAX_CHAT_PER_AUTHOR} chat "
                f"messages per participant, {MAX_REPORT_CHARS} report characters): "
                "they were undone and its connection is closed"
            )
        return None

    def _sweep(self) -> None:
        """After the CRDT library failed halfway through a peer's update (its observers,
        and so the checks above, may not all have run): remove every entry not signed
        by its author, as :meth:`receive` would have."""
        with self.doc.transaction():
            for key, raw in self._annotations.to_py().items():
                if not self._authentic_annotation(key, raw):
                    del self._annotations[key]
            for key, raw in self._removed.to_py().items():
                author, _, annotation_id = key.partition("/")
                try:
                    removal = Removal.from_py(annotation_id, raw)
                    ok = removal.author == author and removal.is_authentic(self.consult_id)
                except MalformedMessage:
                    ok = False
                if not ok:
                    del self._removed[key]
            for index in reversed(range(len(self._chat))):
                try:
                    ok = ChatMessage.from_py(self._chat[index]).is_authentic(self.consult_id)
                except MalformedMessage:
                    ok = False
                if not ok:
                    del self._chat[index]
        self._chat_mirror = list(self._chat.to_py())

    # limits ---------------------------------------------------------------------------------
    @staticmethod
    def _count_by(entries: Iterable[Any]) -> Counter[str]:
        """How many of ``entries`` (raw annotation or chat values) each author has."""
        return Counter(str(e.get("author")) for e in entries if isinstance(e, dict))

    def _chat_counts(self) -> Counter[str]:
        """Chat messages per author, each message once (a put-back copy is the same one)."""
        said = {
            (str(m.get("author")), str(m.get("id")))
            for m in self._chat_mirror
            if isinstance(m, dict)
        }
        return Counter(author for author, _ in said)

    def _said_elsewhere(self, message: ChatMessage, index: int) -> bool:
        """Whether the same signed message is also in the chat at another index."""
        return any(
            j != index
            and isinstance(m, dict)
            and m.get("id") == message.id
            and bytes(m.get("sig") or b"") == message.sig
            for j, m in enumerate(self._chat_mirror)
        )

    def _room(self, extra: int) -> bool:
        """Whether ``extra`` more bytes keep the document under :data:`MAX_DOCUMENT`.

        ``_size`` only grows (every applied update's size is added), so it bounds
        the real size from above; the real size is measured only when the bound
        says the document may be full."""
        if self._size + extra <= MAX_DOCUMENT:
            return True
        self._size = len(self.doc.get_update())
        return self._size + extra <= MAX_DOCUMENT

    def _fits(self, update: bytes) -> bool:
        """Whether the document with ``update`` applied stays under :data:`MAX_DOCUMENT`.

        Cheap while the upper bound says so; near the cap (a catch-up repeating what we
        have, say) it is measured on a scratch copy, since an applied update cannot be
        taken back."""
        if self._room(len(update)):
            return True
        scratch: pycrdt.Doc[Any] = pycrdt.Doc()
        try:
            scratch.apply_update(self.doc.get_update())
            scratch.apply_update(update)
        except (ValueError, RuntimeError) as exc:
            raise MalformedMessage(f"live update from a peer does not apply: {exc}") from exc
        return len(scratch.get_update()) <= MAX_DOCUMENT

    def _local_room(self, extra: int) -> None:
        if not self._room(extra):
            raise LocalConsultError(
                f"the session's shared document is full ({MAX_DOCUMENT // (1024 * 1024)} MiB): "
                "finalise the report, or remove annotations you no longer need"
            )

    def _over_limits(self, touched: dict[str, Any], report_before: str) -> int:
        """Undo what a peer's message added past a cap; returns how many edits that was.

        Every participant that got the same message undoes the same items (all the
        annotations it added for an author now past :data:`MAX_ANNOTATIONS_PER_AUTHOR`,
        the text it inserted into a draft now past :data:`MAX_REPORT_CHARS`), so
        their repairs are the same deletions and nobody takes another's repair for
        a forgery.
        """
        over = 0
        added = [k for k, old in touched.items() if old is None and k in self._annotations]
        if added:
            counts = self._count_by(self._annotations.to_py().values())
            for key in added:
                if counts[str(self._annotations[key].get("author"))] > MAX_ANNOTATIONS_PER_AUTHOR:
                    del self._annotations[key]
                    over += 1
        report = str(self._report)
        if len(report) > MAX_REPORT_CHARS:
            start, end = _inserted(report_before, report)
            if end > start:
                self.delete_report(start, end)
                over += 1
        return over

    def _on_annotations(self, event: Any) -> None:
        if self._touched is not None:
            for key, change in event.keys.items():
                self._touched.setdefault(key, change.get("oldValue"))

    def _on_removed(self, event: Any) -> None:
        if self._buried is not None:
            for key, change in event.keys.items():
                self._buried.setdefault(key, change.get("oldValue"))

    @staticmethod
    def _tombstone_matches(tombstone: Any, annotation: Any) -> bool:
        """Whether a (verified) tombstone is by the author of ``annotation``."""
        return (
            isinstance(tombstone, dict)
            and isinstance(annotation, dict)
            and tombstone.get("author") == annotation.get("author")
        )

    def _rebury(self, buried: dict[str, Any]) -> int:
        """Check the tombstones a peer's message added, changed or removed; returns how
        many were forgeries. A tombstone is never changed or removed (put back); a new
        one must be signed by the author its key names (so every participant decides the
        same, whether or not it knows the annotation yet); an accepted one removes that
        author's annotation of that id for good."""
        forged = 0
        for key, old in buried.items():
            new = self._removed.get(key)
            if old == new:
                continue
            if old is not None:
                self._removed[key] = _writable(old)
                forged += 1
                continue
            author, _, annotation_id = key.partition("/")
            try:
                removal = Removal.from_py(annotation_id, new)
                ok = removal.author == author and removal.is_authentic(self.consult_id)
            except MalformedMessage:
                ok = False
            if not ok:
                del self._removed[key]
                forged += 1
            elif self._tombstone_matches(new, self._annotations.get(annotation_id)):
                del self._annotations[annotation_id]  # e.g. replayed before we saw the removal
        return forged

    def _on_chat(self, event: Any) -> None:
        """Keep the mirror of the chat array; while a peer's message is applied, note
        where it inserted messages and which ones it deleted (and where)."""
        index = 0  # delta positions are in the array as it is after the change
        for op in event.delta:
            if "retain" in op:
                index += op["retain"]
            elif "insert" in op:
                values = list(op["insert"])
                self._chat_mirror[index:index] = values
                if self._said is not None:
                    self._said.extend(range(index, index + len(values)))
                index += len(values)
            elif "delete" in op:
                gone = self._chat_mirror[index : index + op["delete"]]
                del self._chat_mirror[index : index + op["delete"]]
                if self._unsaid is not None:
                    self._unsaid.append((index, gone))
        if len(self._chat_mirror) != len(self._chat):  # never expected: start again
            self._chat_mirror = list(self._chat.to_py())

    def _authentic_annotation(self, key: str, raw: Any) -> bool:
        try:
            return Annotation.from_py(key, raw).is_authentic(self.consult_id)
        except MalformedMessage:
            return False

    def _repair(self, touched: dict[str, Any], sender: str | None, own_edit: bool) -> int:
        """Undo what a peer's message did to annotations; returns how many were forgeries.

        ``touched`` holds the value before the message of each annotation it
        changed. A value without its author's signature is always undone and
        always a forgery. By connection: a change or removal of another author's
        annotation is undone, and so is a new one in another author's name in
        ``own_edit`` (in a catch-up it is legitimate: a late joiner gets
        everyone's); both are forgeries only in ``own_edit``.
        """

        def owner(raw: Any) -> Any:
            return raw.get("author") if isinstance(raw, dict) else None

        forged = 0
        for key, old in touched.items():
            new = self._annotations.get(key)
            if old == new:
                continue
            if new is None:
                if self._tombstone_matches(self._removed.get(_tomb_key(key, owner(old))), old):
                    continue  # removed by its author, who signed the removal
                self._annotations[key] = _writable(old)
                forged += 1
                continue
            if self._tombstone_matches(self._removed.get(_tomb_key(key, owner(new))), new):
                # A removed annotation does not come back. Whoever holds the tombstone holds
                # the removal too, so only a new write (a replay) brings its id back.
                del self._annotations[key]
                forged += 1
                continue
            unsigned = new is not None and not self._authentic_annotation(key, new)
            by_other = sender is not None and old is not None and owner(old) != sender
            in_their_name = sender is not None and new is not None and owner(new) != sender
            if unsigned or by_other or (own_edit and in_their_name):
                if old is None:
                    del self._annotations[key]
                else:
                    self._annotations[key] = _writable(old)
                forged += unsigned or (own_edit and (by_other or in_their_name))
        return forged

    def _resay(self, unsaid: list[tuple[int, list[Any]]], said: list[int]) -> int:
        """Put back the chat messages a peer's message deleted, where they were (nobody
        may delete a chat message); returns how many. ``said`` is shifted to match."""
        count = 0
        for index, gone in reversed(unsaid):
            for offset, raw in enumerate(gone):
                self._chat.insert(index + offset, _writable(raw))
            said[:] = [i + len(gone) if i >= index else i for i in said]
            count += len(gone)
        return count

    def _unsay(self, said: list[int], sender: str | None, own_edit: bool) -> tuple[int, int]:
        """Delete the chat messages a peer's message inserted without their author's
        signature (or, in ``own_edit``, in another's name), or past their author's
        :data:`MAX_CHAT_PER_AUTHOR`; returns how many of each."""
        forged, over = [], []
        counts = self._chat_counts() if said else Counter()
        for index in said:
            try:
                message = ChatMessage.from_py(self._chat[index])
                ok = message.is_authentic(self.consult_id)
                if ok and own_edit and sender is not None and message.author != sender:
                    ok = self._said_elsewhere(message, index)  # a repair putting it back
            except MalformedMessage:
                ok = False
            if not ok:
                forged.append(index)
            elif counts[message.author] > MAX_CHAT_PER_AUTHOR:
                over.append(index)  # all of them: the same for every participant
        for index in sorted(forged + over, reverse=True):
            del self._chat[index]
        return len(forged), len(over)


class LiveSession:
    """The sync protocol with one peer over an injected ``send`` (the transport's live channel).

    On connect (and on every reconnect) each side sends step 1; the answers
    carry whatever the other missed, including edits made while apart.
    """

    def __init__(
        self, state: SharedState, send: Callable[[bytes], None], peer: str | None = None
    ) -> None:
        self.state = state
        self._send = send
        self.peer = peer  # the authenticated node id, for the authorship check on receive
        self._unsubscribe: Callable[[], None] | None = None

    def connect(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.state.on_local_update(self._send)
        self._send(self.state.sync_step1())

    def disconnect(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def receive(self, data: bytes) -> None:
        reply = self.state.receive(data, self.peer)
        if reply is not None:
            self._send(reply)
