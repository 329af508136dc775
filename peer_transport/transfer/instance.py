"""One DICOM instance as the transfer sees it: described and encoded by the sender,
decoded and checked against its manifest entry by the receiver.

Parsing and coding are :mod:`node.dicom.wirecodec`'s; what lives here is what the
transfer demands of an instance (UIDs a receiver can check, no truncated pixel data,
the receiver's budgets) and what it refuses on arrival (a bomb, another instance than
the manifest names).
"""

from __future__ import annotations

import hashlib
from typing import Any

from node.core.ids import is_dicom_uid
from node.dicom import wirecodec
from peer_transport.transfer.errors import DecompressionBomb, ManifestMismatch
from peer_transport.transfer.manifest import (
    MAX_INSTANCE_SIZE,
    ManifestEntry,
    WireDeclaration,
    wire_digest,
    within_budget,
)


def describe_instance(data: bytes) -> tuple[str, str, str, int, int, str]:
    """(study, series, SOP instance UID, series number, instance number, syntax) of a file.

    Raises :class:`node.dicom.wirecodec.BadInstance` for files that must not be sent:
    unreadable, truncated, or without the UIDs a receiver needs.
    """
    return _describe(wirecodec.parse_dicom(data), data)


def _describe(ds: Any, data: bytes) -> tuple[str, str, str, int, int, str]:
    try:
        study = str(ds.StudyInstanceUID)
        series = str(ds.SeriesInstanceUID)
        sop = str(ds.SOPInstanceUID)
        series_number = int(ds.get("SeriesNumber") or 0)
        instance_number = int(ds.get("InstanceNumber") or 0)
    except (AttributeError, ValueError, TypeError) as exc:
        raise wirecodec.BadInstance(f"DICOM file lacks study/series/instance UIDs: {exc}") from exc
    # The raw element, its deferred value left unread: where the pixel data starts and
    # how long it says it is.
    pixel = ds.get_item(wirecodec.PIXEL_DATA_TAG, keep_deferred=True)
    tell, length = getattr(pixel, "value_tell", None), getattr(pixel, "length", None)
    if (
        isinstance(tell, int)
        and isinstance(length, int)
        and length != 0xFFFFFFFF
        and tell + length > len(data)
    ):
        raise wirecodec.BadInstance(f"DICOM file {sop} is truncated: pixel data runs past its end")
    return study, series, sop, series_number, instance_number, wirecodec.transfer_syntax(ds)


def describe_entry(data: bytes) -> tuple[ManifestEntry, str]:
    """(manifest entry, study UID) of a file about to be offered: parsed and hashed, not
    encoded. Raises BadInstance for what a receiver would refuse."""
    study, series, sop, series_number, instance_number, syntax = describe_instance(data)
    if len(data) > MAX_INSTANCE_SIZE:
        raise wirecodec.BadInstance(
            f"instance {sop} is {len(data)} bytes; a receiver takes at most {MAX_INSTANCE_SIZE}"
        )
    if not all(map(is_dicom_uid, (study, series, sop))):
        raise wirecodec.BadInstance(
            f"instance {sop[:64]!r} has a malformed study, series or instance UID; "
            "a receiver refuses it"
        )
    digest = hashlib.sha256(data).digest()
    entry = ManifestEntry(sop, series, series_number, instance_number, syntax, len(data), digest)
    return entry, study


def encode_instance(
    data: bytes, entry: ManifestEntry, study_uid: str, cache: wirecodec.PixelCache | None = None
) -> tuple[bytes, WireDeclaration]:
    """The wire encoding of a file offered as ``entry`` (its declaration's index is 0: the
    caller places it). Raises BadInstance when the file is not what was offered (changed
    since, truncated) or cannot be sent."""
    study, series, sop = describe_instance(data)[:3]
    if (study, series, sop) != (study_uid, entry.series_instance_uid, entry.sop_instance_uid):
        raise wirecodec.BadInstance(
            f"instance {entry.sop_instance_uid} changed since it was offered (its UIDs differ)"
        )
    encoded = wirecodec.encode(data, cache)  # its sha256 is the file's: not hashed twice
    if encoded.sha256 != entry.sha256 or len(data) != entry.size:
        raise wirecodec.BadInstance(
            f"instance {entry.sop_instance_uid} changed since it was offered (its hash differs)"
        )
    wire = encoded.to_wire()
    if not within_budget(len(data), len(wire)):  # compresses beyond belief, or grew: as is
        encoded = wirecodec.WireInstance(
            wirecodec.Encoding.RAW, len(data), encoded.sha256, bytes(data)
        )
        wire = encoded.to_wire()
    return wire, WireDeclaration(0, len(wire), wire_digest(wire), entry)


def prepare_instance(
    data: bytes, cache: wirecodec.PixelCache | None = None
) -> tuple[ManifestEntry, str, bytes]:
    """Describe and encode one file: (manifest entry, study UID, wire bytes)."""
    entry, study = describe_entry(data)
    wire, _ = encode_instance(data, entry, study, cache)
    return entry, study, wire


def decode_part(part: bytes, entry: ManifestEntry, study_uid: str, wire_size: int) -> bytes:
    """The original file of a received wire encoding (declared as ``wire_size`` bytes),
    checked against its manifest entry.

    Every size the encoding declares is checked against the entry before anything is
    decoded (:class:`DecompressionBomb`); the decoded file must have the entry's hash
    and carry the entry's study, series and instance UIDs (:class:`ManifestMismatch`:
    a manifest that names one instance and delivers another is the sender's lie, not
    damage, and fetching it again would not help). Damage raises
    :class:`node.dicom.wirecodec.WireCodecError`.
    """
    wire = wirecodec.WireInstance.from_wire(part, wire_size)
    if wire.sha256 != entry.sha256:
        raise wirecodec.CorruptInstance("its hash differs from the manifest")
    try:
        wirecodec.check_declared(wire, entry.size)
    except wirecodec.Oversized as exc:
        raise DecompressionBomb(
            f"instance {entry.sop_instance_uid} was refused before decoding: {exc}"
        ) from exc
    data = wirecodec.decode(wire)
    try:
        ds = wirecodec.parse_dicom(data)
        found = _describe(ds, data)[:3]
    except wirecodec.BadInstance as exc:
        raise ManifestMismatch(
            f"instance {entry.sop_instance_uid} is not a DICOM instance: {exc}"
        ) from exc
    if found != (study_uid, entry.series_instance_uid, entry.sop_instance_uid):
        raise ManifestMismatch(
            f"the bytes sent as instance {entry.sop_instance_uid} (study {study_uid}) carry "
            f"instance {found[2][:64]!r} of study {found[0][:64]!r}: refused, nothing stored. "
            "The sender's manifest does not describe what it sends; ask them to share again."
        )
    try:  # what a viewer here would allocate to show it
        wirecodec.check_pixels(ds, MAX_INSTANCE_SIZE)
    except wirecodec.Oversized as exc:
        raise DecompressionBomb(f"instance {entry.sop_instance_uid} was refused: {exc}") from exc
    except wirecodec.CorruptInstance:
        pass  # damaged frames are stored as sent: a viewer fails on them here as there
    return data
