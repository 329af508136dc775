"""The session handshake: a SIGMA-style authenticated key exchange, sans-IO.

Three messages travel on the control channel once DTLS is up::

    Init  I -> R   e_i, n_i
    Resp  R -> I   e_r, n_r, pk_r, fp_i, fp_r, sig_r(th2), mac_r(th2)
    Fin   I -> R   pk_i, sig_i(th3), mac_i(th3)

``e_*`` are fresh X25519 keys, ``n_*`` random nonces, ``pk_*`` the long-term
Ed25519 node keys, ``fp_*`` the DTLS fingerprints each side read from the SDPs.
The transcript hashes ``th2``/``th3`` cover everything sent so far, so each
signature binds both ephemerals, both node keys and both DTLS fingerprints: a
relay that terminates DTLS itself (and so shows each side a different
fingerprint) is caught, and a signature from one session never verifies in
another. The MACs (keyed by the shared secret) are the key confirmation. The
session keys are derived from the final transcript, one per direction.

:class:`Initiator` and :class:`Responder` take message bytes in and give message
bytes (and finally :class:`SessionKeys`) out; they never touch a socket.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions

from crypto import canonical
from crypto.errors import BadSignature, CryptoError, EncodingError, Replayed
from crypto.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature
from crypto.statetable import TransitionTable

PROTOCOL = b"radmesh/handshake/v1"
VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 16
MAC_SIZE = 32
MAX_MESSAGE_SIZE = 1024  # every handshake message is far smaller; checked before decoding
MAX_FINGERPRINT_LEN = 200


class HandshakeError(CryptoError):
    """The session handshake failed; the connection must be dropped."""


class WrongIdentity(HandshakeError):
    """The peer proved a different node key than the one we meant to reach."""


class FingerprintMismatch(HandshakeError):
    """The two sides saw different DTLS fingerprints: something in between terminates DTLS."""


class HandshakeStateError(HandshakeError):
    """A handshake message arrived out of order (or twice)."""


def normalise_fingerprint(fingerprint: str) -> str:
    """``"sha-256 AB:CD:…"`` in one spelling, so both sides hash the same text."""
    text = " ".join(fingerprint.split()).lower()
    if not text or len(text) > MAX_FINGERPRINT_LEN:
        raise EncodingError("a DTLS fingerprint must be 1 to 200 characters")
    return text


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"radmesh-hs-th")
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _kdf(secret: bytes, transcript: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(transcript, key=secret, digest_size=KEY_SIZE, person=label).digest()


def _mac(key: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, transcript, hashlib.sha256).digest()


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        shared = nacl.bindings.crypto_scalarmult(private, public)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError) as exc:
        raise BadSignature("peer's ephemeral key is not a usable X25519 key") from exc
    if shared == bytes(32):
        raise BadSignature("peer's ephemeral key is a low-order point")
    return shared


def _ephemeral() -> tuple[bytes, bytes]:
    private = os.urandom(32)
    return private, nacl.bindings.crypto_scalarmult_base(private)


def _check_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise EncodingError(f"handshake field {name!r} must be {size} bytes")
    return value


def _decode(data: bytes, fields: tuple[str, ...]) -> dict[str, object]:
    raw = canonical.decode(data, MAX_MESSAGE_SIZE)
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise EncodingError(f"handshake message must have exactly the fields {sorted(fields)}")
    if raw.get("v") != VERSION:
        raise EncodingError(f"handshake version {raw.get('v')!r} is not supported")
    return raw


@dataclass(frozen=True)
class Init:
    ephemeral: bytes
    nonce: bytes

    def to_wire(self) -> bytes:
        return canonical.encode({"v": VERSION, "e": self.ephemeral, "n": self.nonce})

    @classmethod
    def from_wire(cls, data: bytes) -> Init:
        raw = _decode(data, ("v", "e", "n"))
        return cls(_check_bytes("e", raw["e"], 32), _check_bytes("n", raw["n"], NONCE_SIZE))


@dataclass(frozen=True)
class Resp:
    ephemeral: bytes
    nonce: bytes
    public_key: bytes
    fingerprint_initiator: str
    fingerprint_responder: str
    signature: bytes
    mac: bytes

    def to_wire(self) -> bytes:
        return canonical.encode(
            {
                "v": VERSION,
                "e": self.ephemeral,
                "n": self.nonce,
                "k": self.public_key,
                "fi": self.fingerprint_initiator,
                "fr": self.fingerprint_responder,
                "s": self.signature,
                "m": self.mac,
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> Resp:
        raw = _decode(data, ("v", "e", "n", "k", "fi", "fr", "s", "m"))
        fi, fr = raw["fi"], raw["fr"]
        if not isinstance(fi, str) or not isinstance(fr, str):
            raise EncodingError("handshake fingerprints must be text")
        if normalise_fingerprint(fi) != fi or normalise_fingerprint(fr) != fr:
            raise EncodingError("handshake fingerprints must be in normal form")
        return cls(
            _check_bytes("e", raw["e"], 32),
            _check_bytes("n", raw["n"], NONCE_SIZE),
            _check_bytes("k", raw["k"], PUBLIC_KEY_SIZE),
            fi,
            fr,
            _check_bytes("s", raw["s"], SIGNATURE_SIZE),
            _check_bytes("m", raw["m"], MAC_SIZE),
        )


@dataclass(frozen=True)
class Fin:
    public_key: bytes
    signature: bytes
    mac: bytes

    def to_wire(self) -> bytes:
        return canonical.encode(
            {"v": VERSION, "k": self.public_key, "s": self.signature, "m": self.mac}
        )

    @classmethod
    def from_wire(cls, data: bytes) -> Fin:
        raw = _decode(data, ("v", "k", "s", "m"))
        return cls(
            _check_bytes("k", raw["k"], PUBLIC_KEY_SIZE),
            _check_bytes("s", raw["s"], SIGNATURE_SIZE),
            _check_bytes("m", raw["m"], MAC_SIZE),
        )


@dataclass(frozen=True)
class SessionKeys:
    """What a finished handshake yields. ``send``/``receive`` are direction keys."""

    peer_public_key: bytes
    send: bytes
    receive: bytes
    transcript: bytes

    def channel_keys(self, channel: str) -> tuple[bytes, bytes]:
        """(send key, receive key) for one named channel, independent of the others."""
        label = channel.encode()
        if not 0 < len(label) <= 16:
            raise ValueError("channel names are 1 to 16 bytes")
        return _kdf(self.send, b"channel", label), _kdf(self.receive, b"channel", label)

    def __repr__(self) -> str:  # never print key material
        return f"SessionKeys(peer={self.peer_public_key[:4].hex()}…)"


class _State(enum.Enum):
    START = "start"
    WAIT_RESP = "wait-resp"
    WAIT_FIN = "wait-fin"
    DONE = "done"
    FAILED = "failed"


# ((role, state), event) -> (role, next state). Anything missing is a HandshakeStateError.
_TABLE: TransitionTable[tuple[str, _State], str] = TransitionTable(
    {
        (("initiator", _State.START), "start"): ("initiator", _State.WAIT_RESP),
        (("initiator", _State.WAIT_RESP), "resp"): ("initiator", _State.DONE),
        (("responder", _State.START), "init"): ("responder", _State.WAIT_FIN),
        (("responder", _State.WAIT_FIN), "fin"): ("responder", _State.DONE),
    },
    lambda at, event: HandshakeStateError(
        f"handshake message {event!r} is not expected by the {at[0]} "
        f"in state {at[1].value}: a replayed or out-of-order message"
    ),
)


class _Party:
    role = ""

    def __init__(self) -> None:
        self.state = _State.START

    def _advance(self, event: str) -> None:
        key = (self.role, self.state)
        if not _TABLE.allows(key, event):
            self.state = _State.FAILED
        _, self.state = _TABLE.fire(key, event)


def _check_fingerprints(mine: tuple[str, str], theirs: tuple[str, str]) -> None:
    if mine != theirs:
        raise FingerprintMismatch(
            "the peer saw different DTLS fingerprints than this node: something between "
            "the two nodes is intercepting the connection; it was dropped"
        )


class Initiator:
    """The side that sent the SDP offer. ``expected_peer`` is the key we meant to reach."""

    role = "initiator"

    def __init__(
        self,
        identity: Identity,
        expected_peer: bytes,
        local_fingerprint: str,
        remote_fingerprint: str,
    ) -> None:
        self._party = _Party()
        self._party.role = self.role
        self._identity = identity
        self._expected = expected_peer
        self._fps = (
            normalise_fingerprint(local_fingerprint),
            normalise_fingerprint(remote_fingerprint),
        )
        self._private, public = _ephemeral()
        self._init = Init(public, os.urandom(NONCE_SIZE))

    def start(self) -> bytes:
        self._party._advance("start")
        return self._init.to_wire()

    def receive_resp(self, data: bytes) -> tuple[bytes, SessionKeys]:
        """Check the responder's message; return (Fin bytes to send, session keys)."""
        self._party._advance("resp")
        try:
            return self._receive_resp(data)
        except CryptoError:
            self._party.state = _State.FAILED
            raise

    def _receive_resp(self, data: bytes) -> tuple[bytes, SessionKeys]:
        resp = Resp.from_wire(data)
        if resp.public_key != self._expected:
            raise WrongIdentity(
                "the peer answered with a different node key than the one we called: "
                "check the node id; the connection was dropped"
            )
        _check_fingerprints(self._fps, (resp.fingerprint_initiator, resp.fingerprint_responder))
        shared = _dh(self._private, resp.ephemeral)
        th2 = _transcript2(self._init, resp)
        verify_signature(resp.public_key, PROTOCOL + b"/resp" + th2, resp.signature)
        if not hmac.compare_digest(_mac(_kdf(shared, th2, b"mac-r"), th2), resp.mac):
            raise BadSignature("handshake key confirmation failed (responder MAC)")
        me = self._identity.public_key
        th3 = _hash(th2, me)
        signature = self._identity.sign(PROTOCOL + b"/fin" + th3)
        fin = Fin(me, signature, _mac(_kdf(shared, th3, b"mac-i"), th3))
        keys = SessionKeys(
            resp.public_key, _kdf(shared, th3, b"i2r"), _kdf(shared, th3, b"r2i"), th3
        )
        return fin.to_wire(), keys


