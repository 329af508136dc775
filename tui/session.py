"""What the TUI needs from a live consultation: the ``SessionView`` protocol.

Values are consult's own types (:mod:`consult.shared` annotations and chat,
:mod:`consult.presence` participants and cursors) so backing this with
``SharedState`` + ``Presence`` + the transport is a thin adapter
(:class:`tui.node_facade.LiveSessionView`), and the only one: tests drive it too, over
in-memory links (:class:`tui.memory.MemorySession`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from consult.presence import Cursor, Participant, Viewport
from consult.shared import Annotation, AnnotationKind, ChatMessage, Point

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
