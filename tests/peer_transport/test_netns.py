"""Two nodes on two "hosts": separate network namespaces joined by a veth pair.

Needs root and iproute2 (Debian package iproute2); skips with the reason otherwise.
The 10.231.7.0/24 addresses exist only inside the namespaces this test creates,
and the namespaces are deleted whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.bench_netns import relaying
from crypto.identity import Identity

pytestmark = [pytest.mark.timeout(90), pytest.mark.system, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = {"a": "10.231.7.1", "b": "10.231.7.2"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("ip not found: install the Debian package iproute2")
    tag = uuid.uuid4().hex[:6]
    names = {side: f"rm-{tag}-{side}" for side in ADDRESSES}
    created: list[str] = []
    try:
        for name in names.values():
            try:
                _ip("netns", "add", name)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode()}")
            created.append(name)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for side, veth in (("a", f"va{tag}"), ("b", f"vb{tag}")):
            ns = names[side]
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ADDRESSES[side]}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for name in created:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)


async def test_two_nodes_in_separate_namespaces_connect_over_veth(
    namespaces: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "signal.sock"
    ids = {side: Identity.generate() for side in ADDRESSES}
    async with relaying(sock, 120) as procs:
        for side, role in (("b", "responder"), ("a", "initiator")):
            other = "a" if side == "b" else "b"
            procs[side] = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", namespaces[side],
                sys.executable, "-m", "tests.peer_transport.netns_node",
                "--role", role, "--sock", str(sock), "--address", ADDRESSES[side],
                "--seed", ids[side].seed.hex(), "--peer", ids[other].public_key.hex(),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
        outputs = {}
        for side, proc in procs.items():
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()[-3000:]
            outputs[side] = json.loads(out.decode().strip().splitlines()[-1])
    assert outputs["a"]["reply"] == "secapseman ssorca"
    assert outputs["a"]["pair"] == ["host", "host"]
    assert outputs["b"]["bulk_chunks"] == 16
