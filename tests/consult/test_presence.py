"""Presence: cursors and viewports, coalescing, the 5 s "gone" rule, follow-the-presenter."""

from __future__ import annotations

import pytest

from consult.errors import MalformedMessage
from consult.presence import (
    GONE_AFTER_S,
    MAX_PRESENCE_MESSAGE,
    Cursor,
    Presence,
    PresenceMessage,
    Viewport,
)

T0 = 1_000.0
VIEW = Viewport("2.25.5", 10, 400.0, 40.0)


def pair() -> tuple[Presence, Presence]:
    return (
        Presence("nodeA", "Dr A", "#e6194b", T0, client_id=11),
        Presence("nodeB", "Dr B", "#3cb44b", T0, client_id=22),
    )


def send(src: Presence, dst: Presence, now: float) -> bool:
    message = src.poll(now)
    if message is not None:
        dst.receive(message, now)
    return message is not None


def test_peer_sees_cursor_viewport_tool_name_and_colour() -> None:
    a, b = pair()
    a.set_cursor(Cursor("2.25.5.1", 0, 120.5, 64.0), T0)
    a.set_viewport(VIEW, T0)
    a.set_tool("length", T0)
    assert send(a, b, T0)
    seen = {p.client_id: p for p in b.participants()}
    assert set(seen) == {11, 22}
    assert seen[11].cursor == Cursor("2.25.5.1", 0, 120.5, 64.0)
    assert seen[11].viewport == VIEW
    assert (seen[11].name, seen[11].colour, seen[11].tool) == ("Dr A", "#e6194b", "length")


def test_cursor_updates_are_coalesced_to_30_per_second() -> None:
    a, b = pair()
    sent = 0
    for step in range(300):  # one second of mouse moves at 300 Hz
        now = T0 + step / 300
        a.set_cursor(Cursor("u", 0, float(step), 0.0), now)
        sent += send(a, b, now)
    assert 25 <= sent <= 31
    a.set_cursor(Cursor("u", 0, 999.0, 0.0), T0 + 2)
    assert send(a, b, T0 + 2)  # the last position always goes out
    last = next(p for p in b.participants() if p.client_id == 11)
    assert last.cursor is not None
    assert last.cursor.x == 999.0


def test_silent_peer_is_gone_within_five_seconds_but_heartbeats_keep_it() -> None:
    a, b = pair()
    send(a, b, T0)
    now = last_heard = T0
    for _ in range(20):  # 10 s of polling every 0.5 s with nothing new: heartbeats only
        now += 0.5
        if send(a, b, now):
            last_heard = now
        assert b.expire(now) == []
    assert last_heard > T0 + 8
    # a stops (crash, network gone): no more messages
    assert b.expire(last_heard + GONE_AFTER_S - 0.1) == []
    assert b.expire(last_heard + GONE_AFTER_S) == [11]
    assert [p.client_id for p in b.participants()] == [22]


def test_leaving_removes_the_peer_at_once() -> None:
    a, b = pair()
    send(a, b, T0)
    b.receive(a.leave(T0 + 1), T0 + 1)
    assert [p.client_id for p in b.participants()] == [22]


def test_follower_tracks_presenter_until_moving_on_their_own() -> None:
    a, b = pair()
    b.set_viewport(Viewport("2.25.5", 1, 80.0, 40.0), T0)
    a.present(True, T0)
    a.set_viewport(VIEW, T0)
    send(a, b, T0)
    b.follow(T0)
    assert b.me.viewport == VIEW
    moved = Viewport("2.25.5", 42, 1500.0, -600.0, zoom=2.0, pan_x=10.0)
    a.set_viewport(moved, T0 + 1)
    send(a, b, T0 + 1)
    assert b.me.viewport == moved
    assert b.following
    send(b, a, T0 + 1)  # the presenter sees who follows
    assert [p.following for p in a.participants() if p.client_id == b.client_id] == [True]
    # the follower scrolls on their own: following stops
    own = Viewport("2.25.5", 7, 1500.0, -600.0)
    b.set_viewport(own, T0 + 2)
    assert not b.following
    send(b, a, T0 + 2)
    assert [p.following for p in a.participants() if p.client_id == b.client_id] == [False]
    a.set_viewport(VIEW, T0 + 3)
    send(a, b, T0 + 3)
    assert b.me.viewport == own


def test_follower_viewport_reaches_third_participant() -> None:
    a, b = pair()
    c = Presence("nodeC", "Dr C", "#4363d8", T0, client_id=33)
    a.present(True, T0)
    a.set_viewport(VIEW, T0)
    send(a, b, T0)
    b.follow(T0)
    send(b, c, T0 + 0.1)
    seen = {p.client_id: p for p in c.participants()}
    assert seen[22].viewport == VIEW


def test_presence_message_golden_bytes_and_refusals() -> None:
    assert PresenceMessage(b"\x01\x02\x03").to_wire() == bytes.fromhex("0103010203")
    for bad in (b"", b"\x00\x01\x00", b"\x01\x05ab", b"\x01" + b"\xff" * 8):
        with pytest.raises(MalformedMessage):
            PresenceMessage.from_wire(bad)
    with pytest.raises(MalformedMessage, match="limit"):
        PresenceMessage.from_wire(b"\x01" * (MAX_PRESENCE_MESSAGE + 1))


def test_garbage_awareness_update_is_malformed() -> None:
    _, b = pair()
    with pytest.raises(MalformedMessage):
        b.receive(PresenceMessage(b"\x01\x07").to_wire(), T0)


def test_malformed_peer_state_is_left_out() -> None:
    a, b = pair()
    a._awareness.set_local_state({"name": "no node field"})  # a misbehaving client
    b.receive(PresenceMessage(a._awareness.encode_awareness_update([11])).to_wire(), T0)
    assert [p.client_id for p in b.participants()] == [22]
