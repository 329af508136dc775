"""Who may take part in a consult's live session (sans-IO: decisions, no I/O).

The parties of a consult are the requesting node and the consultant who
accepted it; :class:`~consult.store.ConsultDB` knows both. Anyone else is a
guest, admitted only when **every** party approved that guest: a party that
invites a guest approves it, and the other party approves it on its own node
(``radmesh``'s :func:`node.workflow.approve_live_guest`), which also tells the
first party so (a :class:`GuestConsent` node message, signed and sealed by the
runtime like every node message). So a consultant cannot bring a colleague
into the hospital's case without the hospital's node agreeing, and vice versa.

:meth:`Admission.may_join` is what :class:`~consult.live.LiveHub` asks before it
binds a peer to a session (an invite it sends or answers, a join it answers or
makes). It answers None for a consult this node has no record of (an ad-hoc
session, or one this node was invited into as a guest): the hub then admits
only peers it invited, the peer that invited it, the members that inviter
named, and joiners holding a ticket signed by one of those (see
:class:`~consult.live.Invite`).
"""

from __future__ import annotations

from dataclasses import dataclass

from consult.errors import MalformedMessage, UnknownConsult
from consult.store import ConsultDB
from crypto import canonical
from crypto.identity import PUBLIC_KEY_SIZE, NodeId

MAX_CONSENT = 512


class Admission:
    """The runtime's admission policy for live sessions, read from the consult database."""

    def __init__(self, consults: ConsultDB, own: NodeId) -> None:
        self._consults = consults
        self._own = str(own)

    def may_join(self, consult_id: str, peer: bytes) -> bool | None:
        """True: a party, or a guest every party approved. False: refuse. None: no
        consult of that id on this node (the hub's own invitations decide)."""
        try:
            parties = self._consults.parties(consult_id, self._own)
        except UnknownConsult:
            return None
        node = str(NodeId.from_public_key(peer))
        if node in parties:
            return True
        return parties <= self._consults.guest_approvers(consult_id, node)


@dataclass(frozen=True)
class GuestConsent:
    """A party's approval of ``guest`` (public key) in the live session on ``consult_id``."""

    consult_id: str
    guest: bytes

    def to_wire(self) -> bytes:
        return canonical.encode({"consult": self.consult_id, "guest": self.guest})

    @classmethod
    def from_wire(cls, data: bytes) -> GuestConsent:
        if len(data) > MAX_CONSENT:
            raise MalformedMessage(f"guest consent is {len(data)} bytes, limit is {MAX_CONSENT}")
        try:
            raw = canonical.decode(data, max_size=MAX_CONSENT)
            consult_id, guest = raw["consult"], raw["guest"]
        except Exception as exc:  # canonical raises its own CryptoError family
            raise MalformedMessage(f"guest consent does not parse: {exc}") from exc
        if not (
            isinstance(consult_id, str)
            and 0 < len(consult_id.encode()) <= 64
            and isinstance(guest, bytes)
            and len(guest) == PUBLIC_KEY_SIZE
        ):
            raise MalformedMessage("guest consent has the wrong shape")
        return cls(consult_id, guest)


__all__ = ["Admission", "GuestConsent"]
