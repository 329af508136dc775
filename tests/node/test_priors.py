"""A consult compares with what came before (issue 16), end to end with a real Orthanc:
the hospital queries its PACS for the patient's studies, retrieves them, requests a
consult with the earlier one attached; the consultant's node receives both under one
pseudonymous patient and its viewer shows them linked; a second consult of the patient
to the same consultant lands under the same pseudonym, to another consultant under
another one."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from consult.requests import Event, Priority, State
from node.app.consults import Terms
from node.app.errors import RuntimeError_
from node.app.runtime import NodeRuntime
from node.demo.phantom import generate_ct, random_study
from node.dicom.qr import PacsAddress, StudyQuery, find_studies, move_study
from tests.node.test_runtime import FAST, make_home, wait_for
from tests.orthanc import orthanc_server
from tests.ports import free_port
from tests.tui.pilots import press
from tui.app import RadmeshApp
from tui.node_facade import RuntimeNode
from tui.screens.compare import CompareScreen
from tui.screens.studies import StudiesScreen

pytestmark = [pytest.mark.system, pytest.mark.slow]

NODE_AE = "RADMESH_HOSP"


@dataclasses.dataclass
class Network:
    hospital: NodeRuntime
    neuro: NodeRuntime
    other: NodeRuntime  # a second consultant
    pacs: PacsAddress
    patient_id: str
    current: str  # study UIDs in the PACS
    prior: str
    stranger: str  # another patient's study


def _terms(priors: tuple[str, ...] = ()) -> Terms:
    return Terms(
        question="enlarging collection?",
        priority=Priority.URGENT,
        subspecialty="neuro",
        jurisdiction="IE",
        priors=priors,
    )


@pytest.fixture
async def network(tmp_path: Path, registry: str) -> AsyncIterator[Network]:
    port = free_port()
    modalities = {"radmesh": (NODE_AE, "127.0.0.1", port)}
    with orthanc_server(tmp_path / "orthanc", modalities=modalities) as orthanc:
        prior = random_study(11)
        current = dataclasses.replace(prior, study_uid=generate_uid(), date="20261120")
        stranger = random_study(12)
        for study, folder in ((prior, "p"), (current, "c"), (stranger, "s")):
            for path in generate_ct(tmp_path / folder, slices=3, rows=32, study=study):
                orthanc.upload(path.read_bytes())
        hospital_home, hospital_id = make_home(tmp_path, "hospital", registry, [])
        config = hospital_home.load_config()
        config.dicom = dataclasses.replace(
            config.dicom,
            enabled=True,
            ae_title=NODE_AE,
            port=port,
            allowed=[f"{orthanc.ae_title}@127.0.0.1"],
        )
        hospital_home.save_config(config)
        nodes = []
        for home, identity in (
            (hospital_home, hospital_id),
            make_home(tmp_path, "neuro", registry, ["neuro"]),
            make_home(tmp_path, "other", registry, ["neuro"]),
        ):
            node = NodeRuntime(home, identity, transport_options=FAST)
            await node.start()
            nodes.append(node)
        hospital, neuro, other = nodes
        for consultant in (neuro, other):
            hospital.trust.mark_verified(consultant.identity.node_id, hospital.now())
            consultant.trust.mark_verified(hospital.identity.node_id, consultant.now())
        pacs = PacsAddress("127.0.0.1", orthanc.dicom_port, orthanc.ae_title, NODE_AE)
        try:
            yield Network(
                hospital,
                neuro,
                other,
                pacs,
                prior.patient.patient_id,
                current.study_uid,
                prior.study_uid,
                stranger.study_uid,
            )
        finally:
            for node in nodes:
                await node.stop()


async def _consult(net: Network, consultant: NodeRuntime, priors: tuple[str, ...]) -> str:
    request, _, _ = await net.hospital.consulting.request_consult(
        consultant.identity.public_key, net.current, _terms(priors)
    )
    await wait_for(lambda: request.id in {c.request.id for c in consultant.consults.cases()})
    await consultant.consulting.respond(request.id, Event.ACCEPT)
    await wait_for(lambda: net.hospital.consults.get(request.id).state is State.ACCEPTED)
    await consultant.consulting.studies.fetch(request.id)
    return request.id


def _patient_and_date(node: NodeRuntime, study_uid: str) -> tuple[str, dt.date]:
    row = node.store.instances(study_uid)[0]
    ds = pydicom.dcmread(io.BytesIO(node.store.read_instance(row.sop_instance_uid)))
    return str(ds.PatientID), dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()


async def test_a_prior_from_the_pacs_travels_with_the_consult_and_is_linked(
    network: Network,
) -> None:
    net = network
    # The hospital asks its PACS what it holds of the patient, and brings both in.
    result = await asyncio.to_thread(find_studies, net.pacs, StudyQuery(patient_id=net.patient_id))
    assert {m.study_uid for m in result.matches} == {net.current, net.prior}
    for uid in (net.current, net.prior):
        report = await asyncio.to_thread(move_study, net.pacs, uid, NODE_AE)
        assert report.ok
    await wait_for(lambda: len(net.hospital.store.studies()) == 2)
    # "With priors" (the CLI's --with-priors, the share form's box) finds the earlier one.
    assert net.hospital.consulting.priors_in_store(net.current) == (net.prior,)
    assert net.hospital.consulting.priors_in_store(net.prior) == ()

    with pytest.raises(RuntimeError_, match="not in this node's store"):
        await net.hospital.consulting.request_consult(
            net.neuro.identity.public_key, net.current, _terms((net.stranger,))
        )

    first = await _consult(net, net.neuro, (net.prior,))
    request = net.neuro.consults.get(first).request
    assert len(request.priors) == 1
    shared_current, shared_prior = request.study_uid, request.priors[0]
    assert shared_prior != net.prior  # pseudonymised like the study itself
    assert net.neuro.consults.get(first).state is State.IN_REVIEW
    assert len(net.neuro.store.instances(shared_prior)) == 3
    pseudo, current_date = _patient_and_date(net.neuro, shared_current)
    prior_pseudo, prior_date = _patient_and_date(net.neuro, shared_prior)
    assert pseudo == prior_pseudo != net.patient_id
    # One date shift for both: the interval between them is the real one.
    assert (current_date - prior_date).days == (
        dt.date(2026, 11, 20)
        - dt.datetime.strptime(net.hospital.store.study(net.prior).study_date, "%Y%m%d").date()
    ).days

    # The consultant's viewer: p on the current study opens both, linked.
    app = RadmeshApp(RuntimeNode(net.neuro))
    async with app.run_test(size=(160, 45)) as pilot:
        await press(pilot, "f3")
        studies = app.screen
        assert isinstance(studies, StudiesScreen)
        row = [s.study_uid for s in studies.studies].index(shared_current)
        studies.query_one("#studies").move_cursor(row=row)  # type: ignore[attr-defined]
        await press(pilot, "p")
        assert isinstance(app.screen, CompareScreen)
        assert app.screen.prior.study.study_uid == shared_prior

    # A follow-up to the same consultant: the same pseudonymous patient; to another
    # consultant: another one.
    again = await _consult(net, net.neuro, ())
    assert (
        _patient_and_date(net.neuro, net.neuro.consults.get(again).request.study_uid)[0] == pseudo
    )
    elsewhere = await _consult(net, net.other, ())
    other_uid = net.other.consults.get(elsewhere).request.study_uid
    assert _patient_and_date(net.other, other_uid)[0] not in (pseudo, net.patient_id)


async def test_a_prior_of_another_patient_is_refused(network: Network) -> None:
    net = network
    for uid in (net.current, net.stranger):
        assert (await asyncio.to_thread(move_study, net.pacs, uid, NODE_AE)).ok
    await wait_for(lambda: len(net.hospital.store.studies()) == 2)
    with pytest.raises(RuntimeError_, match="another patient"):
        await net.hospital.consulting.request_consult(
            net.neuro.identity.public_key, net.current, _terms((net.stranger,))
        )
