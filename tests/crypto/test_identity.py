"""Node ids, safety numbers and canonical encoding against committed known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto import canonical
from crypto.errors import EncodingError, InvalidNodeId
from crypto.identity import Identity, NodeId
from crypto.safety import safety_number

KAT = json.loads((Path(__file__).parents[1] / "fixtures" / "crypto" / "kat.json").read_text())


@pytest.mark.parametrize("vector", KAT["identities"])
def test_node_id_matches_known_answer(vector: dict[str, str]) -> None:
    identity = Identity(bytes.fromhex(vector["seed"]))
    assert identity.public_key.hex() == vector["public_key"]
    assert str(identity.node_id) == vector["node_id"]


@pytest.mark.parametrize("vector", KAT["canonical"])
def test_canonical_encoding_matches_known_answer(vector: dict[str, str]) -> None:
    data = bytes.fromhex(vector["hex"])
    assert canonical.encode(canonical.decode(data)) == data


def test_canonical_map_keys_are_sorted_by_bytes() -> None:
    assert canonical.encode({"b": 1, "a": 2}) == canonical.encode({"a": 2, "b": 1})
    assert canonical.encode({"b": 1, "a": 2}) == bytes.fromhex("82a16102a16201")


def test_node_id_is_grouped_for_reading_aloud() -> None:
    text = str(Identity(bytes(32)).node_id)
    groups = text.split("-")
    assert len(groups) == 8
    assert all(len(g) == 7 for g in groups)


def test_node_id_parse_accepts_any_case_and_spacing() -> None:
    node_id = Identity(bytes([7]) * 32).node_id
    messy = " " + str(node_id).lower().replace("-", " ") + "\n"
    assert NodeId.parse(messy) == node_id
    assert NodeId.parse(str(node_id).replace("-", "")) == node_id


def test_node_id_parse_maps_confusable_digits() -> None:
    node_id = Identity(bytes([9]) * 32).node_id
    text = str(node_id)
    confused = text.replace("O", "0").replace("I", "1").replace("B", "8")
    assert NodeId.parse(confused) == node_id


@pytest.mark.parametrize("position", [0, 5, 12, 20, 33, 47, 55])
def test_node_id_with_one_wrong_character_is_rejected(position: int) -> None:
    compact = str(Identity(bytes([3]) * 32).node_id).replace("-", "")
    replacement = "A" if compact[position] != "A" else "C"
    typo = compact[:position] + replacement + compact[position + 1 :]
    with pytest.raises(InvalidNodeId, match="check character"):
        NodeId.parse(typo)


@pytest.mark.parametrize(("text", "reason"), [("", "56"), ("ABC", "56"), ("!" * 56, "A-Z and 2-7")])
def test_malformed_node_id_is_rejected_with_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidNodeId, match=reason):
        NodeId.parse(text)


def test_safety_number_matches_known_answer_and_is_symmetric() -> None:
    vector = KAT["safety_number"]
    a, b = NodeId.parse(vector["a"]), NodeId.parse(vector["b"])
    assert safety_number(a, b) == vector["number"] == safety_number(b, a)
    groups = vector["number"].split()
    assert len(groups) == 6
    assert all(len(g) == 5 and g.isdigit() for g in groups)


def test_safety_number_changes_when_either_key_changes() -> None:
    a, b, c = (Identity(bytes([i]) * 32).node_id for i in (1, 2, 3))
    assert safety_number(a, b) != safety_number(a, c)
    assert safety_number(a, b) != safety_number(c, b)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("82a16201a16102"),  # keys out of order
        bytes.fromhex("d100 01".replace(" ", "")),  # int16 for a value that fits a fixint
        bytes.fromhex("cb3ff0000000000000"),  # float
        bytes.fromhex("82a16101a16101"),  # duplicate key
        bytes.fromhex("81"),  # truncated
        bytes.fromhex("c1"),  # reserved byte
        bytes.fromhex("0102"),  # trailing data
    ],
)
def test_non_canonical_or_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(EncodingError):
        canonical.decode(data)


def test_decode_checks_size_before_parsing() -> None:
    with pytest.raises(EncodingError, match="limit"):
        canonical.decode(canonical.encode(b"x" * 100), max_size=50)


def test_identity_repr_never_shows_key_material() -> None:
    identity = Identity(bytes([5]) * 32)
    assert identity.seed.hex() not in repr(identity)
    assert identity.public_key.hex() not in repr(identity)
