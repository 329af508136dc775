"""The wire cache saves the JPEG-LS work of a study sent again, and never changes a byte."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_files

from bench.bench_codec import ct_series
from crypto.identity import Identity
from node.dicom import wirecache, wirecodec
from node.dicom.deid import ShareContext, deidentify
from node.dicom.store import Store
from node.dicom.wirecache import CacheWarmer, WireCache
from node.dicom.wirecodec import CodedPixels, Encoding, WireInstance
from peer_transport import transfer as tr
from peer_transport.transfer.runner import StudyReceiver, send_study
from tests.peer_transport.transfer_links import MemoryStore, memory_pair


def _local_test_files() -> list[str]:
    with warnings.catch_warnings():  # only files shipped inside pydicom: no downloads
        warnings.simplefilter("ignore")
        return sorted(f for f in get_testdata_files() if os.path.isfile(f))


class CodingSpy:
    """Counts JPEG-LS codings; ``refuse`` makes coding fail the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> None:
        self.calls = 0
        real = wirecodec._code_pixels

        def spy(*args: object) -> CodedPixels:
            self.calls += 1
            assert not refuse, "pixels were coded again although the cache had them"
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(wirecodec, "_code_pixels", spy)


def _cache(tmp_path: Path, cap: int = wirecache.DEFAULT_CAP) -> WireCache:
    return WireCache(tmp_path / "wirecache", bytes(range(32)), cap)


def _exact(wire: WireInstance, data: bytes) -> None:
    assert wirecodec.decode(WireInstance.from_wire(wire.to_wire())) == data


def _entries(cache: WireCache) -> list[Path]:
    return sorted(cache.directory.glob("??/*"))


def _pixel_offset(data: bytes) -> int:
    found = wirecodec._pixel_layout(wirecodec.parse_dicom(data), len(data))
    assert found is not None
    return found[0].offset


@pytest.mark.parametrize("path", _local_test_files(), ids=lambda p: Path(p).name)
def test_every_sample_file_is_byte_exact_with_a_cold_and_a_warm_cache(
    path: str, tmp_path: Path
) -> None:
    data = Path(path).read_bytes()
    plain = wirecodec.encode(data).to_wire()
    cache = _cache(tmp_path)
    cold = wirecodec.encode(data, cache)
    warm = wirecodec.encode(data, cache)
    _exact(cold, data)
    _exact(warm, data)
    assert cold.to_wire() == warm.to_wire() == plain  # the cache never changes what is sent


def test_a_warm_cache_skips_the_pixel_coding_of_a_synthetic_ct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ct_series(3, seed=5, size=128)
    cache = _cache(tmp_path)
    cold = [wirecodec.encode(f, cache) for f in files]
    CodingSpy(monkeypatch, refuse=True)
    warm = [wirecodec.encode(f, cache) for f in files]
    for data, a, b in zip(files, cold, warm, strict=True):
        assert b.encoding is Encoding.JPEGLS
        assert a.to_wire() == b.to_wire()
        _exact(b, data)
    assert len(_entries(cache)) == 3


def test_a_deidentified_copy_hits_the_entry_made_for_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ct_series(1, seed=6, size=128)[0]
    copy = deidentify(original, ShareContext())
    assert copy != original
    assert _pixel_offset(copy) != _pixel_offset(original)
    cache = _cache(tmp_path)
    wirecodec.encode(original, cache)
    CodingSpy(monkeypatch, refuse=True)
    wire = wirecodec.encode(copy, cache)
    assert wire.encoding is Encoding.JPEGLS
    _exact(wire, copy)


def test_noise_is_remembered_as_not_worth_coding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.bench_codec import random_instance

    data = random_instance(3, size=64)
    cache = _cache(tmp_path)
    assert wirecodec.encode(data, cache).encoding is not Encoding.JPEGLS
    CodingSpy(monkeypatch, refuse=True)
    wire = wirecodec.encode(data, cache)
    assert wire.encoding is not Encoding.JPEGLS
    _exact(wire, data)


@pytest.mark.parametrize("where", [0, 10, 30, -1])
def test_a_damaged_entry_is_a_miss_and_is_coded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: int
) -> None:
    data = ct_series(1, seed=8, size=64)[0]
    cache = _cache(tmp_path)
    expected = wirecodec.encode(data, cache).to_wire()
    (entry,) = _entries(cache)
    damaged = bytearray(entry.read_bytes())
    damaged[where] ^= 0x01
    entry.write_bytes(bytes(damaged))
    spy = CodingSpy(monkeypatch)
    wire = wirecodec.encode(data, cache)
    assert spy.calls == 1
    assert wire.to_wire() == expected
    _exact(wire, data)
    assert entry.read_bytes() != bytes(damaged)  # replaced by a good entry
    wirecodec.encode(data, cache)
    assert spy.calls == 1


def test_an_entry_moved_to_another_key_is_refused(tmp_path: Path) -> None:
    a, b = ct_series(2, seed=9, size=64)
    cache = _cache(tmp_path)
    wirecodec.encode(a, cache)
    (entry_a,) = _entries(cache)
    wirecodec.encode(b, cache)
    (entry_b,) = [e for e in _entries(cache) if e != entry_a]
    entry_b.write_bytes(entry_a.read_bytes())  # b's name, a's pixels
    wire = wirecodec.encode(b, cache)
    _exact(wire, b)


def test_a_file_whose_header_matches_but_one_pixel_differs_never_uses_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ct_series(1, seed=10, size=64)[0]
    offset = _pixel_offset(data) + 2 * 1000  # pixel 1000, 16-bit
    other = bytearray(data)
    other[offset] ^= 0x01
    cache = _cache(tmp_path)
    wirecodec.encode(data, cache)
    spy = CodingSpy(monkeypatch)
    wire = wirecodec.encode(bytes(other), cache)
    assert spy.calls == 1
    _exact(wire, bytes(other))
    assert len(_entries(cache)) == 2


