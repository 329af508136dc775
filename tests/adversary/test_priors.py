"""Attacks on priors (issue 16): what a consultant may fetch under a consult, and what a
hostile request may list. The requesting node serves only the study and the priors its
own signed request names; a request naming too many, malformed or repeated priors is
refused when it is parsed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from consult.errors import LocalConsultError, MalformedMessage
from consult.requests import MAX_PRIORS, ConsultRequest
from crypto.identity import Identity
from node.app.studies import FETCH_KIND
from peer_transport.errors import RemoteError
from tests.node.pair import accepted_consult
from tests.node.test_runtime import request_from
from tui.linking import linked_index, slice_location


async def test_a_consultant_fetches_only_what_the_request_lists(
    tmp_path: Path, registry: str
) -> None:
    async with accepted_consult(tmp_path, registry) as pair:
        a, b, request, study = pair.a, pair.b, pair.request, pair.study_uid
        conn = await b.transport.connect(a.identity.public_key)
        for named in (
            f"{request.id}\n{study}",  # the hospital's own UID of the study
            f"{request.id}\n{request.study_uid}",  # the shared study, asked as a prior
            f"{request.id}\n2.25.1\n{request.study_uid}",  # a second line smuggled in
            f"{request.id}\n../../etc/passwd",
            f"{request.id}\n" + "1." * 5000,
        ):
            with pytest.raises(RemoteError) as refused:
                await conn.request(FETCH_KIND, named.encode())
            assert refused.value.code == "not-shared", named
        # The canary on the same connection: the study itself is still served.
        assert await conn.request(FETCH_KIND, request.id.encode()) == b"ok"


def _body(**changes: object) -> dict[str, object]:
    body = request_from(Identity.generate(), 1_000).to_body()
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "priors",
    [
        [f"2.25.{i}" for i in range(MAX_PRIORS + 1)],  # too many
        ["2.25.7", "2.25.7"],  # repeated
        ["2.25.1234"],  # the study itself (request_from's study UID)
        ["../../x"],  # not a UID: no path, no URL
        ["2.25.1" * 20],  # longer than a UID may be
        "2.25.7",  # not a list
        [7],  # not text
    ],
)
def test_a_request_with_hostile_priors_is_refused_when_parsed(priors: object) -> None:
    with pytest.raises((MalformedMessage, LocalConsultError)):
        ConsultRequest.from_body(_body(priors=priors))


def test_a_request_without_priors_parses_as_before() -> None:
    assert ConsultRequest.from_body(_body()).priors == ()
    assert ConsultRequest.from_body(_body(priors=["2.25.7"])).priors == ("2.25.7",)


def test_hostile_slice_positions_do_not_link_slices() -> None:
    """Positions and orientations come from a peer's study: NaN, infinity or a degenerate
    orientation give no location, and the prior then stays where it is."""
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert slice_location((0.0, 0.0, math.nan), axial) is None
    assert slice_location((0.0, 0.0, math.inf), axial) is None
    assert slice_location((0.0, 0.0, 1.0), (math.nan, 0, 0, 0, 1, 0)) is None
    assert slice_location((0.0, 0.0, 1.0), (1e308, 0, 0, 0, 1e308, 0)) is None
    assert slice_location((0.0, 0.0), axial) is None
    assert linked_index([None, None], [1.0, 2.0], 0) is None
