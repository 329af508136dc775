"""A study made ready to send: every instance described, encoded, and signed for in a
manifest (sender side).

:meth:`PreparedStudy.from_source` reads, optionally de-identifies, and encodes one
instance at a time (a few in parallel worker threads) into a
:class:`~peer_transport.transfer.spool.SenderSpool` on disk, so the sender's memory does
not grow with the study; :meth:`PreparedStudy.from_files` does it in memory (small
studies, tests).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from crypto.identity import Identity
from node.dicom import wirecodec
from peer_transport.transfer.instance import prepare_instance
from peer_transport.transfer.manifest import Manifest, ManifestEntry, build_manifest
from peer_transport.transfer.spool import SenderSpool

ENCODE_AHEAD = max(2, os.cpu_count() or 2)  # instances encoded in parallel by the sender


class PreparedStudy:
    """A study encoded for the wire and described by a signed manifest (sender side).

    ``wire(index)`` gives the wire encoding of manifest entry ``index``.
    """

    def __init__(
        self,
        manifest: Manifest,
        signed: bytes,
        wire: Callable[[int], bytes],
        spool: SenderSpool | None = None,
    ) -> None:
        self.manifest = manifest
        self.signed = signed
        self.wire = wire
        self._spool = spool

    def close(self) -> None:
        """Delete the on-disk encodings (if any)."""
        if self._spool is not None:
            self._spool.close()

    @classmethod
    async def from_files(
        cls, files: Sequence[bytes], identity: Identity, deidentified: bool = False
    ) -> PreparedStudy:
        """Describe and encode every file in memory (small studies, tests)."""
        prepared = await asyncio.gather(*(asyncio.to_thread(prepare_instance, f) for f in files))
        manifest = build_manifest(
            [p[0] for p in prepared], _one_study(p[1] for p in prepared), deidentified
        )
        wire_of = {p[0].sop_instance_uid: p[2] for p in prepared}
        wires = [wire_of[e.sop_instance_uid] for e in manifest.entries]
        return cls(manifest, manifest.sign(identity), wires.__getitem__)

    @classmethod
    async def from_source(
        cls,
        files: Iterator[bytes],
        identity: Identity,
        spool: SenderSpool,
        deidentified: bool = False,
        ahead: int = ENCODE_AHEAD,
        cache: wirecodec.PixelCache | None = None,
    ) -> PreparedStudy:
        """Read, describe and encode one file at a time into ``spool``.

        ``files`` is advanced in a worker thread (reading and de-identifying may
        block); up to ``ahead`` instances are encoded in worker threads, so at
        most about ``2 * ahead`` files are in memory. Bad files raise BadInstance.
        ``cache`` (``node.dicom.wirecache.WireCache``) saves the pixel coding done before.
        """
        entries: list[ManifestEntry] = []
        studies: list[str] = []
        slot_of: dict[str, int] = {}
        running: set[asyncio.Future[tuple[ManifestEntry, str, bytes]]] = set()

        def collect(done: Iterable[asyncio.Future[tuple[ManifestEntry, str, bytes]]]) -> None:
            for future in done:
                entry, study, wire = future.result()
                if entry.sop_instance_uid in slot_of:
                    raise wirecodec.BadInstance(
                        f"instance {entry.sop_instance_uid} appears twice in the study"
                    )
                slot_of[entry.sop_instance_uid] = spool.put(wire)
                entries.append(entry)
                studies.append(study)

        try:
            while True:
                data = await asyncio.to_thread(next, files, None)
                if data is None:
                    break
                running.add(asyncio.ensure_future(asyncio.to_thread(prepare_instance, data, cache)))
                del data
                if len(running) >= ahead:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
            if running:
                done, running = await asyncio.wait(running)
                collect(done)
        finally:
            for future in running:
                future.cancel()
        manifest = build_manifest(entries, _one_study(studies), deidentified)
        slots = [slot_of[e.sop_instance_uid] for e in manifest.entries]
        return cls(manifest, manifest.sign(identity), lambda i: spool.get(slots[i]), spool)


def _one_study(studies: Iterable[str]) -> str:
    found = set(studies)
    if len(found) != 1:
        raise wirecodec.BadInstance(
            f"the files belong to {len(found)} studies; share one study at a time"
        )
    return found.pop()
