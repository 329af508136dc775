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

Authorship is enforced where edits are made (this API, so the TUI) and again
on receive, because a modified client can send any update. A Yjs delete set
does not say who deleted, so the check is by connection: the live channel is
authenticated per peer, and in the full mesh a peer's own edits reach us only
as UPDATE messages on its own connection. Before a peer's message is applied
the annotations are read; after it, any annotation of another author that it
removed or changed is written back (a local edit, so every peer gets it back
too), and an annotation that an UPDATE adds in another author's name is
removed. An UPDATE that did any of this is a forgery:
:meth:`SharedState.receive` raises and the hub drops that connection. A STEP2
catch-up may legitimately relay a third participant's edits, so there it is
only repaired, and new annotations in it are not checked (a late joiner gets
everyone's): a peer can still slip one in another's name there, never remove
or alter an existing one. The cost: a removal relayed by someone other than
its author comes back, and the author removes it again.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import pycrdt

from consult.errors import LocalConsultError, MalformedMessage, NotAuthor
from consult.ywire import read_varuint, varuint

MAX_UPDATE_MESSAGE = 256 * 1024  # one local edit
MAX_SYNC_MESSAGE = 16 * 1024 * 1024  # a full state for a late joiner
MAX_CHAT_CHARS = 4000
MAX_LABEL_CHARS = 500
MAX_POINTS = 16

Point = tuple[float, float]


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


@dataclass(frozen=True)
class Annotation:
    """A mark anchored in image coordinates (x = column, y = row) of one frame of one instance."""

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

    def __post_init__(self) -> None:
        if len(self.points) != _POINT_COUNT[self.kind]:
            raise LocalConsultError(
                f"a {self.kind.value} annotation has {_POINT_COUNT[self.kind]} point(s), "
                f"not {len(self.points)}"
            )
        if len(self.text) > MAX_LABEL_CHARS:
            raise LocalConsultError(f"annotation text is limited to {MAX_LABEL_CHARS} characters")

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
        }

    @classmethod
    def from_py(cls, annotation_id: str, raw: Any) -> Annotation:
        """Parse what a (possibly misbehaving) peer put in the shared doc."""
        try:
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
            )
        except (KeyError, TypeError, ValueError, IndexError, LocalConsultError) as exc:
            raise MalformedMessage(f"annotation {annotation_id!r} is malformed: {exc}") from exc


@dataclass(frozen=True)
class ChatMessage:
    id: str
    author: str
    at: float
    text: str

    def to_py(self) -> dict[str, Any]:
        return {"id": self.id, "author": self.author, "at": float(self.at), "text": self.text}

    @classmethod
    def from_py(cls, raw: Any) -> ChatMessage:
        try:
            return cls(str(raw["id"]), str(raw["author"]), float(raw["at"]), str(raw["text"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"chat message is malformed: {exc}") from exc


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
        length, start = read_varuint(data, 2)
        if start + length != len(data):
            raise MalformedMessage("live message length does not match its payload")
        return cls(kind, data[start:])


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

    def __init__(self, consult_id: str, local_node: str, client_id: int | None = None) -> None:
        self.consult_id = consult_id
        self.local_node = local_node
        self.doc: pycrdt.Doc[Any] = (
            pycrdt.Doc(client_id=client_id) if client_id is not None else pycrdt.Doc()
        )
        self._annotations = self.doc.get("annotations", type=pycrdt.Map)
        self._chat = self.doc.get("chat", type=pycrdt.Array)
        self._report = self.doc.get("report", type=pycrdt.Text)
        self._listeners: list[Callable[[bytes], None]] = []
        self._applying_remote = False
        self._subscription = self.doc.observe(self._on_transaction)
        # While a peer's message is applied: annotation id -> value before it (None: new).
        self._touched: dict[str, Any] | None = None
        self._annotations.observe(self._on_annotations)

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
        )
        self._annotations[annotation.id] = annotation.to_py()
        return annotation

    def remove_annotation(self, annotation_id: str) -> None:
        raw = self._annotations.get(annotation_id)
        if raw is None:
            return
        if Annotation.from_py(annotation_id, raw).author != self.local_node:
            raise NotAuthor(
                "only the author can remove an annotation: ask them, or hide it in your own view"
            )
        del self._annotations[annotation_id]

    def say(self, text: str, now: float) -> ChatMessage:
        if len(text) > MAX_CHAT_CHARS:
            raise LocalConsultError(f"a chat message is limited to {MAX_CHAT_CHARS} characters")
        message = ChatMessage(uuid.uuid4().hex, self.local_node, now, text)
        self._chat.append(message.to_py())
        return message

    def insert_report(self, index: int, text: str) -> None:
        """Insert at a character index (clamped to the text)."""
        current = str(self._report)
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
        for key, raw in self._annotations.to_py().items():
            try:
                annotations.append(Annotation.from_py(key, raw))
            except MalformedMessage:
                malformed += 1
        chat = []
        for raw in self._chat.to_py():
            try:
                chat.append(ChatMessage.from_py(raw))
            except MalformedMessage:
                malformed += 1
        annotations.sort(key=lambda a: a.id)
        return Snapshot(tuple(annotations), tuple(chat), str(self._report), malformed)

    # sync ---------------------------------------------------------------------------------
    def on_local_update(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``listener(update message bytes)`` for every local edit; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _on_transaction(self, event: Any) -> None:
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

        ``sender`` is the node id the connection was authenticated as; with it,
        annotations of other authors that the message removed or changed are
        restored (see the module docstring), and a forging UPDATE raises.
        """
        message = SyncMessage.from_wire(data)
        try:
            if message.kind == SyncKind.STEP1:
                return SyncMessage(SyncKind.STEP2, self.doc.get_update(message.payload)).to_wire()
            if message.payload == b"\x00\x00":
                return None
            self._applying_remote = True
            self._touched = {}
            try:
                self.doc.apply_update(message.payload)
            finally:
                self._applying_remote = False
                touched, self._touched = self._touched, None
        except (ValueError, RuntimeError) as exc:
            raise MalformedMessage(f"live update from a peer does not apply: {exc}") from exc
        own_edit = message.kind == SyncKind.UPDATE
        if sender is not None and self._repair(touched, sender, own_edit) and own_edit:
            raise MalformedMessage(
                f"{sender[:8]} removed, changed or forged another participant's annotation"
            )
        return None

    def _on_annotations(self, event: Any) -> None:
        if self._touched is not None:
            for key, change in event.keys.items():
                self._touched.setdefault(key, change.get("oldValue"))

    def _repair(self, touched: dict[str, Any], sender: str, own_edit: bool) -> int:
        """Undo what ``sender`` did to annotations it does not own; returns how many.

        ``touched`` holds the value before the message of each annotation it
        changed. New annotations of other authors are legitimate in a catch-up
        (a late joiner gets everyone's), so they are forgeries only in ``own_edit``.
        """

        def owner(raw: Any) -> Any:
            return raw.get("author") if isinstance(raw, dict) else None

        repairs = 0
        with self.doc.transaction():
            for key, old in touched.items():
                new = self._annotations.get(key)
                if old == new:
                    continue
                forged = own_edit and new is not None and owner(new) != sender
                if (old is not None and owner(old) != sender) or forged:
                    if old is None:
                        del self._annotations[key]
                    else:
                        self._annotations[key] = old
                    repairs += 1
        return repairs


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
