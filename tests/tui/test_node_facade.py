"""The TUI on a real NodeRuntime: studies from its store, a live session with a remote node."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from consult.measure import PixelSpacing, length_mm
from consult.presence import Cursor, Participant
from consult.shared import AnnotationKind
from node.app.runtime import NodeRuntime
from node.demo.phantom import generate_ct, random_study
from peer_transport.transfer import prepared as prepared_module
from peer_transport.transfer.instance import encode_instance as real_encode
from peer_transport.transfer.prepared import ENCODE_AHEAD, PreparedStudy
from tests.consult.test_live import introduce, start_node, wait_for
from tests.tui.pilots import open_viewer, press, svg_text
from tui.app import RadmeshApp
from tui.facade import ActionError, ConsultForm, ConsultItem
from tui.node_facade import LiveSessionView, RuntimeNode
from tui.screens.viewer import ViewerScreen
from tui.widgets.consult_panel import ConsultPanel
from tui.widgets.image_view import ImageView

SIZE = (150, 45)
# The sender encodes the whole study before it offers it (issue 18): on a loaded machine
# that alone can take more than wait_for's default 10 s.
SLOW = 60.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeRuntime]:
    runtime = await start_node(tmp_path, "ana")
    yield runtime
    await runtime.stop()


def import_ct(runtime: NodeRuntime, root: Path, slices: int = 4) -> list[Path]:
    paths = generate_ct(root / "ct", slices=slices, rows=64, study=random_study(3))
    for path in paths:
        runtime.store.add_file(path, source="test")
    return paths


async def test_the_facade_reads_studies_and_frames_from_the_store(
    node: NodeRuntime, tmp_path: Path
) -> None:
    paths = import_ct(node, tmp_path)
    facade = RuntimeNode(node)
    [study] = facade.studies()
    assert study.instance_count == len(paths)
    assert study.patient.startswith("PATIENT-")
    real = pydicom.dcmread(paths[1])
    assert str(real.PatientName) not in study.patient
    [series] = facade.series(study.study_uid)
    refs = facade.instances(series.series_uid)
    assert [r.sop_uid for r in refs] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    frame = await asyncio.to_thread(facade.load_frame, str(real.SOPInstanceUID))
    assert frame is not None
    assert np.array_equal(frame.pixels, real.pixel_array)
    assert frame.intercept == float(real.RescaleIntercept)
    assert frame.has_spacing
    assert frame.spacing == tuple(float(v) for v in real.PixelSpacing)
    assert facade.load_frame("2.25.999") is None


async def test_the_app_lists_a_stored_study_and_opens_it_in_the_viewer(
    node: NodeRuntime, tmp_path: Path
) -> None:
    import_ct(node, tmp_path)
    app = RadmeshApp(RuntimeNode(node))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert str(node.identity.node_id)[:7] in svg_text(app)
        await press(pilot, "f3")
        assert "PATIENT-0001" in svg_text(app)
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ViewerScreen)
        assert app.screen.query_one(ImageView).frame is not None
        assert "Im 1/4" in svg_text(app)


async def test_a_remote_participants_annotation_and_cursor_appear_in_the_tui(
    node: NodeRuntime, tmp_path: Path
) -> None:
    paths = import_ct(node, tmp_path)
    remote = await start_node(tmp_path, "ben")
    try:
        introduce([node, remote])
        facade = RuntimeNode(node)
        study = facade.studies()[0]
        app = RadmeshApp(facade)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_viewer(pilot, facade)
            session = screen.session
            assert isinstance(session, LiveSessionView)
            await node.live_hub().invite(session.consult_id, remote.identity.public_key)
            theirs = remote.live_hub().sessions[session.consult_id]
            assert theirs.study_uid == study.study_uid

            sop = str(pydicom.dcmread(paths[0]).SOPInstanceUID)
            mm = length_mm((5, 5), (25, 5), PixelSpacing(0.5, 0.5))
            drawn = theirs.add_annotation(
                AnnotationKind.LENGTH, sop, 0, ((5, 5), (25, 5)), values={"length_mm": mm}
            )
            theirs.say("see the crescent on the left")
            theirs.move_cursor(Cursor(sop, 0, 30.0, 20.0))
            await wait_for(lambda: [a.id for a in session.annotations()] == [drawn.id])
            await wait_for(
                lambda: any(p.cursor == Cursor(sop, 0, 30.0, 20.0) for p in session.participants())
            )
            await pilot.pause()
            shown = svg_text(app)
            assert "ben" in shown
            assert "10.0 mm" in shown or "10.00 mm" in shown
            assert "see the crescent on the left" in shown
            panel = screen.query_one(ConsultPanel)
            assert panel.session is session
            # ...and what the TUI types reaches the remote node.
            session.say("agreed, subdural")
            await wait_for(lambda: [m.text for m in theirs.chat()][-1:] == ["agreed, subdural"])
    finally:
        await remote.stop()


@asynccontextmanager
async def consult_pair(
    tmp_path: Path, slices: int, rows: int
) -> AsyncIterator[tuple[NodeRuntime, NodeRuntime, RuntimeNode, RuntimeNode, str]]:
    """A requesting node with a CT and a consultant, each verified by the other, the
    services running; gives (rural, neuro, their facades, the study uid), and stops
    both nodes on the way out."""

    rural = await start_node(tmp_path, "rural")
    try:
        neuro = await start_node(tmp_path, "neuro")
    except BaseException:
        await rural.stop()
        raise
    try:
        introduce([rural, neuro])
        for path in generate_ct(tmp_path / "ct", slices=slices, rows=rows, study=random_study(5)):
            rural.store.add_file(path, source="test")
        study_uid = rural.store.studies()[0].study_uid
        yield rural, neuro, RuntimeNode(rural), RuntimeNode(neuro), study_uid
    finally:
        await rural.stop()
        await neuro.stop()


async def accepted(ask: RuntimeNode, answer: RuntimeNode, neuro: NodeRuntime, study: str) -> str:
    """The hospital asks, the consultant accepts; returns the consult id."""
    await ask.request_consult(form_to(neuro, study))
    await wait_for(lambda: bool(answer.consults()))
    consult_id = answer.consults()[0].consult_id
    await answer.respond(consult_id, True)
    await wait_for(lambda: ask.consults()[0].state == "accepted")
    return consult_id


def form_to(peer: NodeRuntime, study_uid: str, priority: str = "stat") -> ConsultForm:
    return ConsultForm(
        study_uid, str(peer.identity.node_id), "subdural?", priority, "neuro", 1.0, "IE"
    )


async def test_request_accept_fetch_and_transfers_through_the_facades(tmp_path: Path) -> None:
    async with consult_pair(tmp_path, slices=3, rows=64) as (rural, neuro, ask, answer, study_uid):
        outcome = await ask.request_consult(form_to(neuro, study_uid))
        assert "delivered (LAN)" in outcome
        await wait_for(lambda: bool(answer.consults()))
        [item] = answer.consults()
        assert (item.incoming, item.priority, item.state) == (True, "stat", "requested")
        with pytest.raises(ActionError, match="accept it first"):
            answer.fetch(item.consult_id)
        assert "accepted" in await answer.respond(item.consult_id, True)
        await wait_for(lambda: ask.consults()[0].state == "accepted")
        assert "fetching" in answer.fetch(item.consult_id)
        assert "already being fetched" in answer.fetch(item.consult_id)
        await wait_for(lambda: [t.state for t in answer.transfers()] == ["complete"])
        [got] = answer.transfers()
        assert (got.direction, got.done_instances, got.total_instances) == ("in", 3, 3)
        assert got.done_bytes == got.total_bytes > 0
        assert got.peer == rural.identity.node_id.short()
        assert item.consult_id[:8] in got.label
        real_name = rural.store.study(study_uid).patient_name
        assert real_name not in got.label
        await wait_for(lambda: [t.state for t in ask.transfers()] == ["complete"])
        [sent] = ask.transfers()
        assert (sent.direction, sent.done_instances, sent.total_instances) == ("out", 3, 3)
        assert answer.consults()[0].state == "in_review"


async def test_decline_with_a_reason_and_withdraw_reach_the_other_node(tmp_path: Path) -> None:
    async with consult_pair(tmp_path, slices=1, rows=32) as (rural, neuro, ask, answer, study_uid):
        await ask.request_consult(form_to(neuro, study_uid))
        await ask.request_consult(form_to(neuro, study_uid, "routine"))
        await wait_for(lambda: len(answer.consults()) == 2)
        first, second = sorted(answer.consults(), key=lambda c: c.priority)  # routine, stat
        assert "declined" in await answer.respond(second.consult_id, False, "out of hours")
        await wait_for(lambda: rural.consults.get(second.consult_id).state.value == "declined")
        with pytest.raises(ActionError, match="only the requesting node"):
            await answer.withdraw(first.consult_id)
        assert "every consultant told" in await ask.withdraw(first.consult_id)
        await wait_for(lambda: neuro.consults.get(first.consult_id).state.value == "withdrawn")


async def test_the_share_form_never_sends_to_an_unverified_peer(tmp_path: Path) -> None:
    async with consult_pair(tmp_path, slices=1, rows=32) as (rural, _, ask, _, study_uid):
        stranger = await start_node(tmp_path, "stranger")
        try:
            assert stranger.record is not None
            rural.directory.remember(stranger.record, "test", rural.now())
            with pytest.raises(ActionError, match="verified peer"):
                await ask.request_consult(form_to(stranger, study_uid))
            assert not rural.consults.cases()
        finally:
            await stranger.stop()


async def test_a_streaming_study_lists_every_slice_and_the_one_on_screen_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slices, free = 40, 4
    # The sender's encoder stops after `free` slices until the viewer's hurry reaches it
    # (bounded): however loaded the machine, the hurried slice then has to overtake the
    # 35 still waiting, which a sender that ignores hurries never does.
    hurried = threading.Event()
    encoded: list[str] = []

    def gated_encode(data: bytes, entry: Any, study_uid: str, cache: Any = None) -> Any:
        encoded.append(entry.sop_instance_uid)
        if len(encoded) > free and not hurried.is_set():
            hurried.wait(30)
        return real_encode(data, entry, study_uid, cache)

    def hurry(self: PreparedStudy, index: int) -> None:
        real_hurry(self, index)
        hurried.set()

    real_hurry = PreparedStudy.hurry
    monkeypatch.setattr(prepared_module, "encode_instance", gated_encode)
    monkeypatch.setattr(PreparedStudy, "hurry", hurry)
    async with consult_pair(tmp_path, slices=slices, rows=256) as pair:
        _, neuro, ask, answer, study_uid = pair
        consult_id = await accepted(ask, answer, neuro, study_uid)
        answer.fetch(consult_id)
        await wait_for(lambda: bool(neuro.transfers.incoming()))
        shared_uid = neuro.transfers.incoming()[0].study_instance_uid
        assert shared_uid == answer.consults()[0].study_uid  # so Home's enter can open it
        [study] = [s for s in answer.studies() if s.study_uid == shared_uid]
        assert study.instance_count == slices  # the signed count, before any entry
        # Each slice is listed as its de-identified file is read, ahead of its encoding.
        await wait_for(lambda: any(len(m.entries) == slices for m in neuro.transfers.incoming()))
        [series] = answer.series(shared_uid)
        refs = answer.instances(series.series_uid)
        assert len(refs) == slices  # before the transfer ends
        last = refs[-1]
        assert not last.present
        assert answer.load_frame(last.sop_uid) is None
        answer.request_first(last.sop_uid)
        await wait_for(lambda: neuro.store.has_instance(last.sop_uid), 60)
        assert hurried.is_set()
        arrived = sum(neuro.store.has_instance(r.sop_uid) for r in refs)
        # At most the free ones and those the sender's workers held when the hurry came.
        assert arrived <= free + ENCODE_AHEAD + 1, f"the requested slice came as number {arrived}"
        await wait_for(lambda: [t.state for t in answer.transfers()] == ["complete"], 60)
        assert all(r.present for r in answer.instances(series.series_uid))
        assert answer.load_frame(last.sop_uid) is not None


async def test_opening_a_study_writes_a_view_audit_record(
    node: NodeRuntime, tmp_path: Path
) -> None:
    import_ct(node, tmp_path)
    facade = RuntimeNode(node)
    [study] = facade.studies()
    app = RadmeshApp(facade)
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "f3")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
    [view] = node.audit.records(study_uid=study.study_uid, kind="view")
    name = node.store.study(study.study_uid).patient_name
    assert name not in repr(view.details)
    assert node.audit.verify().ok


async def test_the_consultant_accepts_fetches_and_opens_the_study_from_the_worklist(
    tmp_path: Path,
) -> None:
    from textual.widgets import DataTable, ProgressBar

    slices = 30
    async with consult_pair(tmp_path, slices=slices, rows=256) as pair:
        _, neuro, ask, answer, study_uid = pair
        await ask.request_consult(form_to(neuro, study_uid))
        await wait_for(lambda: bool(answer.consults()))
        app = RadmeshApp(answer)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            app.screen.query_one("#worklist", DataTable).focus()
            await pilot.press("a")
            await app.workers.wait_for_complete()
            await wait_for(lambda: ask.consults()[0].state == "accepted")
            await pilot.press("f")
            await wait_for(
                lambda: (
                    bool(neuro.transfers.incoming())
                    or [t.state for t in answer.transfers()] == ["complete"]
                ),
                30,
            )
            await pilot.press("enter")  # opens the study while it streams in
            await app.workers.wait_for_complete()
            await pilot.pause()
            viewer = app.screen
            assert isinstance(viewer, ViewerScreen)
            # Opened while the sender may still be listing the slices: the rest come in.
            await wait_for(lambda: len(viewer.instances) == slices, SLOW)
            await wait_for(lambda: [t.state for t in answer.transfers()] == ["complete"], 60)
            await pilot.press("q")

            def bar_full() -> bool:  # after a Home refresh (once a second; later under load)
                bars = list(app.screen.query(ProgressBar))
                return (
                    len(bars) == 1
                    and bars[0].total is not None
                    and bars[0].progress == bars[0].total > 1
                )

            await wait_for(bar_full, 10)
            assert f"{slices}/{slices} images" in svg_text(app)
        kinds = [r.kind for r in neuro.audit.records()]
        assert "view" in kinds


async def shared_and_fetched(
    rural: NodeRuntime, neuro: NodeRuntime, ask: RuntimeNode, answer: RuntimeNode, study_uid: str
) -> ConsultItem:
    """The consultant accepted the request and holds the de-identified study; its worklist
    item (whose study_uid is the pseudonym)."""
    consult_id = await accepted(ask, answer, neuro, study_uid)
    answer.fetch(consult_id)
    await wait_for(lambda: [t.state for t in answer.transfers()] == ["complete"], 30)
    [item] = answer.consults()
    assert item.study_uid != study_uid
    assert len(neuro.store.instances(item.study_uid)) == len(rural.store.instances(study_uid))
    # The worklist and the overlay show the study as the consultant's store holds it: sex
    # kept by the share, the accession number not.
    original = next(r for r in rural.store.studies() if r.study_uid == study_uid)
    held = next(s for s in answer.studies() if s.study_uid == item.study_uid)
    assert original.accession_number
    assert held.accession != original.accession_number
    assert original.accession_number not in held.accession
    assert (held.patient_sex, item.patient_sex) == (original.patient_sex, original.patient_sex)
    assert (item.modality, item.images) == ("CT", len(rural.store.instances(study_uid)))
    return item


async def test_the_hospital_joins_the_consult_session_on_its_original_study(
    tmp_path: Path,
) -> None:
    """The requesting node opens the ORIGINAL study and lands in the consultant's session on
    the de-identified copy: each side sees the other's marks, cursor and presented series
    on its own UIDs, and the shared state only ever holds the pseudonyms."""
    from consult.presence import Viewport

    async with consult_pair(tmp_path, slices=3, rows=64) as (rural, neuro, ask, answer, study_uid):
        item = await shared_and_fetched(rural, neuro, ask, answer, study_uid)
        shared_uid = item.study_uid
        # The same slice on each side: the hospital's original, the consultant's pseudonym.
        original = {r.instance_number: r for r in rural.store.instances(study_uid)}
        pseudo = {r.instance_number: r for r in neuro.store.instances(shared_uid)}
        o_sop, p_sop = original[2].sop_instance_uid, pseudo[2].sop_instance_uid
        o_series, p_series = original[2].series_uid, pseudo[2].series_uid
        assert o_sop != p_sop
        assert o_series != p_series

        hospital = ask.open_session(study_uid)
        assert isinstance(hospital, LiveSessionView)
        assert hospital.consult_id == item.consult_id  # the consult's, not an ad-hoc session
        # Opening it brought the consultant's node in, under the pseudonymous study.
        await wait_for(lambda: item.consult_id in neuro.live_hub().sessions)
        assert neuro.live_hub().sessions[item.consult_id].study_uid == shared_uid
        consultant = answer.open_session(shared_uid)
        assert isinstance(consultant, LiveSessionView)
        assert consultant.live is neuro.live_hub().sessions[item.consult_id]

        theirs = consultant.add_annotation(AnnotationKind.POINT, p_sop, 0, ((10.0, 12.0),))
        await wait_for(lambda: theirs.id in {a.id for a in hospital.annotations()})
        [shown] = [a for a in hospital.annotations() if a.id == theirs.id]
        assert shown.sop_instance_uid == o_sop
        assert rural.store.has_instance(shown.sop_instance_uid)

        ours = hospital.add_annotation(
            AnnotationKind.ARROW, o_sop, 0, ((1.0, 2.0), (20.0, 22.0)), text="here"
        )
        assert ours.sop_instance_uid == o_sop  # the hospital's view stays on its own UIDs
        await wait_for(lambda: ours.id in {a.id for a in consultant.annotations()})
        [arrived] = [a for a in consultant.annotations() if a.id == ours.id]
        assert arrived.sop_instance_uid == p_sop
        assert neuro.store.has_instance(arrived.sop_instance_uid)

        def remote(view: LiveSessionView) -> list[Participant]:
            return [p for p in view.participants() if p.node != view.local_node]

        consultant.move_cursor(Cursor(p_sop, 0, 5.0, 6.0))
        hospital.move_cursor(Cursor(o_sop, 0, 7.0, 8.0))
        await wait_for(lambda: [p.cursor for p in remote(hospital)] == [Cursor(o_sop, 0, 5.0, 6.0)])
        await wait_for(
            lambda: [p.cursor for p in remote(consultant)] == [Cursor(p_sop, 0, 7.0, 8.0)]
        )

        # The consultant presents a series; the hospital follows it on its own series.
        consultant.present(True)
        consultant.set_viewport(Viewport(p_series, 1, 80.0, 40.0))
        await wait_for(
            lambda: (
                [(p.presenting, p.viewport) for p in remote(hospital)]
                == [(True, Viewport(o_series, 1, 80.0, 40.0))]
            )
        )
        hospital.follow(True)
        assert hospital.participants()[0].viewport == Viewport(o_series, 1, 80.0, 40.0)
        consultant.present(False)
        hospital.present(True)
        hospital.set_viewport(Viewport(o_series, 2, 400.0, 40.0))
        await wait_for(
            lambda: (
                [(p.presenting, p.viewport) for p in remote(consultant)]
                == [(True, Viewport(p_series, 2, 400.0, 40.0))]
            )
        )

        # Nothing identifying entered the shared state or the presence on either node.
        identifying = {study_uid, o_series, *(r.sop_instance_uid for r in original.values())}
        for live in (hospital.live, consultant.live):
            document = live.state.full_update()
            assert not [uid for uid in identifying if uid.encode() in document]
            assert {a.sop_instance_uid for a in live.annotations()} == {p_sop}
            states = [(p.cursor, p.viewport) for p in live.participants()]
            assert {c.sop_instance_uid for c, _ in states if c is not None} == {p_sop}
            assert {v.series_uid for _, v in states if v is not None} == {p_series}


async def test_the_hospitals_viewer_shows_the_consultants_marks_on_its_own_slices(
    tmp_path: Path,
) -> None:
    """The consultant is in the session first; the hospital opens the request from its
    outbox (enter), which shows its original study, sees the consultant's measurement and
    cursor on the matching slice and follows the presented slice."""
    from textual.widgets import DataTable

    from consult.presence import Viewport

    async with consult_pair(tmp_path, slices=3, rows=64) as (rural, neuro, ask, answer, study_uid):
        item = await shared_and_fetched(rural, neuro, ask, answer, study_uid)
        consultant = answer.open_session(item.study_uid)
        assert isinstance(consultant, LiveSessionView)
        [p_series] = answer.series(item.study_uid)
        p_refs = answer.instances(p_series.series_uid)
        [outbox] = ask.consults()
        assert outbox.study_uid == study_uid  # the hospital's own study, not the pseudonym
        app = RadmeshApp(ask)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            app.screen.query_one("#worklist", DataTable).focus()
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ViewerScreen)
            assert screen.session is not None
            assert screen.session.consult_id == item.consult_id
            await wait_for(lambda: consultant.live.is_bound(rural.identity.public_key))
            first = p_refs[0].sop_uid
            drawn = consultant.add_annotation(
                AnnotationKind.LENGTH,
                first,
                0,
                ((5, 5), (25, 5)),
                values={"length_mm": 10.0},
            )
            consultant.move_cursor(Cursor(first, 0, 30.0, 20.0))
            await wait_for(lambda: [a.id for a in screen._annotations_here()] == [drawn.id])
            await wait_for(lambda: any(m.kind == "cursor" for m in screen._marks()))
            await pilot.pause()
            assert "10.0 mm" in svg_text(app)
            assert screen.current is not None
            assert rural.store.has_instance(screen.current.sop_uid)

            consultant.present(True)
            consultant.set_viewport(Viewport(p_series.series_uid, 2, 80.0, 40.0))
            await wait_for(lambda: screen._presenter() is not None)
            await pilot.press("f")
            await wait_for(lambda: screen.index == 2)
            assert "Im 3/3" in svg_text(app)


async def test_the_consultant_pauses_goes_on_and_cancels_an_incoming_study(
    tmp_path: Path,
) -> None:
    slices = 40
    async with consult_pair(tmp_path, slices=slices, rows=256) as pair:
        rural, neuro, ask, answer, study_uid = pair
        consult_id = await accepted(ask, answer, neuro, study_uid)
        with pytest.raises(ActionError, match="press f to fetch it"):
            answer.pause_transfer(consult_id)

        answer.fetch(consult_id)
        await wait_for(lambda: [t.state for t in answer.transfers()] == ["running"], SLOW)
        assert "is paused" in answer.pause_transfer(consult_id)
        [receiver] = [t.receiver for t in neuro.transfers._transfers if t.receiver]
        assert receiver is not None
        protocol = receiver.protocol
        assert protocol is not None
        await wait_for(lambda: protocol._outstanding() == 0, SLOW)  # what was in flight landed
        assert [t.state for t in answer.transfers()] == ["paused"]
        assert protocol.poll(asyncio.get_running_loop().time()) == []  # nothing asked for
        assert protocol.progress().instances_done < slices

        assert "goes on" in answer.pause_transfer(consult_id)
        await wait_for(lambda: protocol.progress().instances_done > 0, SLOW)
        assert answer.cancel_transfer(consult_id).endswith("f fetches it again")
        await wait_for(lambda: [t.state for t in answer.transfers()] == ["failed"], SLOW)
        assert "cancelled" in neuro.transfers.views()[0].error
        # the hospital's sender was told and stopped; nothing is resumed at the next start
        await wait_for(lambda: all(v.state != "running" for v in rural.transfers.views()), SLOW)
        await wait_for(lambda: not neuro.consulting.studies.spool_of(consult_id).exists(), SLOW)

        answer.fetch(consult_id)  # the rest comes; what arrived is not sent again
        await wait_for(lambda: "complete" in [t.state for t in answer.transfers()], 60)
        shared = answer.consults()[0].study_uid
        assert len(neuro.store.instances(shared)) == slices


async def test_fetching_again_as_soon_as_a_cancelled_fetch_has_ended_starts_a_new_one(
    tmp_path: Path,
) -> None:
    """f pressed the moment a cancelled fetch is over (its spool removed, the desk free)
    fetches again. The facade used to keep its own "being fetched" set, emptied only when
    its waiting task next ran: a press in between was answered "already being fetched"
    and nothing came (the flaky end of the pause/cancel test above)."""
    async with consult_pair(tmp_path, slices=8, rows=64) as (_, neuro, ask, answer, study_uid):
        consult_id = await accepted(ask, answer, neuro, study_uid)
        answer.fetch(consult_id)
        await wait_for(lambda: [t.state for t in answer.transfers()] == ["running"], SLOW)
        assert "is paused" in answer.pause_transfer(consult_id)
        desk = neuro.consulting.studies
        again: list[str] = []

        def fetch_again(_result: object) -> None:
            # Runs in the loop iteration after the fetch ended: the desk has let it go and
            # its spool is gone, but the facade's own waiter has not run yet.
            assert consult_id not in desk.fetching
            assert not desk.spool_of(consult_id).exists()
            again.append(answer.fetch(consult_id))

        desk.fetching[consult_id].result.add_done_callback(fetch_again)
        answer.cancel_transfer(consult_id)
        await wait_for(lambda: bool(again), SLOW)
        assert again[0].startswith("fetching the study"), again[0]
        await wait_for(lambda: "complete" in [t.state for t in answer.transfers()], SLOW)
        assert len(neuro.store.instances(answer.consults()[0].study_uid)) == 8


async def test_a_verified_requester_not_in_the_directory_shows_verified(node: NodeRuntime) -> None:
    """The worklist's trust badge comes from the trust store, not only from the peer
    directory: a hospital verified by safety number whose record this node never looked
    up is 'verified', and an unknown one is 'unverified'."""
    from consult.requests import Role
    from crypto.identity import Identity
    from tests.node.test_runtime import request_from

    hospital, stranger = Identity.generate(), Identity.generate()
    now = node.now()
    for who in (hospital, stranger):
        request = request_from(who, now)
        node.consults.add(
            request, role=Role.CONSULTANT, now=now, wire=request.to_wire(who),
            peer=str(who.node_id),
        )  # fmt: skip
    node.trust.mark_verified(hospital.node_id, now)
    trust = {item.peer: item.peer_trust for item in RuntimeNode(node).consults()}
    assert trust == {hospital.node_id.short(): "verified", stranger.node_id.short(): "unverified"}
