"""Organisation certificates, revocation lists and the encrypted key file."""

from __future__ import annotations

import dataclasses

import nacl.pwhash
import pytest

from crypto import keyfile
from crypto.errors import (
    CryptoError,
    EncodingError,
    Expired,
    NotYetValid,
    Revoked,
    UntrustedIssuer,
    WrongPassphrase,
)
from crypto.identity import Identity
from crypto.org import (
    NodeCertificate,
    RevocationList,
    issue_certificate,
    sign_revocations,
    verify_certificate,
    verify_revocations,
)

# Argon2id at its minimum cost: the key file format is the same, the tests are fast.
CHEAP_KDF = keyfile.KdfCost(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)

ORG = Identity(bytes([10]) * 32)
OTHER_ORG = Identity(bytes([11]) * 32)
NODE = Identity(bytes([12]) * 32)
NOW = 1_800_000_000


def _cert(**changes: object) -> NodeCertificate:
    cert = NodeCertificate(
        node_key=NODE.public_key,
        org_key=ORG.public_key,
        institution="Nordic Neuro Group",
        display_name="Dr. Lindqvist",
        roles=("radiologist",),
        subspecialties=("neuro",),
        jurisdictions=("SE", "NO"),
        languages=("sv", "en"),
        not_before=NOW - 10,
        not_after=NOW + 86400,
        serial=bytes(16),
    )
    return dataclasses.replace(cert, **changes)  # type: ignore[arg-type]


def test_certificate_chain_verifies() -> None:
    cert = verify_certificate(
        issue_certificate(ORG, _cert()),
        trusted_orgs={ORG.public_key},
        now=NOW,
        node_key=NODE.public_key,
    )
    assert cert.subspecialties == ("neuro",)
    assert cert.node_id == NODE.node_id


def test_certificate_from_untrusted_org_is_refused() -> None:
    with pytest.raises(UntrustedIssuer, match="does not trust"):
        verify_certificate(
            issue_certificate(ORG, _cert()), trusted_orgs={OTHER_ORG.public_key}, now=NOW
        )


def test_certificate_presented_by_another_node_is_refused() -> None:
    with pytest.raises(UntrustedIssuer, match="different node"):
        verify_certificate(
            issue_certificate(ORG, _cert()),
            trusted_orgs={ORG.public_key},
            now=NOW,
            node_key=OTHER_ORG.public_key,
        )


def test_certificate_validity_window() -> None:
    data = issue_certificate(ORG, _cert())
    with pytest.raises(NotYetValid):
        verify_certificate(data, trusted_orgs={ORG.public_key}, now=NOW - 11)
    with pytest.raises(Expired):
        verify_certificate(data, trusted_orgs={ORG.public_key}, now=NOW + 86400)


def test_flipping_any_byte_of_a_certificate_is_rejected() -> None:
    data = issue_certificate(ORG, _cert())
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] ^= 0x04
        with pytest.raises(CryptoError):
            verify_certificate(bytes(tampered), trusted_orgs={ORG.public_key}, now=NOW)


def test_certificate_naming_another_org_is_refused() -> None:
    # Signed by OTHER_ORG but claiming to be from ORG.
    from crypto.envelope import SignedEnvelope
    from crypto.org import CERT_TYPE

    forged = SignedEnvelope.create(OTHER_ORG, CERT_TYPE, _cert().to_body()).to_wire()
    with pytest.raises(UntrustedIssuer):
        verify_certificate(forged, trusted_orgs={ORG.public_key}, now=NOW)


def test_revoked_certificate_is_refused_and_list_must_be_signed_by_org() -> None:
    cert = _cert()
    listing = RevocationList(ORG.public_key, 1, NOW, frozenset({cert.serial}), frozenset())
    signed = sign_revocations(ORG, listing)
    loaded = verify_revocations(signed, ORG.public_key)
    with pytest.raises(Revoked):
        verify_certificate(
            issue_certificate(ORG, cert),
            trusted_orgs={ORG.public_key},
            now=NOW,
            revocations={ORG.public_key: loaded},
        )
    with pytest.raises(UntrustedIssuer):
        verify_revocations(signed, OTHER_ORG.public_key)


def test_revocation_by_node_key_covers_every_certificate_of_that_node() -> None:
    listing = RevocationList(ORG.public_key, 2, NOW, frozenset(), frozenset({NODE.public_key}))
    with pytest.raises(Revoked):
        verify_certificate(
            issue_certificate(ORG, _cert(serial=bytes([1]) * 16)),
            trusted_orgs={ORG.public_key},
            now=NOW,
            revocations={ORG.public_key: listing},
        )


def test_newer_revocation_list_replaces_older() -> None:
    old = RevocationList(ORG.public_key, 1, NOW, frozenset(), frozenset())
    new = RevocationList(ORG.public_key, 2, NOW, frozenset(), frozenset())
    assert new.newer(old)
    assert not old.newer(new)


def test_keyfile_round_trip_and_wrong_passphrase() -> None:
    seed = NODE.seed
    data = keyfile.encrypt_seed(seed, "correct horse", CHEAP_KDF)
    assert seed not in data
    assert keyfile.decrypt_seed(data, "correct horse") == seed
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        keyfile.decrypt_seed(data, "battery staple")


def test_keyfile_tampering_is_detected() -> None:
    data = keyfile.encrypt_seed(NODE.seed, "pw", CHEAP_KDF)
    tampered = bytearray(data)
    tampered[-3] ^= 0x01
    with pytest.raises((WrongPassphrase, EncodingError)):
        keyfile.decrypt_seed(bytes(tampered), "pw")


def test_plain_keyfile_needs_no_passphrase() -> None:
    assert keyfile.decrypt_seed(keyfile.plain_seed(NODE.seed), None) == NODE.seed