def _coded(size: int) -> CodedPixels:
    return CodedPixels(0, 8, (secrets.token_bytes(size),))


def test_the_cap_evicts_the_least_recently_used_entries_first(tmp_path: Path) -> None:
    cache = _cache(tmp_path, cap=3 * 1100)
    keys = [bytes([i]) * 32 for i in range(5)]
    for key in keys[:3]:
        cache.put(key, _coded(1000))
    assert all(cache.get(k) is not None for k in keys[:3])
    assert cache.get(keys[0]) is not None  # renewed: keys[1] is now the oldest
    cache.put(keys[3], _coded(1000))
    assert [cache.get(k) is not None for k in keys[:4]] == [True, False, True, True]
    assert cache.size <= 3 * 1100
    # After a restart the order comes from the entries' mtimes.
    paths = _entries(cache)
    for i, path in enumerate(paths):
        os.utime(path, ns=(10**9 * (len(paths) - i), 10**9 * (len(paths) - i)))
    again = _cache(tmp_path, cap=3 * 1100)
    assert again.size == cache.size
    again.put(keys[4], _coded(1000))
    assert [p.exists() for p in paths] == [True, True, False]


def _key(data: bytes) -> bytes:
    """The cache key of an instance's pixel data."""
    found = wirecodec._pixel_layout(wirecodec.parse_dicom(data), len(data))
    assert found is not None
    return wirecodec.pixel_key(data, found[0])


def test_an_entry_is_sealed_with_the_cache_key(tmp_path: Path) -> None:
    data = ct_series(1, seed=12, size=64)[0]
    cache = _cache(tmp_path)
    wire = wirecodec.encode(data, cache)
    (entry,) = _entries(cache)
    assert wire.frames[0] not in entry.read_bytes()  # no image data in clear on disk
    other_key = WireCache(cache.directory, bytes(32))
    key = _key(data)
    assert cache.get(key) is not None
    assert other_key.get(key) is None


def test_warming_after_an_import_fills_the_cache_without_blocking_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ct_series(3, seed=13, size=64)
    release = threading.Event()
    busy = threading.Event()
    real = wirecodec.encode

    def slow(data: bytes, cache: wirecodec.PixelCache | None = None) -> WireInstance:
        busy.set()
        assert release.wait(20)
        return real(data, cache)

    monkeypatch.setattr(wirecodec, "encode", slow)
    cache = _cache(tmp_path)
    with Store.open(tmp_path / "store", bytes(32)) as store:
        store.use_wire_cache(cache)
        for data in files:
            store.add_bytes(data, source="import")
        store.add_bytes(ct_series(1, seed=14, size=64)[0], source="peer:someone", warm=False)
        # A canary import after the peer's instance: the one warmer thread takes its queue
        # in order, so once the canary is coded the peer's instance would have been too.
        canary = ct_series(1, seed=16, size=64)[0]
        store.add_bytes(canary, source="import")
        assert busy.wait(20)  # the worker is stuck in its first instance...
        assert not _entries(cache)  # ...and every import has returned meanwhile
        release.set()
        deadline = time.monotonic() + 20
        while cache.get(_key(canary)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.get(_key(canary)) is not None
        assert len(_entries(cache)) == 4  # three imports and the canary: the peer's is not
    assert not any(t.name == "wirecache-warmer" for t in threading.enumerate())


def test_warming_is_off_unless_asked_and_errors_only_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _cache(tmp_path)
    with Store.open(tmp_path / "store", bytes(32)) as store:
        store.use_wire_cache(cache, warm=False)
        store.add_bytes(ct_series(1, seed=15, size=64)[0], source="import")
    assert not _entries(cache)

    def unreadable(_uid: str) -> bytes:
        raise OSError("disk gone")

    warmer = CacheWarmer(cache, unreadable)
    assert warmer.submit("1.2.3")
    deadline = time.monotonic() + 20
    while "warming the wire cache failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    warmer.close()
    assert "warming the wire cache failed" in caplog.text
    assert not warmer.submit("1.2.4")  # closed


async def test_send_study_uses_the_stores_cache_for_a_deidentified_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ct_series(3, seed=16, size=64)
    with Store.open(tmp_path / "store", bytes(32)) as store:
        study_uid = {store.add_bytes(f, source="import").study_uid for f in files}.pop()
        cache = _cache(tmp_path)
        for data in files:  # what the warmer does after an import
            wirecodec.encode(data, cache)
        store.use_wire_cache(cache, warm=False)
        CodingSpy(monkeypatch, refuse=True)
        share = ShareContext()
        copies: list[bytes] = []

        def prepare(items: Iterable[bytes]) -> Iterator[bytes]:
            for data in items:
                copies.append(deidentify(data, share))
                yield copies[-1]

        a, b = memory_pair()
        received = MemoryStore()
        receiver = StudyReceiver(b, tmp_path / "spool", received, "peer:a")
        b.attach(receiver.on_control, receiver.on_bulk)
        sending = asyncio.create_task(
            send_study(
                a,
                store,
                study_uid,
                Identity.generate(),
                peer="b",
                prepare=prepare,
                spool_dir=tmp_path / "out",
            )
        )
        try:
            progress = await asyncio.wait_for(receiver.run(), 20)
            state = await asyncio.wait_for(sending, 20)
        finally:
            for pump in (a.pump, b.pump):
                if pump is not None:
                    pump.cancel()
    assert state is tr.State.COMPLETE
    assert progress.instances_done == 3
    assert sorted(received.by_hash.values()) == sorted(copies)
