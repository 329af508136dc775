"""The store keeps original bytes encrypted, indexed, deduplicated and crash-safe."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

import node.dicom.store as store_module
from crypto.identity import Identity
from node.core.config import NodeHome
from node.demo.phantom import DemoPatient, DemoStudy, generate_ct, generate_mr
from node.dicom.store import (
    InstanceConflict,
    InvalidDicom,
    Store,
    StoreCorrupted,
    StoreError,
    UnknownStudy,
    open_store,
)

KEY = bytes(range(32))
PATIENT = DemoPatient("ZZTESTPATIENT^QUENTIN", "PIDXYZ123", "19510203", "M")


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = DemoStudy(patient=PATIENT, accession="ACCQQ77")
    return generate_ct(tmp_path_factory.mktemp("ct"), slices=6, rows=128, study=study)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store", KEY) as s:
        yield s


def _blobs(store: Store) -> list[Path]:
    return sorted(store.blob_dir.glob("??/*"))


def test_round_trip_is_byte_exact(store: Store, ct_files: list[Path]) -> None:
    original = ct_files[0].read_bytes()
    result = store.add_file(ct_files[0], source="test")
    assert result.content_hash == hashlib.sha256(original).hexdigest()
    assert result.size == len(original)
    assert not result.duplicate
    assert store.read_instance(result.sop_instance_uid) == original
    with store.open_instance(result.sop_instance_uid) as stream:
        assert stream.read() == original


def test_add_bytes_and_add_file_agree(store: Store, ct_files: list[Path]) -> None:
    data = ct_files[1].read_bytes()
    result = store.add_bytes(data, source="c-store")
    assert store.has_instance(result.sop_instance_uid)
    assert store.has_hash(result.content_hash)
    again = store.add_file(ct_files[1], source="import")
    assert again.duplicate
    assert again.content_hash == result.content_hash


def test_same_instance_twice_is_stored_once(store: Store, ct_files: list[Path]) -> None:
    first = store.add_file(ct_files[0], source="test")
    second = store.add_file(ct_files[0], source="test")
    assert (first.duplicate, second.duplicate) == (False, True)
    assert len(_blobs(store)) == 1
    assert len(store.instances(first.study_uid)) == 1


def test_changed_bytes_for_same_uid_are_refused_and_the_stored_instance_kept(
    store: Store, ct_files: list[Path]
) -> None:
    first = store.add_file(ct_files[0], source="test")
    ds = pydicom.dcmread(ct_files[0])
    ds.SeriesDescription = "CORRECTED"
    with pytest.raises(InstanceConflict, match="same instance UID, other bytes"):
        store.add_bytes(_to_bytes(ds), source="test")
    assert len(_blobs(store)) == 1
    kept = store.read_instance(first.sop_instance_uid)
    assert hashlib.sha256(kept).hexdigest() == first.content_hash


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_nothing_readable_is_left_on_disk(
    tmp_path: Path, store: Store, ct_files: list[Path]
) -> None:
    for path in ct_files:
        store.add_file(path, source="test")
    pixels = pydicom.dcmread(ct_files[0]).PixelData[4096:4160]
    for path in store.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"ZZTESTPATIENT" not in content, path
            assert b"PIDXYZ123" not in content, path
            assert b"ACCQQ77" not in content, path
            assert pixels not in content, path
    row = store.studies()[0]
    assert (row.patient_name, row.patient_id, row.accession_number) == (
        "ZZTESTPATIENT^QUENTIN",
        "PIDXYZ123",
        "ACCQQ77",
    )


def test_wrong_key_cannot_read(tmp_path: Path, ct_files: list[Path]) -> None:
    with Store.open(tmp_path / "s", KEY) as store:
        uid = store.add_file(ct_files[0], source="test").sop_instance_uid
    with Store.open(tmp_path / "s", bytes(32)) as other, pytest.raises(StoreCorrupted):
        other.read_instance(uid)


def test_a_flipped_bit_in_a_blob_is_detected(store: Store, ct_files: list[Path]) -> None:
    uid = store.add_file(ct_files[0], source="test").sop_instance_uid
    (blob,) = _blobs(store)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted):
        store.read_instance(uid)


def test_chunks_cannot_be_swapped(
    monkeypatch: pytest.MonkeyPatch, store: Store, ct_files: list[Path]
) -> None:
    monkeypatch.setattr(store_module, "CHUNK_SIZE", 4096)
    uid = store.add_file(ct_files[0], source="test").sop_instance_uid
    (blob,) = _blobs(store)
    data = bytearray(blob.read_bytes())
    step = 4096 + store_module.SS_HEADER + store_module.SS_ABYTES
    start = store_module.BLOB_HEADER.size
    first, second = data[start : start + step], data[start + step : start + 2 * step]
    data[start : start + step], data[start + step : start + 2 * step] = second, first
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted):
        store.read_instance(uid)


def test_not_dicom_is_rejected_with_a_reason(store: Store) -> None:
    with pytest.raises(InvalidDicom, match="not DICOM"):
        store.add_bytes(b"hello, this is not an image" * 10, source="test")
    assert _blobs(store) == []


def test_index_lists_studies_series_instances_with_viewer_attributes(
    tmp_path: Path, store: Store, ct_files: list[Path]
) -> None:
    study = DemoStudy(patient=PATIENT)
    mr = generate_mr(tmp_path / "mr", slices=3, rows=64, study=study)
    ct_other = generate_ct(tmp_path / "ct2", slices=2, rows=64, study=study)
    for path in [*mr, *ct_other]:
        store.add_file(path, source="test")
    row = store.study(study.study_uid)
    assert row.modalities == ("CT", "MR")
    assert (row.series_count, row.instance_count) == (2, 5)
    assert row.description == study.description
    assert row.study_date == study.date
    series = store.series(study.study_uid)
    assert [s.series_number for s in series] == [2, 3]
    assert series[1].body_part == "BRAIN"
    assert series[1].instance_count == 3
    instances = store.instances(study.study_uid, series[0].series_uid)
    assert [i.instance_number for i in instances] == [1, 2]
    ds = pydicom.dcmread(ct_other[1])
    second = instances[1]
    assert second.image_position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert second.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert second.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert (second.rows, second.columns, second.frames) == (64, 64, 1)
    assert second.transfer_syntax == "1.2.840.10008.1.2.1"
    assert second.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert second.size == ct_other[1].stat().st_size


def test_delete_study_removes_rows_and_blobs(
    tmp_path: Path, store: Store, ct_files: list[Path]
) -> None:
    kept = generate_mr(tmp_path / "mr", slices=1, rows=32)
    keep = store.add_file(kept[0], source="test")
    results = [store.add_file(p, source="test") for p in ct_files]
    store.delete_study(results[0].study_uid)
    assert not any(store.has_instance(r.sop_instance_uid) for r in results)
    assert [s.study_uid for s in store.studies()] == [keep.study_uid]
    assert len(_blobs(store)) == 1
    with pytest.raises(UnknownStudy):
        store.delete_study(results[0].study_uid)


def test_open_store_uses_the_identity_derived_key(tmp_path: Path, ct_files: list[Path]) -> None:
    identity = Identity.generate()
    home = NodeHome(tmp_path / "home")
    with open_store(home, identity) as store:
        uid = store.add_file(ct_files[0], source="test").sop_instance_uid
    with open_store(home, identity) as store:
        assert store.read_instance(uid) == ct_files[0].read_bytes()
    with open_store(home, Identity.generate()) as store, pytest.raises(StoreCorrupted):
        store.read_instance(uid)


def test_store_key_must_be_32_bytes(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="32 bytes"):
        Store.open(tmp_path, b"short")


# --- crash safety: a real process dies at the worst moments ---------------------------------

CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from node.dicom.store import Store
    root, path, point = sys.argv[1], sys.argv[2], sys.argv[3]
    store = Store.open(Path(root), bytes(range(32)))
    if point == "mid-blob":
        store._after_chunk_written = lambda index: os._exit(3)
    else:
        store._before_index_commit = lambda: os._exit(3)
    store.add_file(Path(path), source="crash")
    """
)


