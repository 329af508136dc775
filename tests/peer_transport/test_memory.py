"""Memory links: what a connection relies on from a link, without aiortc."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from peer_transport.errors import ConnectTimeout, LocalProtocolError
from peer_transport.memory import MemoryLink, MemoryNetwork
from peer_transport.rtc import CHANNELS, RtcOptions

pytestmark = pytest.mark.timeout(10)


class End:
    def __init__(self, network: MemoryNetwork) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.downs: list[str] = []
        self.news = asyncio.Event()
        self.link = network(RtcOptions(), self.on_message, self.on_down)

    def on_message(self, channel: str, data: bytes) -> None:
        self.got.append((channel, data))
        self.news.set()

    def on_down(self, reason: str) -> None:
        self.downs.append(reason)
        self.news.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not done():
                self.news.clear()
                await self.news.wait()


async def _pair(network: MemoryNetwork) -> tuple[End, End]:
    a, b = End(network), End(network)
    answer = await b.link.accept_offer(await a.link.create_offer())
    await a.link.accept_answer(answer)
    await asyncio.gather(a.link.wait_open(1), b.link.wait_open(1))
    return a, b


async def _settle(a: End, b: End) -> None:
    """A canary on the ordered control channel: everything sent before it has arrived."""
    a.link.send("control", b"canary")
    await b.until(lambda: ("control", b"canary") in b.got)


async def test_each_side_sees_the_others_fingerprint_and_they_differ() -> None:
    a, b = await _pair(MemoryNetwork())
    assert a.link.remote_fingerprint == b.link.local_fingerprint
    assert b.link.remote_fingerprint == a.link.local_fingerprint
    assert a.link.local_fingerprint != b.link.local_fingerprint
    assert a.link.local_fingerprint.startswith("sha-256 ")


async def test_every_channel_delivers_everything_and_the_ordered_ones_in_order() -> None:
    a, b = await _pair(MemoryNetwork())
    sent = [(channel, f"{channel} {i}".encode()) for i in range(50) for channel in CHANNELS]
    for channel, data in sent:
        a.link.send(channel, data)
    await _settle(a, b)
    ordered = [m for m in sent if m[0] != "presence"]
    assert [m for m in b.got if m[0] != "presence"][:-1] == ordered
    assert sorted(m for m in b.got if m[0] == "presence") == sorted(set(sent) - set(ordered))


async def test_presence_follows_the_loss_pattern_and_ordered_channels_lose_nothing() -> None:
    a, b = await _pair(MemoryNetwork(presence_loss=(False, True)))
    for i in range(6):
        a.link.send("presence", bytes([i]))
        a.link.send("live", bytes([i]))
    await _settle(a, b)
    assert [d for c, d in b.got if c == "presence"] == [b"\x00", b"\x02", b"\x04"]
    assert [d for c, d in b.got if c == "live"] == [bytes([i]) for i in range(6)]


async def test_an_answer_that_never_arrives_times_the_offer_out() -> None:
    network = MemoryNetwork()
    a, b = End(network), End(network)
    await b.link.accept_offer(await a.link.create_offer())  # the answer is lost
    with pytest.raises(ConnectTimeout):
        await a.link.wait_open(0.05)
    with pytest.raises(LocalProtocolError, match="not open"):
        a.link.send("control", b"x")


async def test_an_answer_from_a_link_that_was_not_offered_to_does_not_connect() -> None:
    network = MemoryNetwork()
    a, b, c = End(network), End(network), End(network)
    await b.link.accept_offer(await a.link.create_offer())
    stranger = await c.link.accept_offer(await End(network).link.create_offer())
    await a.link.accept_answer(stranger)
    with pytest.raises(ConnectTimeout):
        await a.link.wait_open(0.05)


async def test_closing_one_end_takes_the_other_down_after_what_was_sent() -> None:
    a, b = await _pair(MemoryNetwork())
    a.link.send("control", b"goodbye")
    await a.link.close()
    with pytest.raises(LocalProtocolError, match="down"):
        a.link.send("control", b"too late")
    await b.until(lambda: bool(b.downs))
    assert b.got == [("control", b"goodbye")]
    assert b.link.is_down
    assert a.downs == []  # a closed it: no news for a


async def test_a_partition_is_silent_and_a_failure_is_seen_on_both_ends() -> None:
    a, b = await _pair(MemoryNetwork())
    a.link.partition()
    b.link.send("control", b"lost")
    a.link.send("control", b"lost too")
    assert isinstance(a.link, MemoryLink)
    a.link.fail("cable cut")
    await a.until(lambda: bool(a.downs))
    await b.until(lambda: bool(b.downs))
    assert a.got == b.got == []
    assert a.downs == b.downs == ["cable cut"]


async def test_a_close_across_a_partition_is_lost_too() -> None:
    """A frozen peer that gives up and closes is not heard: the other side has only its
    silence to go by (test_connection's frozen peer must be noticed by its heartbeat)."""
    a, b = await _pair(MemoryNetwork())
    b.link.partition()
    await b.link.close()
    canary = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(canary.set_result, None)  # after a close's news
    await canary
    assert a.downs == []
    assert not a.link.is_down
