"""Signed node records and LAN pointers (sans-IO).

A node record says who a node is and how to reach it. The node signs it with
its own key, so any registry may store or mirror it and none can forge or alter
it: the record is self-certifying. A newer sequence number replaces an older
one; an expired record is worth nothing.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from crypto import canonical
from crypto.envelope import SignedEnvelope, open_signed
from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from registry.errors import BadEndpoint, RecordError, StaleRecord

RECORD_TYPE = "node-record"
POINTER_TYPE = "node-pointer"
MAX_RECORD_SIZE = 16 * 1024
MAX_POINTER_SIZE = 240  # one DNS TXT string holds 255 bytes, minus "ptr="
MAX_TEXT = 128
MAX_ITEMS = 16
MAX_ITEM = 64
MAX_ENDPOINTS = 8
MAX_ENDPOINT = 256
MAX_CERT = 4096
MAX_TTL = 7 * 24 * 3600
CLOCK_SKEW = 300


class Availability(enum.StrEnum):
    ONLINE = "online"
    ON_CALL = "on_call"
    AWAY = "away"


def _text(raw: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(raw, str) or len(raw) > limit:
        raise RecordError(f"record field {name!r} must be text of at most {limit} characters")
    return raw


def _texts(raw: Any, name: str, count: int = MAX_ITEMS, limit: int = MAX_ITEM) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > count:
        raise RecordError(f"record field {name!r} must be a list of at most {count} items")
    return tuple(_text(item, name, limit) for item in raw)


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def bare_http_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url`` if it is exactly ``http(s)://host:port``.

    A peer's LAN URL is chosen by whoever signed the record, so it may name
    only where to connect, never what to ask for there: no path, query,
    fragment or userinfo, a port always, and the canonical spelling only (a
    record that differs from ``scheme://host:port`` is refused, not repaired).
    The outgoing URL is built from these parts plus our own fixed path.
    """
    shown = url[:60]
    if not url.isascii() or not url.isprintable() or any(c in url for c in " \\"):
        raise BadEndpoint(f"LAN URL {shown!r} has characters a bare http://host:port cannot")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadEndpoint(f"LAN URL {shown!r} is not a valid URL: {exc}") from exc
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise BadEndpoint(f"LAN URL {shown!r} must use http or https")
    if port is None or port == 0 or not host:
        raise BadEndpoint(f"LAN URL {shown!r} must name a host and a port (http://HOST:PORT)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise BadEndpoint(f"LAN URL {shown!r} has an invalid host name") from None
        netloc = host
    else:
        netloc = f"[{address.compressed}]" if address.version == 6 else address.compressed
    if url != f"{parts.scheme}://{netloc}:{port}":
        raise BadEndpoint(
            f"LAN URL {shown!r} must be exactly http(s)://HOST:PORT, without path, query, "
            "fragment or user name: the node that published it must fix its address"
        )
    return parts.scheme, host, port


def _check_registry_url(url: str) -> None:
    """A registry URL may have a path prefix, nothing else beyond host and port."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BadEndpoint(f"registry URL {url[:60]!r} is not a valid URL: {exc}") from exc
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or "?" in url
        or "#" in url
        or not url.isascii()
        or not url.isprintable()
        or " " in url
    ):
        raise BadEndpoint(
            f"registry URL {url[:60]!r} must be http(s)://HOST[:PORT][/PATH] with no "
            "query, fragment or user name"
        )


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("lan:"):
        bare_http_url(endpoint.removeprefix("lan:"))
    elif endpoint.startswith("registry:"):
        _check_registry_url(endpoint.removeprefix("registry:"))
    else:
        raise RecordError(
            f"endpoint {endpoint[:40]!r} must start with 'lan:' or 'registry:' "
            "(e.g. lan:http://192.0.2.1:7400)"
        )


@dataclass(frozen=True)
class NodeRecord:
    """A verified-or-to-be-verified node record; ``signature`` covers everything else."""

    public_key: bytes
    display_name: str
    institution: str
    country: str
    subspecialties: tuple[str, ...]
    jurisdictions: tuple[str, ...]
    languages: tuple[str, ...]
    timezone: str
    availability: Availability
    endpoints: tuple[str, ...]
    org_certificate: bytes | None
    sequence: int
    issued_at: int
    expires_at: int
    signature: bytes = field(default=b"", repr=False)

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_public_key(self.public_key)

    @property
    def lan_urls(self) -> tuple[str, ...]:
        return tuple(e.removeprefix("lan:") for e in self.endpoints if e.startswith("lan:"))

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        now: int,
        sequence: int,
        ttl: int = 24 * 3600,
        display_name: str = "",
        institution: str = "",
        country: str = "",
        subspecialties: tuple[str, ...] = (),
        jurisdictions: tuple[str, ...] = (),
        languages: tuple[str, ...] = (),
        timezone: str = "UTC",
        availability: Availability = Availability.ONLINE,
        endpoints: tuple[str, ...] = (),
        org_certificate: bytes | None = None,
    ) -> NodeRecord:
        """Build and sign a record; the same limits as :meth:`from_wire` apply."""
        if not 0 < ttl <= MAX_TTL:
            raise RecordError(f"record lifetime must be 1 s to {MAX_TTL} s")
        unsigned = cls(
            identity.public_key,
            display_name,
            institution,
            country,
            tuple(subspecialties),
            tuple(jurisdictions),
            tuple(languages),
            timezone,
            Availability(availability),
            tuple(endpoints),
            org_certificate,
            sequence,
            now,
            now + ttl,
        )
        body = unsigned._body()
        cls._from_body(body, identity.public_key, b"")  # enforce limits before signing
        envelope = SignedEnvelope.create(identity, RECORD_TYPE, body)
        return cls._from_body(body, envelope.signer, envelope.signature)

    def _body(self) -> dict[str, Any]:
        return {
            "name": self.display_name,
            "inst": self.institution,
            "country": self.country,
            "subs": list(self.subspecialties),
            "jur": list(self.jurisdictions),
            "lang": list(self.languages),
            "tz": self.timezone,
            "avail": self.availability.value,
            "ep": list(self.endpoints),
            "cert": self.org_certificate,
            "seq": self.sequence,
            "iat": self.issued_at,
            "exp": self.expires_at,
        }

    @classmethod
    def _from_body(cls, body: Any, key: bytes, signature: bytes) -> NodeRecord:
        fields_ = {
            "name",
            "inst",
            "country",
            "subs",
            "jur",
            "lang",
            "tz",
            "avail",
            "ep",
            "cert",
            "seq",
            "iat",
            "exp",
        }
        if not isinstance(body, dict) or set(body) != fields_:
            raise RecordError("not a node record: wrong fields")
        endpoints = _texts(body["ep"], "endpoints", MAX_ENDPOINTS, MAX_ENDPOINT)
        for endpoint in endpoints:
            _check_endpoint(endpoint)
        cert = body["cert"]
        if cert is not None and not (isinstance(cert, bytes) and len(cert) <= MAX_CERT):
            raise RecordError(f"record org certificate must be at most {MAX_CERT} bytes")
        seq, iat, exp = body["seq"], body["iat"], body["exp"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seq, iat, exp)):
            raise RecordError("record sequence and times must be integers")
        if seq < 0 or iat < 0 or not 0 < exp - iat <= MAX_TTL:
            raise RecordError(f"record sequence or lifetime out of range (at most {MAX_TTL} s)")
        try:
            availability = Availability(body["avail"])
        except ValueError as exc:
            raise RecordError("record availability must be online, on_call or away") from exc
        return cls(
            public_key=key,
            display_name=_text(body["name"], "display name"),
            institution=_text(body["inst"], "institution"),
            country=_text(body["country"], "country", 8),
            subspecialties=_texts(body["subs"], "subspecialties"),
            jurisdictions=_texts(body["jur"], "jurisdictions"),
            languages=_texts(body["lang"], "languages"),
            timezone=_text(body["tz"], "time zone", 64),
            availability=availability,
            endpoints=endpoints,
            org_certificate=cert,
            sequence=seq,
            issued_at=iat,
            expires_at=exp,
            signature=signature,
        )

    def to_wire(self) -> bytes:
        if not self.signature:
            raise RecordError("record is not signed: build it with NodeRecord.create")
        return SignedEnvelope(
            RECORD_TYPE, 1, self.public_key, _encode(self._body()), self.signature
        ).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> NodeRecord:
        """Parse and check the signature; call :meth:`verify` for the time window."""
        envelope, body = open_signed(
            data, RECORD_TYPE, MAX_RECORD_SIZE, what="node record", error=RecordError
        )
        return cls._from_body(body, envelope.signer, envelope.signature)

    def verify(self, now: int) -> NodeRecord:
        """Raise unless the signature holds and ``now`` is inside the validity window."""
        try:
            SignedEnvelope(
                RECORD_TYPE, 1, self.public_key, _encode(self._body()), self.signature
            ).verify(RECORD_TYPE)
        except CryptoError as exc:
            raise RecordError(f"node record does not verify: {exc}") from exc
        if now >= self.expires_at:
            raise RecordError(
                f"record of {self.node_id.short()} expired; the node must publish a fresh one"
            )
        if self.issued_at > now + CLOCK_SKEW:
            raise RecordError("record is dated in the future: check both clocks")
        return self

    def expected_id(self, node_id: NodeId) -> NodeRecord:
        """Raise unless this record belongs to ``node_id`` (a swapped key)."""
        if self.node_id != node_id:
            raise RecordError(
                f"record is signed by {self.node_id.short()}, not {node_id.short()}: "
                "the source swapped it; ignore that source"
            )
        return self


def _encode(body: Any) -> bytes:
    return canonical.encode(body)


def parse_verified(data: bytes, now: int, node_id: NodeId | None = None) -> NodeRecord:
    """Parse, verify signature and time, and optionally check whose record it is."""
    record = NodeRecord.from_wire(data).verify(now)
    if node_id is not None:
        record.expected_id(node_id)
    return record


def supersedes(new: NodeRecord, old: NodeRecord | None) -> bool:
    """True when ``new`` should replace ``old``: same node, strictly higher sequence."""
    if old is None:
        return True
    if new.public_key != old.public_key:
        raise RecordError("records of two different nodes cannot replace each other")
    return new.sequence > old.sequence


def require_newer(new: NodeRecord, old: NodeRecord | None) -> None:
    if old is not None and not supersedes(new, old):
        raise StaleRecord(
            f"record sequence {new.sequence} is not newer than {old.sequence}: "
            "publish with a higher sequence number",
            old.sequence,
        )


@dataclass(frozen=True)
class LanPointer:
    """The small signed hint a node puts in its mDNS TXT record."""

    public_key: bytes
    endpoint: str
    sequence: int
    signature: bytes = field(default=b"", repr=False)

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_public_key(self.public_key)

    @classmethod
    def create(cls, identity: Identity, endpoint: str, sequence: int) -> LanPointer:
        bare_http_url(endpoint)
        envelope = SignedEnvelope.create(identity, POINTER_TYPE, [endpoint, sequence])
        pointer = cls(identity.public_key, endpoint, sequence, envelope.signature)
        if len(pointer.to_wire()) > MAX_POINTER_SIZE:
            raise RecordError("LAN endpoint URL is too long for an mDNS pointer")
        return pointer

    def to_wire(self) -> bytes:
        return SignedEnvelope(
            POINTER_TYPE,
            1,
            self.public_key,
            _encode([self.endpoint, self.sequence]),
            self.signature,
        ).to_wire()

    @classmethod
    def from_wire(cls, data: bytes) -> LanPointer:
        envelope, body = open_signed(
            data, POINTER_TYPE, MAX_POINTER_SIZE, what="mDNS pointer", error=RecordError
        )
        if not (
            isinstance(body, list)
            and len(body) == 2
            and isinstance(body[0], str)
            and len(body[0]) <= MAX_ENDPOINT
            and isinstance(body[1], int)
        ):
            raise RecordError("mDNS pointer has the wrong shape")
        bare_http_url(body[0])  # BadEndpoint unless exactly http(s)://host:port
        return cls(envelope.signer, body[0], body[1], envelope.signature)
