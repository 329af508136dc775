"""Golden bytes of every study-transfer message and of a manifest's signed value.

The fixtures were written by the transfer code before it became a package; a change
to the wire format shows up here as a changed fixture in review.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto import canonical
from crypto.envelope import SignedEnvelope
from crypto.identity import Identity
from peer_transport.transfer.errors import MalformedMessage
from peer_transport.transfer.manifest import (
    MANIFEST_TYPE,
    MAX_DECLARATIONS,
    Manifest,
    ManifestEntry,
    WireBatch,
    WireDeclaration,
    build_manifest,
    open_wires,
    sign_wires,
)
from peer_transport.transfer.messages import (
    CHUNK_SIZE,
    Cancel,
    Chunk,
    Declare,
    Finished,
    Hurry,
    Message,
    OfferPart,
    Request,
    ResumeRequest,
    chunk_digest,
    from_wire,
    peek,
)

GOLDEN = Path(__file__).parent / "golden"
TID = bytes(range(16))
SIGNER = Identity(bytes(range(32)))  # Ed25519 signs deterministically: fixed bytes
DERIVED_ID = "140f10b6de4d926c3415e9bdc4128c2e"  # transfer id of the golden manifest
ENTRY = ManifestEntry("1.2.3.4.1", "1.2.3.4", 1, 2, "1.2.840.10008.1.2.1", 1000, bytes(32))
ENTRY_7 = ManifestEntry("1.2.3.4.8", "1.2.3.4", 1, 9, "", 2000, bytes(range(32)))
DECLARED = (
    WireDeclaration(0, 900, bytes(range(32)), ENTRY),
    WireDeclaration(7, 70000, bytes(32), ENTRY_7),
    WireDeclaration.announce(8, ENTRY_7),  # listed before it is encoded
)

MESSAGES: list[tuple[str, Message]] = [
    ("transfer_req.bin", Request(TID, 3, (0, 1, 7))),
    ("transfer_chunk.bin", Chunk(TID, 2, 5, chunk_digest(b"abc"), b"abc")),
    ("transfer_cancel.bin", Cancel(TID, "cancelled by the receiver")),
    ("transfer_fin.bin", Finished(TID)),
    ("transfer_offer.bin", OfferPart(TID, 0, 2, b"manifest part")),
    ("transfer_resume.bin", ResumeRequest(TID)),
    ("transfer_wire.bin", Declare(TID, sign_wires(SIGNER, TID, "1.2.3", DECLARED))),
    ("transfer_hurry.bin", Hurry(TID, 300)),
]


@pytest.mark.parametrize(("name", "message"), MESSAGES)
def test_each_transfer_message_has_its_golden_bytes(name: str, message: Message) -> None:
    golden = (GOLDEN / name).read_bytes()
    assert message.to_wire() == golden
    assert from_wire(golden) == message
    assert type(message).from_wire(golden) == message
    assert peek(golden) == (message.KIND, TID)


def test_a_manifest_has_its_golden_value_and_content_derived_id() -> None:
    # Version 3: no entries (they come in the declarations), the count and a bound on
    # the bytes; the id is derived from what is signed and the entries known (a store's).
    manifest = Manifest(TID, "1.2.3", 1, 1000, CHUNK_SIZE, False)
    golden = (GOLDEN / "transfer_manifest.bin").read_bytes()
    assert canonical.encode(manifest.to_value()) == golden
    assert Manifest.from_value(canonical.decode(golden, len(golden))) == manifest
    derived = build_manifest([ENTRY], "1.2.3").transfer_id
    assert derived.hex() == DERIVED_ID
    signed = (GOLDEN / "transfer_manifest_signed.bin").read_bytes()
    assert manifest.sign(SIGNER) == signed
    assert Manifest.open(signed) == (SIGNER.public_key, manifest)


def test_a_manifest_of_another_version_is_refused_with_its_version_named() -> None:
    value = Manifest(TID, "1.2.3", 1, 1000, CHUNK_SIZE, False).to_value()
    old = SignedEnvelope.create(SIGNER, MANIFEST_TYPE, value, version=2).to_wire()
    with pytest.raises(MalformedMessage, match="version 2 is not supported"):
        Manifest.open(old)


def test_a_wire_declaration_has_its_golden_signed_value() -> None:
    signed = Declare.from_wire((GOLDEN / "transfer_wire.bin").read_bytes()).data
    assert open_wires(signed) == WireBatch(SIGNER.public_key, TID, "1.2.3", DECLARED)
    envelope = SignedEnvelope.from_wire(signed)
    assert envelope.type == "study-wire"
    payload = {
        "id": TID,
        "study": "1.2.3",
        "wires": [
            [
                0,
                900,
                bytes(range(32)),
                ["1.2.3.4.1", "1.2.3.4", 1, 2, "1.2.840.10008.1.2.1", 1000, bytes(32)],
            ],
            [7, 70000, bytes(32), ["1.2.3.4.8", "1.2.3.4", 1, 9, "", 2000, bytes(range(32))]],
            [8, 0, b"", ["1.2.3.4.8", "1.2.3.4", 1, 9, "", 2000, bytes(range(32))]],
        ],
    }
    assert envelope.payload == canonical.encode(payload)


def test_a_full_batch_of_declarations_with_the_longest_uids_fits_one_control_message() -> None:
    uid = "1." + "9" * 62  # 64 characters, the longest a DICOM UID may be
    entry = ManifestEntry(uid, uid, 2**31, 2**31, uid, 1 << 30, bytes(32))
    full = [WireDeclaration(i, 1 << 30, bytes(32), entry) for i in range(MAX_DECLARATIONS)]
    message = Declare(TID, sign_wires(SIGNER, TID, uid, full))
    assert Declare.from_wire(message.to_wire()) == message  # within MAX_CONTROL_MESSAGE
