"""Frames of the registry's signaling WebSocket (sans-IO).

Every frame is one canonical msgpack map with a ``t`` field. The size cap is
checked before decoding. The registry relays ``data`` without reading it: the
sender has sealed it to the recipient with :func:`crypto.envelope.seal`.

Authentication: the registry sends 32 random bytes; the node signs
``AUTH_DOMAIN || canonical([challenge, registry_url, node_key])``. Binding the
registry's own URL means a hostile registry that forwards another registry's
challenge to a node gets a signature the other registry refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from crypto import canonical
from crypto.errors import CryptoError
from crypto.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, NodeId, verify_signature
from registry.errors import AuthError, LimitExceeded, RegistryError

AUTH_DOMAIN = b"radmesh/registry-auth/v1"
CHALLENGE_SIZE = 32
MAX_SEALED = 64 * 1024
MAX_FRAME = MAX_SEALED + 1024
CLOSE_REPLACED = 4001  # WebSocket close code after Replaced (4000-4999: the application's)


def normalise_url(url: str) -> str:
    return url.rstrip("/").lower()


def auth_input(challenge: bytes, registry_url: str, node_key: bytes) -> bytes:
    return AUTH_DOMAIN + canonical.encode([challenge, normalise_url(registry_url), node_key])


def sign_challenge(identity: Identity, challenge: bytes, registry_url: str) -> Auth:
    return Auth(
        identity.public_key, identity.sign(auth_input(challenge, registry_url, identity.public_key))
    )


def check_auth(auth: Auth, challenge: bytes, registry_url: str) -> NodeId:
    try:
        verify_signature(
            auth.node_key, auth_input(challenge, registry_url, auth.node_key), auth.signature
        )
    except CryptoError as exc:
        raise AuthError(
            "challenge signature does not verify for this registry: the node used another "
            "challenge or another registry's URL"
        ) from exc
    return NodeId.from_public_key(auth.node_key)


def _bytes(raw: Any, name: str, size: int | None = None, limit: int = MAX_SEALED) -> bytes:
    if not isinstance(raw, bytes) or len(raw) > limit or (size is not None and len(raw) != size):
        raise RegistryError(f"frame field {name!r} must be bytes" + (f" of {size}" if size else ""))
    return raw


def _str(raw: Any, name: str, limit: int = 256) -> str:
    if not isinstance(raw, str) or len(raw) > limit:
        raise RegistryError(f"frame field {name!r} must be text of at most {limit} characters")
    return raw


def _int(raw: Any, name: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise RegistryError(f"frame field {name!r} must be an integer")
    return raw


def _node_id(raw: Any, name: str) -> NodeId:
    try:
        return NodeId.parse(_str(raw, name, 80))
    except CryptoError as exc:
        raise RegistryError(f"frame field {name!r} is not a node id") from exc


class _Frame:
    """A signaling frame: a frozen dataclass whose ``body`` goes in a map beside its type."""

    T: ClassVar[str]

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_wire(self) -> bytes:
        return canonical.encode({"t": self.T, **self.body()})


class _Bare(_Frame):
    """A frame that says one thing by its type alone and carries nothing else."""

    def body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True)
class Challenge(_Frame):
    T: ClassVar[str] = "challenge"
    challenge: bytes
    registry_url: str

    def body(self) -> dict[str, Any]:
        return {"c": self.challenge, "url": self.registry_url}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Challenge:
        return cls(_bytes(m["c"], "c", CHALLENGE_SIZE), _str(m["url"], "url"))


@dataclass(frozen=True)
class Auth(_Frame):
    T: ClassVar[str] = "auth"
    node_key: bytes
    signature: bytes

    def body(self) -> dict[str, Any]:
        return {"k": self.node_key, "s": self.signature}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Auth:
        return cls(_bytes(m["k"], "k", PUBLIC_KEY_SIZE), _bytes(m["s"], "s", SIGNATURE_SIZE))


@dataclass(frozen=True)
class Ready(_Frame):
    T: ClassVar[str] = "ready"
    node_id: NodeId
    pending: int

    def body(self) -> dict[str, Any]:
        return {"id": str(self.node_id), "n": self.pending}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Ready:
        return cls(_node_id(m["id"], "id"), _int(m["n"], "n"))


@dataclass(frozen=True)
class Send(_Frame):
    T: ClassVar[str] = "send"
    to: NodeId
    data: bytes
    ref: int

    def body(self) -> dict[str, Any]:
        return {"to": str(self.to), "d": self.data, "ref": self.ref}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Send:
        return cls(_node_id(m["to"], "to"), _bytes(m["d"], "d"), _int(m["ref"], "ref"))


@dataclass(frozen=True)
class Deliver(_Frame):
    """A relayed message. ``sender`` is who the registry says sent it: a hint only."""

    T: ClassVar[str] = "msg"
    sender: NodeId
    to: NodeId
    data: bytes

    def body(self) -> dict[str, Any]:
        return {"from": str(self.sender), "to": str(self.to), "d": self.data}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Deliver:
        return cls(_node_id(m["from"], "from"), _node_id(m["to"], "to"), _bytes(m["d"], "d"))


@dataclass(frozen=True)
class Ack(_Frame):
    T: ClassVar[str] = "ack"
    ref: int
    status: str  # "delivered" | "stored"

    def body(self) -> dict[str, Any]:
        return {"ref": self.ref, "st": self.status}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Ack:
        return cls(_int(m["ref"], "ref"), _str(m["st"], "st", 16))


@dataclass(frozen=True)
class TurnRequest(_Bare):
    T: ClassVar[str] = "turn?"


@dataclass(frozen=True)
class TurnCredentials(_Frame):
    T: ClassVar[str] = "turn"
    username: str
    password: str
    ttl: int
    urls: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"u": self.username, "p": self.password, "ttl": self.ttl, "urls": list(self.urls)}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> TurnCredentials:
        urls = m["urls"]
        if not isinstance(urls, list) or len(urls) > 8:
            raise RegistryError("turn urls must be a short list")
        ttl = _int(m["ttl"], "ttl")
        if not 0 < ttl <= MAX_TURN_TTL:
            raise RegistryError(f"turn credential lifetime must be 1 s to {MAX_TURN_TTL} s")
        return cls(_str(m["u"], "u"), _str(m["p"], "p"), ttl, tuple(_ice_url(u) for u in urls))


MAX_TURN_TTL = 7 * 24 * 3600
# What a registry may hand out as a relay: scheme, host, port, transport; nothing that
# could steer a TURN client anywhere else or smuggle more than an address.
_ICE_URL = re.compile(
    r"^(turns?|stuns?):(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?"
    r"(\?transport=(udp|tcp))?$"
)


def _ice_url(raw: Any) -> str:
    url = _str(raw, "urls", 256)
    match = _ICE_URL.match(url)
    if match is None or (match.group(3) and not 0 < int(match.group(3)[1:]) < 65536):
        raise RegistryError(
            f"registry offered a relay URL {url[:60]!r} that is not "
            "turn:HOST[:PORT][?transport=udp|tcp]; ignoring its relay"
        )
    return url


@dataclass(frozen=True)
class Error(_Frame):
    T: ClassVar[str] = "error"
    error: str
    hint: str
    ref: int = -1

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "hint": self.hint, "ref": self.ref}

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Error:
        return cls(
            _str(m["error"], "error", 1024), _str(m["hint"], "hint", 1024), _int(m["ref"], "ref")
        )


@dataclass(frozen=True)
class Replaced(_Bare):
    """Registry to node: another socket authenticated with this node's key and took this
    one's place; this one closes next. Its receiver should stop reconnecting."""

    T: ClassVar[str] = "replaced"


