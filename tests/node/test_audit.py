"""The audit log detects edited, removed, reordered and truncated records."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.identity import Identity
from node.core.audit import AuditError, AuditKind, AuditLog

NOW = 1_700_000_000.0


@pytest.fixture
def identity() -> Identity:
    return Identity.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


@pytest.fixture
def log(log_path: Path, identity: Identity) -> Iterator[AuditLog]:
    with AuditLog.open(log_path, identity, checkpoint_every=4) as audit:
        for i in range(10):
            audit.append(
                AuditKind.IMPORT if i % 2 else AuditKind.VIEW,
                now=NOW + i,
                study_uid=f"1.2.3.{i % 3}",
                peer=None if i % 4 else "PEER-A",
                details={"instances": i},
            )
        audit.checkpoint(NOW + 100)
        yield audit


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_intact_log_verifies_with_every_record_signed(log: AuditLog) -> None:
    report = log.verify()
    assert report.ok, report.problems
    assert report.records == 10
    assert report.last_signed_seq == 10
    assert report.unsigned_tail == 0


@pytest.mark.parametrize(
    ("tamper", "problem", "first"),
    [
        pytest.param(
            "UPDATE records SET study_uid = '9.9.9' WHERE seq = 5", "record 5", True, id="edited"
        ),
        pytest.param(
            "DELETE FROM records WHERE seq = 6", "record 6 is missing", True, id="removed"
        ),
        pytest.param(
            "DELETE FROM records WHERE seq > 7",
            "removed",
            False,
            id="tail-truncated-below-the-last-checkpoint",
        ),
        pytest.param(
            "UPDATE checkpoints SET signature = zeroblob(64) WHERE seq = 8",
            "checkpoint at record 8",
            False,
            id="checkpoint-signature-forged",
        ),
    ],
)
def test_a_record_or_checkpoint_tampered_with_is_detected(
    log: AuditLog, log_path: Path, tamper: str, problem: str, first: bool
) -> None:
    with _raw(log_path) as db:
        db.execute(tamper)
    report = log.verify()
    assert not report.ok
    named = report.problems[:1] if first else report.problems  # first: the first one named
    assert any(problem in p for p in named), report.problems


def test_edit_with_recomputed_chain_is_caught_by_signed_checkpoint(
    log: AuditLog, log_path: Path
) -> None:
    from node.core.audit import GENESIS, record_hash

    with _raw(log_path) as db:
        db.execute("UPDATE records SET actor = 'someone else' WHERE seq = 3")
        prev = GENESIS
        rows = db.execute(
            "SELECT seq, time_ms, kind, actor, study_uid, peer, details FROM records ORDER BY seq"
        ).fetchall()
        for row in rows:
            prev = record_hash(prev, *row)
            db.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev, row[0]))
    report = log.verify()
    assert not report.ok
    assert any("checkpoint" in p for p in report.problems)


def test_reordered_records_are_detected(log: AuditLog, log_path: Path) -> None:
    select = (
        "SELECT time_ms, kind, actor, study_uid, peer, details, hash FROM records WHERE seq = ?"
    )
    with _raw(log_path) as db:
        a = db.execute(select, (2,)).fetchone()
        b = db.execute(select, (3,)).fetchone()
        for seq, row in ((2, b), (3, a)):
            db.execute(
                "UPDATE records SET time_ms=?, kind=?, actor=?, study_uid=?, peer=?, details=?, "
                "hash=? WHERE seq = ?",
                (*row, seq),
            )
    report = log.verify()
    assert not report.ok
    assert "record 2" in report.problems[0]


def test_another_nodes_key_does_not_verify_the_checkpoints(log: AuditLog) -> None:
    report = log.verify(Identity.generate().public_key)
    assert not report.ok


def test_records_after_last_checkpoint_are_reported_unsigned(
    log_path: Path, identity: Identity
) -> None:
    with AuditLog.open(log_path, identity, checkpoint_every=4) as audit:
        for i in range(6):
            audit.append("export", now=NOW + i, study_uid="1.2")
        report = audit.verify()
        assert report.ok
        assert (report.last_signed_seq, report.unsigned_tail) == (4, 2)


def test_records_filter_by_study_and_peer(log: AuditLog) -> None:
    assert [r.seq for r in log.records(study_uid="1.2.3.1")] == [2, 5, 8]
    assert [r.seq for r in log.records(peer="PEER-A")] == [1, 5, 9]
    assert log.records(study_uid="1.2.3.1", peer="PEER-A")[0].details == {"instances": 4}


def test_patient_data_in_details_is_refused(log: AuditLog) -> None:
    with pytest.raises(AuditError, match="patient"):
        log.append("share", now=NOW, details={"PatientName": "DOE^JANE"})


def test_unknown_kind_is_refused(log: AuditLog) -> None:
    with pytest.raises(AuditError, match="kind"):
        log.append("print", now=NOW)


def test_log_reopens_and_continues_the_chain(log_path: Path, identity: Identity) -> None:
    with AuditLog.open(log_path, identity) as audit:
        audit.append("import", now=NOW)
    with AuditLog.open(log_path, identity) as audit:
        assert audit.append("view", now=NOW + 1) == 2
        assert audit.verify().ok