def _transcript2(init: Init, resp: Resp) -> bytes:
    return _hash(
        PROTOCOL,
        init.to_wire(),
        resp.ephemeral,
        resp.nonce,
        resp.public_key,
        resp.fingerprint_initiator.encode(),
        resp.fingerprint_responder.encode(),
    )


class ReplayCache:
    """Initiator ephemerals a responder has seen; a second Init with one is a replay. Bounded."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._seen: dict[bytes, None] = {}

    def check_and_remember(self, ephemeral: bytes) -> None:
        if ephemeral in self._seen:
            raise Replayed("this handshake was already used once (replay refused)")
        if len(self._seen) >= self._capacity:
            del self._seen[next(iter(self._seen))]
        self._seen[ephemeral] = None


class Responder:
    """The side that answered the offer. ``expected_peer`` is the key that signed the offer."""

    role = "responder"

    def __init__(
        self,
        identity: Identity,
        expected_peer: bytes | None,
        local_fingerprint: str,
        remote_fingerprint: str,
        replay_cache: ReplayCache | None = None,
    ) -> None:
        self._party = _Party()
        self._party.role = self.role
        self._identity = identity
        self._expected = expected_peer
        self._fps = (
            normalise_fingerprint(remote_fingerprint),
            normalise_fingerprint(local_fingerprint),
        )
        self._replay = replay_cache
        self._private, self._public = _ephemeral()
        self._shared = b""
        self._th2 = b""

    def receive_init(self, data: bytes) -> bytes:
        """Check the initiator's first message; return the Resp bytes to send."""
        self._party._advance("init")
        try:
            init = Init.from_wire(data)
            if self._replay is not None:
                self._replay.check_and_remember(init.ephemeral)
            self._shared = _dh(self._private, init.ephemeral)
        except CryptoError:
            self._party.state = _State.FAILED
            raise
        me = self._identity.public_key
        unsigned = Resp(self._public, os.urandom(NONCE_SIZE), me, *self._fps, bytes(64), bytes(32))
        self._th2 = _transcript2(init, unsigned)
        signature = self._identity.sign(PROTOCOL + b"/resp" + self._th2)
        mac = _mac(_kdf(self._shared, self._th2, b"mac-r"), self._th2)
        return Resp(unsigned.ephemeral, unsigned.nonce, me, *self._fps, signature, mac).to_wire()

    def receive_fin(self, data: bytes) -> SessionKeys:
        self._party._advance("fin")
        try:
            fin = Fin.from_wire(data)
            if self._expected is not None and fin.public_key != self._expected:
                raise WrongIdentity(
                    "the peer proved a different node key than the one that signed its "
                    "offer; the connection was dropped"
                )
            th3 = _hash(self._th2, fin.public_key)
            verify_signature(fin.public_key, PROTOCOL + b"/fin" + th3, fin.signature)
            if not hmac.compare_digest(_mac(_kdf(self._shared, th3, b"mac-i"), th3), fin.mac):
                raise BadSignature("handshake key confirmation failed (initiator MAC)")
        except CryptoError:
            self._party.state = _State.FAILED
            raise
        return SessionKeys(
            fin.public_key, _kdf(self._shared, th3, b"r2i"), _kdf(self._shared, th3, b"i2r"), th3
        )


__all__ = [
    "Fin",
    "FingerprintMismatch",
    "HandshakeError",
    "HandshakeStateError",
    "Init",
    "Initiator",
    "ReplayCache",
    "Resp",
    "Responder",
    "SessionKeys",
    "WrongIdentity",
]
