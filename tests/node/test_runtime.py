"""Whole nodes on loopback: a real registry, real LAN endpoints, memory links (FAST; the
security path above the link is the real one) and one test over real aiortc (REAL)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from consult.requests import ConsultRequest, Priority, State
from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.core.keystore import save_identity
from peer_transport.connection import TransportOptions
from peer_transport.memory import MemoryNetwork
from peer_transport.rtc import RtcLink, RtcOptions, restrict_host_addresses

FAST = TransportOptions(
    rtc=RtcOptions(ice_servers=()),
    link=MemoryNetwork(),
    connect_timeout=10.0,
    backoff_initial=0.2,
)
REAL = replace(FAST, link=RtcLink)


def new_home(root: Path, name: str, registry: str = "", **config: Any) -> tuple[NodeHome, Identity]:
    """A home named ``name`` under ``root`` with a new key: its network on 127.0.0.1 only,
    mDNS off, on ``registry`` (if any); ``config``, the rest of its NodeConfig."""
    home = NodeHome(root / name)
    identity = Identity.generate()
    save_identity(home.key_path, identity, None)
    network = NetworkConfig(
        registries=[registry] if registry else [], mdns=False, listen_host="127.0.0.1"
    )
    home.save_config(NodeConfig(display_name=name, network=network, **config))
    return home, identity


def make_home(root: Path, name: str, registry: str, subs: list[str]) -> tuple[NodeHome, Identity]:
    return new_home(root, name, registry, subspecialties=subs, jurisdictions=["IE"])


def request_from(identity: Identity, now: int) -> ConsultRequest:
    return ConsultRequest.new(
        requester=identity.node_id,
        study_uid="2.25.1234",
        question="suspected subdural haematoma",
        priority=Priority.STAT,
        subspecialty="neuro",
        jurisdiction="IE",
        language="en",
        deadline=now + 3600,
        now=now,
    )


async def wait_for(predicate: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def started(
    home: NodeHome, identity: Identity, options: TransportOptions = FAST
) -> NodeRuntime:
    runtime = NodeRuntime(home, identity, transport_options=options)
    await runtime.start()
    return runtime


async def test_consult_request_reaches_an_unknown_specialist_through_the_registry(
    tmp_path: Path, registry: str
) -> None:
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a, b = await started(rural_home, rural), await started(neuro_home, neuro)
    try:
        await wait_for(lambda: a.registry_state.get(registry) == "connected")
        await wait_for(lambda: b.registry_state.get(registry) == "connected")
        request = request_from(rural, a.now())
        # Neuro's record names a LAN address, but neuro's key is not trusted here: an
        # untrusted key's address is never contacted, the registry relays instead.
        how = await a.send_message(neuro.public_key, "consult.request", request.to_wire(rural))
        assert how == f"delivered (registry {registry})"
        await wait_for(lambda: bool(b.consults.cases()))
        case = b.consults.get(request.id)
        assert case.state is State.REQUESTED
        assert case.request.question == "suspected subdural haematoma"
        # First contact lands in the inbox; the rural node is not trusted by it.
        assert [e.node_id for e in b.trust.inbox()] == [rural.node_id]
        assert not b.trust.is_trusted(rural.public_key, b.now())
    finally:
        await a.stop()
        await b.stop()


async def test_request_waits_in_the_registry_mailbox_for_an_offline_specialist(
    tmp_path: Path, registry: str
) -> None:
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    # The registry keeps mail only for nodes it knows: the specialist was online before.
    b = await started(neuro_home, neuro)
    await b.stop()
    a = await started(rural_home, rural)
    try:
        await wait_for(lambda: a.registry_state.get(registry) == "connected")
        request = request_from(rural, a.now())
        how = await a.send_message(neuro.public_key, "consult.request", request.to_wire(rural))
        assert how.startswith("stored")
        b = await started(neuro_home, neuro)
        try:
            await wait_for(lambda: bool(b.consults.cases()))
            assert b.consults.get(request.id).request.priority is Priority.STAT
        finally:
            await b.stop()
    finally:
        await a.stop()


async def test_a_response_from_an_untrusted_node_is_ignored(
    tmp_path: Path, registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    from consult.requests import ConsultResponse, Event

    caplog.set_level(logging.WARNING, logger="node.app.runtime")

    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a, b = await started(rural_home, rural), await started(neuro_home, neuro)
    try:
        await wait_for(lambda: b.registry_state.get(registry) == "connected")
        request = request_from(rural, a.now())
        a.consults.add(request, role="requester", now=a.now(), peer=str(neuro.node_id))
        accept = ConsultResponse(request.id, neuro.node_id, Event.ACCEPT, b.now(), "")
        await b.send_message(rural.public_key, "consult.response", accept.to_wire(neuro))
        await wait_for(lambda: "is not trusted: consult.response ignored" in caplog.text)
        assert a.consults.get(request.id).state is State.REQUESTED
        a.trust.mark_verified(neuro.node_id, a.now())
        await b.send_message(rural.public_key, "consult.response", accept.to_wire(neuro))
        await wait_for(lambda: a.consults.get(request.id).state is State.ACCEPTED)
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.webrtc
async def test_trusted_nodes_connect_over_webrtc_with_lan_signaling(
    tmp_path: Path, registry: str
) -> None:
    restrict_host_addresses(["127.0.0.1"])
    rural_home, rural = make_home(tmp_path, "rural", registry, [])
    neuro_home, neuro = make_home(tmp_path, "neuro", registry, ["neuro"])
    a = await started(rural_home, rural, REAL)
    b = await started(neuro_home, neuro, REAL)
    try:
        assert b.record is not None
        a.directory.remember(b.record, "test", a.now())  # as if found by mDNS
        a.trust.mark_verified(neuro.node_id, a.now())
        b.trust.mark_verified(rural.node_id, b.now())

        async def echo(conn: object, body: bytes) -> bytes:
            return body[::-1]

        b.transport.handle("test.echo", echo)
        conn = await a.transport.connect(neuro.public_key)
        assert await conn.request("test.echo", b"abc", timeout=5) == b"cba"
    finally:
        await a.stop()
        await b.stop()


async def test_doctor_probes_the_configured_registry(tmp_path: Path, registry: str) -> None:
    import sys

    home, _ = make_home(tmp_path, "a", registry, [])
    config = home.load_config()
    config.network.registries.append("http://127.0.0.1:9")  # nothing listens on port 9
    home.save_config(config)
    # A separate process, so this loop keeps serving the registry while doctor asks it.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node.cli",
        "--home",
        str(home.root),
        "doctor",
        stdout=asyncio.subprocess.PIPE,
    )
    out = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert f"registry {registry}: answers /v1/health" in out
    assert "registry http://127.0.0.1:9: unreachable" in out


async def test_node_run_starts_and_stops_cleanly(
    tmp_path: Path, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from node.cli.node import run_node

    home, _ = make_home(tmp_path, "hospital", registry, [])
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_node(argparse.Namespace(home=str(home.root)), stop))
    seen: list[str] = []

    def started() -> bool:
        seen.append(capsys.readouterr().out)
        return "Ctrl-C stops it" in "".join(seen)

    await wait_for(started)
    stop.set()
    assert await asyncio.wait_for(task, 20) == 0


def test_a_runtime_is_a_whole_node_from_its_constructor(tmp_path: Path) -> None:
    """Every consult message has its handler before the node takes any message in (a
    report that arrives while the node starts, from a registry mailbox, is filed): there
    is no install step to forget."""
    from node.app.consults import LIVE_CONSENT_KIND
    from node.app.guests import LIVE_REFUSE_KIND
    from node.app.reports import ACK_KIND, ADDENDUM_KIND, REPORT_KIND, REVIEW_KIND

    home, identity = make_home(tmp_path, "hospital", "", [])
    rt = NodeRuntime(home, identity)
    kinds = {"consult.request", "consult.response", REPORT_KIND, REVIEW_KIND, ACK_KIND,
             ADDENDUM_KIND, LIVE_CONSENT_KIND, LIVE_REFUSE_KIND}  # fmt: skip
    assert kinds <= rt.handlers.keys()
    assert [rt.alerts.rt, rt.consulting.rt, rt.guests.rt] == [rt, rt, rt]
