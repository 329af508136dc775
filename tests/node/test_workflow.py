"""The clinical loop between two real nodes: request, accept, signed report back, SR in the PACS."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pydicom
import pytest

from consult.report import Measurement, Unit
from consult.requests import Event, Priority, State
from node.app import consults, reports
from node.app.runtime import NodeRuntime
from node.demo.phantom import generate_ct
from tests.node.pair import accepted_consult
from tests.node.test_runtime import FAST, make_home, wait_for
from tests.orthanc import orthanc_server


async def _loop(tmp_path: Path, registry_url: str, pacs: tuple[str, int, str] | None) -> None:
    rural_home, rural = make_home(tmp_path, "rural", registry_url, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry_url, ["neuro"])
    if pacs is not None:
        config = rural_home.load_config()
        config.dicom.pacs_host, config.dicom.pacs_port, config.dicom.pacs_ae_title = pacs
        rural_home.save_config(config)
    a = NodeRuntime(rural_home, rural, transport_options=FAST)
    b = NodeRuntime(neuro_home, neuro, transport_options=FAST)
    await a.start()
    await b.start()
    try:
        files = generate_ct(tmp_path / "ct", slices=3, rows=64)
        for path in files:
            a.store.add_file(path, source="test")
        study_uid = a.store.studies()[0].study_uid
        real_name = a.store.study(study_uid).patient_name
        a.trust.mark_verified(neuro.node_id, a.now())
        b.trust.mark_verified(rural.node_id, b.now())

        request, share, _ = await a.consulting.request_consult(
            neuro.public_key,
            study_uid,
            consults.Terms(
                question="suspected subdural haematoma",
                priority=Priority.STAT,
                subspecialty="neuro",
                jurisdiction="IE",
            ),
        )
        assert share.shared_study_uid != study_uid

        await wait_for(lambda: bool(b.consults.cases()))
        assert b.consults.get(request.id).request.study_uid == share.shared_study_uid
        await b.consulting.respond(request.id, Event.ACCEPT)
        await wait_for(lambda: a.consults.get(request.id).state is State.ACCEPTED)

        # The consultant pulls the de-identified study over WebRTC.
        progress = await b.consulting.studies.fetch(request.id)
        assert progress.instances_done == len(files)
        received = b.store.instances(share.shared_study_uid)
        assert len(received) == len(files)
        shared = pydicom.dcmread(io.BytesIO(b.store.read_instance(received[0].sop_instance_uid)))
        assert str(shared.PatientName) != real_name
        assert shared.PatientIdentityRemoved == "YES"
        assert not b.store.instances(study_uid)  # the original UIDs never left the hospital
        assert b.consults.get(request.id).state is State.IN_REVIEW

        await b.consulting.reports.send_report(
            request.id,
            text="Crescentic extra-axial collection over the left convexity.",
            impression="Acute left subdural haematoma, 9 mm, no midline shift.",
            measurements=(Measurement("length", 9.0, Unit.MM, "haematoma thickness"),),
        )
        await wait_for(lambda: request.id in a.reports)
        assert a.consults.get(request.id).state is State.REPORTED
        sr = pydicom.dcmread(io.BytesIO(a.store.read_instance(a.reports[request.id])))
        assert sr.StudyInstanceUID == study_uid  # re-linked to the real study
        assert str(sr.PatientName) == real_name
        texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
        assert any("subdural haematoma" in text for text in texts)
        kinds = [r.kind for r in a.audit.records(study_uid=study_uid)]
        assert "share" in kinds
        assert "report" in kinds
    finally:
        await a.stop()
        await b.stop()


async def test_report_comes_back_relinked_to_the_real_patient(
    tmp_path: Path, registry: str
) -> None:
    await _loop(tmp_path, registry, None)


async def test_report_lands_in_the_hospital_pacs(tmp_path: Path, registry: str) -> None:
    with orthanc_server(tmp_path / "orthanc") as pacs:
        await _loop(tmp_path, registry, ("127.0.0.1", pacs.dicom_port, pacs.ae_title))
        deadline = asyncio.get_running_loop().time() + 10
        while not pacs.instance_ids():
            assert asyncio.get_running_loop().time() < deadline, "SR never reached Orthanc"
            await asyncio.sleep(0.2)
        (instance,) = pacs.instance_ids()
        tags = pacs.get_json(f"/instances/{instance}/simplified-tags")
        assert tags["Modality"] == "SR"


async def test_finalising_in_the_tui_signs_and_sends_the_report(
    tmp_path: Path, registry: str
) -> None:
    from tui.node_facade import LiveSessionView, RuntimeNode, impression_of

    assert impression_of("Findings here.\nImpression: Acute SDH.") == (
        "Findings here.",
        "Acute SDH.",
    )
    assert impression_of("One.\n\nTwo.") == ("One.", "Two.")
    async with accepted_consult(tmp_path, registry) as pair:
        a, b, request = pair.a, pair.b, pair.request
        live = b.live_hub().open(request.id)
        live.set_report_text("No haemorrhage.\nImpression: Normal CT head.")
        view = LiveSessionView(live, RuntimeNode(b)._finalise)
        view.finalise()
        await wait_for(lambda: request.id in a.reports)
        wire = a.consults.report_wire(request.id)
        assert wire is not None
        assert b"Normal CT head." in wire


async def test_peer_review_goes_to_the_reports_author_and_both_nodes_keep_it(
    tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from consult.report import PeerReview, Score
    from node.cli import main
    from tests.cli import radmesh

    async with accepted_consult(
        tmp_path, registry, slices=1, question="fracture?", control=True
    ) as pair:
        a, b, request = pair.a, pair.b, pair.request
        rural_home, neuro_home, rural, neuro = pair.a_home, pair.b_home, pair.rural, pair.neuro
        await b.consulting.reports.send_report(
            request.id, text="No fracture.", impression="Normal."
        )
        await wait_for(lambda: request.id in a.reports)

        # A review of another version of the report is refused by the author's node.
        wrong = PeerReview(request.id, b"\0" * 32, rural.node_id, Score.AGREE, "", a.now())
        await a.send_message(neuro.public_key, reports.REVIEW_KIND, wrong.sign(rural))

        code, out = await radmesh(
            rural_home, "consult", "review", request.id[:8], "--score", "major",
            "--comment", "missed the C2 fracture",
        )  # fmt: skip
        assert code == 0, out
        assert "delivered (LAN)" in out
        await wait_for(lambda: bool(b.consults.reviews(request.id)))
        (kept,) = b.consults.reviews(request.id)
        assert kept.score is Score.MAJOR
        assert kept.reviewer == rural.node_id
        assert [r.score for r in a.consults.reviews(request.id)] == [Score.MAJOR]
        for node in (a, b):
            reviews = [
                r.details
                for r in node.audit.records()
                if r.kind == "consult" and r.details.get("event") == "review"
            ]
            assert reviews == [
                {
                    "consult": request.id,
                    "event": "review",
                    "score": "major_discrepancy",
                    "reviewer": str(rural.node_id),
                }
            ]
        assert main(["--home", str(neuro_home.root), "consult", "show", request.id[:8]]) == 0
        shown = capsys.readouterr().out
        assert "peer review:   major discrepancy by" in shown
        assert "missed the C2 fracture" in shown
