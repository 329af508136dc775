"""The study desk: a consult's study served by the requesting node and fetched by the
consultant's.

Requesting side: a ``consult.fetch`` request from the accepted consultant starts a
sender (:meth:`StudyDesk.on_fetch`); one sender per consult and peer, a new fetch
replacing the old sender. Consultant side: :meth:`StudyDesk.fetch` pulls the shared
study, one fetch per consult (a second caller waits for the same one). A fetch cut
short by a restart resumes by itself when the node starts again
(:meth:`StudyDesk.unfinished`), from what its spool in ``data/transfers`` verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from consult.errors import ConsultError, IllegalTransition, LocalConsultError
from consult.requests import Event, Role, State, check_consult_id, refusal
from crypto.identity import NodeId
from node.app import cases
from node.app.cases import SERVABLE, Share
from node.app.transfers import Direction, Transfer
from node.core.errors import NodeError
from node.core.ids import local_name
from node.dicom import pseudonyms as pair_pseudonyms
from node.dicom import sharing
from node.dicom.deid import PseudonymMap
from peer_transport import transfer as tr
from peer_transport.connection import PeerConnection, RequestRefused
from peer_transport.errors import RemoteError, TransportError
from peer_transport.mux import ChannelLink
from peer_transport.transfer import Progress, TransferCancelled
from peer_transport.transfer.runner import (
    ProgressCallback,
    StudyReceiver,
    StudySender,
    receive_study,
    send_study,
)

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

FETCH_KIND = "consult.fetch"
# A fetch resumed at start that fails is tried again after each of these delays
# (seconds), then left to a person; its spool stays for that later attempt.
RESUME_RETRY_AFTER = (60.0, 300.0, 900.0)
WATCH_INTERVAL = 1.0  # seconds between checks that a consult being fetched is still ours


@dataclass
class _Serving:
    """Requesting side: the sender serving one consult's study to one peer."""

    task: asyncio.Task[None]
    sender: StudySender | None = None  # once the study is prepared


@dataclass
class _Fetch:
    """Consultant side: the one fetch running for a consult, and who watches it."""

    result: asyncio.Future[Progress]
    listeners: list[ProgressCallback] = field(default_factory=list)

    def progress(self, progress: Progress) -> None:
        for listener in list(self.listeners):
            listener(progress)


