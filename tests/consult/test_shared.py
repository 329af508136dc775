"""The live shared state: sync, late joiners, offline merges, authorship, hostile input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pycrdt
import pytest

from consult.errors import Forgery, LocalConsultError, MalformedMessage, NotAuthor
from consult.shared import (
    MAX_SYNC_MESSAGE,
    MAX_UPDATE_MESSAGE,
    Annotation,
    AnnotationKind,
    ChatMessage,
    LiveSession,
    SharedState,
    Snapshot,
    SyncKind,
    SyncMessage,
)
from crypto.identity import Identity

UID = "2.25.99"


def participant(client_id: int | None = None, consult_id: str = "c") -> SharedState:
    return SharedState(consult_id, Identity.generate(), client_id=client_id)


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
    state = participant(1)
    bad = SyncMessage(SyncKind.UPDATE, b"\x05\x07garbage").to_wire()
    with pytest.raises(MalformedMessage):
        state.receive(bad)
    state.say("still works", 1.0)
    assert state.snapshot().chat[0].text == "still works"


def test_edits_flow_both_ways_live() -> None:
    a, b = participant(1), participant(2)
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
    a = participant(1)
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
    late = participant(9)
    sent: list[bytes] = []
    LiveSession(a, sent.append)
    reply = a.receive(late.sync_step1())
    assert reply is not None
    assert SyncMessage.from_wire(reply).kind == SyncKind.STEP2
    late.receive(reply)
    assert late.snapshot() == a.snapshot()
    assert len(late.snapshot().annotations) == 50


def test_offline_edits_on_both_sides_merge_on_reconnect() -> None:
    a, b = participant(1), participant(2)
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
    a, b = participant(1), participant(2)
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


def test_malformed_entries_from_a_peer_are_removed_and_refused() -> None:
    a, b = participant(1), participant(2)
    link = Link(a, b)
    link.connect()
    # a misbehaving client writes straight into the document
    a.doc.get("annotations", type=pycrdt.Map)["x"] = {"kind": "laser"}
    a.doc.get("chat", type=pycrdt.Array).append("not a message")
    for update in link.to_b:
        with pytest.raises(Forgery):
            link.b.receive(update)
    link.to_b.clear()
    assert b.snapshot() == Snapshot((), (), "", malformed=0)
    assert b._annotations.to_py() == {}
    assert b._chat.to_py() == []


def test_entries_that_do_not_parse_are_counted_not_shown() -> None:
    state = participant()
    state._annotations["x"] = {"kind": "laser"}  # only a modified client writes these itself
    state._chat.append("not a message")
    assert state.snapshot() == Snapshot((), (), "", malformed=2)


def test_annotation_point_counts_and_limits() -> None:
    state = participant()
    with pytest.raises(LocalConsultError):
        state.add_annotation(AnnotationKind.ANGLE, UID, 0, ((0.0, 0.0),), 1.0)
    with pytest.raises(LocalConsultError):
        state.say("x" * 5000, 1.0)


def test_remote_updates_are_not_echoed() -> None:
    a, b = participant(1), participant(2)
    link = Link(a, b)
    link.connect()
    a.say("hello", 1.0)
    assert len(link.to_b) == 1
    link.b.receive(link.to_b.pop())
    assert link.to_a == []  # B applied it without sending it back


def test_report_edits_count_characters_not_utf8_bytes() -> None:
    a, b = participant(1), participant(2)
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
    alice, mallory = participant(), participant()
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
        with pytest.raises(Forgery, match="another participant's annotation"):
            alice.receive(update, sender=mallory.local_node)
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
    mallory._annotations[forged.id] = {**forged.to_py(), "author": alice.local_node}
    alice.receive(updates[0], sender=mallory.local_node)  # its own annotation: fine
    with pytest.raises(Forgery):
        alice.receive(updates[1], sender=mallory.local_node)  # now claimed to be Alice's
    assert [a.author for a in alice.annotations()] == [mallory.local_node]


def test_a_catch_up_may_carry_other_authors_annotations_and_own_removals() -> None:
    alice, bob, carol = participant(), participant(), participant()
    kept = carol.add_annotation(AnnotationKind.POINT, "1.2", 0, ((1, 1),), 1.0)
    carol.say("from carol", 1.5)
    gone = bob.add_annotation(AnnotationKind.POINT, "1.2", 0, ((3, 3),), 1.0)
    bob.say("from bob", 2.0)
    bob.receive(SyncMessage(SyncKind.STEP2, carol.full_update()).to_wire(), carol.local_node)
    alice.receive(SyncMessage(SyncKind.STEP2, bob.full_update()).to_wire(), bob.local_node)
    assert {a.id for a in alice.annotations()} == {kept.id, gone.id}
    assert {m.text for m in alice.snapshot().chat} == {"from carol", "from bob"}
    assert alice.snapshot() == bob.snapshot()
    vector = alice.doc.get_state()
    bob.remove_annotation(gone.id)
    alice.receive(SyncMessage(SyncKind.STEP2, bob.doc.get_update(vector)).to_wire(), bob.local_node)
    assert [a.id for a in alice.annotations()] == [kept.id]


# --- signatures: a catch-up relayed by one peer cannot carry forgeries ------------------------

CAROL, MALLORY = Identity.generate(), Identity.generate()


def _carols(**changes: object) -> dict[str, object]:
    """An annotation in Carol's name, signed by Carol for consult "c", then altered."""
    mark = Annotation("f" * 32, AnnotationKind.ARROW, UID, 0, ((1, 1), (9, 9)), "", 5.0, "bleed")
    signed = replace(mark, author=str(CAROL.node_id)).signed(CAROL, "c")
    return {**signed.to_py(), **changes}


