"""Attacks on "another socket took your place" (:class:`wsproto.Replaced`).

A node that believes it stops for good: so only its registry, on its authenticated
socket and after its own ``Auth``, can make it stop. A frame that arrives too early,
carries trailing bytes, is oversized, or comes inside a message another node relayed
is refused (or is just data) and the node goes on; a node cannot make the registry
stop anyone else by sending the frame itself. A fake registry on 127.0.0.1 plays each
broken first socket, then a correct one that relays a canary.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from crypto import canonical
from crypto.identity import Identity, NodeId
from node.core.config import NodeHome
from registry import wsproto
from registry.client import RegistryClient, RegistryConnection
from registry.server import RegistryServer
from tests.adversary.test_signaling import node_home, running
from tests.node.test_runtime import wait_for

WITHIN = 20.0
ALICE, MALLORY = Identity.generate(), Identity.generate()
Script = Callable[[web.WebSocketResponse, str], Awaitable[None]]


async def handshake(ws: web.WebSocketResponse, url: str) -> NodeId:
    """The registry's side of a correct challenge, auth and Ready."""
    challenge = os.urandom(wsproto.CHALLENGE_SIZE)
    await ws.send_bytes(wsproto.Challenge(challenge, url).to_wire())
    auth = wsproto.from_wire((await ws.receive()).data)
    assert isinstance(auth, wsproto.Auth)
    node = wsproto.check_auth(auth, challenge, url)
    await ws.send_bytes(wsproto.Ready(node, 0).to_wire())
    return node


