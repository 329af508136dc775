"""`radmesh consult ...` as two users run it: one node asks, the other answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from consult.requests import State
from consult.store import ConsultDB
from crypto.identity import NodeId
from node.cli import main
from node.core.config import NodeHome


def init(home: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> NodeId:
    assert main(["--home", str(home), "init", "--no-passphrase", *extra]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Node id:"))
    return NodeId.parse(line.split(":", 1)[1])


def run(home: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), "consult", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def state_of(home: Path, consult_id: str) -> State:
    with ConsultDB.in_data_dir(NodeHome(home).data_dir) as db:
        return db.get(db.resolve(consult_id)).state


def requested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, str, Path]:
    """A new hospital home (FR) that asked a new neuro specialist's home a stat question
    offline: the two homes, the consult id and the request file it wrote."""
    hospital, specialist = tmp_path / "hospital", tmp_path / "specialist"
    init(hospital, capsys, "--jurisdictions", "FR")
    specialist_id = init(specialist, capsys, "--subspecialties", "neuro")
    request_file = tmp_path / "req.bin"
    code, out, _ = run(
        hospital, capsys, "request", "--study", "2.25.1", "--question", "Bleed?",
        "--priority", "stat", "--subspecialty", "neuro", "--jurisdiction", "FR",
        "--to", str(specialist_id), "--out", str(request_file),
    )  # fmt: skip
    assert code == 0
    return hospital, specialist, out.split()[1], request_file


def test_request_import_accept_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, specialist, consult_id, request_file = requested(tmp_path, capsys)
    response_file = tmp_path / "resp.bin"
    assert state_of(hospital, consult_id) == State.OFFERED

    assert run(specialist, capsys, "import", str(request_file))[0] == 0
    code, out, _ = run(specialist, capsys, "list")
    assert code == 0
    assert consult_id[:8] in out
    assert "stat" in out

    code, _, _ = run(specialist, capsys, "accept", consult_id[:8], "--out", str(response_file))
    assert code == 0
    assert state_of(specialist, consult_id) == State.ACCEPTED
    assert run(hospital, capsys, "import", str(response_file))[0] == 0
    assert state_of(hospital, consult_id) == State.ACCEPTED

    code, out, _ = run(hospital, capsys, "show", consult_id[:6])
    assert code == 0
    assert "offer -> offered" in out
    assert "accept -> accepted" in out

    # the requester cannot accept its own request; an accepted case cannot be declined
    code, _, err = run(hospital, capsys, "accept", consult_id[:8])
    assert code == 1
    assert "only the consultant" in err
    code, _, err = run(specialist, capsys, "decline", consult_id[:8])
    assert code == 1
    assert "already accepted, so it can no longer be declined" in err


def test_response_from_a_node_the_request_was_not_sent_to_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, chosen, intruder = tmp_path / "h", tmp_path / "c", tmp_path / "i"
    init(hospital, capsys)
    chosen_id = init(chosen, capsys)
    init(intruder, capsys)
    request_file, response_file = tmp_path / "req.bin", tmp_path / "resp.bin"
    _, out, _ = run(
        hospital, capsys, "request", "--study", "2.25.1", "--question", "?",
        "--subspecialty", "msk", "--jurisdiction", "FR", "--to", str(chosen_id),
        "--out", str(request_file),
    )  # fmt: skip
    consult_id = out.split()[1]
    assert run(intruder, capsys, "import", str(request_file))[0] == 0
    assert run(intruder, capsys, "accept", consult_id, "--out", str(response_file))[0] == 0
    code, _, err = run(hospital, capsys, "import", str(response_file))
    assert code == 1
    assert "may not accept" in err
    assert state_of(hospital, consult_id) == State.OFFERED


def test_list_on_an_empty_node_and_unknown_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "n"
    init(home, capsys)
    code, out, _ = run(home, capsys, "list")
    assert code == 0
    assert "No consults" in out
    code, _, err = run(home, capsys, "show", "deadbeef")
    assert code == 1
    assert "consult list" in err


def test_list_and_stats_show_turnaround_per_case_and_per_priority(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consult.requests import Event, Priority
    from tests.consult.test_requests import NOW, make_request

    home = tmp_path / "n"
    init(home, capsys)
    with ConsultDB.in_data_dir(NodeHome(home).data_dir) as db:
        for minutes, priority in ((10, Priority.STAT), (30, Priority.STAT), (50, Priority.STAT)):
            request = make_request(priority)
            db.add(request, role="consultant", now=NOW)
            db.apply(request.id, Event.ACCEPT, NOW + 60)
            db.apply(request.id, Event.BEGIN_REVIEW, NOW + 120)
            db.apply(request.id, Event.REPORT, NOW + minutes * 60)
        open_case = make_request(Priority.ROUTINE)
        db.add(open_case, role="consultant", now=NOW)
    code, out, _ = run(home, capsys, "list", "--all")
    assert code == 0
    assert sorted(line.split()[6] for line in out.splitlines()[1:]) == ["-", "10m", "30m", "50m"]
    code, out, _ = run(home, capsys, "stats")
    assert code == 0
    stat = next(line for line in out.splitlines() if line.startswith("stat"))
    assert stat.split()[:3] == ["stat", "3", "30m"]  # 3 reported, median 30 minutes
    routine = next(line for line in out.splitlines() if line.startswith("routine"))
    assert routine.split()[:3] == ["routine", "0", "-"]
