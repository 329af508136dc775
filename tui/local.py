"""``NodeFacade`` over a node home on disk.

Until the node store lands in the runtime, studies come from DICOM files in
``<home>/data/inbox`` (and any ``--dicom DIR`` given), indexed with pydicom
without reading pixel data. Patient names are never shown: each patient gets a
stable pseudonym label for this session.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from crypto.identity import Identity, NodeId
from crypto.safety import safety_number
from node.core.config import NodeConfig, NodeHome
from node.core.errors import NodeError
from tui.facade import (
    ActionError,
    ConsultForm,
    ConsultItem,
    CriticalAlert,
    Frame,
    GuestProposal,
    InstanceRef,
    NodeStatus,
    PeerInfo,
    ReportSection,
    SeriesInfo,
    StudyInfo,
    TransferInfo,
)
from tui.imaging import Window
from tui.session import SessionView

log = logging.getLogger(__name__)
MAX_FILES = 20_000
MAX_FILE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class _Indexed:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    number: int
    patient_key: str
    study: dict[str, str]
    series: dict[str, str]


def _s(ds: Any, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "")


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _number(ds: Any, keyword: str) -> float | None:
    try:
        value = float(getattr(ds, keyword))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def frame_from_dataset(ds: pydicom.Dataset, frame: int) -> Frame:
    """Stored pixel values of one frame, with what the viewer needs to show them in HU/mm."""
    pixels = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if pixels.ndim >= 3 and frames > 1:
        pixels = pixels[min(max(frame, 0), pixels.shape[0] - 1)]
    if pixels.ndim == 3:  # colour: show luminance
        pixels = pixels[..., :3].mean(axis=2)
    spacing = _floats(getattr(ds, "PixelSpacing", None))
    origin = _floats(getattr(ds, "ImagePositionPatient", None))
    window = None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        if "WindowCenter" in ds and "WindowWidth" in ds:
            window = Window(_first(ds.WindowCenter), max(1.0, _first(ds.WindowWidth)))
    return Frame(
        pixels,
        float(getattr(ds, "RescaleSlope", 1) or 1),
        float(getattr(ds, "RescaleIntercept", 0) or 0),
        (spacing[0], spacing[1]) if spacing and len(spacing) == 2 else (1.0, 1.0),
        bool(spacing and len(spacing) == 2),
        (origin[0], origin[1], origin[2]) if origin and len(origin) == 3 else None,
        _floats(getattr(ds, "ImageOrientationPatient", None)),
        window,
        max(1, frames),
        _number(ds, "SliceLocation"),
        _number(ds, "SliceThickness"),
    )


class LocalNode:
    def __init__(
        self,
        home: NodeHome,
        identity: Identity | None,
        config: NodeConfig | None,
        dicom_dirs: list[Path] | None = None,
    ) -> None:
        self.home = home
        self.identity = identity
        self.config = config or NodeConfig()
        self._dirs = [home.data_dir / "inbox", *(dicom_dirs or [])]
        self._files: dict[str, _Indexed] = {}
        self._problems: list[str] = []
        self.rescan()

    def rescan(self) -> None:
        files: dict[str, _Indexed] = {}
        count = 0
        for root in self._dirs:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if count >= MAX_FILES:
                    self._problems.append(f"stopped indexing after {MAX_FILES} files")
                    break
                if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                    continue
                count += 1
                item = self._index(path)
                if item is not None:
                    files[item.sop_uid] = item
        self._files = files

    def _index(self, path: Path) -> _Indexed | None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, TypeError):
            return None
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            return None
        number = getattr(ds, "InstanceNumber", None)
        return _Indexed(
            path,
            _s(ds, "StudyInstanceUID"),
            _s(ds, "SeriesInstanceUID"),
            _s(ds, "SOPInstanceUID"),
            int(number) if number not in (None, "") else 0,
            _s(ds, "PatientID") + "|" + _s(ds, "PatientName"),
            {
                "date": _s(ds, "StudyDate"),
                "description": _s(ds, "StudyDescription"),
                "age": _s(ds, "PatientAge"),
                "sex": _s(ds, "PatientSex"),
                "accession": _s(ds, "AccessionNumber"),
            },
            {
                "modality": _s(ds, "Modality"),
                "description": _s(ds, "SeriesDescription"),
                "number": _s(ds, "SeriesNumber"),
            },
        )

    def _pseudonym(self, patient_key: str) -> str:
        keys = sorted({f.patient_key for f in self._files.values()})
        return f"PATIENT-{keys.index(patient_key) + 1:04d}"

    # NodeFacade
    def status(self) -> NodeStatus:
        node_id = str(self.identity.node_id) if self.identity else "(no identity: radmesh init)"
        dicom = self.config.dicom
        net = self.config.network
        return NodeStatus(
            node_id,
            self.config.display_name,
            self.config.institution,
            (
                ("registries", f"{len(net.registries)} configured", bool(net.registries)),
                ("mDNS", "on" if net.mdns else "off", net.mdns),
                (
                    "DICOM listener",
                    f"{dicom.ae_title}@{dicom.host}:{dicom.port}" if dicom.enabled else "off",
                    dicom.enabled,
                ),
                ("TURN/ICE", f"{len(net.ice_servers)} server(s)", bool(net.ice_servers)),
                ("studies", f"{len(self._files)} instance(s) in {self._dirs[0]}", True),
            ),
        )

    def studies(self) -> list[StudyInfo]:
        by_study: dict[str, list[_Indexed]] = defaultdict(list)
        for f in self._files.values():
            by_study[f.study_uid].append(f)
        out = []
        for uid, items in sorted(by_study.items()):
            first = items[0]
            out.append(
                StudyInfo(
                    uid,
                    self._pseudonym(first.patient_key),
                    first.study["date"],
                    first.study["description"],
                    ",".join(sorted({i.series["modality"] for i in items})),
                    len({i.series_uid for i in items}),
                    len(items),
                    first.study["age"],
                    first.study["sex"],
                    first.study["accession"],
                )
            )
        return out

    def series(self, study_uid: str) -> list[SeriesInfo]:
        by_series: dict[str, list[_Indexed]] = defaultdict(list)
        for f in self._files.values():
            if f.study_uid == study_uid:
                by_series[f.series_uid].append(f)
        out = []
        for uid, items in by_series.items():
            s = items[0].series
            number = int(s["number"]) if s["number"].lstrip("-").isdigit() else 0
            out.append(
                SeriesInfo(uid, study_uid, number, s["modality"], s["description"], len(items))
            )
        return sorted(out, key=lambda s: s.number)

    def instances(self, series_uid: str) -> list[InstanceRef]:
        items = [f for f in self._files.values() if f.series_uid == series_uid]
        items.sort(key=lambda f: (f.number, f.sop_uid))
        return [InstanceRef(f.sop_uid, series_uid, f.number) for f in items]

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        item = self._files.get(sop_uid)
        if item is None:
            return None
        try:
            ds = pydicom.dcmread(item.path)
            return frame_from_dataset(ds, frame)
        except (InvalidDicomError, OSError, ValueError, AttributeError, RuntimeError) as exc:
            raise NodeError(f"cannot decode {item.path.name}: {exc}") from exc

    def request_first(self, sop_uid: str) -> None:
        return None  # everything here is already on disk

    def consults(self) -> list[ConsultItem]:
        return []

    def peers(self) -> list[PeerInfo]:
        return []

    def transfers(self) -> list[TransferInfo]:
        return []

    def notifications(self) -> list[str]:
        notes = list(self._problems)
        if self.identity is None:
            notes.append(f"No identity in {self.home.root}: run `radmesh init` to create one")
        return notes

    def safety_number(self, peer_node_id: str) -> str:
        if self.identity is None:
            return "(no identity)"
        return safety_number(self.identity.node_id, NodeId.parse(peer_node_id))

    def mark_verified(self, peer_node_id: str) -> None:
        return None

    def open_session(self, study_uid: str) -> SessionView | None:
        return None

    def record_view(self, study_uid: str, live: bool) -> None:
        return None  # file-only mode: no node, so no audit log to write to

    async def respond(self, consult_id: str, accept: bool, reason: str = "") -> str:
        raise ActionError(LOCAL_ONLY)

    def fetch(self, consult_id: str) -> str:
        raise ActionError(LOCAL_ONLY)

    def pause_transfer(self, consult_id: str) -> str:
        raise ActionError(LOCAL_ONLY)

    def cancel_transfer(self, consult_id: str) -> str:
        raise ActionError(LOCAL_ONLY)

    async def withdraw(self, consult_id: str) -> str:
        raise ActionError(LOCAL_ONLY)

    async def cycle_availability(self) -> str:
        raise ActionError(LOCAL_ONLY)

    async def request_consult(self, form: ConsultForm) -> str:
        raise ActionError(LOCAL_ONLY)

    async def propose_guest(self, consult_id: str, peer_node_id: str) -> str:
        raise ActionError(LOCAL_ONLY)

    def guest_proposals(self) -> list[GuestProposal]:
        return []

    async def answer_guest(self, consult_id: str, guest_node_id: str, approve: bool) -> str:
        raise ActionError(LOCAL_ONLY)

    def critical_alerts(self) -> list[CriticalAlert]:
        return []

    async def acknowledge(self, consult_id: str, by: str) -> str:
        raise ActionError(LOCAL_ONLY)

    def report(self, consult_id: str) -> list[ReportSection] | None:
        return None  # no consults without the node

    async def add_addendum(self, consult_id: str, text: str) -> str:
        raise ActionError(LOCAL_ONLY)


LOCAL_ONLY = "this app runs without its node (--local): start `radmesh` without --local to consult"
