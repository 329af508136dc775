"""Two real nodes: annotations made in the consultant's session come back to the hospital as
a TID 1500 SR whose SCOORDs point at the hospital's own (original) instances, under the
real patient, with the key images beside it as a KOS."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import KeyObjectSelectionDocumentStorage

from consult.report import KeyImage
from consult.shared import AnnotationKind
from tests.node.pair import accepted_consult
from tests.node.test_runtime import wait_for


async def test_session_annotations_reach_the_hospital_sr_on_the_original_images(
    tmp_path: Path,
    registry: str,
) -> None:
    from tui.node_facade import LiveSessionView, RuntimeNode

    async with accepted_consult(tmp_path, registry) as pair:
        a, b, request, share, study_uid = pair.a, pair.b, pair.request, pair.share, pair.study_uid
        originals = {row.sop_instance_uid for row in a.store.instances(study_uid)}
        real_name = a.store.study(study_uid).patient_name
        await b.consulting.studies.fetch(request.id)
        seen = b.store.instances(share.shared_study_uid)[0]

        live = b.live_hub().open(request.id)
        live.add_annotation(
            AnnotationKind.LENGTH, seen.sop_instance_uid, 0, ((2, 2), (12, 2)),
            text="thickness", values={"length_mm": 9.0},
        )  # fmt: skip
        live.add_annotation(
            AnnotationKind.ELLIPSE, seen.sop_instance_uid, 0, ((16, 16), (4, 3)),
            values={"area_mm2": 37.7, "mean": 55.0, "sd": 3.0, "min": 50.0, "max": 60.0},
        )  # fmt: skip
        live.add_annotation(
            AnnotationKind.ARROW, seen.sop_instance_uid, 0, ((1, 1), (8, 9)), text="bleed"
        )
        live.set_report_text("Extra-axial collection.\nImpression: Acute subdural haematoma.")
        LiveSessionView(live, RuntimeNode(b)._finalise).finalise()
        await wait_for(lambda: request.id in a.reports)

        sr = hd.sr.srread(io.BytesIO(a.store.read_instance(a.reports[request.id])))
        assert str(sr.PatientName) == real_name
        assert sr.StudyInstanceUID == study_uid
        assert sr.VerificationFlag == "VERIFIED"
        assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "neuro^"
        tree = hd.sr.MeasurementReport.from_sequence(sr.content)
        (line,) = tree.get_image_measurement_groups()
        assert line.tracking_identifier == "thickness"
        (length,) = line.get_measurements()
        assert (length.value, length.unit.value) == (9.0, "mm")
        (coords,) = length.referenced_coordinates
        referenced = {coords.ContentSequence[0].referenced_sop_instance_uid}
        regions = {}
        for group in tree.get_planar_roi_measurement_groups():
            assert group.roi is not None
            regions[group.tracking_identifier] = group.roi.graphic_type.value
            referenced.add(group.roi.ContentSequence[0].referenced_sop_instance_uid)
        assert regions == {"ROI": "ELLIPSE", "bleed": "POINT"}
        assert referenced <= originals  # the hospital's own instances, not the pseudonyms
        assert len(referenced) == 1


async def test_key_images_are_filed_beside_the_sr_and_a_stranger_reference_is_left_out(
    tmp_path: Path,
    registry: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="node.app.runtime")
    async with accepted_consult(tmp_path, registry, slices=1) as pair:
        a, b, request, share, study_uid = pair.a, pair.b, pair.request, pair.share, pair.study_uid
        (original,) = a.store.instances(study_uid)
        await b.consulting.studies.fetch(request.id)
        (seen,) = b.store.instances(share.shared_study_uid)
        key = KeyImage(seen.series_uid, seen.sop_class_uid, seen.sop_instance_uid)
        stranger = KeyImage("2.25.8", seen.sop_class_uid, "2.25.9")  # not in the share
        await b.consulting.reports.send_report(
            request.id, text="", impression="Normal.", key_images=(key, stranger)
        )
        await wait_for(lambda: request.id in a.reports)
        await wait_for(lambda: len(a.store.instances(study_uid)) == 3)  # image, SR, KOS
        by_class = {row.sop_class_uid: row for row in a.store.instances(study_uid)}
        kos = pydicom.dcmread(
            io.BytesIO(
                a.store.read_instance(by_class[KeyObjectSelectionDocumentStorage].sop_instance_uid)
            )
        )
        (image,) = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original.sop_instance_uid
        assert any("not in the study shared" in r.getMessage() for r in caplog.records)


pytestmark = pytest.mark.timeout(120)
