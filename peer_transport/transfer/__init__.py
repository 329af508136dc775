"""Study transfer: one study moved between two nodes, pulled by the receiver, checked
against a signed manifest, resumable after a crash on either side.

One idea per module, from the bytes up:

- :mod:`.errors` the error base, split into this node's mistakes and the peer's;
- :mod:`.messages` the wire messages (frozen dataclasses, ``to_wire`` / ``from_wire``);
- :mod:`.manifest` the signed manifest and the receiver's budgets;
- :mod:`.instance` what the transfer demands of a DICOM instance, on each side;
- :mod:`.machine` the transfer's state, as a transition table;
- :mod:`.spool` the sealed on-disk spools (receiver's resumable, sender's throwaway);
- :mod:`.progress` the numbers a person reads;
- :mod:`.sender` / :mod:`.receiver` the two sans-IO protocol ends;
- :mod:`.prepared` a study signed for, then encoded while it is sent;
- :mod:`.serving` the sending end run over a link (offer, encode, declare, serve);
- :mod:`.audit` the typed audit sink and the two records written;
- :mod:`.runner` both ends run over a link, with a store and an audit log.

New code imports from the module it needs. The names below are re-exported so that
``from peer_transport import transfer as tr; tr.Chunk`` keeps working for callers
written before the package existed.
"""

from peer_transport.transfer.errors import (
    ChunkRejected,
    DecompressionBomb,
    IllegalTransition,
    InstanceRejected,
    LocalTransferError,
    MalformedMessage,
    ManifestMismatch,
    RemoteTransferError,
    TransferCancelled,
    TransferError,
)
from peer_transport.transfer.instance import decode_part, describe_instance, prepare_instance
from peer_transport.transfer.machine import TABLE, TRANSITIONS, Event, Machine, State
from peer_transport.transfer.manifest import (
    EXPANSION_FLOOR,
    MANIFEST_TYPE,
    MANIFEST_VERSION,
    MAX_DECLARATIONS,
    MAX_EXPANSION,
    MAX_INSTANCE_SIZE,
    MAX_INSTANCES,
    MAX_STUDY_SIZE,
    WIRE_SLACK,
    WIRE_TYPE,
    Manifest,
    ManifestEntry,
    WireDeclaration,
    build_manifest,
    open_wires,
    sign_wires,
    wire_digest,
    within_budget,
)
from peer_transport.transfer.messages import (
    CHUNK_DIGEST_SIZE,
    CHUNK_SIZE,
    MAX_CHUNK_MESSAGE,
    MAX_CONTROL_MESSAGE,
    MAX_MANIFEST_SIZE,
    MAX_OFFERS_ASSEMBLED,
    MAX_SEQS_PER_REQUEST,
    TRANSFER_ID_SIZE,
    Cancel,
    Chunk,
    Declare,
    Finished,
    Hurry,
    Message,
    OfferAssembler,
    OfferPart,
    Request,
    ResumeRequest,
    chunk_digest,
    from_wire,
    offer_parts,
    peek,
    to_wire,
)
from peer_transport.transfer.progress import Progress
from peer_transport.transfer.receiver import (
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    JOURNAL_FILE,
    MANIFEST_FILE,
    MAX_ACTIVE_INSTANCES,
    MAX_INSTANCE_ATTEMPTS,
    STATE_FILE,
    Receiver,
    resume_request,
)
from peer_transport.transfer.sender import REOFFER_MIN_INTERVAL, Sender
from peer_transport.transfer.spool import RECEIPT_SIZE, SPOOL_KEY_PURPOSE, SenderSpool, Spool

__all__ = [
    "CHUNK_DIGEST_SIZE",
    "CHUNK_SIZE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "EXPANSION_FLOOR",
    "JOURNAL_FILE",
    "MANIFEST_FILE",
    "MANIFEST_TYPE",
    "MANIFEST_VERSION",
    "MAX_ACTIVE_INSTANCES",
    "MAX_CHUNK_MESSAGE",
    "MAX_CONTROL_MESSAGE",
    "MAX_DECLARATIONS",
    "MAX_EXPANSION",
    "MAX_INSTANCES",
    "MAX_INSTANCE_ATTEMPTS",
    "MAX_INSTANCE_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_OFFERS_ASSEMBLED",
    "MAX_SEQS_PER_REQUEST",
    "MAX_STUDY_SIZE",
    "RECEIPT_SIZE",
    "REOFFER_MIN_INTERVAL",
    "SPOOL_KEY_PURPOSE",
    "STATE_FILE",
    "TABLE",
    "TRANSFER_ID_SIZE",
    "TRANSITIONS",
    "WIRE_SLACK",
    "WIRE_TYPE",
    "Cancel",
    "Chunk",
    "ChunkRejected",
    "Declare",
    "DecompressionBomb",
    "Event",
    "Finished",
    "Hurry",
    "IllegalTransition",
    "InstanceRejected",
    "LocalTransferError",
    "Machine",
    "MalformedMessage",
    "Manifest",
    "ManifestEntry",
    "ManifestMismatch",
    "Message",
    "OfferAssembler",
    "OfferPart",
    "Progress",
    "Receiver",
    "RemoteTransferError",
    "Request",
    "ResumeRequest",
    "Sender",
    "SenderSpool",
    "Spool",
    "State",
    "TransferCancelled",
    "TransferError",
    "WireDeclaration",
    "build_manifest",
    "chunk_digest",
    "decode_part",
    "describe_instance",
    "from_wire",
    "offer_parts",
    "open_wires",
    "peek",
    "prepare_instance",
    "resume_request",
    "sign_wires",
    "to_wire",
    "wire_digest",
    "within_budget",
]
