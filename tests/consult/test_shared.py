"""The live shared state: sync, late joiners, offline merges, authorship, hostile input."""

from __future__ import annotations

import pycrdt
import pytest

from consult.errors import LocalConsultError, MalformedMessage, NotAuthor
from consult.shared import (
    MAX_SYNC_MESSAGE,
    MAX_UPDATE_MESSAGE,
    AnnotationKind,
    LiveSession,
    SharedState,
    SyncKind,
    SyncMessage,
)

UID = "2.25.99"


class Link:
    """Two LiveSessions joined by in-memory queues; deliver() runs until quiet."""

    def __init__(self, a: SharedState, b: SharedState) -> None:
        self.to_a: list[bytes] = []
        self.to_b: list[bytes] = []
        self.a = LiveSession(a, self.to_b.append)
        self.b = LiveSession(b, self.to_a.append)

    def connect(self) -> None:
        self.a.connect()
        self.b.connect()
        self.deliver()

    def deliver(self) -> None:
        for _ in range(100):
            if not (self.to_a or self.to_b):
                return
            while self.to_b:
                self.b.receive(self.to_b.pop(0))
            while self.to_a:
                self.a.receive(self.to_a.pop(0))
        raise AssertionError("sync did not settle")


def test_sync_message_golden_bytes() -> None:
    # y-protocols framing: 0 = sync, kind, varuint length, payload
    assert SyncMessage(SyncKind.UPDATE, b"\x01\x02").to_wire() == bytes.fromhex("00020201 02")
    long = SyncMessage(SyncKind.STEP2, b"x" * 200).to_wire()
    assert long[:4] == bytes.fromhex("0001c801")  # 200 = 0xc8 0x01 as a varuint
    assert SyncMessage.from_wire(long) == SyncMessage(SyncKind.STEP2, b"x" * 200)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x01\x00\x00",  # awareness, not sync
        b"\x00\x07\x00",  # unknown kind
        b"\x00\x02\x05abc",  # length says 5, payload is 3
        b"\x00\x02\xff\xff\xff\xff\xff\xff",  # runaway varuint
    ],
)
def test_malformed_sync_messages_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        SyncMessage.from_wire(data)


def test_size_caps_are_checked_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="limit"):
        SyncMessage.from_wire(b"\x00\x02" + b"\x00" * MAX_UPDATE_MESSAGE)
    with pytest.raises(MalformedMessage, match="limit"):
        SyncMessage.from_wire(b"\x00\x01" + b"\x00" * MAX_SYNC_MESSAGE)


def test_garbage_update_raises_malformed_and_leaves_doc_usable() -> None:
    state = SharedState("c", "A", client_id=1)
    bad = SyncMessage(SyncKind.UPDATE, b"\x05\x07garbage").to_wire()
    with pytest.raises(MalformedMessage):
        state.receive(bad)
    state.say("still works", 1.0)
    assert state.snapshot().chat[0].text == "still works"


def test_edits_flow_both_ways_live() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    point = a.add_annotation(AnnotationKind.POINT, UID, 0, ((10.0, 20.0),), 1.0)
    b.say("I see it", 2.0)
    b.insert_report(0, "No haemorrhage.")
    link.deliver()
    assert a.snapshot() == b.snapshot()
    assert b.snapshot().annotations[0] == point
    assert a.report_text == "No haemorrhage."
    assert [m.text for m in a.snapshot().chat] == ["I see it"]


def test_late_joiner_gets_everything_in_one_step2() -> None:
    a = SharedState("c", "A", client_id=1)
    for i in range(50):
        a.add_annotation(
            AnnotationKind.LENGTH,
            UID,
            i,
            ((0.0, 0.0), (3.0, 4.0)),
            float(i),
            values={"length_mm": 5.0},
        )
    a.insert_report(0, "Findings.")
    late = SharedState("c", "Z", client_id=9)
    sent: list[bytes] = []
    LiveSession(a, sent.append)
    reply = a.receive(late.sync_step1())
    assert reply is not None
    assert SyncMessage.from_wire(reply).kind == SyncKind.STEP2
    late.receive(reply)
    assert late.snapshot() == a.snapshot()
    assert len(late.snapshot().annotations) == 50


def test_offline_edits_on_both_sides_merge_on_reconnect() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    a.insert_report(0, "Report. ")
    link.deliver()
    link.a.disconnect()
    link.b.disconnect()
    a.insert_report(len(a.report_text), "A was here.")
    b.insert_report(0, "B first. ")
    b.add_annotation(AnnotationKind.ARROW, UID, 0, ((1.0, 1.0), (5.0, 5.0)), 3.0, text="look")
    assert a.snapshot() != b.snapshot()
    assert not link.to_a
    assert not link.to_b  # nothing was sent while apart
    link.connect()
    assert a.snapshot() == b.snapshot()
    assert "A was here." in a.report_text
    assert "B first." in a.report_text
    assert a.snapshot().annotations[0].text == "look"


