"""What the DICOM listener lets in: who may send (calling AE and address), and how much.

pynetdicom reads a whole PDU (whatever length its header claims, up to 4 GiB)
and keeps a whole data set in memory before any handler sees it; a 400 MiB
instance cost 1.27 GiB. Here:

* :class:`PduMeter` (sans-IO) is fed every PDU header and body as the listener
  reads them. It refuses a PDU longer than ``max_pdu`` from its header, before
  the body is read, and a data set that grows past ``max_instance`` at the PDU
  that crosses the cap. Nothing else is read from that peer: it gets an A-ABORT
  and the connection closes.
* :func:`install_spool` makes pynetdicom write each received data set to a file
  in a spool directory inside the node's 0700 home (its
  ``STORE_RECV_CHUNKED_DATASET`` mode) instead of memory, sealed as it is
  written (:mod:`node.dicom.sealed_spool`); the listener stores the file and deletes
  it, and removes what an aborted association left.
* :class:`AllowList`: ``[dicom] allowed_calling_aets`` (an AE title from any
  address) and ``[dicom] allowed`` (``"AE@address"``: that AE title only from
  that IP address).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pynetdicom import _config, dimse_messages
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.core.errors import NodeError
from node.dicom.sealed_spool import SpoolWriter

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context id, control header
# An A-ABORT-RQ PDU: source 2 (service provider), reason 0 (not specified).
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])
SPOOL_PREFIX = "rx-"


class OverCap(NodeError):
    """A peer sent more than the listener takes; the message says what."""


class AllowListError(NodeError):
    """An ``[dicom] allowed`` entry is not ``AE@address``."""


@dataclass
class PduMeter:
    """Counts one association's incoming PDUs; raises :class:`OverCap` past a cap."""

    max_pdu: int
    max_instance: int
    data_set: int = 0  # bytes of the data set being received
    _body_type: int | None = None

    def header(self, header: bytes) -> int:
        """The 6-byte PDU header; returns the body length to read."""
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if length > self.max_pdu:
            raise OverCap(f"a {length}-byte PDU (the listener takes {self.max_pdu})")
        self._body_type = pdu_type
        return int(length)

    def body(self, body: bytes) -> None:
        """The body of the PDU whose header came last."""
        if self._body_type != P_DATA_TF:
            return
        offset = 0
        while offset + PDV_HEADER.size <= len(body):
            length, _context, control = PDV_HEADER.unpack_from(body, offset)
            if control & 1:  # a command fragment: the next message begins
                self.data_set = 0
            else:
                self.data_set += max(0, length - 2)
                if self.data_set > self.max_instance:
                    raise OverCap(
                        f"an instance of more than {self.max_instance} bytes (the listener's cap)"
                    )
            offset += 4 + length


# -- where pynetdicom writes received data sets ----------------------------------------------

_spool = threading.local()  # set in each association's reader thread (see MeteredSocket)
# pynetdicom names the received data set's file with this (delete=False, system temp dir)
_original_temp_file: Callable[..., IO[bytes]] = getattr(dimse_messages, "NamedTemporaryFile")  # noqa: B009
_install_lock = threading.Lock()


def _spool_temp_file(*args: Any, **kwargs: Any) -> Any:
    directory = getattr(_spool, "directory", None)
    if directory is not None:  # one of our associations: sealed, in the home's spool
        return SpoolWriter(directory, _spool.prefix, _spool.key)
    return _original_temp_file(*args, **kwargs)


def install_spool() -> None:
    """Received C-STORE data sets go to a file (sealed, in the association's spool
    directory: :mod:`node.dicom.sealed_spool`), not memory. Process-wide in pynetdicom; other
    SCPs in the process get ``event.dataset_path`` too, a plain file in the system's
    temp directory."""
    with _install_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        setattr(dimse_messages, "NamedTemporaryFile", _spool_temp_file)  # noqa: B010


def clear_spool(directory: Path, prefix: str = SPOOL_PREFIX) -> int:
    """Remove received data sets left in ``directory`` (one association's, or all)."""
    removed = 0
    for path in directory.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


# -- the socket pynetdicom reads from --------------------------------------------------------

OnOverCap = Callable[[str, str], None]  # (peer address, what was over the cap)


