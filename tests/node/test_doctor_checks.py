"""`radmesh doctor` asks the running node about its own port, C-ECHOes the PACS, and says
what a site left at its defaults (issue 19)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from node.app.runtime import NodeRuntime
from node.cli.doctor import Check, run_checks
from node.core.config import NodeConfig, NodeHome
from tests.dcmtk import storescp
from tests.node.test_runtime import FAST, make_home
from tests.ports import free_port


def _named(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.name == name)


def _with_dicom(home: NodeHome, port: int, **pacs: object) -> None:
    config = home.load_config()
    config.dicom.enabled = True
    config.dicom.port = port
    config.dicom.allowed_calling_aets = ["PACS"]
    for key, value in pacs.items():
        setattr(config.dicom, key, value)
    home.save_config(config)


async def test_the_dicom_port_held_by_this_homes_running_node_is_not_a_failure(
    tmp_path: Path,
) -> None:
    home, identity = make_home(tmp_path, "hospital", "", [])
    _with_dicom(home, free_port())
    node = NodeRuntime(home, identity, transport_options=FAST, control=True)
    await node.start()
    try:
        checks = await asyncio.to_thread(run_checks, home)
    finally:
        await node.stop()
    dicom = _named(checks, "DICOM listener")
    assert dicom.ok, dicom
    assert "held by this home's running node" in dicom.detail


def test_the_dicom_port_held_by_another_program_still_fails(tmp_path: Path) -> None:
    home, _ = make_home(tmp_path, "hospital", "", [])
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        _with_dicom(home, other.getsockname()[1])
        dicom = _named(run_checks(home), "DICOM listener")
    assert not dicom.ok
    assert dicom.required
    assert "in use" in dicom.detail


def test_doctor_c_echoes_the_configured_pacs(tmp_path: Path) -> None:
    home, _ = make_home(tmp_path, "hospital", "", [])
    with storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        _with_dicom(
            home, free_port(), pacs_host="127.0.0.1", pacs_port=pacs.port, pacs_ae_title="PACS"
        )
        check = _named(run_checks(home), "PACS")
    assert check.ok, check
    assert check.detail == f"PACS@127.0.0.1:{pacs.port} answers C-ECHO"


def test_doctor_fails_clearly_when_no_pacs_listens(tmp_path: Path) -> None:
    home, _ = make_home(tmp_path, "hospital", "", [])
    port = free_port()  # nothing listens there
    _with_dicom(home, free_port(), pacs_host="127.0.0.1", pacs_port=port, pacs_ae_title="PACS")
    check = _named(run_checks(home), "PACS")
    assert not check.ok
    assert check.required
    assert f"C-ECHO to PACS@127.0.0.1:{port} failed" in check.detail
    assert "check that the PACS runs" in check.fix


def test_doctor_warns_about_a_default_name_an_empty_country_and_every_interface(
    tmp_path: Path,
) -> None:
    home = NodeHome(tmp_path / "fresh")
    make_home(tmp_path, "fresh", "", [])
    config = NodeConfig()  # what `radmesh init` writes without --name / --country
    config.network.listen_host = "0.0.0.0"
    home.save_config(config)
    checks = run_checks(home)
    for name, said in (
        ("display name", "still the default 'radmesh node'"),
        ("country", "empty"),
        ("network listener", "bound to 0.0.0.0"),
    ):
        check = _named(checks, name)
        assert not check.ok
        assert not check.required  # a warning: the node works, but should not stay so
        assert said in check.detail


def test_a_named_node_with_a_country_gets_no_profile_warning(tmp_path: Path) -> None:
    home, _ = make_home(tmp_path, "hospital", "", [])
    config = home.load_config()
    config.country = "IE"
    home.save_config(config)
    names = {c.name for c in run_checks(home)}
    assert not names & {"display name", "country", "network listener"}