def test_only_the_author_removes_an_annotation() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    mark = a.add_annotation(AnnotationKind.POINT, UID, 0, ((1.0, 2.0),), 1.0)
    link.deliver()
    with pytest.raises(NotAuthor):
        b.remove_annotation(mark.id)
    assert len(b.snapshot().annotations) == 1
    a.remove_annotation(mark.id)
    link.deliver()
    assert b.snapshot().annotations == ()


def test_malformed_entries_from_a_peer_are_counted_not_shown() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    # a misbehaving client writes straight into the document
    a.doc.get("annotations", type=pycrdt.Map)["x"] = {"kind": "laser"}
    a.doc.get("chat", type=pycrdt.Array).append("not a message")
    link.deliver()
    snapshot = b.snapshot()
    assert snapshot.annotations == ()
    assert snapshot.chat == ()
    assert snapshot.malformed == 2


def test_annotation_point_counts_and_limits() -> None:
    state = SharedState("c", "A")
    with pytest.raises(LocalConsultError):
        state.add_annotation(AnnotationKind.ANGLE, UID, 0, ((0.0, 0.0),), 1.0)
    with pytest.raises(LocalConsultError):
        state.say("x" * 5000, 1.0)


def test_remote_updates_are_not_echoed() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    a.say("hello", 1.0)
    assert len(link.to_b) == 1
    link.b.receive(link.to_b.pop())
    assert link.to_a == []  # B applied it without sending it back


def test_report_edits_count_characters_not_utf8_bytes() -> None:
    a, b = SharedState("c", "A", client_id=1), SharedState("c", "B", client_id=2)
    link = Link(a, b)
    link.connect()
    a.insert_report(0, "Hématome sous-dural.")
    a.insert_report(2, "X")  # after "Hé", not inside the two bytes of "é"
    assert a.report_text == "HéXmatome sous-dural."
    a.delete_report(1, 3)
    assert a.report_text == "Hmatome sous-dural."
    a.insert_report(999, " ✓")
    link.deliver()
    assert b.report_text == "Hmatome sous-dural. ✓"


def _pair_with_mallory() -> tuple[SharedState, SharedState, list[bytes]]:
    alice, mallory = SharedState("c", "ALICE"), SharedState("c", "MALLORY")
    sent: list[bytes] = []
    alice.on_local_update(sent.append)
    return alice, mallory, sent


def test_a_peer_cannot_remove_or_change_someone_elses_annotation_on_receive() -> None:
    alice, mallory, sent = _pair_with_mallory()
    mine = alice.add_annotation(AnnotationKind.POINT, "1.2", 0, ((1, 1),), 1.0, text="keep me")
    other = alice.add_annotation(AnnotationKind.POINT, "1.2", 0, ((2, 2),), 1.0)
    mallory.receive(SyncMessage(SyncKind.STEP2, alice.full_update()).to_wire())
    updates: list[bytes] = []
    mallory.on_local_update(updates.append)
    del mallory._annotations[mine.id]  # a modified client: no author check
    mallory._annotations[other.id] = {**other.to_py(), "text": "rewritten"}
    sent.clear()
    for update in updates:
        with pytest.raises(MalformedMessage, match="another participant's annotation"):
            alice.receive(update, sender="MALLORY")
    assert {a.id: a.text for a in alice.annotations()} == {mine.id: "keep me", other.id: ""}
    # The repair is a local edit, so the other participants get the annotations back too.
    assert sent
    for repair in sent:
        mallory.receive(repair)
    assert mallory.snapshot() == alice.snapshot()


def test_a_peer_cannot_add_an_annotation_in_another_authors_name() -> None:
    alice, mallory, _ = _pair_with_mallory()
    updates: list[bytes] = []
    mallory.on_local_update(updates.append)
    forged = mallory.add_annotation(AnnotationKind.POINT, "1.2", 0, ((1, 1),), 1.0)
    mallory._annotations[forged.id] = {**forged.to_py(), "author": "ALICE"}
    alice.receive(updates[0], sender="MALLORY")  # its own annotation: fine
    with pytest.raises(MalformedMessage):
        alice.receive(updates[1], sender="MALLORY")  # now claimed to be Alice's
    assert [a.author for a in alice.annotations()] == ["MALLORY"]


def test_a_catch_up_may_carry_other_authors_annotations_and_own_removals() -> None:
    alice, bob, carol = SharedState("c", "ALICE"), SharedState("c", "BOB"), SharedState("c", "C")
    kept = carol.add_annotation(AnnotationKind.POINT, "1.2", 0, ((1, 1),), 1.0)
    gone = bob.add_annotation(AnnotationKind.POINT, "1.2", 0, ((3, 3),), 1.0)
    bob.receive(SyncMessage(SyncKind.STEP2, carol.full_update()).to_wire(), sender="C")
    alice.receive(SyncMessage(SyncKind.STEP2, bob.full_update()).to_wire(), sender="BOB")
    assert {a.id for a in alice.annotations()} == {kept.id, gone.id}
    state = alice.doc.get_state()
    bob.remove_annotation(gone.id)
    alice.receive(SyncMessage(SyncKind.STEP2, bob.doc.get_update(state)).to_wire(), sender="BOB")
    assert [a.id for a in alice.annotations()] == [kept.id]
