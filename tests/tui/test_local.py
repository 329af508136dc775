"""The local node facade over real DICOM files (pydicom's bundled CT sample)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from node.core.config import NodeHome
from tui.local import LocalNode


def test_local_node_lists_and_loads_a_real_ct_file_with_a_pseudonym(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    home = NodeHome(tmp_path)
    inbox = home.data_dir / "inbox"
    inbox.mkdir(parents=True)
    shutil.copy(source, inbox / "ct.dcm")
    (inbox / "notes.txt").write_text("not dicom")
    node = LocalNode(home, None, None)
    (study,) = node.studies()
    assert study.patient == "PATIENT-0001"
    assert study.modalities == "CT"
    (series,) = node.series(study.study_uid)
    (ref,) = node.instances(series.series_uid)
    frame = node.load_frame(ref.sop_uid)
    assert frame is not None
    assert frame.pixels.shape == (128, 128)
    assert frame.has_spacing
    hu = frame.modality()
    assert np.allclose(hu, frame.pixels * frame.slope + frame.intercept)
    assert node.load_frame("1.2.3.unknown") is None
    assert any("radmesh init" in n for n in node.notifications())
