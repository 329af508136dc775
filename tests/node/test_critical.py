"""Acknowledgement of reports and critical results between real running nodes on loopback:
the hospital is paged, the result is re-sent and escalated until a named person
acknowledges it, and the consultant's node sees who did and when."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from consult.alerts import Acknowledgement, ReportAck
from consult.requests import Event, Priority, State
from node.app import consults, reports
from node.app.alerts import hook_argv, run_hook
from node.app.runtime import NodeRuntime
from node.cli import main
from node.core.errors import NodeError
from tests.cli import radmesh
from tests.node.test_cli_consult_network import Pair, _hospital_and_neuro
from tests.node.test_runtime import wait_for

REPEAT = 300  # seconds, the default [alerts] critical_repeat_minutes


def _paging(rt: NodeRuntime, tmp_path: Path) -> Path:
    """``rt`` pages critical results through a tiny hook that appends its arguments, one
    call per line, to a file: that file."""
    calls = tmp_path / "pager-calls.txt"
    script = tmp_path / "pager.py"
    script.write_text(
        "import sys\n"
        f"with open({str(calls)!r}, 'a') as out:\n"
        "    out.write(' '.join(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    rt.config.alerts.critical_command = [sys.executable, str(script), "{consult}"]
    return calls


def _calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


async def _reported(
    pair: Pair, *, critical: bool, priority: Priority = Priority.STAT, cli: bool = False
) -> str:
    """A consult from the hospital, accepted and reported by the neuroradiologist (with
    `radmesh consult report` on its running node when ``cli``)."""
    request, _, _ = await pair.hospital.consulting.request_consult(pair.neuro_id.public_key,
        pair.study_uid,
        consults.Terms(
            question="head injury, GCS 9", priority=priority, subspecialty="neuro",
            jurisdiction="IE",
        ),
    )  # fmt: skip
    await wait_for(lambda: bool(pair.neuro.consults.cases()))
    await pair.neuro.consulting.respond(request.id, Event.ACCEPT)
    await wait_for(lambda: pair.hospital.consults.get(request.id).state is State.ACCEPTED)
    text = "Crescentic collection over the left convexity, 12 mm, midline shift 8 mm."
    impression = "Acute left subdural haematoma with mass effect: neurosurgery now."
    if cli:
        code, out = await radmesh(
            pair.neuro_home, "consult", "report", request.id[:8], "--text", text,
            "--impression", impression, *(["--critical"] if critical else []),
        )  # fmt: skip
        assert code == 0, out
        assert ("sent as a critical result" in out) is critical
    else:
        await pair.neuro.consulting.reports.send_report(
            request.id, text=text, impression=impression, critical=critical
        )
    await wait_for(lambda: request.id in pair.hospital.reports)
    return request.id


def _row(rt: NodeRuntime, consult_id: str) -> ReportAck:
    row = rt.consults.report_ack(consult_id)
    assert row is not None
    return row


def _steps(rt: NodeRuntime, consult_id: str) -> int:
    return _row(rt, consult_id).steps


async def _noted(rt: NodeRuntime, text: str) -> None:
    """Wait (bounded) until the node notifies ``text``."""
    seen: list[str] = []

    def arrived() -> bool:
        while not rt.notifications.empty():
            seen.append(rt.notifications.get_nowait())
        return any(text in note for note in seen)

    await wait_for(arrived)


async def test_critical_result_pages_escalates_until_acknowledged_by_name(
    tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    hospital, neuro = pair.hospital, pair.neuro
    calls = _paging(hospital, tmp_path)
    try:
        consult_id = await _reported(pair, critical=True, cli=True)
        hospital_alerts, neuro_alerts = hospital.alerts, neuro.alerts

        # Arrival: the hook ran with the consult id only, and the banner is up.
        await wait_for(lambda: _calls(calls) == [consult_id])
        assert [(b.consult_id, b.steps) for b in hospital_alerts.banners()] == [(consult_id, 0)]
        assert hospital.consults.get(consult_id).state is State.REPORTED

        # Nobody acknowledges: one interval later the consultant's node re-sends it...
        reported_at = _row(neuro, consult_id).reported_at
        await neuro_alerts.tick(now=reported_at + REPEAT)
        await _noted(hospital, f"critical result on consult {consult_id[:8]} came again")
        assert len(hospital.consults.report_acks()) == 1  # kept once, not filed twice
        # ...and the hospital escalates: the hook again, and a louder banner.
        arrived = _row(hospital, consult_id).reported_at
        await hospital_alerts.tick(now=arrived + REPEAT)
        await wait_for(lambda: _calls(calls) == [consult_id, f"{consult_id} --escalation 1"])
        assert [b.steps for b in hospital_alerts.banners()] == [1]
        await hospital_alerts.tick(now=arrived + REPEAT + 10)  # not due again yet
        assert [b.steps for b in hospital_alerts.banners()] == [1]
        # Long unanswered: one page at the last level (not one per missed interval), then
        # the repeats end and a person is told to take over.
        await hospital_alerts.tick(now=arrived + 100 * REPEAT)
        await hospital_alerts.tick(now=arrived + 200 * REPEAT)
        await wait_for(lambda: len(_calls(calls)) == 3)
        assert _calls(calls)[2] == f"{consult_id} --escalation 6"
        assert [b.steps for b in hospital_alerts.banners()] == [6]
        await _noted(hospital, "no more pages will be sent")

        # A critical result needs a name.
        code, out = await radmesh(pair.hospital_home, "consult", "ack", consult_id[:8])
        assert code != 0
        assert "--by" in out
        code, out = await radmesh(
            pair.hospital_home, "consult", "ack", consult_id[:8], "--by", "Dr Aoife Byrne"
        )
        assert code == 0, out
        assert "acknowledged by Dr Aoife Byrne" in out

        assert hospital.consults.get(consult_id).state is State.ACKNOWLEDGED
        assert hospital_alerts.banners() == []
        await wait_for(lambda: neuro.consults.get(consult_id).state is State.ACKNOWLEDGED)
        seen = neuro.consults.report_ack(consult_id)
        assert seen is not None
        assert seen.acked_by == "Dr Aoife Byrne"
        assert seen.time_to_ack is not None
        assert seen.time_to_ack >= 0
        for node in (hospital, neuro):
            (record,) = [
                r.details
                for r in node.audit.records()
                if r.details.get("event") == "report-acknowledged"
            ]
            assert record["by"] == "Dr Aoife Byrne"
            assert record["critical"] is True
            assert "time_to_ack_s" in record

        # Acknowledged: the timers stop on both sides (no step is taken any more).
        await hospital_alerts.tick(now=arrived + 10 * REPEAT)
        await neuro_alerts.tick(now=reported_at + 10 * REPEAT)
        assert _steps(hospital, consult_id) == 6
        assert _steps(neuro, consult_id) == 1
        await wait_for(lambda: len(hospital_alerts.hook_results) == 3)
        assert all(result.ok for result in hospital_alerts.hook_results)

        capsys.readouterr()
        assert main(["--home", str(pair.hospital_home.root), "consult", "stats"]) == 0
        out = capsys.readouterr().out
        assert "critical results: 1, acknowledged 1" in out
        assert "not acknowledged now: 0" in out
        assert main(["--home", str(pair.neuro_home.root), "consult", "list", "--all"]) == 0
        assert "acknowledged" in capsys.readouterr().out
        assert main(["--home", str(pair.neuro_home.root), "consult", "show", consult_id[:8]]) == 0
        assert "CRITICAL result, acknowledged by Dr Aoife Byrne" in capsys.readouterr().out
    finally:
        await hospital.stop()
        await neuro.stop()


async def test_routine_report_is_acknowledged_without_a_name_and_flagged_until_then(
    tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    hospital, neuro = pair.hospital, pair.neuro
    config = pair.hospital_home.load_config()
    config.alerts.ack_routine_minutes = 0  # due at once: `consult list` flags it now
    pair.hospital_home.save_config(config)
    try:
        consult_id = await _reported(pair, critical=False, priority=Priority.ROUTINE)
        alerts = hospital.alerts
        assert alerts.banners() == []  # not critical: no banner, no page

        capsys.readouterr()
        assert main(["--home", str(pair.hospital_home.root), "consult", "list"]) == 0
        assert "NOT ACKNOWLEDGED" in capsys.readouterr().out

        # An acknowledgement of other report bytes is refused by the consultant's node...
        wrong = Acknowledgement(consult_id, hospital.identity.node_id, bytes(32), "Mallory", 0)
        await hospital.send_message(
            pair.neuro_id.public_key, reports.ACK_KIND, wrong.to_wire(hospital.identity)
        )
        # ...and the real one, sent after it on the same path, is the one it records.
        code, out = await radmesh(
            pair.hospital_home, "consult", "ack", consult_id[:8], "--by", "Dr Real"
        )
        assert code == 0, out
        await wait_for(lambda: neuro.consults.get(consult_id).state is State.ACKNOWLEDGED)
        kept = neuro.consults.report_ack(consult_id)
        assert kept is not None
        assert kept.acked_by == "Dr Real"
        assert main(["--home", str(pair.hospital_home.root), "consult", "list", "--all"]) == 0
        assert "NOT ACKNOWLEDGED" not in capsys.readouterr().out
    finally:
        await hospital.stop()
        await neuro.stop()


async def test_the_alert_hook_is_run_without_a_shell_with_a_timeout(tmp_path: Path) -> None:
    argv = hook_argv(["/bin/echo", "consult={consult}", "; rm -rf /"], "abc123", 2)
    assert argv == ["/bin/echo", "consult=abc123", "; rm -rf /", "--escalation", "2"]
    with pytest.raises(NodeError):
        hook_argv(["/bin/echo", "{consult}"], "--help", 0)  # an id is never an option
    slow = await run_hook([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)
    assert not slow.ok
    assert "killed" in slow.detail
    missing = await run_hook([str(tmp_path / "no-such-pager")], 5)
    assert not missing.ok
    assert (await run_hook([sys.executable, "-c", "pass"], 5)).ok


async def test_finalising_in_the_tui_with_critical_pages_the_hospital(
    tmp_path: Path, registry: str
) -> None:
    from tui.node_facade import LiveSessionView, RuntimeNode

    pair = await _hospital_and_neuro(tmp_path, registry)
    hospital, neuro = pair.hospital, pair.neuro
    calls = _paging(hospital, tmp_path)
    try:
        request, _, _ = await hospital.consulting.request_consult(
            pair.neuro_id.public_key,
            pair.study_uid,
            consults.Terms(question="q", priority=Priority.STAT, subspecialty="neuro",
                           jurisdiction="IE"),
        )  # fmt: skip
        await wait_for(lambda: bool(neuro.consults.cases()))
        await neuro.consulting.respond(request.id, Event.ACCEPT)
        live = neuro.live_hub().open(request.id)
        live.set_report_text("Impression: Acute SDH with midline shift.")
        LiveSessionView(live, RuntimeNode(neuro)._finalise).finalise(critical=True)
        await wait_for(lambda: request.id in hospital.reports)
        ack = hospital.consults.report_ack(request.id)
        assert ack is not None
        assert ack.critical
        await wait_for(lambda: _calls(calls) == [request.id])
        assert [c.consult_id for c in RuntimeNode(hospital).critical_alerts()] == [request.id]
        items = {c.consult_id: c for c in RuntimeNode(hospital).consults()}
        assert items[request.id].critical
    finally:
        await hospital.stop()
        await neuro.stop()


def test_alert_settings_are_checked_when_the_config_is_read() -> None:
    from node.core.config import NodeConfig
    from node.core.errors import ConfigError

    config = NodeConfig.from_toml('[alerts]\ncritical_command = ["/usr/bin/page", "{consult}"]\n')
    assert config.alerts.critical_command == ["/usr/bin/page", "{consult}"]
    assert config.alerts.critical_repeat_minutes == 5
    for bad in ('critical_command = "/usr/bin/page {consult}"', "critical_command = [1]",
                "critical_repeat_minutes = 0", "ack_stat_minutes = -1"):  # fmt: skip
        with pytest.raises(ConfigError, match=r"\[alerts\]"):
            NodeConfig.from_toml(f"[alerts]\n{bad}\n")


async def test_a_lost_acknowledgement_is_sent_again_when_the_report_comes_again(
    tmp_path: Path, registry: str
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    hospital, neuro = pair.hospital, pair.neuro
    try:
        consult_id = await _reported(pair, critical=True)
        handler = neuro.handlers.pop(reports.ACK_KIND)  # the acknowledgement gets lost
        how, _ = await hospital.consulting.reports.acknowledge(consult_id, "Dr Aoife Byrne")
        assert "delivered" in how
        assert neuro.consults.get(consult_id).state is State.REPORTED
        neuro.handlers[reports.ACK_KIND] = handler

        neuro_alerts = neuro.alerts
        await neuro_alerts.tick(now=_row(neuro, consult_id).reported_at + REPEAT)
        await wait_for(lambda: neuro.consults.get(consult_id).state is State.ACKNOWLEDGED)
        assert _row(neuro, consult_id).acked_by == "Dr Aoife Byrne"
        assert _row(hospital, consult_id).steps == 0  # acknowledged here: never escalated
    finally:
        await hospital.stop()
        await neuro.stop()