class StudyDesk:
    """One node's consult studies on the move: the senders it serves, the fetches it runs."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.serving: dict[tuple[str, bytes], _Serving] = {}
        self.fetching: dict[str, _Fetch] = {}

    # -- requesting side: serve ---------------------------------------------------------
    async def on_fetch(self, conn: PeerConnection, body: bytes) -> bytes:
        """The accepted consultant asks for the study: start serving it."""
        rt = self.rt
        if not rt.trust.is_trusted(conn.peer, rt.now()):  # checked per request, not per link
            raise RequestRefused("not-trusted", "this node no longer trusts your node")
        # "<consult id>" for its study, "<consult id>\n<prior's shared UID>" for a prior
        named, _, prior = body.decode(errors="replace").partition("\n")
        try:  # the peer names a whole consult id, never a prefix of one
            consult_id = rt.consults.resolve(check_consult_id(named))
        except ConsultError as exc:
            raise RequestRefused("not-shared", "this study was not shared with your node") from exc
        info = rt.consults.info(consult_id)
        if info.role is not Role.REQUESTER or info.peer_id != conn.peer_id:
            raise RequestRefused("not-shared", "this study was not shared with your node")
        case = rt.consults.get(consult_id)
        if case.state not in SERVABLE:
            raise RequestRefused(
                "not-servable", f"consult {consult_id[:8]} is {case.state.value}, not accepted"
            )
        rt.consults.advance(consult_id, State.TRANSFERRING, rt.now(), info.peer)
        self._start_serving(conn, consult_id, cases.share_of(rt, consult_id, prior))
        return b"ok"

    def _start_serving(self, conn: PeerConnection, consult_id: str, share: Share) -> None:
        """Serve the study to ``conn``'s peer, replacing a sender already serving it this
        consult (the peer fetched again: restarted, or asked twice).

        Replacing rather than re-attaching the old sender: the manifest and its transfer
        id derive from the content (de-identification is keyed and deterministic), so a
        new sender offers the same transfer and the peer resumes from its spool; and the
        old sender may be bound to a connection that is gone. The cost is preparing the
        study again.
        """
        self.stop_serving(consult_id, "replaced by a new fetch from the peer", peer=conn.peer)
        key = (consult_id, conn.peer)
        serving = _Serving(asyncio.ensure_future(self._serve(conn, consult_id, share)))
        self.serving[key] = serving
        serving.task.add_done_callback(
            lambda _t: self.serving.pop(key) if self.serving.get(key) is serving else None
        )
        self.rt.spawn(serving.task)

    def stop_serving(
        self, consult_id: str, reason: str, *, peer: bytes | None = None, tell: bool = False
    ) -> None:
        """End the senders of a consult's study (to ``peer`` only, if given); ``tell`` the
        receiving peer its transfer is cancelled (a withdrawal), so it stops asking."""
        for key, serving in list(self.serving.items()):
            if key[0] != consult_id or peer not in (None, key[1]):
                continue
            del self.serving[key]
            serving.task.cancel(reason)
            sender = serving.sender
            if tell and sender is not None:
                cancel = tr.Cancel(sender.study.manifest.transfer_id, reason)
                self.rt.spawn(_tell(sender, cancel))

    async def _serve(self, conn: PeerConnection, consult_id: str, share: Share) -> None:
        rt = self.rt

        def on_sender(sender: StudySender) -> None:
            tracked.attach_sender(sender)
            serving = self.serving.get((consult_id, conn.peer))
            if serving is not None:
                serving.sender = sender

        try:
            with rt.transfers.track(consult_id, Direction.OUT, conn.peer_id.short()) as tracked:
                await send_study(
                    ChannelLink(conn),
                    rt.store,
                    share.original_study_uid,
                    rt.identity,
                    peer=str(conn.peer_id),
                    audit=rt.audit,
                    prepare=self._deidentifier(consult_id) if share.deidentified else None,
                    on_sender=on_sender,
                    spool_dir=rt.home.data_dir / "outgoing",
                )
        except (NodeError, TransportError) as exc:
            rt.notify(f"Sending the study for consult {consult_id[:8]} failed: {exc}")

    def _deidentifier(self, consult_id: str) -> Callable[[Iterable[bytes]], Iterator[bytes]]:
        rt = self.rt
        consultant = rt.consults.info(consult_id).peer  # here: prepare runs in another thread

        def prepare(files: Iterable[bytes]) -> Iterator[bytes]:
            # One file at a time (send_study streams); one context keeps the pseudonyms
            # consistent, and the map is saved once every instance UID is in it.
            path = cases.map_path(rt, consult_id)
            pseudonyms = PseudonymMap.load(path, cases.map_key(rt))
            if consultant:  # the same patient to the same consultant: the same pseudonym
                pair_pseudonyms.bind_to_consultant(
                    pseudonyms,
                    rt.home.data_dir,
                    rt.identity.derive_key(pair_pseudonyms.LINKAGE_KEY_PURPOSE),
                    consultant,
                )
            options = sharing.options_of(rt.config.sharing)
            yield from sharing.deidentifier(pseudonyms, path, cases.map_key(rt), options)(files)

        return prepare

    # -- consultant side: fetch ---------------------------------------------------------
    def spool_of(self, consult_id: str) -> Path:
        # Named by a hash: a consult id came from a peer, and a peer's string is never a path.
        return self.rt.home.data_dir / "transfers" / f"consult-{local_name(consult_id)}"

    def still_ours(self, consult_id: str) -> bool:
        """Consultant side: the consult is ours and its study may still be fetched."""
        rt = self.rt
        try:
            return (
                rt.consults.info(consult_id).role is Role.CONSULTANT
                and rt.consults.get(consult_id).state in SERVABLE
            )
        except ConsultError:
            return False

    async def fetch(self, consult_id: str, on_progress: ProgressCallback | None = None) -> Progress:
        """Consultant side: pull the shared study of an accepted consult into this node's store.

        One fetch per consult runs, in the runtime's background tasks: a second call while
        one runs (a second `f`, a command during an automatic resume) waits for the same
        fetch and gets its progress too. What was verified stays in the consult's spool
        until the study is complete, for the next attempt.
        """
        fetch = self._fetch_of(self.rt.consults.resolve(consult_id))[0]
        if on_progress is not None:
            fetch.listeners.append(on_progress)
        try:
            return await asyncio.shield(fetch.result)
        finally:
            if on_progress in fetch.listeners:
                fetch.listeners.remove(on_progress)

    def start_fetch(self, consult_id: str) -> asyncio.Future[Progress] | None:
        """Consultant side: start fetching a consult's study in the background, unless a
        fetch of it runs already; the new fetch's outcome, or None when one was running.
        Raises as :meth:`fetch`.

        Synchronous, and answered from :attr:`fetching` alone: a fetch that has ended
        (cancelled, failed) is let go in the same step as its spool, so a fetch asked for
        right after it starts anew instead of joining the one that is over."""
        fetch, new = self._fetch_of(self.rt.consults.resolve(consult_id))
        return fetch.result if new else None

    def _fetch_of(self, consult_id: str) -> tuple[_Fetch, bool]:
        """The fetch running for the consult, or a new one started; and whether it is new."""
        rt = self.rt
        fetch = self.fetching.get(consult_id)
        if fetch is not None:
            return fetch, False
        state = rt.consults.get(consult_id).state
        if state not in SERVABLE:
            raise IllegalTransition(  # in the user's words, with the command to run
                state.value,
                Event.START_TRANSFER.value,
                refusal(state, Event.START_TRANSFER, consult_id[:8]),
            )
        cases.requester_key(rt, consult_id)  # raises now for a consult with no signed request
        fetch = self.fetching[consult_id] = _Fetch(asyncio.get_running_loop().create_future())
        fetch.result.add_done_callback(_retrieved)
        rt.spawn(self._fetch(consult_id, fetch))
        return fetch, True

    async def _fetch(self, consult_id: str, fetch: _Fetch) -> None:
        try:
            fetch.result.set_result(await self._pull(consult_id, fetch.progress))
            shutil.rmtree(self.spool_of(consult_id), ignore_errors=True)  # emptied by then
        except Exception as exc:  # for the waiters, whatever it was
            fetch.result.set_exception(exc)
            # Withdrawn, or cancelled by the user: not resumed at the next start. What was
            # stored stays, so a new fetch brings only the rest.
            if isinstance(exc, TransferCancelled) or not self.still_ours(consult_id):
                shutil.rmtree(self.spool_of(consult_id), ignore_errors=True)
        finally:
            self.fetching.pop(consult_id, None)
            fetch.result.cancel()  # no-op once set; wakes the waiters if the node stopped

    async def _pull(self, consult_id: str, on_progress: ProgressCallback) -> Progress:
        rt = self.rt
        own = str(rt.identity.node_id)
        requester = cases.requester_key(rt, consult_id)
        with rt.transfers.track(
            consult_id, Direction.IN, NodeId.from_public_key(requester).short()
        ) as tracked:
            conn = await rt.transport.connect(requester)
            rt.consults.advance(consult_id, State.TRANSFERRING, rt.now(), own)
            # the study as this consult shares it: another consult's transfer with the same
            # node may run on this connection meanwhile
            study = rt.consults.get(consult_id).request.study_uid
            progress = await self._receive(consult_id, conn, study, on_progress, tracked)
            self._report_conflicts(consult_id, tracked.receiver)
        for prior in rt.consults.get(consult_id).request.priors:  # after the study itself
            await self._pull_prior(consult_id, prior, requester, on_progress)
        rt.consults.advance(consult_id, State.IN_REVIEW, rt.now(), own)
        return progress

    async def _pull_prior(
        self, consult_id: str, prior: str, requester: bytes, on_progress: ProgressCallback
    ) -> None:
        """One prior study of the consult, pulled as its study was (in a spool of its own)."""
        rt = self.rt
        with rt.transfers.track(
            consult_id, Direction.IN, NodeId.from_public_key(requester).short()
        ) as tracked:
            conn = await rt.transport.connect(requester)
            await self._receive(consult_id, conn, prior, on_progress, tracked)
            shutil.rmtree(self.spool_of(f"{consult_id}/{prior}"), ignore_errors=True)
            self._report_conflicts(consult_id, tracked.receiver)

    async def _receive(
        self,
        consult_id: str,
        conn: PeerConnection,
        study: str,
        on_progress: ProgressCallback,
        tracked: Transfer,
    ) -> Progress:
        """Ask the requester for ``study`` of the consult (its own, or a prior it lists) and
        receive it into the store, stopping if the consult stops being ours."""
        rt = self.rt
        prior = study != rt.consults.get(consult_id).request.study_uid
        receiving = asyncio.ensure_future(
            receive_study(
                ChannelLink(conn),
                rt.store,
                self.spool_of(f"{consult_id}/{study}" if prior else consult_id),
                peer=str(conn.peer_id),
                audit=rt.audit,
                on_progress=on_progress,
                on_receiver=tracked.attach_receiver,
                sender_key=conn.peer,
                expect_study=study,
                spool_key=self._spool_key(),
            )
        )
        try:
            named = f"{consult_id}\n{study}" if prior else consult_id
            await conn.request(FETCH_KIND, named.encode())
            while not (await asyncio.wait({receiving}, timeout=WATCH_INTERVAL))[0]:
                if not self.still_ours(consult_id):
                    raise LocalConsultError(
                        f"consult {consult_id[:8]} was withdrawn: its study is no longer fetched"
                    )
            return receiving.result()
        finally:
            receiving.cancel()

    def _report_conflicts(self, consult_id: str, receiver: StudyReceiver | None) -> None:
        if receiver is not None and receiver.conflicts:
            self.rt.notify(
                f"{len(receiver.conflicts)} image(s) of consult {consult_id[:8]} were not "
                "stored: this node already holds instances with the same UIDs and other bytes "
                "(kept its own). Ask the requesting node to check the study."
            )

    def unfinished(self) -> list[str]:
        """Consults whose study this node was fetching when it stopped (spool kept in
        ``data/transfers/consult-<hash of its id>``). A consult's spool that has nothing left
        to resume, or whose consult is no longer in this node's hands (withdrawn, reported),
        is removed; other spools there (``radmesh fetch``) are left alone."""
        rt = self.rt
        found = []
        for case in rt.consults.cases():
            consult_id, spool = case.request.id, self.spool_of(case.request.id)
            role = rt.consults.info(consult_id).role
            if role is not Role.CONSULTANT or consult_id in self.fetching or not spool.is_dir():
                continue
            if self.still_ours(consult_id) and self._unfinished(consult_id, spool):
                found.append(consult_id)
            else:
                shutil.rmtree(spool, ignore_errors=True)
        return sorted(found)

    def _unfinished(self, consult_id: str, spool: Path) -> bool:
        """A fetch began (the case moved to transferring) or its spool holds a transfer
        the requesting node signed and this node has not finished."""
        rt = self.rt
        if rt.consults.get(consult_id).state is State.TRANSFERRING:
            return True
        wire = rt.consults.info(consult_id).request_wire
        return (
            wire is not None
            and tr.resume_request(tr.Spool(spool, self._spool_key()), cases.signer(wire))
            is not None
        )

    def _spool_key(self) -> bytes:
        return self.rt.identity.derive_key(tr.SPOOL_KEY_PURPOSE)

    def resume_all(self) -> None:
        """Resume in the background the fetches a restart cut short."""
        for consult_id in self.unfinished():
            self.rt.spawn(self.resume(consult_id))

    async def resume(self, consult_id: str) -> None:
        """Fetch again, in the background, a study a restart cut short; retried a few times
        (:data:`RESUME_RETRY_AFTER`), then left to a person with the spool kept."""
        rt = self.rt
        short = consult_id[:8]
        rt.notify(f"Resuming the study of consult {short}")
        for delay in (*RESUME_RETRY_AFTER, None):
            try:
                done = await self.fetch(consult_id)
            except RemoteError as exc:  # the requesting node refused: retrying will not help
                rt.notify(f"Resuming the study of consult {short} was refused by its sender: {exc}")
                return
            except (ConsultError, NodeError, TransportError) as exc:
                if not self.still_ours(consult_id):
                    rt.notify(f"The study of consult {short} is no longer fetched: {exc}")
                    return
                if delay is None:
                    rt.notify(
                        f"Resuming the study of consult {short} failed again ({exc}); what "
                        f"arrived is kept: fetch it again (f, or `radmesh consult fetch "
                        f"{short}`) once the requesting node is online"
                    )
                    return
                rt.notify(
                    f"Resuming the study of consult {short} failed ({exc}); "
                    f"trying again in {delay / 60:.0f} min"
                )
                await asyncio.sleep(delay)
            else:
                rt.notify(f"Study of consult {short} received: {done.instances_done} images")
                return


def _retrieved(result: asyncio.Future[Progress]) -> None:
    if not result.cancelled():
        result.exception()  # every waiter may be gone: no "never retrieved" warning


async def _tell(sender: StudySender, cancel: tr.Cancel) -> None:
    with contextlib.suppress(TransportError):
        await sender.link.send_control(tr.to_wire(cancel))


__all__ = ["FETCH_KIND", "RESUME_RETRY_AFTER", "WATCH_INTERVAL", "StudyDesk"]
