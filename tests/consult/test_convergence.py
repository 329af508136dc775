"""Peers editing concurrently over a lossy, reordering, partitioning network converge.

A hypothesis state machine drives three peers in a full mesh. Each rule is one
thing that can happen: a local edit (annotation added or removed by its author,
chat message, report text insert or delete), one message delivered out of
order, a message dropped, a link going down or coming back. Whenever the
network heals (every link reconnects and every message is delivered), all
peers must hold exactly the same state.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consult.shared import AnnotationKind, LiveSession, SharedState
from crypto.identity import Identity

PEERS = 3
IDENTITIES = [Identity(bytes([i + 1]) * 32) for i in range(PEERS)]
PAIRS = [(i, j) for i, j in itertools.permutations(range(PEERS), 2)]
peer_index = st.integers(0, PEERS - 1)
pair_index = st.integers(0, len(PAIRS) - 1)
text = st.text(alphabet="abcxyz é\n", min_size=1, max_size=6)


class Mesh(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers = [SharedState("case", IDENTITIES[i], client_id=100 + i) for i in range(PEERS)]
        self.pending: dict[tuple[int, int], list[bytes]] = {pair: [] for pair in PAIRS}
        self.sessions = {
            (i, j): LiveSession(self.peers[i], self.pending[(i, j)].append) for i, j in PAIRS
        }
        self.up = dict.fromkeys(PAIRS, False)
        self.steps = 0
        for i, j in PAIRS:
            if i < j:
                self._connect(i, j)

    # network ------------------------------------------------------------------------------
    def _connect(self, i: int, j: int) -> None:
        self.up[(i, j)] = self.up[(j, i)] = True
        self.sessions[(i, j)].connect()
        self.sessions[(j, i)].connect()

    def _disconnect(self, i: int, j: int) -> None:
        self.up[(i, j)] = self.up[(j, i)] = False
        for pair in ((i, j), (j, i)):
            self.sessions[pair].disconnect()
            self.pending[pair].clear()  # in flight when the link died

    def _deliver(self, pair: tuple[int, int], index: int) -> None:
        queue = self.pending[pair]
        message = queue.pop(index % len(queue))
        sender, receiver = pair
        self.sessions[(receiver, sender)].receive(message)

    @rule(pair=pair_index, index=st.integers(0, 50))
    def deliver_one_out_of_order(self, pair: int, index: int) -> None:
        if self.pending[PAIRS[pair]]:
            self._deliver(PAIRS[pair], index)

    @rule(pair=pair_index, index=st.integers(0, 50))
    def drop_one(self, pair: int, index: int) -> None:
        queue = self.pending[PAIRS[pair]]
        if queue:
            queue.pop(index % len(queue))

    @rule(pair=pair_index)
    def link_down(self, pair: int) -> None:
        i, j = PAIRS[pair]
        if self.up[(i, j)]:
            self._disconnect(i, j)

    @rule(pair=pair_index)
    def link_up(self, pair: int) -> None:
        i, j = PAIRS[pair]
        if not self.up[(i, j)]:
            self._connect(i, j)

    # edits --------------------------------------------------------------------------------
    @rule(
        peer=peer_index,
        kind=st.sampled_from(list(AnnotationKind)),
        x=st.floats(0, 511, allow_nan=False),
        frame=st.integers(0, 3),
    )
    def annotate(self, peer: int, kind: AnnotationKind, x: float, frame: int) -> None:
        count = {"point": 1, "arrow": 2, "length": 2, "angle": 3, "ellipse": 2}[kind.value]
        points = tuple((x + k, x / 2 + k) for k in range(count))
        self.steps += 1
        self.peers[peer].add_annotation(kind, "2.25.7", frame, points, float(self.steps))

    @rule(peer=peer_index, pick=st.integers(0, 100))
    def remove_own_annotation(self, peer: int, pick: int) -> None:
        state = self.peers[peer]
        own = [a for a in state.annotations() if a.author == state.local_node]
        if own:
            state.remove_annotation(own[pick % len(own)].id)

    @rule(peer=peer_index, message=text)
    def chat(self, peer: int, message: str) -> None:
        self.steps += 1
        self.peers[peer].say(message, float(self.steps))

    @rule(peer=peer_index, at=st.integers(0, 200), insert=text)
    def type_in_report(self, peer: int, at: int, insert: str) -> None:
        self.peers[peer].insert_report(at, insert)

    @rule(peer=peer_index, at=st.integers(0, 200), length=st.integers(1, 5))
    def delete_in_report(self, peer: int, at: int, length: int) -> None:
        state = self.peers[peer]
        start = at % (len(state.report_text) + 1)
        state.delete_report(start, start + length)

    # the property ------------------------------------------------------------------------
    @precondition(lambda self: self.steps > 0)
    @rule()
    def heal_and_check_convergence(self) -> None:
        for i, j in PAIRS:
            if i < j:
                if self.up[(i, j)]:
                    self._disconnect(i, j)
                self._connect(i, j)
        for _ in range(50):
            busy = [pair for pair in PAIRS if self.pending[pair]]
            if not busy:
                break
            for pair in busy:
                while self.pending[pair]:
                    self._deliver(pair, 0)
        assert not any(self.pending.values()), "messages still flowing after healing"
        first = self.peers[0].snapshot()
        for other in self.peers[1:]:
            assert other.snapshot() == first
        assert first.malformed == 0

    @invariant()
    def nobody_sees_malformed_entries(self) -> None:
        for peer in self.peers:
            assert peer.snapshot().malformed == 0


Mesh.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestConvergence = Mesh.TestCase
