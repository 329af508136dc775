"""One radmesh node inside a network namespace (run by test_netns.py via `ip netns exec`).

Signaling reaches the test process through a Unix socket (filesystem sockets cross
network namespaces); the data path is WebRTC over the veth link only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from crypto.identity import Identity
from peer_transport import frames as fr
from peer_transport.connection import PeerConnection, Received, Transport, TransportOptions
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from peer_transport.signaling import StreamSignaling

CHUNKS = 16


async def _echo(_conn: PeerConnection, body: bytes) -> bytes:
    return body[::-1]


async def run(args: argparse.Namespace) -> dict[str, object]:
    restrict_host_addresses([args.address])
    reader, writer = await asyncio.open_unix_connection(args.sock)
    me, peer = Identity(bytes.fromhex(args.seed)), bytes.fromhex(args.peer)
    options = TransportOptions(rtc=RtcOptions(ice_servers=()), connect_timeout=15)
    transport = Transport(
        me, StreamSignaling(reader, writer), is_trusted=lambda k: k == peer, options=options
    )
    transport.handle("echo", _echo)
    await transport.start()
    try:
        if args.role == "initiator":
            conn = await transport.connect(peer)
            reply = await conn.request("echo", b"across namespaces")
            payload = os.urandom(fr.MAX_BULK_PAYLOAD)
            for _ in range(CHUNKS):
                await conn.send_bulk(payload)
            await conn.request("echo", b"flush")
            session = conn._session
            assert session is not None
            return {"reply": reply.decode(), "pair": session.link.selected_candidate_types()}
        conn = await transport.accept(20)
        received = 0
        while received < CHUNKS:
            event = await conn.next_event(20)
            if isinstance(event, Received) and event.channel == "bulk":
                received += 1
        await asyncio.sleep(0.5)
        return {"bulk_chunks": received}
    finally:
        await transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["initiator", "responder"], required=True)
    parser.add_argument("--sock", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--peer", required=True)
    result = asyncio.run(run(parser.parse_args()))
    sys.stdout.write(json.dumps(result) + "\n")
