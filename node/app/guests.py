"""Guests of a consult's live session, as people propose, approve and refuse them.

A guest (a neurosurgeon the consultant wants to show the images to, say) takes
part in a consult's live session only once **both** parties approved it
(:mod:`consult.admission`). This module is the person's path to that:

- a party *proposes* a guest (`radmesh consult invite ID --guest PEER`, or ``g`` in
  the viewer): its node approves it and tells the other party (``live.consent``);
- the other party sees the proposal (a notification, the Home screen's line, and
  `radmesh consult guests ID`) and *approves* it (the same approval, from its side)
  or *refuses* it (``live.refuse``: the proposer's node records the refusal);
- once both approved, a node with the session open invites the guest;
- a party that refuses a guest it had approved takes the guest out of its session
  at once, and so does the other party when told; until then, the live hub refuses
  each message of a guest no longer admitted (:meth:`consult.live.LiveHub.expel`).

A guest must be trusted by the node that approves it: a node never vouches for a
key it has not verified. The decisions on stored rows are plain functions of the
consult database (:func:`statuses`); :class:`Guests`, which the runtime builds, sends
and audits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from consult.admission import CLOSED, Admission, GuestRefusal
from consult.errors import LocalConsultError
from consult.store import ConsultDB
from crypto.identity import NodeId
from node.app import cases
from node.app.errors import RuntimeError_
from node.core.audit import AuditKind

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

LIVE_REFUSE_KIND = "live.refuse"


class GuestError(LocalConsultError):
    """A guest proposal, approval or refusal that cannot be done (the text says why)."""


@dataclass(frozen=True)
class GuestStatus:
    """One guest of one consult, as this node's database records it (node ids as text)."""

    consult_id: str
    guest: str
    parties: frozenset[str]
    approvers: frozenset[str]
    refusers: frozenset[str]

    @property
    def state(self) -> str:
        """approved (every party agreed), refused (a party said no) or proposed."""
        if self.parties <= self.approvers and not self.refusers:
            return "approved"
        return "refused" if self.refusers else "proposed"

    def waits_for(self, node: str) -> bool:
        """Another party proposed this guest and ``node`` (a party) has not answered yet."""
        answered = self.approvers | self.refusers
        return node in self.parties and node not in answered and bool(self.approvers)


def statuses(db: ConsultDB, own: str, consult_id: str | None = None) -> list[GuestStatus]:
    """Every guest proposed, approved or refused on this node (of one consult, or all)."""
    found = []
    for cid, guest in db.guests(consult_id):
        found.append(
            GuestStatus(
                cid,
                guest,
                db.parties(cid, own),
                db.guest_approvers(cid, guest),
                db.guest_refusers(cid, guest),
            )
        )
    return found


def pending(db: ConsultDB, own: str) -> list[GuestStatus]:
    """The proposals waiting for this node's answer, on consults still open."""
    return [
        s for s in statuses(db, own) if s.waits_for(own) and db.state_of(s.consult_id) not in CLOSED
    ]


