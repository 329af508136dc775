"""Who may take part in a consult's live session (sans-IO: decisions, no I/O).

The parties of a consult are the requesting node and the consultant who
accepted it; :class:`~consult.store.ConsultDB` knows both. Anyone else is a
guest, admitted only when **every** party approved that guest: a party that
invites a guest approves it, and the other party approves it on its own node
(``radmesh``'s :meth:`node.app.consults.ConsultService.approve_live_guest`), which also tells the
first party so (a :class:`GuestConsent` node message, signed and sealed by the
runtime like every node message). So a consultant cannot bring a colleague
into the hospital's case without the hospital's node agreeing, and vice versa.
A party may refuse a guest, also after approving it (:class:`GuestRefusal`,
:mod:`node.app.guests`); a consult withdrawn, declined or expired admits nobody.
The hub asks again for every live and presence message, so a peer whose
admission ends is dropped at its next message even if nothing expelled it.

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
from consult.requests import State
from consult.store import ConsultDB
from crypto import canonical
from crypto.identity import PUBLIC_KEY_SIZE, NodeId

MAX_CONSENT = 512
# A consult in one of these states has no live session: its parties and guests are refused.
CLOSED = frozenset({State.WITHDRAWN, State.DECLINED, State.EXPIRED})


class Admission:
    """The runtime's admission policy for live sessions, read from the consult database."""

    def __init__(self, consults: ConsultDB, own: NodeId) -> None:
        self._consults = consults
        self._own = str(own)

    def may_join(self, consult_id: str, peer: bytes) -> bool | None:
        """True: a party, or a guest every party approved. False: refuse (also everyone
        once the consult is withdrawn, declined or expired). None: no consult of that id on
        this node (the hub's own invitations decide). Asked again for every live message."""
        try:
            parties = self._consults.parties(consult_id, self._own)
            if self._consults.state_of(consult_id) in CLOSED:
                return False  # withdrawn, declined or expired: no live session for anyone
        except UnknownConsult:
            return None
        node = str(NodeId.from_public_key(peer))
        if node in parties:
            return True
        return parties <= self._consults.guest_approvers(consult_id, node)


def _consult_and_guest(data: bytes, what: str, key: str, size: int) -> tuple[str, bytes]:
    """(consult id, guest bytes of ``size``) of a consent or refusal: its size checked
    before it is decoded, then each field's type; MalformedMessage otherwise."""
    if len(data) > MAX_CONSENT:
        raise MalformedMessage(f"{what} is {len(data)} bytes, limit is {MAX_CONSENT}")
    try:
        raw = canonical.decode(data, max_size=MAX_CONSENT)
        consult_id, guest = raw["consult"], raw[key]
    except Exception as exc:  # canonical raises its own CryptoError family
        raise MalformedMessage(f"{what} does not parse: {exc}") from exc
    if not (
        isinstance(consult_id, str)
        and 0 < len(consult_id.encode()) <= 64
        and isinstance(guest, bytes)
        and len(guest) == size
    ):
        raise MalformedMessage(f"{what} has the wrong shape")
    return consult_id, guest


@dataclass(frozen=True)
class GuestConsent:
    """A party's approval of ``guest`` (public key) in the live session on ``consult_id``."""

    consult_id: str
    guest: bytes

    def to_wire(self) -> bytes:
        return canonical.encode({"consult": self.consult_id, "guest": self.guest})

    @classmethod
    def from_wire(cls, data: bytes) -> GuestConsent:
        consult_id, guest = _consult_and_guest(data, "guest consent", "guest", PUBLIC_KEY_SIZE)
        return cls(consult_id, guest)


@dataclass(frozen=True)
class GuestRefusal:
    """A party's refusal of the guest whose node id is ``guest`` in the live session on
    ``consult_id`` (a proposal it turns down, or an approval it takes back). It carries the
    node id, not the key: a node refuses a guest it never resolved too."""

    consult_id: str
    guest: NodeId

    def to_wire(self) -> bytes:
        return canonical.encode({"consult": self.consult_id, "guest_id": self.guest.digest})

    @classmethod
    def from_wire(cls, data: bytes) -> GuestRefusal:
        consult_id, guest = _consult_and_guest(data, "guest refusal", "guest_id", 32)
        return cls(consult_id, NodeId(guest))


__all__ = ["CLOSED", "Admission", "GuestConsent", "GuestRefusal"]
