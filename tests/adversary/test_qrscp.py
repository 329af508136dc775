"""Attacks on the node's Query/Retrieve SCP (node.dicom.qrscp): a caller that is not
allowed, a C-MOVE to a destination the site did not list, hostile matching keys."""

from __future__ import annotations

import pytest

from node.dicom.qrscp import find
from tests.dcmtk import LOOPBACK, require_dcmtk
from tests.node.test_dicom_qrscp import NODE_AE, Archive, _listener, _query, _run
from tests.node.test_dicom_qrscp import archive as archive


@pytest.mark.system
def test_an_unlisted_caller_gets_no_answer(archive: Archive) -> None:
    require_dcmtk("findscu")
    with _listener(archive) as listener:
        result = _run(
            "findscu", "-S", "-aet", "STRANGER", "-aec", NODE_AE,
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PAT-1",
            LOOPBACK, str(listener.port),
        )  # fmt: skip
    assert archive.current not in result.stdout + result.stderr
    assert "Rejected" in result.stdout + result.stderr or result.returncode != 0


@pytest.mark.filterwarnings("ignore:The PN component length")  # the hostile value itself
def test_overlong_or_levelless_identifiers_are_refused_before_matching(archive: Archive) -> None:
    with pytest.raises(ValueError, match="longer than"):
        list(find(archive.store, _query(QueryRetrieveLevel="STUDY", PatientName="x" * 1000)))
    with pytest.raises(ValueError, match="query level"):
        list(find(archive.store, _query(PatientID="PAT-1")))
