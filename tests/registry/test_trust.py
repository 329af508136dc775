"""Trust store: inbox on first contact, verified, trusted by org, revocation wins at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.identity import Identity
from crypto.org import RevocationList, sign_revocations
from registry.errors import TrustError
from registry.trust import TrustState, TrustStore
from tests.certs import certificate
from tests.registry.conftest import NOW

PEER = Identity(bytes([21]) * 32)
OTHER = Identity(bytes([22]) * 32)
ORG = Identity(bytes([23]) * 32)


def _cert(node: Identity, org: Identity = ORG) -> bytes:
    return certificate(org, node, NOW, display_name="Dr P", serial=bytes(16))


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "trust.db")


def test_first_contact_lands_in_inbox_and_is_not_trusted(store: TrustStore) -> None:
    assert store.state(PEER.public_key, NOW) is TrustState.UNKNOWN
    assert (
        store.first_contact(PEER.public_key, NOW, summary="consult request") is TrustState.PENDING
    )
    assert [e.node_id for e in store.inbox()] == [PEER.node_id]
    assert not store.is_trusted(PEER.public_key, NOW)


def test_safety_number_confirmation_makes_verified(store: TrustStore) -> None:
    store.first_contact(PEER.public_key, NOW)
    store.mark_verified(PEER.node_id, NOW)
    assert store.state(PEER.public_key, NOW) is TrustState.VERIFIED
    assert store.is_trusted(PEER.public_key, NOW)
    assert store.inbox() == []
    assert not store.is_trusted(OTHER.public_key, NOW)


def test_revocation_applies_immediately_and_is_final(store: TrustStore) -> None:
    store.mark_verified(PEER.node_id, NOW)
    store.revoke(PEER.node_id, NOW)
    assert store.state(PEER.public_key, NOW) is TrustState.REVOKED
    assert not store.is_trusted(PEER.public_key, NOW)
    with pytest.raises(TrustError, match="revoked"):
        store.mark_verified(PEER.node_id, NOW)


def test_certificate_from_trusted_org(store: TrustStore) -> None:
    cert = _cert(PEER)
    assert not store.is_trusted(PEER.public_key, NOW, cert)  # org not trusted yet
    store.add_org(ORG.public_key, NOW)
    assert store.state(PEER.public_key, NOW, cert) is TrustState.TRUSTED_BY_ORG
    # A certificate for another key does not transfer.
    assert not store.is_trusted(OTHER.public_key, NOW, cert)
    # Expired certificate: no trust.
    assert not store.is_trusted(PEER.public_key, NOW + 2 * 86400, cert)
    # A remembered certificate is used when none is presented.
    store.first_contact(PEER.public_key, NOW, certificate=cert)
    assert store.state(PEER.public_key, NOW) is TrustState.TRUSTED_BY_ORG


def test_org_revocation_list_revokes_at_once(store: TrustStore) -> None:
    cert = _cert(PEER)
    store.add_org(ORG.public_key, NOW)
    assert store.is_trusted(PEER.public_key, NOW, cert)
    listing = RevocationList(ORG.public_key, 1, NOW, frozenset({bytes(16)}), frozenset())
    store.add_revocations(sign_revocations(ORG, listing), ORG.public_key)
    assert store.state(PEER.public_key, NOW, cert) is TrustState.REVOKED
    with pytest.raises(TrustError, match="not newer"):
        store.add_revocations(sign_revocations(ORG, listing), ORG.public_key)
    forged = RevocationList(OTHER.public_key, 2, NOW, frozenset(), frozenset())
    with pytest.raises(TrustError):
        store.add_revocations(sign_revocations(OTHER, forged), ORG.public_key)


def test_org_revokes_node_key_even_for_verified_peer(store: TrustStore) -> None:
    store.mark_verified(PEER.node_id, NOW)
    listing = RevocationList(ORG.public_key, 1, NOW, frozenset(), frozenset({PEER.public_key}))
    store.add_revocations(sign_revocations(ORG, listing), ORG.public_key)
    assert store.state(PEER.public_key, NOW) is TrustState.REVOKED


def test_key_must_match_node_id(store: TrustStore) -> None:
    store.first_contact(PEER.public_key, NOW)
    with pytest.raises(TrustError):
        store._set(PEER.node_id, OTHER.public_key, TrustState.VERIFIED, "x", NOW)
