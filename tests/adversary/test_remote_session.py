"""The live-session connection of the control socket (tui.remote_session) refuses what is
not a session edit: an oversized frame is not read, a malformed or unknown one closes
that connection only; the node keeps serving (the canary: a new session on it answers
an edit)."""

from __future__ import annotations

import logging
import struct

import msgpack
import pytest

from node.app.control import Channel, open_stream
from node.app.runtime import NodeRuntime
from tui.remote_session import OPERATION
from tui.session_wire import MAX_EDIT, MAX_SNAPSHOT, Edit, Result, decode_from_node

STUDY = "2.25.4242"


async def session(node: NodeRuntime) -> Channel:
    opened = await open_stream(node.home, OPERATION, {"study_uid": STUDY}, limit=MAX_SNAPSHOT)
    assert opened is not None
    return opened[1]


async def closed_by_node(channel: Channel, max_frames: int = 100) -> bool:
    """Read what the node sent until it closed the connection (True), at most this many."""
    for _ in range(max_frames):
        if await channel.recv() is None:
            return True
    return False


def packed(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


BAD = {
    "not msgpack": b"\xc1\xc1\xc1",
    "not a map": packed([1, 2, 3]),
    "an unknown edit": packed({"edit": "_finalise", "seq": 1, "args": []}),
    "a private method": packed({"edit": "__class__", "seq": 1, "args": []}),
    "an extra field": packed({"edit": "say", "seq": 1, "args": ["x"], "more": 1}),
    "wrong argument types": packed({"edit": "move_cursor", "seq": 1, "args": [{"x": "far"}]}),
    "too many arguments": packed({"edit": "say", "seq": 1, "args": ["a", "b"]}),
    "a map key that is not text": b"\x81\x01\x02",
    "an edit name that is a list": packed({"edit": ["say"], "seq": 1, "args": ["x"]}),
    "points that are not numbers": packed(
        {"edit": "add_annotation", "seq": 1, "args": ["arrow", "1.2", 0, [["a", "b"]], "", {}]}
    ),
}


@pytest.mark.parametrize("what", sorted(BAD))
async def test_a_malformed_session_frame_closes_that_connection_only(
    attachable: NodeRuntime, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    channel = await session(attachable)
    with caplog.at_level(logging.WARNING, logger="node.app.control"):
        await channel.send(BAD[what])
        assert await closed_by_node(channel), what
    assert any("control stream tui.session closed" in r.getMessage() for r in caplog.records)
    await canary(attachable)


async def test_an_oversized_session_frame_is_refused_before_it_is_read(
    attachable: NodeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    channel = await session(attachable)
    with caplog.at_level(logging.WARNING, logger="node.app.control"):
        channel._writer.write(struct.pack(">I", MAX_EDIT + 1))  # the length only: never sent
        await channel._writer.drain()
        assert await closed_by_node(channel)
    assert any("exceeds the" in r.getMessage() for r in caplog.records)
    await canary(attachable)


async def canary(node: NodeRuntime) -> None:
    """A new session on the same node answers an edit: the node kept serving."""
    channel = await session(node)
    try:
        await channel.send(Edit(9, "say", ("still here",)).to_wire())
        for _ in range(100):
            payload = await channel.recv()
            assert payload is not None
            message = decode_from_node(payload)
            if isinstance(message, Result):
                assert message.seq == 9
                assert message.value is not None
                return
        raise AssertionError("no answer to the canary edit")
    finally:
        channel.close()