@dataclass
class FakeRegistry:
    """Plays ``first`` on its first socket; every later one is correct and relays a canary."""

    first: Script
    url: str = ""
    sockets: int = 0

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets += 1
        if self.sockets == 1:
            await self.first(ws, self.url)
        else:
            node = await handshake(ws, self.url)
            await ws.send_bytes(wsproto.Deliver(MALLORY.node_id, node, b"canary").to_wire())
        async for _ in ws:  # until the client closes
            pass
        return ws


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Script], Awaitable[FakeRegistry]]]:
    runners: list[web.AppRunner] = []

    async def start(first: Script) -> FakeRegistry:
        registry = FakeRegistry(first)
        app = web.Application()
        app.router.add_get("/v1/ws", registry.serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        registry.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return registry

    yield start
    for runner in runners:
        await runner.cleanup()


async def replaced_first(ws: web.WebSocketResponse, url: str) -> None:
    await ws.send_bytes(wsproto.Replaced().to_wire())  # before the challenge


async def replaced_for_auth(ws: web.WebSocketResponse, url: str) -> None:
    # Another socket came in while this one signed: the registry's answer to this Auth.
    challenge = os.urandom(wsproto.CHALLENGE_SIZE)
    await ws.send_bytes(wsproto.Challenge(challenge, url).to_wire())
    await ws.receive()
    await ws.send_bytes(wsproto.Replaced().to_wire())


async def replaced_after_ready(ws: web.WebSocketResponse, url: str) -> None:
    await handshake(ws, url)
    await ws.send_bytes(wsproto.Replaced().to_wire())


async def replaced_with_trailing_junk(ws: web.WebSocketResponse, url: str) -> None:
    await handshake(ws, url)
    await ws.send_bytes(wsproto.Replaced().to_wire() + b"\x00")


async def replaced_oversized(ws: web.WebSocketResponse, url: str) -> None:
    await handshake(ws, url)
    padded = canonical.encode({"t": "replaced", "pad": b"x" * wsproto.MAX_FRAME})
    await ws.send_bytes(padded)


async def replaced_not_canonical(ws: web.WebSocketResponse, url: str) -> None:
    await handshake(ws, url)
    await ws.send_bytes(b"\x81\xa1t\xd9\x08replaced")  # "replaced" as str8, not fixstr


async def replaced_as_relayed_data(ws: web.WebSocketResponse, url: str) -> None:
    node = await handshake(ws, url)
    # Another node sent these bytes through the registry: a message, not a frame.
    relayed = wsproto.Deliver(MALLORY.node_id, node, wsproto.Replaced().to_wire())
    await ws.send_bytes(relayed.to_wire())
    await ws.send_bytes(wsproto.Deliver(MALLORY.node_id, node, b"canary").to_wire())


async def opened(url: str) -> RegistryConnection:
    conn = RegistryClient(url, ALICE).connect(max_backoff=0.1, connect_timeout=WITHIN)
    return await conn.__aenter__()


async def shut(conn: RegistryConnection) -> None:
    await conn.close()
    await conn.client.close()


@pytest.mark.parametrize(
    ("script", "refusal"),
    [
        (replaced_first, "did not send a challenge"),
        (replaced_with_trailing_junk, "malformed"),
        (replaced_oversized, "ERROR"),  # aiohttp refuses it over max_msg_size
        (replaced_not_canonical, "canonical"),
    ],
    ids=["before-challenge", "trailing-junk", "oversized", "not-canonical"],
)
async def test_a_replaced_frame_that_is_not_well_formed_on_the_authenticated_socket_is_refused(
    fake: Callable[[Script], Awaitable[FakeRegistry]], script: Script, refusal: str
) -> None:
    registry = await fake(script)
    conn = await opened(registry.url)
    try:
        async with asyncio.timeout(WITHIN):
            assert (await conn.receive()).data == b"canary"  # from the second socket
        assert conn.stopped == ""
        assert refusal in conn.last_error  # the first socket was refused, and why
        assert (registry.sockets, conn.connects) == (2, 2 if script is not replaced_first else 1)
    finally:
        await shut(conn)


async def test_a_replaced_frame_relayed_by_another_node_is_only_data(
    fake: Callable[[Script], Awaitable[FakeRegistry]],
) -> None:
    registry = await fake(replaced_as_relayed_data)
    conn = await opened(registry.url)
    try:
        async with asyncio.timeout(WITHIN):
            assert (await conn.receive()).data == wsproto.Replaced().to_wire()
            assert (await conn.receive()).data == b"canary"  # same socket, after it
        assert (conn.stopped, conn.connects, registry.sockets) == ("", 1, 1)
    finally:
        await shut(conn)


@pytest.mark.parametrize("script", [replaced_after_ready, replaced_for_auth])
async def test_the_registry_can_stop_a_node_on_its_authenticated_socket(
    fake: Callable[[Script], Awaitable[FakeRegistry]], script: Script
) -> None:
    """The control for the refusals above: the same fake, the frame well placed."""
    registry = await fake(script)
    conn = RegistryClient(registry.url, ALICE).connect(max_backoff=0.1, connect_timeout=WITHIN)
    conn.start()
    try:
        async with asyncio.timeout(WITHIN):
            await conn._task  # type: ignore[misc]  # it ends: no second socket
        assert "another process is connected" in conn.stopped
        assert registry.sockets == 1
    finally:
        await shut(conn)


async def test_a_node_cannot_make_the_registry_stop_another(tmp_path: Path) -> None:
    """Mallory sends the registry the frame (before and after its own auth): refused,
    only Mallory's socket closes, and Alice's socket is neither replaced nor told to stop."""
    server = RegistryServer(tmp_path / "r.db")
    url = await server.start("127.0.0.1", 0)
    try:
        async with RegistryClient(url, ALICE) as a, a.connect() as alice:
            async with aiohttp.ClientSession() as session, session.ws_connect(url + "/v1/ws") as ws:
                assert isinstance(wsproto.from_wire((await ws.receive()).data), wsproto.Challenge)
                await ws.send_bytes(wsproto.Replaced().to_wire())  # instead of its Auth
                refusal = wsproto.from_wire((await ws.receive()).data)
                assert isinstance(refusal, wsproto.Error)
                assert "auth" in refusal.error
            async with RegistryClient(url, MALLORY) as m, m.connect() as mallory:
                assert mallory._ws is not None
                await mallory._ws.send_bytes(wsproto.Replaced().to_wire())
                async with asyncio.timeout(WITHIN):
                    while mallory.connects < 2:  # noqa: ASYNC110 - its socket was closed
                        await asyncio.sleep(0.02)
                # The canary to Alice, sent after all that:
                assert await mallory.send(ALICE.node_id, b"canary") == "delivered"
            async with asyncio.timeout(WITHIN):
                assert (await alice.receive()).data == b"canary"
            assert (alice.connects, alice.stopped, server.replaced) == (1, "", 0)
    finally:
        await server.stop()


def stolen(home: NodeHome, root: Path, name: str) -> NodeHome:
    """A second home with a copy of ``home``'s key (a restored VM, a stolen key)."""
    other = node_home(root, name, home.load_config().network.registries[0])
    shutil.copyfile(home.key_path, other.key_path)
    return other


async def test_a_node_whose_key_runs_elsewhere_says_so_and_stops_fighting(tmp_path: Path) -> None:
    """Two running nodes with one key on one registry: the first is told, shows it as
    its registry status and a notification naming what to do, and stops reconnecting;
    the second keeps the registry."""
    server = RegistryServer(tmp_path / "registry.sqlite")
    url = await server.start("127.0.0.1", 0)
    try:
        home = node_home(tmp_path, "hospital", url)
        async with running(home) as first:
            await wait_for(lambda: first.status().registries.get(url) == "connected", WITHIN)
            async with running(stolen(home, tmp_path, "copy")) as second:
                await wait_for(lambda: first.registry_state[url].startswith("stopped"), WITHIN)
                status = first.status().registries[url]
                assert "another process is connected" in status
                assert "radmesh org revoke" in status
                notes = []
                while not first.notifications.empty():
                    notes.append(first.notifications.get_nowait())
                assert any("another process is connected" in n for n in notes)
                # The canary: a relayed message reaches the second node's socket.
                conn = second.registry_connections[url]
                async with RegistryClient(url, MALLORY) as m, m.connect() as mallory:
                    assert await mallory.send(second.identity.node_id, b"canary") == "delivered"
                assert second.status().registries[url] == "connected"
                assert (server.accepted, server.replaced) == (3, 1)
                assert first._registry_sockets[url].connects == 1
                assert conn.connects == 1
    finally:
        await server.stop()
