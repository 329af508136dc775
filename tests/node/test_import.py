"""Import of real sample files (including malformed ones), folders, DICOMDIR; reads back."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.encaps
import pytest
from pydicom.data import get_testdata_files

import node.dicom.store as store_module
from bench.bench_store import multiframe
from node.dicom.importer import ImportSummary, import_paths
from node.dicom.store import Store

KEY = bytes(range(32))
REASONS = (
    "not DICOM",
    "truncated",
    "missing meta",
    "missing attribute",
    "unreadable element",
    "not an instance",
)
# pydicom's known-bad samples and why the store must refuse them.
MALFORMED = {
    "MR_truncated.dcm": "truncated",
    "meta_missing_tsyntax.dcm": "missing meta",
    "ExplVR_LitEndNoMeta.dcm": "missing meta",
    "README.txt": "not DICOM",
    "zipMR.gz": "not DICOM",
}


def _local_samples() -> list[Path]:
    # get_testdata_files lists only files shipped inside the package; nothing downloads.
    return sorted(Path(p) for p in get_testdata_files() if os.path.isfile(p))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def sample_import(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Store, ImportSummary]]:
    root = tmp_path_factory.mktemp("samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Store.open(root, KEY) as store:
            yield store, import_paths(store, _local_samples(), source="test")


def test_every_shipped_sample_imports_or_is_rejected_with_a_reason(
    sample_import: tuple[Store, ImportSummary],
) -> None:
    _store, summary = sample_import
    assert summary.imported, "the valid samples must import"
    parts = (
        summary.imported,
        summary.duplicates,
        summary.conflicts,
        summary.rejected,
        summary.skipped,
    )
    handled = sum(len(part) for part in parts)
    assert handled == len(_local_samples())
    for path, reason in summary.conflicts:  # one image in several encodings: the first kept
        assert reason.startswith("same instance UID, other bytes"), (path.name, reason)
    for path, reason in summary.rejected:
        assert reason.startswith(REASONS), (path.name, reason)
        assert "\n" not in reason
    rejected = {path.name: reason for path, reason in summary.rejected}
    for name, why in MALFORMED.items():
        assert rejected[name].startswith(why), (name, rejected[name])


def test_every_imported_sample_reads_back_byte_exact(
    sample_import: tuple[Store, ImportSummary],
) -> None:
    store, summary = sample_import
    by_uid = {r.sop_instance_uid: r for r in summary.imported}
    for path in _local_samples():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - rejected files are covered above
            continue
        uid = ds.get("SOPInstanceUID")
        if uid in by_uid and by_uid[uid].content_hash:
            data = store.read_instance(uid)
            if by_uid[uid].size == path.stat().st_size and data == path.read_bytes():
                continue
            # Two sample files share a SOP Instance UID; the latest import won.
            assert any(
                p.read_bytes() == data for p in _local_samples() if p.stat().st_size == len(data)
            )


def test_reading_part_of_an_instance_decrypts_only_the_chunks_covering_it(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHUNK_SIZE", 8192)
    path = multiframe(tmp_path / "mf.dcm", frames=40, rows=64, seed=7)  # 8 KiB frames, ~40 chunks
    uid = store.add_file(path, source="test").sop_instance_uid
    decrypted: list[int] = []
    original = store_module.BlobReader._decrypt

    def counting(self: store_module.BlobReader, index: int) -> bytes:
        decrypted.append(index)
        return original(self, index)

    monkeypatch.setattr(store_module.BlobReader, "_decrypt", counting)
    original_bytes = path.read_bytes()
    for offset in (0, 17 * 8192 + 100, len(original_bytes) - 8192):
        decrypted.clear()
        with store.open_instance(uid) as stream:
            stream.seek(offset)
            assert stream.read(8192) == original_bytes[offset : offset + 8192]
        assert 1 <= len(set(decrypted)) <= 2


def test_folder_import_is_recursive_and_one_bad_file_does_not_stop_the_rest(
    tmp_path: Path, store: Store
) -> None:
    from node.demo.phantom import generate_ct

    folder = tmp_path / "in"
    good = generate_ct(folder / "a" / "b", slices=3, rows=32)
    (folder / "a" / "notes.txt").write_text("not an image")
    truncated = folder / "a" / "cut.dcm"
    truncated.write_bytes(good[0].read_bytes()[:-500])
    summary = import_paths(store, [folder], source="test")
    assert len(summary.imported) == 3
    assert sorted((p.name, r.split(":")[0]) for p, r in summary.rejected) == [
        ("cut.dcm", "truncated"),
        ("notes.txt", "not DICOM"),
    ]
    again = import_paths(store, [folder], source="test")
    assert (len(again.imported), len(again.duplicates)) == (0, 3)


def test_dicomdir_import_follows_its_references(tmp_path: Path, store: Store) -> None:
    dicomdir = next(
        Path(p)
        for p in get_testdata_files()
        if p.endswith(os.path.join("dicomdirtests", "DICOMDIR"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = import_paths(store, [dicomdir], source="test")
        records = pydicom.dcmread(dicomdir).DirectoryRecordSequence
    referenced = [r for r in records if r.get("ReferencedFileID")]
    assert len(summary.imported) + len(summary.duplicates) == len(referenced)
    assert not summary.rejected
    assert len(store.studies()) >= 2


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_bigendian.dcm",
        "CT_small.dcm",
    ],
)
def test_each_transfer_syntax_reads_back_byte_exact(store: Store, name: str) -> None:
    path = next(p for p in _local_samples() if p.name == name)
    uid = store.add_file(path, source="test").sop_instance_uid
    assert store.read_instance(uid) == path.read_bytes()
