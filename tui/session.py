"""What the TUI needs from a live consultation: the ``SessionView`` protocol.

Values are consult's own types (:mod:`consult.shared` annotations and chat,
:mod:`consult.presence` participants and cursors) so backing this with
``SharedState`` + ``Presence`` + the transport is a thin adapter.
:class:`InMemorySession` is the in-process implementation used by tests and
demos; ``remote_*`` methods play the part of the other participants.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from consult.errors import NotAuthor
from consult.presence import Cursor, Participant, Viewport
from consult.shared import MAX_CHAT_CHARS, Annotation, AnnotationKind, ChatMessage, Point

Listener = Callable[[], None]


class SessionView(Protocol):
    consult_id: str
    local_node: str

    def participants(self) -> list[Participant]: ...
    def annotations(self) -> list[Annotation]: ...
    def chat(self) -> list[ChatMessage]: ...
    def report_text(self) -> str: ...
    def finalised(self) -> bool: ...

    def add_annotation(
        self,
        kind: AnnotationKind,
        sop_instance_uid: str,
        frame: int,
        points: tuple[Point, ...],
        *,
        text: str = "",
        values: Mapping[str, float] | None = None,
    ) -> Annotation: ...

    def remove_annotation(self, annotation_id: str) -> None: ...
    def move_cursor(self, cursor: Cursor | None) -> None: ...
    def say(self, text: str) -> ChatMessage: ...
    def set_report_text(self, text: str) -> None: ...
    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        """Lock the draft; ``critical``: the report is a critical result; ``drop``: ids
        of annotations (duplicates) left out of the signed report."""
        ...

    # presence: what this participant looks at, and follow-the-presenter
    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        """Broadcast (coalesced) the own viewport; ``by_user`` stops following."""
        ...

    def set_tool(self, tool: str) -> None: ...
    def present(self, on: bool) -> None: ...
    def follow(self, on: bool) -> None: ...
    def following(self) -> bool: ...

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (on the UI thread's loop) whenever anything above changed."""
        ...


class InMemorySession:
    def __init__(
        self, consult_id: str, local_node: str, name: str, colour: str = "#00d7ff"
    ) -> None:
        self.consult_id = consult_id
        self.local_node = local_node
        self._me = Participant(0, local_node, name, colour, "", False, None, None)
        self._others: dict[int, Participant] = {}
        self._annotations: dict[str, Annotation] = {}
        self._chat: list[ChatMessage] = []
        self._report = ""
        self._final = False
        self.critical = False  # what finalise() was told, for tests
        self.sent: list[tuple[str, str, frozenset[str]]] = []  # (findings, impression, drop)
        self._listeners: list[Listener] = []
        self._following = False
        self.cursor_moves = 0  # how many cursor updates left this participant

    # reading
    def participants(self) -> list[Participant]:
        return [self._me, *self._others.values()]

    def annotations(self) -> list[Annotation]:
        return sorted(self._annotations.values(), key=lambda a: a.at)

    def chat(self) -> list[ChatMessage]:
        return list(self._chat)

    def report_text(self) -> str:
        return self._report

    def finalised(self) -> bool:
        return self._final

    # local edits
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
        a = Annotation(
            uuid.uuid4().hex,
            kind,
            sop_instance_uid,
            frame,
            points,
            self.local_node,
            time.time(),
            text,
            dict(values or {}),
        )
        self._annotations[a.id] = a
        self._changed()
        return a

    def remove_annotation(self, annotation_id: str) -> None:
        a = self._annotations.get(annotation_id)
        if a is None:
            return
        if a.author != self.local_node:
            raise NotAuthor(
                "only the author can remove an annotation: ask them, or hide it in your own view"
            )
        del self._annotations[annotation_id]
        self._changed()

    def move_cursor(self, cursor: Cursor | None) -> None:
        self._me = replace(self._me, cursor=cursor)
        self.cursor_moves += 1

    def say(self, text: str) -> ChatMessage:
        text = text[:MAX_CHAT_CHARS]
        m = ChatMessage(uuid.uuid4().hex, self.local_node, time.time(), text)
        self._chat.append(m)
        self._changed()
        return m

    def set_report_text(self, text: str) -> None:
        if not self._final:
            self._report = text
            self._changed()

    def finalise(self, critical: bool = False, drop: frozenset[str] = frozenset()) -> None:
        from consult.report_draft import split_report

        self._final = True
        self.critical = critical
        self.sent.append((*split_report(self._report), drop))
        self._changed()

    def set_viewport(self, viewport: Viewport, *, by_user: bool = True) -> None:
        if by_user and self._following:
            self._following = False
            self._changed()
        self._me = replace(self._me, viewport=viewport)

    def set_tool(self, tool: str) -> None:
        self._me = replace(self._me, tool=tool)

    def present(self, on: bool) -> None:
        self._me = replace(self._me, presenting=on)
        self._following = self._following and not on
        self._changed()

    def follow(self, on: bool) -> None:
        self._following = on
        self._changed()

    def following(self) -> bool:
        return self._following

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    # the other side, for tests and demos
    def remote_join(self, client_id: int, node: str, name: str, colour: str) -> None:
        self._others[client_id] = Participant(client_id, node, name, colour, "", False, None, None)
        self._changed()

    def remote_cursor(self, client_id: int, cursor: Cursor | None) -> None:
        self._others[client_id] = replace(self._others[client_id], cursor=cursor)
        self._changed()

    def remote_viewport(
        self,
        client_id: int,
        viewport: Viewport | None,
        presenting: bool | None = None,
        following: bool | None = None,
    ) -> None:
        other = self._others[client_id]
        presenting = other.presenting if presenting is None else presenting
        following = other.following if following is None else following
        self._others[client_id] = replace(
            other, viewport=viewport, presenting=presenting, following=following
        )
        self._changed()

    def remote_annotation(self, annotation: Annotation) -> None:
        self._annotations[annotation.id] = annotation
        self._changed()

    def remote_say(self, node: str, text: str) -> None:
        self._chat.append(ChatMessage(uuid.uuid4().hex, node, time.time(), text))
        self._changed()
