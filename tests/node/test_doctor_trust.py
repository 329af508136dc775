"""`radmesh doctor` reports the organisation certificate and the record sequence (issue 14)."""

from __future__ import annotations

import time
from pathlib import Path

from crypto.identity import Identity
from node.cli.doctor import _certificate, _sequence, run_checks
from node.core.config import NodeHome
from node.core.sequence import RecordSequence
from tests.certs import certificate
from tests.node.test_runtime import make_home

DAY = 86400


def _install(home: NodeHome, node: Identity, *, not_after: int, org: Identity) -> None:
    now = int(time.time())
    cert = certificate(
        org, node, now, institution="St. Brigid's", display_name="CT", roles=("referrer",),
        subspecialties=(), jurisdictions=("IE",), languages=("en",), not_before=now - DAY,
        not_after=not_after,
    )  # fmt: skip
    home.cert_path.write_bytes(cert)


def test_doctor_names_the_certificate_and_flags_an_expired_or_forged_one(tmp_path: Path) -> None:
    home, node = make_home(tmp_path, "node", "", [])
    org = Identity.generate()
    now = time.time()
    assert _certificate(home, now).ok  # none installed: fine, but said
    assert "safety number" in _certificate(home, now).detail

    _install(home, node, not_after=int(now) + 365 * DAY, org=org)
    good = _certificate(home, now)
    assert good.ok
    assert node.node_id.short() in good.detail

    _install(home, node, not_after=int(now) + 3 * DAY, org=org)
    soon = _certificate(home, now)
    assert not soon.ok
    assert not soon.required
    assert "expires in" in soon.detail

    _install(home, node, not_after=int(now) - 1, org=org)
    expired = _certificate(home, now)
    assert not expired.ok
    assert expired.required
    assert "expired" in expired.detail

    data = bytearray(home.cert_path.read_bytes())
    data[-5] ^= 1  # one flipped bit in the signature or body
    home.cert_path.write_bytes(bytes(data))
    forged = _certificate(home, now)
    assert not forged.ok
    assert "unusable" in forged.detail
    assert "organisation certificate" in {c.name for c in run_checks(home)}


def test_doctor_flags_a_record_sequence_far_ahead_of_the_clock(tmp_path: Path) -> None:
    home, _ = make_home(tmp_path, "node", "", [])
    now = time.time()
    assert _sequence(home, now).ok
    RecordSequence(home).next(int(now))
    assert _sequence(home, now).ok
    RecordSequence(home).advance_past(int(now * 1_000_000), int(now))  # signed in microseconds
    ahead = _sequence(home, now)
    assert not ahead.ok
    assert "ahead of the clock" in ahead.detail
