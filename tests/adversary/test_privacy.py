"""Privacy boundary: what leaves the node about a patient (issue 14, items 4, 5, 6).

A hostile but realistic CT (PHI in the file meta, the preamble, private tags,
nested sequences, overlays, curves, comments and descriptions) is
de-identified, and no PHI string may appear anywhere in the output bytes.
Burned-in text: modalities that burn text into pixels are refused without a flag
saying NO or a person's confirmation. Every way a study leaves the node
(`radmesh send`, `consult request`, offline `--out`) is de-identified by default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import nacl.pwhash
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from consult.requests import ConsultRequest, Priority
from crypto import canonical, keyfile
from crypto.identity import Identity
from node.app import cases, consults
from node.app.operations import OPERATIONS
from node.app.runtime import NodeRuntime
from node.cli import main
from node.cli.transfer import fetch_from_peer
from node.core.audit import open_audit
from node.core.config import DicomConfig, NodeConfig, NodeHome
from node.core.keystore import load_identity, save_identity
from node.dicom import deid, sharing
from node.dicom.deid import (
    BurnedInAnnotationError,
    BurnedInPolicy,
    Option,
    PseudonymMap,
    ShareContext,
    deidentify,
)
from node.dicom.sharing import BurnedInRefused, QuestionNamesPatient
from node.dicom.store import open_store
from tests.dcmtk import generated_ct, require_dcmtk, storescu
from tests.node.pair import two_trusted_nodes
from tests.node.test_runtime import FAST, make_home
from tui.facade import ActionError, ConsultForm
from tui.node_facade import RuntimeNode

NAME = "Zabrowski^Henrietta"
PATIENT_ID = "MRN77341"
BIRTH = "19520714"
PHONE = "555-0199"
SENDER_AE = "ER_MODALITY7"
# Every string that identifies the patient or the site, in whatever form it was written.
PHI = (
    "Zabrowski",
    "Henrietta",
    PATIENT_ID,
    BIRTH,
    "1952-07-14",
    PHONE,
    SENDER_AE,
    "St Elsewhere",
    "Dr^Feelgood",
    "Feelgood",
    "sister Irma",
)


def hostile_ct() -> bytes:
    """A CT with PHI in every place a held-out file had it, and a few more."""
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.preamble = b"Zabrowski Henrietta MRN77341".ljust(128, b" ")
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = SENDER_AE
    meta.PrivateInformationCreatorUID = UID("1.2.3.4")
    meta.PrivateInformation = f"{NAME} {PATIENT_ID} {BIRTH}".encode()
    meta.ImplementationVersionName = "STELSEWHERE"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    ds.ImageComments = f"DOB 1952-07-14 MRN {PATIENT_ID} phone {PHONE}"
    ds.AdditionalPatientHistory = f"fell at home, sister Irma called {PHONE}"
    ds.StudyDescription = f"CT HEAD {PATIENT_ID} Zabrowski"
    ds.SeriesDescription = "AX 5MM Henrietta"
    ds.InstitutionName = "St Elsewhere"
    ds.ReferringPhysicianName = "Dr^Feelgood"
    ds.ProtocolName = f"HEAD {BIRTH}"
    ds.RequestedProcedureDescription = f"head for {NAME}"
    ds.add_new(0x00321060, "LO", f"head for {NAME}")  # RequestedProcedureDescription (dup)
    ds.add_new(0x00081010, "SH", "STELSEWHERE1")  # StationName
    ds.add_new(0x00400280, "ST", f"comments {PATIENT_ID}")  # CommentsOnThePerformedProcedureStep
    ds.add_new(0x00180010, "LO", "Henrietta contrast")  # ContrastBolusAgent
    ds.add_new(0x0040A123, "PN", "Feelgood^Dr")  # PersonName, top level
    ds.add_new(0x00080054, "AE", SENDER_AE)  # RetrieveAETitle
    ds.add_new(0x00420010, "ST", f"scan of {NAME}")  # DocumentTitle: not in the table
    # Private tags, at the top level and nested.
    ds.add_new(0x00290010, "LO", "ACME 1.0")
    ds.add_new(0x00291010, "LO", f"{NAME} {PATIENT_ID}")
    # Nested sequences with names, two levels deep.
    inner = Dataset()
    inner.PersonName = NAME
    inner.TextValue = f"patient {PATIENT_ID} born {BIRTH}"
    inner.add_new(0x00291010, "LO", PHONE)
    inner.add_new(0x00290010, "LO", "ACME 1.0")
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ContentSequence = Sequence([inner])
    item.PatientName = NAME
    ds.ReferencedImageSequence = Sequence([item])
    other = Dataset()
    other.PatientName, other.PatientID = NAME, PATIENT_ID
    ds.OtherPatientIDsSequence = Sequence([other])
    # Overlay with a label and burned-in bits; a curve with text.
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", f"overlay {NAME}")  # OverlayDescription
    ds.add_new(0x60001500, "LO", f"label {PATIENT_ID}")  # OverlayLabel
    ds.add_new(0x60004000, "LT", f"overlay comment {PHONE}")
    ds.add_new(0x60003000, "OW", b"Zabrowski!")
    ds.add_new(0x50002500, "LO", f"curve {NAME}")  # CurveLabel
    ds.add_new(0x50003000, "OW", b"MRN77341")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _leaks(data: bytes) -> list[str]:
    lowered = data.lower()
    return [phi for phi in PHI if phi.lower().encode() in lowered]


def test_hostile_ct_leaks_no_phi_anywhere_in_the_shared_bytes() -> None:
    data = hostile_ct()
    assert len(_leaks(data)) == len(PHI)  # the fixture carries every one
    shared = deidentify(data, ShareContext())
    assert _leaks(shared) == []
    assert shared[:128] == bytes(128)
    out = pydicom.dcmread(io.BytesIO(shared))
    assert sorted(elem.keyword for elem in out.file_meta) == sorted(
        [
            "FileMetaInformationGroupLength",
            "FileMetaInformationVersion",
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
            "ImplementationClassUID",
            "ImplementationVersionName",
        ]
    )
    assert out.file_meta.ImplementationClassUID == deid.IMPLEMENTATION_CLASS_UID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "ImageComments" not in out
    assert "StudyDescription" not in out
    assert out.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData


def test_clean_descriptors_is_off_by_default_and_removes_numbers_when_turned_on() -> None:
    """Token scrubbing missed DOB and phone numbers; a site turns it on knowingly."""
    data = hostile_ct()
    default = pydicom.dcmread(io.BytesIO(deidentify(data, ShareContext())))
    assert "113105" not in {i.CodeValue for i in default.DeidentificationMethodCodeSequence}
    options = frozenset({Option.CLEAN_DESCRIPTORS, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES})
    cleaned = deidentify(data, ShareContext(options=options))
    assert _leaks(cleaned) == []
    out = pydicom.dcmread(io.BytesIO(cleaned))
    assert "CT HEAD" in out.StudyDescription


# -- burned-in text (item 5) -------------------------------------------------------------


def _instance(modality: str, flag: str | None, sop_class: str | None = None) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.Modality = modality
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    if flag is not None:
        ds.BurnedInAnnotation = flag
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [
        ("US", None),
        ("SC", None),
        ("XA", None),
        ("ES", None),
        ("OT", None),
        ("CT", "1.2.840.10008.5.1.4.1.1.7"),  # a screenshot stored as secondary capture
    ],
)
def test_text_burning_modality_without_the_flag_counts_as_burned_in(
    modality: str, sop_class: str | None
) -> None:
    data = _instance(modality, None, sop_class)
    with pytest.raises(BurnedInAnnotationError, match="--burned-in-checked"):
        deidentify(data, ShareContext())
    # a person checked the pixels: it goes
    assert deidentify(data, ShareContext(burned_in=BurnedInPolicy.ALLOW))


def test_flag_no_is_believed_and_ct_without_flag_goes() -> None:
    assert deidentify(_instance("US", "NO"), ShareContext())
    assert deidentify(_instance("CT", None), ShareContext())
    with pytest.raises(BurnedInAnnotationError):
        deidentify(_instance("CT", "YES"), ShareContext())


# -- every way a study leaves the node is de-identified by default (items 5 and 6) -------


def _us_series(count: int) -> list[bytes]:
    """An ultrasound series whose BurnedInAnnotation flag is missing (as held-out files)."""
    out = []
    for data in generated_ct(count):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.Modality = "US"
        ds.PatientName, ds.PatientID = NAME, PATIENT_ID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


async def _send(a: NodeRuntime, b: NodeRuntime, study_uid: str, **flags: object) -> str:
    """`radmesh send STUDY --to B [flags]` as the running node A executes it, B fetching."""
    fetching = asyncio.create_task(fetch_from_peer(b, str(a.identity.node_id), 30, io.StringIO()))
    try:
        args = {"study": study_uid, "to": str(b.identity.node_id), **flags}
        sending = OPERATIONS["study.send"](a, args, lambda _line: None)
        state: str = await asyncio.wait_for(sending, 60)
        await asyncio.wait_for(fetching, 30)
        return state
    finally:
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)


def _received(b: NodeRuntime) -> list[bytes]:
    return [
        b.store.read_instance(row.sop_instance_uid)
        for study in b.store.studies()
        for row in b.store.instances(study.study_uid)
    ]


@pytest.mark.timeout(120)
async def test_send_to_a_peer_is_deidentified_by_default(tmp_path: Path) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = a.store.add_bytes(hostile_ct(), source="test").study_uid
        assert await _send(a, b, study_uid) == "complete"
        (got,) = _received(b)
        assert _leaks(got) == []
        assert pydicom.dcmread(io.BytesIO(got)).StudyInstanceUID != study_uid
        # the pseudonym map stays home, so what comes back can be re-linked
        assert len(list((a.home.data_dir / "pseudonyms").iterdir())) == 1
        (transfer,) = a.audit.records(kind="transfer")
        assert transfer.details["deidentified"] is True


@pytest.mark.timeout(120)
async def test_identified_send_only_with_the_flag_and_audited(tmp_path: Path) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = a.store.add_bytes(hostile_ct(), source="test").study_uid
        assert await _send(a, b, study_uid, identified=True) == "complete"
        (got,) = _received(b)
        assert _leaks(got) != []
        shares = [(r.study_uid, r.peer, r.details) for r in a.audit.records(kind="share")]
        assert shares == [
            (study_uid, str(b.identity.node_id), {"event": "identified", "via": "send"})
        ]
        for record in a.audit.records():
            assert _leaks(repr(record).encode()) == []


@pytest.mark.timeout(120)
async def test_ultrasound_without_flag_is_refused_naming_instances_unless_checked(
    tmp_path: Path,
) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        files = _us_series(2)
        sops = [str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in files]
        study_uid = {a.store.add_bytes(f, source="test").study_uid for f in files}.pop()
        with pytest.raises(BurnedInRefused) as refused:
            await OPERATIONS["study.send"](
                a, {"study": study_uid, "to": str(b.identity.node_id)}, lambda _line: None
            )
        assert all(sop in str(refused.value) for sop in sops)
        assert "--burned-in-checked" in str(refused.value)
        assert _received(b) == []
        # the person checked the pixels: it goes, and the confirmation is audited
        assert await _send(a, b, study_uid, burned_in_checked=True) == "complete"
        assert len(_received(b)) == 2
        checked = [
            r
            for r in a.audit.records(kind="share")
            if r.details.get("event") == "burned-in-checked"
        ]
        assert [(r.study_uid, r.peer, r.details["instances"]) for r in checked] == [
            (study_uid, str(b.identity.node_id), 2)
        ]


@pytest.mark.timeout(120)
async def test_consult_request_on_ultrasound_is_refused_before_anything_is_recorded(
    tmp_path: Path,
) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = {a.store.add_bytes(f, source="test").study_uid for f in _us_series(1)}.pop()
        terms = consults.Terms("bleed?", Priority.STAT, "neuro", "IE")
        assert b.record is not None
        with pytest.raises(BurnedInRefused):
            await a.consulting.request_consult(b.record.public_key, study_uid, terms)
        assert a.consults.cases() == []
        checked = dataclasses.replace(terms, burned_in_checked=True)
        request, share, _ = await a.consulting.request_consult(
            b.record.public_key, study_uid, checked
        )
        assert share.deidentified
        # the confirmation travels with the pseudonym map to the moment the study is served
        key = a.identity.derive_key(cases.PSEUDONYM_KEY_PURPOSE)
        stored = PseudonymMap.load(cases.pseudonym_map_path(a.home, request.id), key)
        assert stored.burned_in_checked


def test_offline_consult_request_out_is_deidentified_and_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital = NodeHome(tmp_path / "hospital")
    assert main(["--home", str(hospital.root), "init", "--no-passphrase"]) == 0
    identity = load_identity(hospital.key_path)
    with open_store(hospital, identity) as store:
        study_uid = store.add_bytes(hostile_ct(), source="test").study_uid
    consultant = Identity.generate().node_id
    out = tmp_path / "request.bin"
    code = main(
        ["--home", str(hospital.root), "consult", "request", "--study", study_uid,
         "--question", "bleed?", "--subspecialty", "neuro", "--jurisdiction", "IE",
         "--to", str(consultant), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    wire = out.read_bytes()
    assert study_uid.encode() not in wire
    request = ConsultRequest.from_wire(wire)
    assert request.deidentified
    # the map is home: the node relinks the pseudonymous study to the stored one
    key = identity.derive_key(cases.PSEUDONYM_KEY_PURPOSE)
    stored = PseudonymMap.load(cases.pseudonym_map_path(hospital, request.id), key)
    assert stored.relink_uid(request.study_uid) == study_uid
    with open_audit(hospital, identity) as audit:
        shares = [r for r in audit.records(kind="share")]
        assert [(r.study_uid, r.details["deidentified"]) for r in shares] == [(study_uid, "True")]


# -- the key file that guards every study (item 11) ---------------------------------------

INTERACTIVE = (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE)
MODERATE = (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE)


def _cost(path: Path) -> tuple[int, int]:
    raw = canonical.decode(path.read_bytes(), keyfile.MAX_KEYFILE_SIZE)
    return raw["ops"], raw["mem"]


@pytest.mark.timeout(60)
def test_old_interactive_key_file_opens_and_is_rewrapped_with_moderate(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "identity.key"
    save_identity(path, identity, "old pass", keyfile.KdfCost(*INTERACTIVE))
    assert _cost(path) == INTERACTIVE
    assert load_identity(path, "old pass").node_id == identity.node_id
    assert _cost(path) == MODERATE
    assert load_identity(path, "old pass").node_id == identity.node_id  # still opens


@pytest.mark.timeout(60)
def test_a_new_key_file_uses_moderate(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, Identity.generate(), "new pass")
    assert _cost(path) == MODERATE


# -- the DICOM listener keeps the sender's AE title out of the instances (item 4) ----------


@pytest.mark.timeout(60)
async def test_listener_writes_no_sender_ae_title_into_stored_or_shared_instances(
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu")
    home, identity = make_home(tmp_path, "hospital", "", [])
    config = home.load_config()
    config.dicom = DicomConfig(
        ae_title="RADMESH_T", port=0, enabled=True, allowed_calling_aets=[SENDER_AE]
    )
    home.save_config(config)
    runtime = NodeRuntime(home, identity, transport_options=FAST)
    await runtime.start()
    try:
        assert runtime.dicom is not None
        path = tmp_path / "ct.dcm"
        path.write_bytes(generated_ct(1)[0])
        done = await asyncio.to_thread(storescu, [path], runtime.dicom.port, "RADMESH_T", SENDER_AE)
        assert done.returncode == 0, done.stderr
        (study,) = runtime.store.studies()
        (row,) = runtime.store.instances(study.study_uid)
        stored = runtime.store.read_instance(row.sop_instance_uid)
        assert SENDER_AE.encode() not in stored
        assert "SourceApplicationEntityTitle" not in pydicom.dcmread(io.BytesIO(stored)).file_meta
        assert SENDER_AE.encode() not in deidentify(stored, ShareContext())
    finally:
        await runtime.stop()


@pytest.mark.timeout(120)
async def test_tui_share_form_refuses_ultrasound_until_pixels_checked_box_is_ticked(
    tmp_path: Path,
) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = {a.store.add_bytes(f, source="test").study_uid for f in _us_series(1)}.pop()
        facade = RuntimeNode(a)
        form = ConsultForm(
            study_uid, str(b.identity.node_id), "bleed?", "urgent", "neuro", 4.0, "IE"
        )
        with pytest.raises(ActionError, match="burned into the pixels"):
            await facade.request_consult(form)
        assert a.consults.cases() == []
        sent = await facade.request_consult(dataclasses.replace(form, burned_in_checked=True))
        assert "sent to" in sent
        (checked,) = [
            r
            for r in a.audit.records(kind="share")
            if r.details.get("event") == "burned-in-checked"
        ]
        assert checked.study_uid == study_uid


# -- Clean Pixel Data: black out the band where ultrasound machines write the patient -------

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _us_rgb(rows: int = 32, cols: int = 24) -> bytes:
    """An RGB ultrasound frame, no BurnedInAnnotation flag, every pixel bright."""
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(US_IMAGE)
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.PixelData = bytes([200]) * (rows * cols * 3)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_black_out_top_blanks_the_band_of_an_ultrasound_and_claims_clean_pixel_data() -> None:
    shared = deidentify(_us_rgb(), ShareContext(black_out_top=6))
    out = pydicom.dcmread(io.BytesIO(shared))
    pixels = out.pixel_array
    assert (pixels[:6] == 0).all()
    assert (pixels[6:] == 200).all()
    assert "113101" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    # a CT is not a burned-in candidate: its pixels are never touched
    ct = generated_ct(1)[0]
    kept = pydicom.dcmread(io.BytesIO(deidentify(ct, ShareContext(black_out_top=6))))
    assert kept.PixelData == pydicom.dcmread(io.BytesIO(ct)).PixelData


@pytest.mark.timeout(120)
async def test_send_with_black_out_delivers_the_ultrasound_blanked_and_audited(
    tmp_path: Path,
) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = a.store.add_bytes(_us_rgb(), source="test").study_uid
        assert await _send(a, b, study_uid, black_out_top=6) == "complete"
        (got,) = _received(b)
        assert (pydicom.dcmread(io.BytesIO(got)).pixel_array[:6] == 0).all()
        events = [r.details for r in a.audit.records(kind="share")]
        assert {"event": "black-out", "rows": 6, "instances": 1} in events


def test_clean_descriptors_is_a_site_setting_off_by_default() -> None:
    assert sharing.options_of(NodeConfig().sharing) == deid.DEFAULT_OPTIONS
    chosen = NodeConfig.from_toml("[sharing]\nclean_descriptors = true\n").sharing
    options = sharing.options_of(chosen)
    assert Option.CLEAN_DESCRIPTORS in options
    out = pydicom.dcmread(io.BytesIO(deidentify(hostile_ct(), ShareContext(options=options))))
    assert out.StudyDescription == "CT HEAD"
    assert _leaks(deidentify(hostile_ct(), ShareContext(options=options))) == []


# -- the free text sent with a de-identified study must not name the patient ---------------


@pytest.mark.timeout(120)
async def test_a_question_naming_the_patient_is_refused_before_anything_leaves(
    tmp_path: Path,
) -> None:
    async with two_trusted_nodes(tmp_path) as (a, b):
        study_uid = a.store.add_bytes(hostile_ct(), source="test").study_uid
        assert b.record is not None
        for question in (
            "Henrietta fell at home: bleed?",
            "bleed? (MRN77341)",
            "born 1952-07-14, bleed?",
        ):
            terms = consults.Terms(question, Priority.STAT, "neuro", "IE")
            with pytest.raises(QuestionNamesPatient) as refused:
                await a.consulting.request_consult(b.record.public_key, study_uid, terms)
            assert _leaks(str(refused.value).encode()) == []
        assert a.consults.cases() == []
        fine = consults.Terms("subdural bleed? midline shift?", Priority.STAT, "neuro", "IE")
        await a.consulting.request_consult(b.record.public_key, study_uid, fine)


def test_a_common_word_that_is_also_the_surname_is_not_refused(tmp_path: Path) -> None:
    home, identity = make_home(tmp_path, "n", "", [])
    ds = pydicom.dcmread(io.BytesIO(generated_ct(1)[0]))
    ds.PatientName, ds.PatientID = "WHITE^WALTER", "H4411"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with open_store(home, identity) as store:
        study_uid = store.add_bytes(buf.getvalue(), source="test").study_uid
        sharing.check_free_text(store, study_uid, "white matter lesions?", "question")
        with pytest.raises(QuestionNamesPatient):
            sharing.check_free_text(store, study_uid, "Mr White, white matter?", "question")
