"""radmesh peer_transport: authenticated, end-to-end encrypted connections between nodes.

Layers (each usable and tested on its own):

- ``frames``     sans-IO frame codec: frozen dataclasses, ``to_wire()`` / ``frames.decode()``,
                 size cap (``MAX_FRAME``) checked before decoding, golden-byte fixtures.
- ``signaling``  ``Signaling`` protocol (``send(to_public_key, sealed)`` / ``receive()``),
                 ``MemorySignalingHub`` (tests) and ``StreamSignaling`` (two processes); a
                 node passes its own router (LAN endpoint, then registry WebSocket). Offers
                 and answers are ``SignalMessage``s, signed + sealed + replay-guarded, and
                 are verified before ``setRemoteDescription``.
- ``rtc``        the only aiortc importer: ``RtcLink`` (four negotiated channels),
                 ``RtcOptions(ice_servers=(IceServer(urls, username, credential),),
                 relay_only=False)``; never aiortc's default STUN server. ``Link`` is the
                 interface a connection needs from a link.
- ``memory``     ``MemoryNetwork``/``MemoryLink``: the same four channels in memory
                 (``TransportOptions(link=MemoryNetwork())``), for tests.
- ``session``    sans-IO: the link and connection lifecycle tables, ``BulkCredit``.
- ``connection`` ``Transport`` and ``PeerConnection`` (below).
- ``mux``        ``ChannelLink``: a study transfer over a connection; several on one
                 connection are routed by transfer id.
- ``transfer``   the study transfer (a package: messages, manifest, machine, spools,
                 sender, receiver, runner) on top of bulk + control.

Using it::

    transport = Transport(identity, signaling, is_trusted=trust_store.is_trusted,
                          options=TransportOptions(rtc=RtcOptions(ice_servers=...)))
    await transport.start()
    transport.handle("study.list", handler)              # async handler(conn, body) -> bytes
    conn = await transport.connect(peer_public_key)      # initiator; PeerRejected if untrusted
    conn = await transport.accept()                      # responder: next trusted peer

    reply = await conn.request("study.list", b"...", timeout=5)  # RemoteError / RequestTimeout
    await conn.send_message(data)    # one-way, control channel, ordered with requests
    await conn.send_bulk(chunk)      # <= frames.MAX_BULK_PAYLOAD; waits for credit
    await conn.send_live(data)       # reliable, ordered: consult state, chat
    conn.send_presence(data)         # unordered, no retransmits, never blocks: cursors
    async for event in conn.events():  # Connected, Received(channel, data),
        ...                            # Disconnected(will_retry), Reconnected, Closed
    conn.set_receiver("bulk", callback)  # or take a channel out of the event stream
    mux.ChannelLink(conn)            # a transfer.runner.TransferLink over this connection
    await conn.close(); await transport.close()

Security: after DTLS, a SIGMA handshake (``crypto.handshake``) binds both node
keys and both DTLS fingerprints; every frame on every channel is then encrypted
with ``crypto.channel`` (secretstream on ordered channels, counter AEAD with a
replay window on presence). Only ``is_trusted`` peers get a ``PeerConnection``,
and ``is_trusted`` is asked again for every frame in and out and every
reconnect: a peer no longer trusted loses the connection at its next message
(and ``Transport.on_untrusted`` tells the application); an unknown peer is refused
before any WebRTC work (its first contact is a sealed node message, not a connection).
Heartbeats every second notice a dead peer within 5 s; the initiator reconnects
with backoff (a new RTCPeerConnection) and callers see one event stream. Bulk
backpressure uses application acks: at most ``TransportOptions.bulk_window``
chunks are unconsumed, so bulk never fills the SCTP queue that presence shares.
``install_event_loop_policy()`` uses uvloop when installed. Errors:
``peer_transport.errors`` (``TransportError`` base).
"""