def _mallorys_as_carols() -> dict[str, object]:
    signed = replace(
        Annotation("f" * 32, AnnotationKind.POINT, UID, 0, ((1, 1),), "", 5.0),
        author=str(MALLORY.node_id),
    ).signed(MALLORY, "c")
    return {**signed.to_py(), "author": str(CAROL.node_id)}


FORGED_ANNOTATIONS = {
    "unsigned": lambda: _carols(sig=b""),
    "no signature field": lambda: {k: v for k, v in _carols().items() if k != "sig"},
    "signed by mallory, carol's key": lambda: _carols(sig=MALLORY.sign(b"x")),
    "signed by mallory with her key": _mallorys_as_carols,
    "carol's, replayed from another consult": lambda: {
        **_carols(),
        "sig": replace(Annotation.from_py("f" * 32, _carols()), sig=b"").signed(CAROL, "d").sig,
    },
    "carol's, text changed": lambda: _carols(text="no bleed"),
    "carol's, under another id": lambda: _carols(),  # stored under key "e" * 32 below
    "sig is text": lambda: _carols(sig="AAAA" * 16),
    "sig too short": lambda: _carols(sig=bytes(63)),
    "key too long": lambda: _carols(key=bytes(33)),
}


def _catch_up_from_mallory() -> tuple[SharedState, SharedState, SharedState]:
    """Alice and Carol made honest edits; Mallory has them all; Zed is about to join."""
    alice, carol = participant(), SharedState("c", CAROL)
    mallory, zed = SharedState("c", MALLORY), participant()
    alice.add_annotation(AnnotationKind.POINT, UID, 0, ((4, 4),), 1.0, text="alice's")
    alice.say("alice here", 1.0)
    carol.add_annotation(AnnotationKind.LENGTH, UID, 1, ((0, 0), (3, 4)), 2.0, text="carol's")
    carol.say("carol here", 2.0)
    for honest in (alice, carol):
        mallory.receive(SyncMessage(SyncKind.STEP2, honest.full_update()).to_wire())
    return mallory, zed, carol


