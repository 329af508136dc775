"""The one transition-table helper: handshake, consult and transfer state machines.

Each machine is a table ``(state, event) -> next state``; anything missing is refused
with the caller's own error, which says in the reader's words what was refused. It lives
in the lowest layer because the handshake (here in :mod:`crypto`) uses it too; it is
pure and does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)
E = TypeVar("E", bound=Hashable)


class TransitionTable(Generic[S, E]):
    """``(state, event) -> state``; :meth:`fire` raises ``refuse(state, event)`` when the
    pair is not in the table."""

    def __init__(self, edges: Mapping[tuple[S, E], S], refuse: Callable[[S, E], Exception]) -> None:
        self.edges: Mapping[tuple[S, E], S] = dict(edges)
        self._refuse = refuse

    def allows(self, state: S, event: E) -> bool:
        return (state, event) in self.edges

    def fire(self, state: S, event: E) -> S:
        try:
            return self.edges[(state, event)]
        except KeyError:
            raise self._refuse(state, event) from None

    def terminal(self, states: list[S]) -> frozenset[S]:
        """The states of ``states`` that no event leaves."""
        sources = {source for source, _ in self.edges}
        return frozenset(s for s in states if s not in sources)
