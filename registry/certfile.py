"""The organisation certificate installed in a node's home (`radmesh org install`).

A node's published record carries it, so peers that trust the organisation trust the
node through it. :class:`CertificateFile` reads it again only when the file changes,
and gives nothing for a file that is unusable or is another node's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.org import CERT_TYPE
from registry.records import MAX_CERT

log = logging.getLogger(__name__)


class CertificateFile:
    def __init__(self, path: Path, public_key: bytes) -> None:
        self.path = path
        self.public_key = public_key
        self._stamp: tuple[int, int] | None = None  # (mtime, size) as last read
        self._cert: bytes | None = None

    def current(self) -> bytes | None:
        """The certificate in the file if it is this node's, else None."""
        try:
            info = self.path.stat()
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp, self._cert = stamp, None
            if stamp is not None:
                self._cert = self._read()
        return self._cert

    def _read(self) -> bytes | None:
        try:
            with self.path.open("rb") as handle:
                cert = handle.read(MAX_CERT + 1)
            if len(cert) > MAX_CERT:
                raise CryptoError(f"it is larger than {MAX_CERT} bytes")
            body = SignedEnvelope.from_wire(cert).verify(CERT_TYPE)
        except (OSError, CryptoError) as exc:
            log.warning("the organisation certificate in this home is unusable: %s", exc)
            return None
        if isinstance(body, dict) and body.get("node") == self.public_key:
            return cert
        log.warning("the organisation certificate in this home belongs to another node: ignored")
        return None
