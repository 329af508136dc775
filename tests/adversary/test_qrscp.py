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


def test_a_pacs_answering_with_a_giant_pdu_is_aborted_before_it_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our own C-FIND SCU against a hostile 'PACS': its A-ASSOCIATE-AC claims 1 GiB. The
    association is refused from the PDU header, nothing of that size is allocated, and the
    query fails at once with what to check (it does not wait out the network timeout)."""
    import socket
    import struct
    import threading

    from node.dicom.net import DicomPeerError
    from node.dicom.qr import PacsAddress, StudyQuery, find_studies

    server = socket.create_server((LOOPBACK, 0))
    port = server.getsockname()[1]
    got: list[bytes] = []

    def hostile() -> None:
        conn, _ = server.accept()
        with conn:
            got.append(conn.recv(65536))  # the A-ASSOCIATE-RQ
            conn.sendall(struct.pack(">BBL", 0x02, 0, 1 << 30) + b"\x00" * 64)
            conn.settimeout(10)
            while conn.recv(65536):  # until the client aborts and closes
                pass

    thread = threading.Thread(target=hostile, daemon=True)
    thread.start()
    try:
        with pytest.raises(DicomPeerError, match="association"):
            find_studies(
                PacsAddress(LOOPBACK, port, "EVILPACS", "RADMESH"),
                StudyQuery(patient_id="PAT-1"),
                timeout=30,
            )
    finally:
        server.close()
        thread.join(15)
    assert got  # the request did reach the hostile server
    assert "1073741824-byte PDU" in caplog.text
