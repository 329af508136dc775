"""Query/retrieve pieces that need no PACS: what a query may send, and what a retrieve keeps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from node.cli.dicom import _Receiver
from node.core.audit import open_audit
from node.core.keystore import load_identity
from node.demo.phantom import generate_ct, random_study
from node.dicom.net import BadInstanceError
from node.dicom.qr import QueryError, RetrieveReport, StudyQuery, check_uid
from node.dicom.store import open_store
from tests.node.test_runtime import make_home


@pytest.mark.parametrize(
    "query",
    [
        StudyQuery(),
        StudyQuery(patient_id="*"),
        StudyQuery(patient_id="RM1?"),
        StudyQuery(accession="A\\B"),
        StudyQuery(patient_id="x" * 65),
        StudyQuery(modality="CT*"),
        StudyQuery(modality="CT", since="2024-01-01"),
    ],
)
def test_queries_that_would_list_more_than_asked_are_refused(query: StudyQuery) -> None:
    with pytest.raises(QueryError):
        query.check()


def test_retrieve_refuses_a_bad_study_uid() -> None:
    with pytest.raises(QueryError):
        check_uid("1.2.3\\*")


def test_a_retrieve_keeps_only_the_study_it_asked_for(tmp_path: Path) -> None:
    home, identity = make_home(tmp_path, "rural", "", [])
    wanted, foreign = random_study(1), random_study(2)
    ours = generate_ct(tmp_path / "a", slices=1, rows=16, study=wanted)[0].read_bytes()
    theirs = generate_ct(tmp_path / "b", slices=1, rows=16, study=foreign)[0].read_bytes()
    report = RetrieveReport()
    with open_audit(home, identity) as audit:
        receiver = _Receiver(home, wanted.study_uid, audit, report)
        try:
            with pytest.raises(BadInstanceError):  # the listener answers 0xC000
                receiver(io.BytesIO(theirs), len(theirs), "ORTHANC")
            receiver(io.BytesIO(ours), len(ours), "ORTHANC")
            receiver(io.BytesIO(ours), len(ours), "ORTHANC")
        finally:
            receiver.close()
    assert (report.received, report.duplicate, report.refused) == (1, 1, 1)
    with open_store(home, load_identity(home.key_path)) as store:
        assert [s.study_uid for s in store.studies()] == [wanted.study_uid]
