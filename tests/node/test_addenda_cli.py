"""`radmesh consult addendum` on the consultant's running node (its control socket): the
addendum reaches the hospital, which lists it under the report (`consult show`); a second
`consult report` for the same consult is refused and points at the addendum."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import radmesh
from tests.node.test_cli_consult_network import _hospital_and_neuro
from tests.node.test_critical import _reported
from tests.node.test_runtime import wait_for


async def test_consult_addendum_on_the_running_node_reaches_the_hospital(
    tmp_path: Path,
    registry: str,
) -> None:
    pair = await _hospital_and_neuro(tmp_path, registry)
    try:
        consult_id = await _reported(pair, critical=False, cli=True)
        code, out = await radmesh(
            pair.neuro_home, "consult", "report", consult_id[:8], "--impression", "Changed."
        )
        assert code != 0
        assert "already has a signed report" in out
        assert "consult addendum" in out

        code, out = await radmesh(
            pair.neuro_home, "consult", "addendum", consult_id[:8], "--text",
            "Correction: the collection is 14 mm.",
        )  # fmt: skip
        assert code == 0, out
        assert f"Addendum 1 to the report of consult {consult_id[:8]} signed" in out
        await wait_for(lambda: len(pair.hospital.consults.addenda_wires(consult_id)) == 1)
        code, out = await radmesh(pair.hospital_home, "consult", "show", consult_id[:8])
        assert code == 0, out
        assert "Addendum 1:" in out
        assert "Correction: the collection is 14 mm." in out

        # The hospital did not sign the report: it cannot add an addendum to it.
        code, out = await radmesh(
            pair.hospital_home, "consult", "addendum", consult_id[:8], "--text", "No."
        )
        assert code != 0
        assert "only the consultant who signed the report" in out
    finally:
        await pair.hospital.stop()
        await pair.neuro.stop()


pytestmark = pytest.mark.timeout(180)
