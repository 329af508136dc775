"""Retention of consultant studies (issue 19, item 13): the pure decision, and a real node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.bench_codec import ct_series
from consult.requests import ConsultRequest, Event, Priority, Role, State
from crypto.identity import Identity
from node.app.retention import DAY, ConsultRow, Purge, RetentionDB, due_purges, summarise
from node.app.runtime import NodeRuntime
from node.core.config import NodeConfig, NodeHome
from node.core.errors import ConfigError
from node.core.keystore import save_identity

T0 = 1_800_000_000


def row(cid: str, study: str, **kw: object) -> ConsultRow:
    fields: dict[str, object] = {
        "role": Role.CONSULTANT,
        "state": State.ACKNOWLEDGED,
        "closed_at": T0,
    }
    fields.update(kw)
    return ConsultRow(cid, study, **fields)  # type: ignore[arg-type]


def test_closed_consultant_study_is_due_only_after_the_window() -> None:
    rows = [row("a", "1.1")]
    assert due_purges(rows, T0 + 30 * DAY - 1, 30) == []
    assert due_purges(rows, T0 + 30 * DAY, 30) == [Purge("a", "1.1", T0 + 30 * DAY)]


@pytest.mark.parametrize("state", [State.WITHDRAWN, State.DECLINED, State.EXPIRED])
def test_every_closed_state_starts_the_window(state: State) -> None:
    assert [p.consult_id for p in due_purges([row("a", "1.1", state=state)], T0 + DAY, 1)] == ["a"]


@pytest.mark.parametrize(
    "changed",
    [
        {"pinned": True},
        {"role": "requester"},  # the hospital's own original
        {"state": State.REPORTED, "closed_at": None},  # report not acknowledged yet
        {"state": State.IN_REVIEW, "closed_at": None},
        {"purged": True},  # already done
    ],
)
def test_kept(changed: dict[str, object]) -> None:
    assert due_purges([row("a", "1.1", **changed)], T0 + 400 * DAY, 30) == []


def test_zero_days_keeps_forever() -> None:
    assert due_purges([row("a", "1.1")], T0 + 10_000 * DAY, 0) == []


def test_a_study_shared_with_an_open_pinned_or_own_consult_is_kept() -> None:
    later = T0 + 100 * DAY
    assert due_purges([row("a", "1.1"), row("b", "1.1", state=State.IN_REVIEW)], later, 30) == []
    assert due_purges([row("a", "1.1"), row("b", "1.1", pinned=True)], later, 30) == []
    assert due_purges([row("a", "1.1"), row("b", "1.1", role=Role.REQUESTER)], later, 30) == []
    both = due_purges([row("a", "1.1"), row("b", "1.1", closed_at=T0 + DAY)], later, 30)
    assert [p.consult_id for p in both] == ["a", "b"]


def test_summary_counts_held_due_and_next() -> None:
    rows = [
        row("a", "1.1"),
        row("b", "1.2", closed_at=T0 + 10 * DAY),
        row("c", "1.3", state=State.IN_REVIEW, closed_at=None),
        row("d", "1.4", pinned=True),
        row("e", "1.5", purged=True),
        row("f", "1.6", role=Role.REQUESTER),
        row("g", "1.7", state=State.OFFERED, closed_at=None),  # never fetched
    ]
    s = summarise(rows, T0 + 30 * DAY, 30)
    assert (s.held, s.due, s.next_purge, s.pinned) == (4, 1, T0 + 40 * DAY, 1)
    assert "4 study(ies) held for consults, 1 due" in s.line(30, T0 + 30 * DAY)


def test_config_days_checked_when_read() -> None:
    assert NodeConfig().retention.days == 30
    assert NodeConfig.from_toml("[retention]\ndays = 0\n").retention.days == 0
    with pytest.raises(ConfigError, match=r"\[retention\] days"):
        NodeConfig.from_toml("[retention]\ndays = -1\n")
    with pytest.raises(ConfigError, match="days must be int"):
        NodeConfig.from_toml('[retention]\ndays = "30"\n')


def _request(requester: Identity, study_uid: str, now: int) -> ConsultRequest:
    return ConsultRequest.new(
        requester=requester.node_id,
        study_uid=study_uid,
        question="suspected subdural haematoma",
        priority=Priority.ROUTINE,
        subspecialty="neuro",
        jurisdiction="IE",
        language="en",
        deadline=now + 30 * DAY,
        now=now,
    )


async def test_a_consultant_node_purges_a_closed_fetched_study_on_its_tick(
    tmp_path: Path,
) -> None:
    home = NodeHome(tmp_path / "consultant")
    identity, hospital = Identity.generate(), Identity.generate()
    save_identity(home.key_path, identity, None)
    config = NodeConfig(display_name="consultant")
    config.network.mdns = False
    config.network.listen_host = "127.0.0.1"
    home.save_config(config)
    rt = NodeRuntime(home, identity)
    await rt.start()
    try:
        now = int(time.time())
        studies = {}
        for seed, name, source in (
            (1, "due", "peer:hospital"),
            (2, "pinned", "peer:hospital"),
            (3, "open", "peer:hospital"),
            (4, "own", "modality"),  # this node's own original, consulted elsewhere
        ):
            added = [rt.store.add_bytes(d, source=source) for d in ct_series(2, seed=seed, size=32)]
            studies[name] = added[0].study_uid
        ids = {}
        for name in studies:
            role = "requester" if name == "own" else "consultant"
            req = _request(hospital if role == "consultant" else identity, studies[name], now)
            rt.consults.add(req, role=role, now=now)
            ids[name] = req.id
            if name != "open":
                rt.consults.apply(req.id, Event.WITHDRAW, now)
            else:
                rt.consults.apply(req.id, Event.ACCEPT, now)
        pins = RetentionDB(home.data_dir)
        pins.pin(ids["pinned"], now)
        pins.close()

        assert rt.retention_tick(now + 29 * DAY) == []  # inside the window
        assert rt.retention_tick(now + 31 * DAY) == [ids["due"]]

        held = {s.study_uid for s in rt.store.studies()}
        assert studies["due"] not in held
        assert rt.store.series(studies["due"]) == []  # no descriptions left behind
        assert {studies["pinned"], studies["open"], studies["own"]} <= held
        records = [
            r
            for r in rt.audit.records(study_uid=studies["due"], kind="delete")
            if r.details.get("retention") == "purge"
        ]
        assert len(records) == 1
        assert records[0].details == {
            "retention": "purge",
            "consult": ids["due"],
            "instances": 2,
        }
        assert rt.retention_tick(now + 32 * DAY) == []  # once per study
        retention = RetentionDB(home.data_dir)
        assert retention.describe(ids["due"]).startswith("study purged ")
        assert retention.describe(ids["due"]).endswith("(2 instance(s))")
        retention.close()
    finally:
        await rt.stop()


def _consultant_home(tmp_path: Path) -> tuple[NodeHome, Identity]:
    home = NodeHome(tmp_path / "consultant")
    identity = Identity.generate()
    save_identity(home.key_path, identity, None)
    config = NodeConfig(display_name="consultant")
    config.network.mdns = False
    home.save_config(config)
    return home, identity


async def test_a_consultant_study_holding_a_local_original_is_never_purged(
    tmp_path: Path,
) -> None:
    home, identity = _consultant_home(tmp_path)
    rt = NodeRuntime(home, identity)
    await rt.start()
    try:
        now = int(time.time())
        data = ct_series(2, seed=7, size=32)
        study = rt.store.add_bytes(data[0], source="peer:hospital").study_uid
        rt.store.add_bytes(data[1], source="modality")  # same study, acquired here
        req = _request(Identity.generate(), study, now)
        rt.consults.add(req, role="consultant", now=now)
        rt.consults.apply(req.id, Event.WITHDRAW, now)
        assert rt.retention_tick(now + 31 * DAY) == []
        assert len(rt.store.instances(study)) == 2
        assert not [
            r for r in rt.audit.records(kind="delete") if r.details.get("retention") == "purge"
        ]
    finally:
        await rt.stop()


def test_pin_unpin_cli_and_status_doctor_show_retention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consult.store import ConsultDB
    from node.cli import main

    home, _ = _consultant_home(tmp_path)
    now = int(time.time())
    closed = _request(Identity.generate(), "2.25.77", now - 31 * DAY)
    later = _request(Identity.generate(), "2.25.78", now - 31 * DAY)
    with ConsultDB.in_data_dir(home.data_dir) as db:
        for req, at in ((closed, now - 31 * DAY), (later, now - 2 * DAY)):
            db.add(req, role="consultant", now=at)
            db.apply(req.id, Event.ACCEPT, at)
            db.apply(req.id, Event.WITHDRAW, at)
    root = ["--home", str(home.root)]
    assert main([*root, "status"]) == 0
    out = capsys.readouterr().out
    assert "Retention: 2 study(ies) held for consults, 1 due for purge, next in 28 d" in out
    assert main([*root, "consult", "pin", closed.id[:10]]) == 0
    assert "pinned" in capsys.readouterr().out
    db2 = RetentionDB(home.data_dir)
    assert db2.pinned() == {closed.id}
    db2.close()
    assert main([*root, "consult", "show", closed.id[:10]]) == 0
    assert "retention:     pinned" in capsys.readouterr().out
    main([*root, "doctor"])
    assert "0 due for purge, next in 28 d, 1 pinned" in capsys.readouterr().out
    assert main([*root, "consult", "unpin", closed.id[:10]]) == 0
    db3 = RetentionDB(home.data_dir)
    assert db3.pinned() == set()
    db3.close()
