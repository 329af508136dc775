"""Node certificates for tests: one organisation vouching for one node."""

from __future__ import annotations

import dataclasses
from typing import Any

from crypto.identity import Identity
from crypto.org import NodeCertificate, issue_certificate


def certificate(org: Identity, node: Identity, now: int, days: int = 1, **changes: Any) -> bytes:
    """``org``'s signed certificate for ``node``: a neuro radiologist at CHU (FR), valid
    from just before ``now`` for ``days``; ``changes`` replace any field."""
    cert = NodeCertificate(
        node_key=node.public_key,
        org_key=org.public_key,
        institution="CHU",
        display_name="Dr P",
        roles=("radiologist",),
        subspecialties=("neuro",),
        jurisdictions=("FR",),
        languages=("fr",),
        not_before=now - 10,
        not_after=now + days * 86400,
    )
    return issue_certificate(org, dataclasses.replace(cert, **changes))
