"""A signaling socket's Outbox when another socket takes its place (in memory)."""

from __future__ import annotations

import asyncio

from crypto.identity import Identity
from registry import wsproto
from registry.netguard import Outbox, Relayed

SENDER = Identity(bytes([7]) * 32).node_id


class ParkedSocket:
    """A WebSocket whose first write waits until ``release`` is set (a reader that lags)."""

    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []
        self.close_code: int | None = None
        self.release = asyncio.Event()
        self.writing = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        self.writing.set()
        await self.release.wait()
        self.written.append(data)

    async def close(self, *, code: int, message: bytes) -> bool:
        self.closed, self.close_code = True, code
        return True


class Transport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def relayed(n: int) -> Relayed:
    return Relayed(SENDER, f"message {n}".encode())


async def test_a_retired_socket_gets_its_last_frame_after_the_one_in_flight_then_closes() -> None:
    ws, transport = ParkedSocket(), Transport()
    kept: list[Relayed] = []
    outbox = Outbox(
        ws,  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        size=8,
        timeout=10.0,
        on_drop=kept.extend,
        on_sent=lambda _r: None,
    )
    for n in range(4):
        assert outbox.push(f"frame {n}".encode(), relayed(n))
    async with asyncio.timeout(5):
        await ws.writing.wait()  # frame 0 is being written; 1-3 wait in the queue
    last = wsproto.Replaced().to_wire()
    outbox.retire(last, "replaced by a newer connection", wsproto.CLOSE_REPLACED)
    assert not outbox.push(b"after", relayed(9))  # nothing more goes to it
    # Unsent messages go for the mailbox: the one in flight too (a duplicate is harmless).
    assert kept == [relayed(0), relayed(1), relayed(2), relayed(3)]
    ws.release.set()
    async with asyncio.timeout(5):
        await outbox.close()  # waits for the last frame and the close, does not cut them
    assert ws.written == [b"frame 0", last]
    assert ws.close_code == wsproto.CLOSE_REPLACED
    assert not transport.aborted


async def test_a_retired_socket_that_does_not_read_its_last_frame_is_aborted() -> None:
    ws, transport = ParkedSocket(), Transport()
    outbox = Outbox(
        ws,  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        size=8,
        timeout=0.05,
        on_drop=lambda _u: None,
        on_sent=lambda _r: None,
    )
    outbox.retire(wsproto.Replaced().to_wire(), "replaced", wsproto.CLOSE_REPLACED)
    async with asyncio.timeout(5):
        await outbox.close()  # bounded by the write timeout: never released
    assert transport.aborted
    assert (ws.written, ws.close_code) == ([], None)