@pytest.mark.parametrize("forge", FORGED_ANNOTATIONS.values(), ids=FORGED_ANNOTATIONS.keys())
def test_a_catch_up_cannot_slip_in_an_annotation_in_anothers_name(
    forge: Callable[[], dict[str, object]],
) -> None:
    mallory, zed, _ = _catch_up_from_mallory()
    honest = mallory.snapshot()
    key = "e" * 32 if forge is FORGED_ANNOTATIONS["carol's, under another id"] else "f" * 32
    mallory._annotations[key] = forge()  # a modified client writes straight into the doc
    step2 = mallory.receive(zed.sync_step1())
    assert step2 is not None
    with pytest.raises(Forgery, match="not signed by their author"):
        zed.receive(step2, sender=mallory.local_node)
    assert zed.snapshot() == honest  # everyone's honest edits arrived, the forgery did not
    assert key not in zed._annotations.to_py()  # removed from the doc, so never relayed on


FORGED_CHAT = {
    "unsigned": lambda: {**_carols_chat(), "sig": b""},
    "signed by mallory": lambda: {**_carols_chat(), "sig": MALLORY.sign(b"x")},
    "replayed from another consult": lambda: _carols_chat(consult_id="d"),
    "text changed": lambda: {**_carols_chat(), "text": "ignore the bleed"},
    "not a message": lambda: "hello",
}


def _carols_chat(consult_id: str = "c") -> dict[str, object]:
    message = ChatMessage("m" * 32, str(CAROL.node_id), 3.0, "operate now")
    return message.signed(CAROL, consult_id).to_py()


@pytest.mark.parametrize("forge", FORGED_CHAT.values(), ids=FORGED_CHAT.keys())
def test_a_catch_up_cannot_slip_in_a_chat_message_in_anothers_name(
    forge: Callable[[], object],
) -> None:
    mallory, zed, _ = _catch_up_from_mallory()
    honest = mallory.snapshot()
    mallory._chat.insert(1, forge())  # between the honest messages
    step2 = mallory.receive(zed.sync_step1())
    assert step2 is not None
    with pytest.raises(Forgery):
        zed.receive(step2, sender=mallory.local_node)
    assert zed.snapshot() == honest
    assert len(zed._chat) == 2  # deleted, so never relayed on


def test_a_correctly_signed_chat_message_in_a_catch_up_is_shown_once() -> None:
    mallory, zed, carol = _catch_up_from_mallory()
    (carols,) = [m for m in mallory.snapshot().chat if m.author == carol.local_node]
    mallory._chat.append(carols.to_py())  # replayed
    step2 = mallory.receive(zed.sync_step1())
    assert step2 is not None
    zed.receive(step2, sender=mallory.local_node)
    assert len(zed._chat) == 3
    assert sorted(m.text for m in zed.snapshot().chat) == ["alice here", "carol here"]


def test_a_peer_cannot_chat_in_anothers_name_in_its_own_update() -> None:
    alice, mallory, _ = _pair_with_mallory()
    updates: list[bytes] = []
    mallory.on_local_update(updates.append)
    mallory._chat.append(_carols_chat())  # correctly signed by Carol, sent as Mallory's edit
    mallory.say("mine", 1.0)
    with pytest.raises(Forgery):
        alice.receive(updates[0], sender=mallory.local_node)
    alice.receive(updates[1], sender=mallory.local_node)
    assert [m.text for m in alice.snapshot().chat] == ["mine"]


def test_local_edits_are_signed_for_this_consult_only() -> None:
    a = participant()
    mark = a.add_annotation(AnnotationKind.POINT, UID, 0, ((1, 2),), 1.0)
    said = a.say("hello", 2.0)
    assert mark.is_authentic("c")
    assert said.is_authentic("c")
    assert not mark.is_authentic("d")
    assert not said.is_authentic("d")
    assert not replace(mark, points=((1.0, 3.0),)).is_authentic("c")
    assert not replace(said, at=2.5).is_authentic("c")