class Guests:
    """One node's guest proposals, approvals and refusals (``rt.guests``)."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt

    def install(self) -> None:
        """Register the refusal handler (``live.refuse``: the other party refused a guest)."""

        async def handle(sender: NodeId, kind: str, wire: bytes) -> None:
            await self.on_refusal(sender, wire)

        self.rt.handlers[LIVE_REFUSE_KIND] = handle

    @property
    def _own(self) -> str:
        return str(self.rt.identity.node_id)

    def _open_consult(self, consult_id: str) -> str:
        """The full id of an open consult this node is a party of."""
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        state = rt.consults.state_of(consult_id)
        if state in CLOSED:
            raise GuestError(
                f"consult {consult_id[:8]} is {state.value}: it has no live session to bring a "
                "guest into"
            )
        if not rt.consults.info(consult_id).peer:
            raise GuestError(
                f"consult {consult_id[:8]} has no consultant yet: a guest needs the approval of "
                "both the requesting hospital and the consultant, so propose it once one "
                "accepted"
            )
        return consult_id

    def _refuse_party(self, consult_id: str, guest: NodeId) -> None:
        if str(guest) in self.rt.consults.parties(consult_id, self._own):
            raise GuestError(
                f"{guest.short()} is a party of consult {consult_id[:8]}, not a guest: it takes "
                "part in the live session already"
            )

    async def _trusted_key(self, guest: NodeId) -> bytes:
        """The guest's public key, which this node must trust (it vouches for that key)."""
        rt = self.rt
        found = await rt.directory.resolve(guest, rt.now())
        if found is None:
            raise GuestError(
                f"{guest.short()} is not known to this node: find it first (`radmesh peers "
                "search`), verify its safety number, then propose it"
            )
        key = found.record.public_key
        if not rt.live_hub().is_trusted(key):
            raise GuestError(
                f"{guest.short()} is not trusted by this node: verify its safety number "
                f"(`radmesh trust verify {guest.short()}`) before approving it as a guest"
            )
        return key

    async def propose(self, consult_id: str, guest: NodeId) -> str:
        """Approve ``guest`` for the consult's live session and tell the other party; invite
        it at once if the other party approved it already. Returns what happened, for a
        person."""
        rt = self.rt
        consult_id = self._open_consult(consult_id)
        self._refuse_party(consult_id, guest)
        key = await self._trusted_key(guest)
        how = await rt.consulting.approve_live_guest(consult_id, key)
        if Admission(rt.consults, rt.identity.node_id).may_join(consult_id, key):
            invited = await self.invite_if_admitted(consult_id, key)
            return f"{guest.short()} approved by both parties; {invited} (other party told: {how})"
        return (
            f"{guest.short()} proposed as a guest of consult {consult_id[:8]}; the other party "
            f"must approve it too (told: {how})"
        )

    async def answer(self, consult_id: str, guest: NodeId, approve: bool) -> str:
        """The other party's answer to a proposal: approve it (as :meth:`propose` does), or
        refuse it (also after approving it: the guest leaves the session)."""
        if approve:
            return await self.propose(consult_id, guest)
        return await self.refuse(consult_id, guest)

    async def refuse(self, consult_id: str, guest: NodeId) -> str:
        """Refuse ``guest`` (or take back this node's approval): recorded, audited, the guest
        taken out of this node's session, and the other party told."""
        rt = self.rt
        consult_id = rt.consults.resolve(consult_id)
        self._refuse_party(consult_id, guest)
        rt.consults.refuse_guest(consult_id, str(guest), self._own)
        rt.audit.append(
            AuditKind.CONSULT,
            now=rt.clock(),
            peer=str(guest),
            details={"consult": consult_id, "event": "live-guest-refused"},
        )
        self.expel(consult_id, guest)
        if not rt.consults.info(consult_id).peer:
            return f"{guest.short()} refused (consult {consult_id[:8]} has no other party yet)"
        other = await cases.other_party_key(rt, consult_id)
        if other is None:
            raise RuntimeError_(
                f"{guest.short()} is refused here, but the other party of consult "
                f"{consult_id[:8]} cannot be reached now to be told: refuse it again later"
            )
        how = await rt.send_message(
            other, LIVE_REFUSE_KIND, GuestRefusal(consult_id, guest).to_wire()
        )
        return f"{guest.short()} refused as a guest of consult {consult_id[:8]}; other party: {how}"

    def expel(self, consult_id: str, guest: NodeId) -> bool:
        """Take ``guest`` out of this node's session on the consult, if it is in it."""
        hub = self.rt.live_hub()
        live = hub.sessions.get(consult_id)
        if live is None:
            return False
        keys = [k for k in (*live.peers, *live.expected) if NodeId.from_public_key(k) == guest]
        return any([hub.expel(consult_id, k) for k in keys])

    async def invite_if_admitted(self, consult_id: str, guest: bytes) -> str:
        """Invite an admitted guest into this node's open session on the consult (a node
        without the session open leaves it to the other party, or to its next opening)."""
        hub = self.rt.live_hub()
        live = hub.sessions.get(consult_id)
        if live is None:
            return "it joins when a party opens the live session"
        if live.is_bound(guest):
            return "it is in the live session"
        await hub.invite(consult_id, guest)
        return "invited into the live session"

    async def _invite_soon(self, consult_id: str, guest: bytes) -> None:
        try:
            await self.invite_if_admitted(consult_id, guest)
        except Exception as exc:  # the transport's and the hub's errors: a person reads them
            self.rt.notify(
                f"Guest {NodeId.from_public_key(guest).short()} of consult {consult_id[:8]} was "
                f"approved by both parties but could not be invited now: {exc}"
            )

    def after_consent(self, consult_id: str, guest: bytes, sender: NodeId) -> None:
        """The other party approved ``guest``: ask this node's person, or (both approved)
        bring the guest into the open session."""
        rt = self.rt
        guest_id = NodeId.from_public_key(guest)
        if rt.consults.state_of(consult_id) in CLOSED:
            return  # no live session to bring anyone into
        if Admission(rt.consults, rt.identity.node_id).may_join(consult_id, guest):
            rt.spawn(self._invite_soon(consult_id, guest))
            return
        if self._own in rt.consults.guest_refusers(consult_id, str(guest_id)):
            return  # refused here already; the refusal stands until a person here approves
        rt.notify(
            f"{sender.short()} proposes {guest_id.short()} as a guest of the live session on "
            f"consult {consult_id[:8]}: approve or refuse it (g on Home, or `radmesh consult "
            f"approve-guest {consult_id[:8]} --guest {guest_id.short()}` [--refuse])"
        )

    async def on_refusal(self, sender: NodeId, wire: bytes) -> None:
        """The other party refused a guest (or took back its approval)."""
        rt = self.rt
        refusal = GuestRefusal.from_wire(wire)
        consult_id = refusal.consult_id
        if rt.consults.info(consult_id).peer_id != sender:
            raise RuntimeError_(
                f"a guest refusal for consult {consult_id[:8]} from {sender.short()}, who is "
                "not its other party, was ignored"
            )
        rt.consults.refuse_guest(consult_id, str(refusal.guest), str(sender))
        rt.audit.append(
            AuditKind.CONSULT,
            now=rt.clock(),
            peer=str(refusal.guest),
            details={"consult": consult_id, "event": "live-guest-refused", "by": str(sender)},
        )
        gone = self.expel(consult_id, refusal.guest)
        rt.notify(
            f"{sender.short()} refused {refusal.guest.short()} as a guest of the live session "
            f"on consult {consult_id[:8]}" + ("; it left the session" if gone else "")
        )


__all__ = [
    "LIVE_REFUSE_KIND",
    "GuestError",
    "GuestStatus",
    "Guests",
    "pending",
    "statuses",
]