def _crash_while_adding(root: Path, path: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", CRASHER, str(root), str(path), point],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr.decode()


def test_crash_mid_blob_write_leaves_nothing_visible_and_temp_is_cleaned(
    tmp_path: Path, ct_files: list[Path]
) -> None:
    root = tmp_path / "store"
    _crash_while_adding(root, ct_files[0], "mid-blob")
    assert list((root / "blobs").glob(".tmp-*")), "the crash should have left a temp file"
    with Store.open(root, KEY) as store:
        assert list(store.blob_dir.glob(".tmp-*")) == []
        assert store.studies() == []
        assert store.add_file(ct_files[0], source="retry").duplicate is False


def test_crash_between_blob_and_index_commit_leaves_nothing_visible(
    tmp_path: Path, ct_files: list[Path]
) -> None:
    root = tmp_path / "store"
    _crash_while_adding(root, ct_files[0], "before-commit")
    with Store.open(root, KEY) as store:
        uid = pydicom.dcmread(ct_files[0]).SOPInstanceUID
        assert not store.has_instance(uid)
        assert store.studies() == []
        assert store.gc() == 1
        assert _blobs(store) == []
        assert store.add_file(ct_files[0], source="retry").duplicate is False
        assert store.read_instance(uid) == ct_files[0].read_bytes()


def test_failed_index_commit_in_process_removes_the_new_blob(
    store: Store, ct_files: list[Path]
) -> None:
    def fail() -> None:
        raise OSError("disk full")

    store._before_index_commit = fail  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        store.add_file(ct_files[0], source="test")
    assert _blobs(store) == []
    assert list(store.blob_dir.glob(".tmp-*")) == []