Frame = (
    Challenge
    | Auth
    | Ready
    | Send
    | Deliver
    | Ack
    | TurnRequest
    | TurnCredentials
    | Error
    | Replaced
)
_KINDS: dict[str, type[Frame]] = {
    k.T: k
    for k in (
        Challenge,
        Auth,
        Ready,
        Send,
        Deliver,
        Ack,
        TurnRequest,
        TurnCredentials,
        Error,
        Replaced,
    )
}


def to_wire(frame: Frame) -> bytes:
    return frame.to_wire()


def from_wire(data: bytes) -> Frame:
    """Decode one frame; raise :class:`RegistryError` on anything malformed."""
    if len(data) > MAX_FRAME:
        raise LimitExceeded(f"signaling frame is {len(data)} bytes, limit is {MAX_FRAME}")
    try:
        raw = canonical.decode(data, MAX_FRAME)
    except CryptoError as exc:
        raise RegistryError(f"malformed signaling frame: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("t"), str):
        raise RegistryError("signaling frame must be a map with a type")
    kind = _KINDS.get(raw["t"])
    if kind is None:
        raise RegistryError(f"unknown signaling frame type {raw['t'][:20]!r}")
    try:
        return kind.parse(raw)
    except KeyError as exc:
        raise RegistryError(f"signaling frame {raw['t']!r} lacks field {exc}") from exc