class MeteredSocket(AssociationSocket):
    """pynetdicom's socket for one association, metered by a :class:`PduMeter`.

    pynetdicom's reader calls ``recv(6)`` for a PDU header, then ``recv(length)``
    for its body, alternately. Over a cap this sends an A-ABORT and answers with
    no bytes, which pynetdicom takes as the connection closing."""

    meter: PduMeter
    spool_directory: Path | None  # None: an association this node opened (no spool)
    spool_prefix: str
    spool_key: bytes
    on_over_cap: OnOverCap
    _expect_body: bool
    _refused: bool

    def recv(self, nr_bytes: int) -> bytearray:
        _spool.directory, _spool.prefix = self.spool_directory, self.spool_prefix
        _spool.key = self.spool_key
        if self._refused:
            return bytearray()
        try:
            if not self._expect_body:
                data = super().recv(nr_bytes)
                if len(data) == PDU_HEADER.size:
                    self.meter.header(bytes(data))
                    self._expect_body = True
                return data
            self._expect_body = False
            data = super().recv(nr_bytes)
            self.meter.body(bytes(data))
            return data
        except OverCap as exc:
            self._refuse(str(exc))
            return bytearray()

    def _refuse(self, what: str) -> None:
        self._refused = True
        with contextlib.suppress(OSError):
            self.send(A_ABORT)
        peer = "?"
        with contextlib.suppress(OSError, AttributeError, TypeError):
            peer = str(self.socket.getpeername()[0])  # type: ignore[union-attr]
        self.on_over_cap(peer, what)


def metered_handler(
    limits: tuple[int, int], spool: Path, spool_key: bytes, on_over_cap: OnOverCap
) -> type[RequestHandler]:
    """A pynetdicom request handler whose associations read through a MeteredSocket."""
    counter = iter(range(1 << 62))
    count_lock = threading.Lock()

    class Handler(RequestHandler):
        def _create_association(self) -> Any:
            assoc = super()._create_association()
            with count_lock:
                number = next(counter)
            sock = _metered(assoc.dul.socket, limits, on_over_cap)
            sock.spool_directory, sock.spool_key = spool, spool_key
            sock.spool_prefix = f"{SPOOL_PREFIX}{os.getpid()}-{number}-"
            return assoc

    return Handler


def _metered(sock: Any, limits: tuple[int, int], on_over_cap: OnOverCap) -> MeteredSocket:
    assert isinstance(sock, AssociationSocket)  # noqa: S101 - pynetdicom made it
    sock.__class__ = MeteredSocket  # same object and state, metered recv
    assert isinstance(sock, MeteredSocket)  # noqa: S101 - for mypy
    sock.meter = PduMeter(*limits)
    sock.spool_directory, sock.spool_key, sock.spool_prefix = None, b"", ""
    sock.on_over_cap = on_over_cap
    sock._expect_body = False
    sock._refused = False
    return sock


def meter_client(ae: Any, limits: tuple[int, int], on_over_cap: OnOverCap) -> None:
    """Meter the associations ``ae`` opens (C-FIND, C-MOVE, C-GET as SCU) from their first
    PDU, as the listener's are: a PACS answering with a PDU or a data set over the caps
    gets an A-ABORT, and nothing of it is allocated."""
    create = ae._create_socket

    def metered_socket(*args: Any) -> MeteredSocket:
        return _metered(create(*args), limits, on_over_cap)

    ae._create_socket = metered_socket


def spool_prefix_of(assoc: Any) -> str | None:
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    return sock.spool_prefix if isinstance(sock, MeteredSocket) else None


# -- who may send ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowList:
    """Calling AE titles allowed from any address, and (AE, address) pairs."""

    anywhere: frozenset[str]
    pairs: frozenset[tuple[str, str]]

    @classmethod
    def parse(cls, any_address: list[str], pairs: list[str]) -> AllowList:
        parsed = set()
        for entry in pairs:
            ae, at, address = entry.strip().rpartition("@")
            ae = ae.strip()
            try:
                ip = ipaddress.ip_address(address.strip())
            except ValueError:
                ip = None
            if not (at and ae and len(ae) <= 16 and ip is not None):
                raise AllowListError(
                    f"[dicom] allowed entry {entry!r} is not AE@address: write the PACS's "
                    'calling AE title and its IP address, e.g. "PACS@10.0.0.5"'
                )
            parsed.add((ae, ip.compressed))
        return cls(frozenset(a.strip() for a in any_address if a.strip()), frozenset(parsed))

    @property
    def calling_aets(self) -> list[str]:
        """Every AE title that may call from somewhere (pynetdicom's first check)."""
        return sorted(self.anywhere | {ae for ae, _ in self.pairs})

    def allows(self, calling_ae: str, address: str) -> bool:
        if calling_ae in self.anywhere:
            return True
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(address)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return (calling_ae, ip.compressed) in self.pairs
        return False

    def addresses_of(self, calling_ae: str) -> list[str]:
        return sorted(address for ae, address in self.pairs if ae == calling_ae)


__all__ = [
    "AllowList",
    "AllowListError",
    "MeteredSocket",
    "OverCap",
    "PduMeter",
    "clear_spool",
    "install_spool",
    "metered_handler",
    "spool_prefix_of",
]
