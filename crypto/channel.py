"""Per-channel encryption for the data channels, on top of DTLS. Pure, no I/O.

Ordered, reliable channels use libsodium's secretstream (XChaCha20-Poly1305):
the first message on a channel carries the 24-byte stream header, every
message is authenticated in order, so a dropped, reordered, replayed or
injected message breaks the stream and is detected.

Unordered channels (presence: no retransmits) cannot keep a stream in step, so
each message is sealed on its own with XChaCha20-Poly1305 (IETF AEAD) and an
explicit 64-bit counter; the receiver keeps a sliding window of the counters it
has accepted and refuses any it has seen or that fall behind the window.
"""

from __future__ import annotations

import nacl.bindings as sodium
import nacl.exceptions

from crypto.errors import DecryptionFailed, Replayed

HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
STREAM_OVERHEAD = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
COUNTER_SIZE = 8
DATAGRAM_OVERHEAD = COUNTER_SIZE + sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_NONCE_PREFIX = b"radmesh/datagram"  # 16 bytes; the counter fills the last 8 of 24


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise ValueError("channel keys are 32 bytes")


class StreamSealer:
    """Encrypts an ordered sequence of messages. The first output starts with the header."""

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._header: bytes | None = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )

    def seal(self, plain: bytes) -> bytes:
        sealed = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plain, None, _TAG_MESSAGE
        )
        if self._header is not None:
            sealed, self._header = self._header + sealed, None
        return sealed


class StreamOpener:
    """Decrypts what a :class:`StreamSealer` produced, in the same order."""

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        self._key = key
        self._state: sodium.crypto_secretstream_xchacha20poly1305_state | None = None
        self._broken = False

    def open(self, data: bytes) -> bytes:
        if self._broken:
            raise DecryptionFailed("this stream already failed authentication; reconnect")
        try:
            if self._state is None:
                if len(data) < HEADER_SIZE + STREAM_OVERHEAD:
                    raise DecryptionFailed("first stream message is too short for a header")
                state = sodium.crypto_secretstream_xchacha20poly1305_state()
                sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                    state, data[:HEADER_SIZE], self._key
                )
                self._state, data = state, data[HEADER_SIZE:]
            plain, _tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._state, data, None)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
            self._broken = True
            raise DecryptionFailed(
                "a channel message failed authentication (tampered, replayed or reordered)"
            ) from exc
        except DecryptionFailed:
            self._broken = True
            raise
        return bytes(plain)


class ReplayWindow:
    """Sliding window over 64-bit counters: each accepted at most once, none too old."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set: counter (highest - i) was accepted

    def check(self, counter: int) -> None:
        if counter > self.highest:
            return
        offset = self.highest - counter
        if offset >= self.size:
            raise Replayed(f"datagram {counter} is older than the replay window")
        if self._bits >> offset & 1:
            raise Replayed(f"datagram {counter} was already received (replay refused)")

    def accept(self, counter: int) -> None:
        self.check(counter)
        if counter > self.highest:
            shift = counter - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = counter
        else:
            self._bits |= 1 << (self.highest - counter)


def _nonce(counter: bytes) -> bytes:
    return _NONCE_PREFIX + counter


class DatagramSealer:
    """Seals independent messages with an explicit counter (unordered, lossy channels)."""

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        self._key = key
        self._counter = 0

    def seal(self, plain: bytes) -> bytes:
        if self._counter >= 1 << 64:
            raise OverflowError("datagram counter exhausted; reconnect for new keys")
        counter = self._counter.to_bytes(COUNTER_SIZE, "big")
        self._counter += 1
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, counter, _nonce(counter), self._key
        )
        return counter + sealed


class DatagramOpener:
    def __init__(self, key: bytes, window: int = 1024) -> None:
        _check_key(key)
        self._key = key
        self.window = ReplayWindow(window)

    def open(self, data: bytes) -> bytes:
        if len(data) < DATAGRAM_OVERHEAD:
            raise DecryptionFailed("datagram is too short")
        raw_counter = data[:COUNTER_SIZE]
        counter = int.from_bytes(raw_counter, "big")
        self.window.check(counter)
        try:
            plain = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                data[COUNTER_SIZE:], raw_counter, _nonce(raw_counter), self._key
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
            raise DecryptionFailed("a datagram failed authentication (tampered or forged)") from exc
        self.window.accept(counter)
        return bytes(plain)


__all__ = [
    "DATAGRAM_OVERHEAD",
    "HEADER_SIZE",
    "STREAM_OVERHEAD",
    "DatagramOpener",
    "DatagramSealer",
    "ReplayWindow",
    "StreamOpener",
    "StreamSealer",
]
