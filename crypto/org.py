"""Organisation keys: certificates for member nodes and signed revocation lists.

A consortium or hospital group holds an organisation key. It signs a
certificate for each member node saying who the node is (institution, roles,
subspecialties, licensed jurisdictions, languages) and for how long. A node
that trusts the organisation key trusts its members' certificates, until the
organisation revokes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from crypto.envelope import SignedEnvelope
from crypto.errors import EncodingError, Expired, NotYetValid, Revoked, UntrustedIssuer
from crypto.identity import PUBLIC_KEY_SIZE, Identity, NodeId

CERT_TYPE = "org-cert"
REVOCATION_TYPE = "org-revocations"
SERIAL_SIZE = 16


def _str_tuple(raw: Any, name: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise EncodingError(f"certificate field {name!r} must be a list of strings")
    return tuple(raw)


@dataclass(frozen=True)
class NodeCertificate:
    node_key: bytes
    org_key: bytes
    institution: str
    display_name: str
    roles: tuple[str, ...]
    subspecialties: tuple[str, ...]
    jurisdictions: tuple[str, ...]
    languages: tuple[str, ...]
    not_before: int
    not_after: int
    serial: bytes = field(default_factory=lambda: os.urandom(SERIAL_SIZE))

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_public_key(self.node_key)

    def to_body(self) -> dict[str, Any]:
        return {
            "node": self.node_key,
            "org": self.org_key,
            "inst": self.institution,
            "name": self.display_name,
            "roles": list(self.roles),
            "subs": list(self.subspecialties),
            "jur": list(self.jurisdictions),
            "lang": list(self.languages),
            "nbf": self.not_before,
            "naf": self.not_after,
            "serial": self.serial,
        }

    @classmethod
    def from_body(cls, body: Any) -> NodeCertificate:
        keys = {
            "node",
            "org",
            "inst",
            "name",
            "roles",
            "subs",
            "jur",
            "lang",
            "nbf",
            "naf",
            "serial",
        }
        if not isinstance(body, dict) or set(body) != keys:
            raise EncodingError("certificate has wrong fields")
        node, org, serial = body["node"], body["org"], body["serial"]
        if not (
            isinstance(node, bytes)
            and len(node) == PUBLIC_KEY_SIZE
            and isinstance(org, bytes)
            and len(org) == PUBLIC_KEY_SIZE
            and isinstance(serial, bytes)
            and len(serial) == SERIAL_SIZE
        ):
            raise EncodingError("certificate keys or serial have the wrong size")
        if not all(isinstance(body[k], str) for k in ("inst", "name")):
            raise EncodingError("certificate institution and name must be strings")
        if not all(isinstance(body[k], int) for k in ("nbf", "naf")):
            raise EncodingError("certificate validity must be integers")
        return cls(
            node_key=node,
            org_key=org,
            institution=body["inst"],
            display_name=body["name"],
            roles=_str_tuple(body["roles"], "roles"),
            subspecialties=_str_tuple(body["subs"], "subspecialties"),
            jurisdictions=_str_tuple(body["jur"], "jurisdictions"),
            languages=_str_tuple(body["lang"], "languages"),
            not_before=body["nbf"],
            not_after=body["naf"],
            serial=serial,
        )


def issue_certificate(org: Identity, cert: NodeCertificate) -> bytes:
    """Sign ``cert`` with the organisation key; returns the certificate's wire bytes."""
    if cert.org_key != org.public_key:
        raise ValueError("certificate names a different organisation key than the signer")
    if cert.not_after <= cert.not_before:
        raise ValueError("certificate must end after it starts")
    return SignedEnvelope.create(org, CERT_TYPE, cert.to_body()).to_wire()


@dataclass(frozen=True)
class RevocationList:
    org_key: bytes
    sequence: int
    issued_at: int
    revoked_serials: frozenset[bytes]
    revoked_node_keys: frozenset[bytes]

    def to_body(self) -> dict[str, Any]:
        return {
            "org": self.org_key,
            "seq": self.sequence,
            "iat": self.issued_at,
            "serials": sorted(self.revoked_serials),
            "nodes": sorted(self.revoked_node_keys),
        }

    @classmethod
    def from_body(cls, body: Any) -> RevocationList:
        if not isinstance(body, dict) or set(body) != {"org", "seq", "iat", "serials", "nodes"}:
            raise EncodingError("revocation list has wrong fields")
        serials, nodes = body["serials"], body["nodes"]
        if not (
            isinstance(serials, list)
            and all(isinstance(s, bytes) for s in serials)
            and isinstance(nodes, list)
            and all(isinstance(n, bytes) for n in nodes)
        ):
            raise EncodingError("revocation list entries must be bytes")
        if not (
            isinstance(body["seq"], int)
            and isinstance(body["iat"], int)
            and isinstance(body["org"], bytes)
        ):
            raise EncodingError("revocation list header has wrong types")
        return cls(body["org"], body["seq"], body["iat"], frozenset(serials), frozenset(nodes))

    def revokes(self, cert: NodeCertificate) -> bool:
        return cert.serial in self.revoked_serials or cert.node_key in self.revoked_node_keys

    def newer(self, other: RevocationList | None) -> bool:
        return other is None or self.sequence > other.sequence


def sign_revocations(org: Identity, revocations: RevocationList) -> bytes:
    if revocations.org_key != org.public_key:
        raise ValueError("revocation list names a different organisation key than the signer")
    return SignedEnvelope.create(org, REVOCATION_TYPE, revocations.to_body()).to_wire()


def verify_revocations(data: bytes, org_key: bytes) -> RevocationList:
    """Verify a revocation list signed by ``org_key``."""
    envelope = SignedEnvelope.from_wire(data)
    if envelope.signer != org_key:
        raise UntrustedIssuer("revocation list is not signed by this organisation")
    revocations = RevocationList.from_body(envelope.verify(REVOCATION_TYPE))
    if revocations.org_key != org_key:
        raise EncodingError("revocation list names a different organisation")
    return revocations


def verify_certificate(
    data: bytes,
    *,
    trusted_orgs: frozenset[bytes] | set[bytes],
    now: int,
    revocations: dict[bytes, RevocationList] | None = None,
    node_key: bytes | None = None,
) -> NodeCertificate:
    """Verify the chain org key → certificate, its validity window and revocation.

    ``node_key``, when given, must be the key the certificate was issued to (the
    peer presenting it).
    """
    envelope = SignedEnvelope.from_wire(data)
    cert = NodeCertificate.from_body(envelope.verify(CERT_TYPE))
    if envelope.signer != cert.org_key:
        raise UntrustedIssuer("certificate is signed by a key other than the one it names")
    if cert.org_key not in trusted_orgs:
        raise UntrustedIssuer(
            "certificate is issued by an organisation this node does not trust; "
            "add the organisation key with `radmesh trust org` if it should be"
        )
    if node_key is not None and cert.node_key != node_key:
        raise UntrustedIssuer("certificate belongs to a different node key")
    if now < cert.not_before:
        raise NotYetValid("certificate is not valid yet: check the clock of both nodes")
    if now >= cert.not_after:
        raise Expired("certificate expired: ask the organisation to issue a new one")
    listing = (revocations or {}).get(cert.org_key)
    if listing is not None and listing.revokes(cert):
        raise Revoked("certificate was revoked by its organisation")
    return cert
