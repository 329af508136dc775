"""DICOM networking with the hospital: C-ECHO / C-STORE as SCP and SCU (pynetdicom).

The listener lets a PACS or a modality push studies into the node; the SCU pushes
studies (and reports) back. Both keep the bytes exact:

* Received: the stored file is the 128-byte preamble, ``DICM``, the File Meta
  Information group pynetdicom builds for the association (transfer syntax,
  SOP class/instance, its implementation UID), then the data set **exactly as
  the peer sent it**, never decoded and re-encoded. So the data set part is
  byte-exact; the file meta group is new. It is streamed to a sealed spool file
  (:mod:`node.dicom.sealed_spool`), never held in memory whole nor in clear on disk,
  and a peer past the size cap is aborted as it crosses it
  (:mod:`node.dicom.guard`, which also checks who may send: AE and address).
  The file meta never carries the calling AE title, which names a hospital
  device and would travel in every copy.
* Sent: each instance goes out in its own transfer syntax, the data set streamed
  from the stored bytes without decoding (pynetdicom's chunked send reading an
  in-memory ``memfd``), so the receiver gets byte-identical data set bytes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from node.core.config import DicomConfig
from node.core.errors import NodeError
from node.dicom.guard import (
    AllowList,
    clear_spool,
    install_spool,
    metered_handler,
    spool_prefix_of,
)
from node.dicom.qrscp import Archive, QueryRetrieveSCP, parse_destinations
from node.dicom.sealed_spool import SpoolCorrupted, new_key, open_spooled

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
QR_SOP_CLASSES = (
    UID("1.2.840.10008.5.1.4.1.2.2.1"),  # Study Root Query/Retrieve - FIND
    UID("1.2.840.10008.5.1.4.1.2.2.2"),  # Study Root Query/Retrieve - MOVE
    UID("1.2.840.10008.5.1.4.1.2.2.3"),  # Study Root Query/Retrieve - GET
)

# Transfer syntaxes the listener accepts for every storage SOP class.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# DIMSE statuses (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

# An association whose data set grows past this is aborted as it crosses it.
MAX_INSTANCE_BYTES = 2 * 1024**3
# The longest PDU read from a peer (we offer 16 KiB P-DATA; an A-ASSOCIATE-RQ with
# 128 presentation contexts is under 64 KiB): refused from its header, unread.
MAX_PDU_BYTES = 1024 * 1024
MAX_ASSOCIATIONS = 16
CHECK_DEFER_BYTES = 64 * 1024  # values this long are not read by the parse check
# pynetdicom proposes at most 128 presentation contexts per association.
_MAX_CONTEXTS = 128

InstanceSink = Callable[[bytes, str], None]
# (seekable Part-10 stream, its size, calling AE): valid during the call only
StreamSink = Callable[[IO[bytes], int, str], None]
AuditSink = Callable[[str, dict[str, str]], None]


class DicomNetError(NodeError):
    """A DICOM network operation failed."""


class DicomPeerError(DicomNetError):
    """The remote DICOM peer refused, aborted or could not be reached."""


class BadInstanceError(DicomNetError):
    """Raised by an ``on_instance`` sink when the data is not usable DICOM (status 0xC000)."""


class DicomListener:
    """C-ECHO and C-STORE SCP in pynetdicom's own thread.

    ``on_instance(part10_bytes, calling_ae)`` is called for every received
    instance, from a pynetdicom thread; it should store the bytes and return.
    With ``on_stream(stream, size, calling_ae)`` instead it reads the instance from
    the sealed spool file, so the instance need not be in memory. If it raises
    :class:`BadInstanceError` (or any exception type listed in ``bad_data_errors``)
    the peer gets 0xC000 "cannot understand"; any other exception gives 0xA700
    "out of resources" so the sender retries later.
    """

    def __init__(
        self,
        config: DicomConfig,
        on_instance: InstanceSink | None = None,
        *,
        on_stream: StreamSink | None = None,
        spool_dir: Path | None = None,
        audit: AuditSink | None = None,
        bad_data_errors: tuple[type[Exception], ...] = (),
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
        max_pdu_bytes: int = MAX_PDU_BYTES,
        archive: Archive | None = None,
    ) -> None:
        """``spool_dir``: where received data sets are written (a 0700 directory in the
        node's home); by default a private temporary directory. With ``archive`` (the
        node's store) the listener also answers C-FIND, C-GET and C-MOVE from it
        (:mod:`node.dicom.qrscp`), to the same allowed callers."""
        if (on_instance is None) == (on_stream is None):
            raise ValueError("give exactly one of on_instance and on_stream")
        self._config = config
        self._on_instance = on_instance
        self._on_stream = on_stream
        self._audit = audit
        self._bad_data_errors: tuple[type[Exception], ...] = (BadInstanceError, *bad_data_errors)
        self._max_instance_bytes = max_instance_bytes
        self._max_pdu_bytes = max_pdu_bytes
        self._allow = AllowList.parse(config.allowed_calling_aets, config.allowed)
        self._allowed = self._allow.calling_aets
        self._spool_dir = spool_dir
        self._own_spool = False
        self._spool_key = new_key()  # in memory only: a crash leaves ciphertext
        self._ae: Any = None
        self._server: Any = None
        self._lock = threading.Lock()
        self.received = 0
        self.over_cap = 0  # associations aborted for sending too much
        self._qr = (
            None
            if archive is None
            else QueryRetrieveSCP(archive, parse_destinations(config.move_destinations), self._emit)
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise DicomNetError("the DICOM listener is not running")
        port: int = self._server.server_address[1]
        return port

    @property
    def ae_title(self) -> str:
        return self._config.ae_title

    def start(self) -> None:
        if self._server is not None:
            return
        if not self._allowed:
            raise DicomNetError(
                "no calling AE title is allowed to send to this node: add the PACS as "
                '[dicom] allowed = ["PACSAE@its.ip.address"] (or its AE title to '
                "allowed_calling_aets, from any address) in config.toml"
            )
        ae = AE(ae_title=self._config.ae_title)
        ae.require_calling_aet = self._allowed
        ae.require_called_aet = True
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.add_supported_context(VERIFICATION)
        for context in AllStoragePresentationContexts:
            # Both roles: a C-STORE from the PACS, and the node's C-STORE back inside a
            # C-GET that a workstation asked for (it proposes the SCP role).
            ae.add_supported_context(
                str(context.abstract_syntax),
                list(ACCEPTED_TRANSFER_SYNTAXES),
                scu_role=self._qr is not None,
                scp_role=self._qr is not None,
            )
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
        ]
        if self._qr is not None:
            for sop_class in QR_SOP_CLASSES:
                ae.add_supported_context(sop_class)
            handlers += [
                (evt.EVT_C_FIND, self._qr.handle_find),
                (evt.EVT_C_GET, self._qr.handle_get),
                (evt.EVT_C_MOVE, self._qr.handle_move),
            ]
        spool = self._open_spool()
        install_spool()
        try:
            server = ae.make_server(
                (self._config.host, self._config.port),
                evt_handlers=handlers,
                server_class=ThreadedAssociationServer,
                request_handler=metered_handler(
                    (self._max_pdu_bytes, self._max_instance_bytes),
                    spool,
                    self._spool_key,
                    self._over_cap,
                ),
            )
        except OSError as exc:
            raise DicomNetError(
                f"cannot listen for DICOM on {self._config.host}:{self._config.port} ({exc}); "
                "choose another [dicom] port or stop the program using it"
            ) from exc
        ae._servers.append(server)  # as ae.start_server(block=False) does: shutdown stops it
        threading.Thread(
            target=server.serve_forever, name="radmesh-dicom-listener", daemon=True
        ).start()
        self._server = server
        self._ae = ae
        log.info("DICOM listener %s on %s:%d", self._config.ae_title, self._config.host, self.port)

    def stop(self) -> None:
        server, ae = self._server, self._ae
        self._server = self._ae = None
        if server is not None:
            server.shutdown()
        if ae is not None:
            ae.shutdown()
        if self._spool_dir is not None:
            clear_spool(self._spool_dir)
            if self._own_spool:
                shutil.rmtree(self._spool_dir, ignore_errors=True)
                self._spool_dir = None

    def _open_spool(self) -> Path:
        if self._spool_dir is None:
            self._spool_dir = Path(tempfile.mkdtemp(prefix="radmesh-dicom-"))  # 0700
            self._own_spool = True
        self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._spool_dir, 0o700)
        clear_spool(self._spool_dir)  # what a crashed listener left
        return self._spool_dir

    def __enter__(self) -> DicomListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers (run in pynetdicom threads) --------------------------------

    def _handle_rejected(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        if calling not in self._allowed:
            log.warning(
                "refused DICOM association from calling AE %r at %s: not in "
                "[dicom] allowed_calling_aets; add it there to allow it",
                calling,
                event.assoc.requestor.address,
            )
        else:
            log.warning(
                "refused DICOM association from %r: it called AE %r, this node is %r",
                calling,
                str(event.assoc.requestor.primitive.called_ae_title).strip(),
                self._config.ae_title,
            )
        self._emit("dicom.refused", {"calling_ae": calling})

    def _handle_requested(self, event: Any) -> None:
        """An allowed AE title from an address its ``[dicom] allowed`` entry does not
        name is refused as an unknown caller (pynetdicom checks the AE title alone)."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if calling not in self._allowed or self._allow.allows(calling, address):
            return  # allowed, or pynetdicom refuses the unknown AE title itself
        log.warning(
            "refused DICOM association from calling AE %r at %s: [dicom] allowed lists it "
            "only from %s; add %s@%s there if that address is really the PACS",
            calling,
            address,
            ", ".join(self._allow.addresses_of(calling)),
            calling,
            address,
        )
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE unknown
        self._emit("dicom.refused", {"calling_ae": calling, "address": address})
        assoc.kill()

    def _over_cap(self, address: str, what: str) -> None:
        with self._lock:
            self.over_cap += 1
        log.warning(
            "aborted the DICOM association from %s: it sent %s; raise the cap only if "
            "such instances are expected",
            address,
            what,
        )
        self._emit("dicom.over_cap", {"address": address, "what": what})

    def _handle_closed(self, event: Any) -> None:
        prefix = spool_prefix_of(event.assoc)
        if prefix is not None and self._spool_dir is not None:
            clear_spool(self._spool_dir, prefix)  # the partial data set of an aborted store

    def _handle_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            path = Path(event.dataset_path)
        except (AttributeError, TypeError):  # a C-STORE request without a data set
            log.warning("C-STORE from %s carried no data set", calling)
            return STATUS_CANNOT_UNDERSTAND
        try:
            return self._store_file(path, calling, event)
        finally:
            path.unlink(missing_ok=True)

    def _store_file(self, path: Path, calling: str, event: Any) -> int:
        try:
            stream, size = open_spooled(path, self._spool_key)
        except (OSError, SpoolCorrupted) as exc:
            log.error("the spooled instance from %s is unusable: %s", calling, exc)
            return STATUS_OUT_OF_RESOURCES
        with stream:
            return self._store_stream(stream, size, calling, event)

    def _store_stream(self, stream: IO[bytes], size: int, calling: str, event: Any) -> int:
        if size > self._max_instance_bytes:
            log.warning("refused a %d-byte instance from %s: over the size cap", size, calling)
            return STATUS_OUT_OF_RESOURCES
        try:
            _check_parses(stream)
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError) as exc:
            log.warning("instance from %s is not readable DICOM: %s", calling, type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        except SpoolCorrupted as exc:
            log.error("the spooled instance from %s is unusable: %s", calling, exc)
            return STATUS_OUT_OF_RESOURCES
        try:
            stream.seek(0)
            if self._on_stream is not None:
                self._on_stream(stream, size, calling)
            elif self._on_instance is not None:
                self._on_instance(stream.read(), calling)
        except self._bad_data_errors as exc:
            log.warning("instance from %s rejected by the store: %s", calling, exc)
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:
            log.error("could not store an instance from %s: %s", calling, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        self._emit(
            "dicom.received",
            {
                "calling_ae": calling,
                "sop_instance_uid": str(event.request.AffectedSOPInstanceUID),
            },
        )
        return STATUS_SUCCESS

    def _emit(self, kind: str, details: dict[str, str]) -> None:
        if self._audit is None:
            return
        try:
            self._audit(kind, details)
        except Exception:
            log.exception("audit sink failed for %s", kind)


def _check_parses(part10: IO[bytes]) -> None:
    """Decode the data set once (every element but bulk values left on disk) so garbage
    is refused with 0xC000."""
    part10.seek(0)
    ds = pydicom.dcmread(part10, force=False, defer_size=CHECK_DEFER_BYTES)
    _decode_all(ds)
    if "SOPInstanceUID" not in ds:
        raise ValueError("no SOP Instance UID")


def _decode_all(ds: pydicom.Dataset) -> None:
    for raw in list(ds.elements()):
        if getattr(raw, "value", b"") is None and getattr(raw, "length", 0) > 0:
            continue  # deferred bulk data (pixels): read by the store, not held here
        elem = ds[raw.tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


# -- SCU -----------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceResult:
    sop_instance_uid: str
    status: int | None  # None: not sent (no accepted context, or association lost)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (
            self.status == STATUS_SUCCESS or 0xB000 <= self.status <= 0xBFFF
        )


@dataclass(frozen=True)
class SendReport:
    results: tuple[InstanceResult, ...] = field(default_factory=tuple)

    @property
    def sent(self) -> int:
        return sum(1 for r in self.results if r.ok)

    @property
    def failed(self) -> tuple[InstanceResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class _Outgoing:
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _outgoing(item: bytes | Path) -> _Outgoing:
    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    try:
        file_meta = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        ).file_meta
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise DicomNetError(f"not a DICOM Part-10 file: {exc}") from exc
    missing = [
        kw
        for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        if kw not in file_meta
    ]
    if missing:
        raise DicomNetError(f"cannot send: file meta lacks {', '.join(missing)}")
    return _Outgoing(
        data,
        str(file_meta.MediaStorageSOPClassUID),
        str(file_meta.MediaStorageSOPInstanceUID),
        str(file_meta.TransferSyntaxUID),
    )


@contextmanager
def _memfile(data: bytes) -> Iterator[Path]:
    """An in-memory file with a path, so decrypted PHI never touches the disk."""
    fd = os.memfd_create("radmesh-dicom", 0)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _contexts(items: Sequence[_Outgoing]) -> list[Any]:
    wanted: dict[tuple[str, str], None] = {}
    for item in items:
        wanted.setdefault((item.sop_class_uid, item.transfer_syntax), None)
    if len(wanted) > _MAX_CONTEXTS:
        raise DicomNetError(
            f"{len(wanted)} SOP class / transfer syntax pairs: more than one association "
            f"can carry ({_MAX_CONTEXTS}); send the study in parts"
        )
    return [build_context(sop, [ts]) for sop, ts in wanted]


@contextmanager
def association(
    ae: AE, host: str, port: int, called_ae: str, timeout: float, hint: str, **kwargs: Any
) -> Iterator[Any]:
    """``ae`` associated with ``called_ae@host:port`` (every timeout ``timeout`` s), released
    and shut down however the block ends; a refusal is a DicomPeerError ending ``hint``."""
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae, **kwargs)
    if not assoc.is_established:
        ae.shutdown()
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DicomPeerError(f"association with {called_ae}@{host}:{port} {reason}: {hint}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _scu(
    host: str, port: int, called_ae: str, calling_ae: str, contexts: list[Any], timeout: float
) -> AbstractContextManager[Any]:
    hint = (
        "check the host, port and called AE title, and that the peer accepts calling AE "
        f"{calling_ae!r}"
    )
    ae = AE(ae_title=calling_ae)
    return association(ae, host, port, called_ae, timeout, hint, contexts=contexts)


def send_to_pacs(
    files_or_bytes: Iterable[bytes | Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "RADMESH",
    *,
    timeout: float = 30.0,
) -> SendReport:
    """C-STORE every instance to ``called_ae@host:port``, each in its own transfer syntax."""
    items = [_outgoing(item) for item in files_or_bytes]
    if not items:
        return SendReport()
    # Stream data set bytes unchanged from the (in-memory) file instead of re-encoding.
    _config.STORE_SEND_CHUNKED_DATASET = True
    results: list[InstanceResult] = []
    with _scu(host, port, called_ae, calling_ae, _contexts(items), timeout) as assoc:
        for item in items:
            results.append(_send_one(assoc, item))
    return SendReport(tuple(results))


def _send_one(assoc: Any, item: _Outgoing) -> InstanceResult:
    if not assoc.is_established:
        return InstanceResult(item.sop_instance_uid, None, "association lost")
    try:
        with _memfile(item.data) as path:
            status = assoc.send_c_store(path)
    except ValueError as exc:  # no accepted presentation context for this instance
        return InstanceResult(item.sop_instance_uid, None, str(exc))
    if "Status" not in status:
        return InstanceResult(item.sop_instance_uid, None, "no response from the peer")
    code = int(status.Status)
    return InstanceResult(item.sop_instance_uid, code, "" if code == 0 else f"status 0x{code:04X}")


def echo(
    host: str, port: int, called_ae: str, calling_ae: str = "RADMESH", *, timeout: float = 10.0
) -> int:
    """C-ECHO the peer; returns the DIMSE status (0 is success)."""
    with _scu(host, port, called_ae, calling_ae, [build_context(VERIFICATION)], timeout) as assoc:
        status = assoc.send_c_echo()
    if "Status" not in status:
        raise DicomPeerError(f"no C-ECHO response from {called_ae}@{host}:{port}")
    code: int = int(status.Status)
    return code
