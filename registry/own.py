"""A node's own record, as the running node and `radmesh peers publish` both sign it.

:func:`own_record` builds it from the node's config. The record carries the organisation
certificate installed in the home (`radmesh org install`), so peers that trust the
organisation trust the node through it: :class:`CertificateFile` reads it again only
when the file changes, and gives nothing for a file that is unusable or another node's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from crypto.envelope import SignedEnvelope
from crypto.errors import CryptoError
from crypto.identity import Identity
from crypto.org import CERT_TYPE
from node.core.config import NodeConfig
from registry.records import MAX_CERT, Availability, NodeRecord

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


def own_record(
    identity: Identity,
    config: NodeConfig,
    *,
    now: int,
    sequence: int,
    endpoints: tuple[str, ...],
    availability: str,
    org_certificate: bytes | None,
    ttl: int = 24 * 3600,
) -> NodeRecord:
    """The node's signed record: ``endpoints`` first, then one per configured registry."""
    registries = tuple(f"registry:{url}" for url in config.network.registries)
    return NodeRecord.create(
        identity,
        now=now,
        sequence=sequence,
        ttl=ttl,
        display_name=config.display_name,
        institution=config.institution,
        country=config.country,
        subspecialties=tuple(config.subspecialties),
        jurisdictions=tuple(config.jurisdictions),
        languages=tuple(config.languages),
        timezone=config.timezone,
        availability=Availability(availability),
        endpoints=endpoints + registries,
        org_certificate=org_certificate,
    )
