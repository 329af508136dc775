"""Golden bytes of every study-transfer message and of a manifest's signed value.

The fixtures were written by the transfer code before it became a package; a change
to the wire format shows up here as a changed fixture in review.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto import canonical
from peer_transport.transfer.manifest import Manifest, ManifestEntry, build_manifest
from peer_transport.transfer.messages import (
    CHUNK_SIZE,
    Cancel,
    Chunk,
    Finished,
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

MESSAGES: list[tuple[str, Message]] = [
    ("transfer_req.bin", Request(TID, 3, (0, 1, 7))),
    ("transfer_chunk.bin", Chunk(TID, 2, 5, chunk_digest(b"abc"), b"abc")),
    ("transfer_cancel.bin", Cancel(TID, "cancelled by the receiver")),
    ("transfer_fin.bin", Finished(TID)),
    ("transfer_offer.bin", OfferPart(TID, 0, 2, b"manifest part")),
    ("transfer_resume.bin", ResumeRequest(TID)),
]


@pytest.mark.parametrize(("name", "message"), MESSAGES)
def test_each_transfer_message_has_its_golden_bytes(name: str, message: Message) -> None:
    golden = (GOLDEN / name).read_bytes()
    assert message.to_wire() == golden
    assert from_wire(golden) == message
    assert type(message).from_wire(golden) == message
    assert peek(golden) == (message.KIND, TID)


def test_a_manifest_has_its_golden_value_and_content_derived_id() -> None:
    entry = ManifestEntry("1.2.3.4.1", "1.2.3.4", 1, 2, "1.2.840.10008.1.2.1", 1000, bytes(32), 900)
    manifest = Manifest(TID, "1.2.3", (entry,), CHUNK_SIZE, False)
    golden = (GOLDEN / "transfer_manifest.bin").read_bytes()
    assert canonical.encode(manifest.to_value()) == golden
    assert Manifest.from_value(canonical.decode(golden, len(golden))) == manifest
    derived = build_manifest([entry], "1.2.3").transfer_id
    assert derived.hex() == "d8f05ed67b0250d533bff05fd6071530"
