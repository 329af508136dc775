"""The registry HTTP API through aiohttp's test client and over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.identity import Identity
from registry.client import RegistryClient, RegistryConnection, SearchQuery
from registry.errors import RegistryUnavailable, RemoteRegistryError, StaleRecord, TlsSetupError
from registry.records import Availability
from registry.server import Limits, RegistryServer, server_tls_context
from tests.registry.conftest import NOW, Clock, make_record
from tests.tlscerts import make_pki

IDS = [Identity(bytes([i]) * 32) for i in range(1, 8)]


@pytest.fixture
async def http(
    tmp_path: Path, clock: Clock
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], RegistryServer]]:
    server = RegistryServer(
        tmp_path / "r.db", clock=clock, limits=Limits(publish_burst=3, address_burst=1000)
    )
    async with TestClient(TestServer(server.app)) as client:
        yield client, server


async def test_publish_then_lookup_returns_the_same_signed_bytes(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer],
) -> None:
    client, _ = http
    record = make_record(IDS[0])
    response = await client.post("/v1/records", data=record.to_wire())
    assert response.status == 200, await response.text()
    response = await client.get(f"/v1/records/{IDS[0].node_id}")
    assert response.status == 200
    assert await response.read() == record.to_wire()
    missing = await client.get(f"/v1/records/{IDS[1].node_id}")
    assert missing.status == 404
    assert set(await missing.json()) == {"error", "hint"}


async def test_tampered_and_stale_records_are_refused_with_readable_errors(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer],
) -> None:
    client, _ = http
    wire = bytearray(make_record(IDS[0], seq=2).to_wire())
    wire[-5] ^= 1
    response = await client.post("/v1/records", data=bytes(wire))
    assert response.status == 400
    assert "does not verify" in (await response.json())["error"]
    assert (
        await client.post("/v1/records", data=make_record(IDS[0], seq=2).to_wire())
    ).status == 200
    stale = await client.post("/v1/records", data=make_record(IDS[0], seq=2).to_wire())
    assert stale.status == 409
    assert "sequence" in (await stale.json())["hint"]
    newer = await client.post("/v1/records", data=make_record(IDS[0], seq=3).to_wire())
    assert newer.status == 200


async def test_oversized_body_is_413(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer],
) -> None:
    client, _ = http
    response = await client.post("/v1/records", data=b"x" * 40_000)
    assert response.status == 413
    assert "too large" in (await response.json())["error"]


async def test_expired_records_disappear_and_are_purged(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer], clock: Clock
) -> None:
    client, server = http
    await client.post("/v1/records", data=make_record(IDS[0], ttl=100).to_wire())
    assert (await client.get(f"/v1/records/{IDS[0].node_id}")).status == 200
    clock.now = NOW + 100
    assert (await client.get(f"/v1/records/{IDS[0].node_id}")).status == 404
    assert (await (await client.get("/v1/search")).json())["records"] == []
    assert server.db.purge(int(clock.now)) == 1


async def test_search_filters_and_pages(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer],
) -> None:
    client, _ = http
    specs = [
        (("neuro",), ("FR",), Availability.ONLINE),
        (("neuro", "paediatric"), ("DE",), Availability.AWAY),
        (("msk",), ("FR",), Availability.ON_CALL),
    ]
    for identity, (subs, jur, avail) in zip(IDS, specs, strict=False):
        record = make_record(identity, subs=subs, jur=jur, availability=avail)
        assert (await client.post("/v1/records", data=record.to_wire())).status == 200

    async def ids(query: str) -> set[str]:
        response = await client.get("/v1/search?" + query)
        assert response.status == 200
        from registry.records import NodeRecord

        return {
            str(NodeRecord.from_wire(base64.b64decode(w)).node_id)
            for w in (await response.json())["records"]
        }

    assert await ids("subspecialty=neuro") == {str(IDS[0].node_id), str(IDS[1].node_id)}
    assert await ids("subspecialty=NEURO&online=1") == {str(IDS[0].node_id)}
    assert await ids("jurisdiction=FR&online=1") == {str(IDS[0].node_id)}
    assert await ids("jurisdiction=FR&on_call=1") == {str(IDS[2].node_id)}
    both = {str(IDS[0].node_id), str(IDS[2].node_id)}
    assert await ids("online=1&on_call=1") == both
    assert await ids("subspecialty=neur") == set()  # whole items only
    assert await ids("subspecialty=%25") == set()  # LIKE wildcards are escaped
    first = await ids("limit=2")
    rest = await ids("limit=2&after=" + max(first))
    assert len(first) == 2
    assert len(rest) == 1
    assert not first & rest


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("bogus=1", "unknown search parameter"),
        ("online=yes", "online must be 0 or 1"),
        ("limit=1000", "between 1 and 100"),
        ("subspecialty=" + "x" * 65, "too long"),
    ],
)
async def test_bad_search_parameters_are_400(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer], query: str, fragment: str
) -> None:
    client, _ = http
    response = await client.get("/v1/search?" + query)
    assert response.status == 400
    assert fragment in (await response.json())["error"]


async def test_publish_rate_limit_per_node_recovers_with_time(
    http: tuple[TestClient[web.Request, web.Application], RegistryServer], clock: Clock
) -> None:
    client, _ = http
    statuses = [
        (await client.post("/v1/records", data=make_record(IDS[0], seq=s).to_wire())).status
        for s in range(1, 6)
    ]
    assert statuses == [200, 200, 200, 429, 429]
    other = await client.post("/v1/records", data=make_record(IDS[1]).to_wire())
    assert other.status == 200  # the limit is per node
    clock.now += 2
    assert (
        await client.post("/v1/records", data=make_record(IDS[0], seq=9).to_wire())
    ).status == 200


async def test_per_address_rate_limit(tmp_path: Path, clock: Clock) -> None:
    server = RegistryServer(
        tmp_path / "r.db", clock=clock, limits=Limits(address_rate=1, address_burst=5)
    )
    async with TestClient(TestServer(server.app)) as client:
        statuses = [(await client.get("/v1/health")).status for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        body = await (await client.get("/v1/health")).json()
        assert "retry after" in body["hint"]
        clock.now += 3
        assert (await client.get("/v1/health")).status == 200


async def test_real_server_on_loopback_with_client(live_registry: RegistryServer) -> None:
    async with RegistryClient(live_registry.url) as client:
        assert (await client.health())["status"] == "ok"
        await client.publish(make_record(IDS[0], seq=1))
        with pytest.raises(StaleRecord):
            await client.publish(make_record(IDS[0], seq=1))
        found = await client.lookup(IDS[0].node_id, now=NOW)
        assert found is not None
        assert found.sequence == 1
        assert await client.lookup(IDS[1].node_id, now=NOW) is None
        results = await client.search(SearchQuery(subspecialty="neuro"), now=NOW)
        assert [r.node_id for r in results] == [IDS[0].node_id]
        with pytest.raises(RemoteRegistryError) as info:
            await client.publish(make_record(IDS[1], seq=1, ttl=1, now=NOW - 10))
        assert info.value.status == 400


def test_fuzz_http_inputs_get_json_4xx_never_5xx(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    server = RegistryServer(
        tmp_path / "f.db", limits=Limits(address_rate=1e6, address_burst=1e6, publish_burst=1e6)
    )
    client = TestClient(TestServer(server.app), loop=loop)
    loop.run_until_complete(client.start_server())
    good = make_record(IDS[0], now=int(__import__("time").time())).to_wire()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=st.one_of(
            st.binary(max_size=600),
            st.integers(0, len(good) - 1).map(
                lambda i: good[:i] + bytes([good[i] ^ 0x40]) + good[i + 1 :]
            ),
        ),
        key=st.sampled_from(
            ["subspecialty", "jurisdiction", "language", "online", "limit", "after", "x"]
        ),
        value=st.text(max_size=80),
        node=st.text(max_size=90),
    )
    def check(body: bytes, key: str, value: str, node: str) -> None:
        async def run() -> None:
            for response in (
                await client.post("/v1/records", data=body),
                await client.get("/v1/search", params={key: value}),
                await client.get(
                    "/v1/records/" + node.replace("/", "").replace("?", "").replace("#", "") + "x"
                ),
            ):
                assert response.status < 500, await response.text()
                if response.status >= 400:
                    assert set(await response.json()) == {"error", "hint"}

        loop.run_until_complete(run())

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()


# TLS served directly (`registry run --tls-cert/--tls-key`) ------------------------------


@asynccontextmanager
async def _tls_registry(
    tmp_path: Path, clock: Clock, host: str
) -> AsyncIterator[tuple[RegistryServer, Path]]:
    """A registry serving TLS on 127.0.0.1 with a certificate for ``host``: the server
    and its CA's certificate; stopped on the way out."""
    pki = make_pki(tmp_path / "pki", host)
    server = RegistryServer(
        tmp_path / "registry.db", clock=clock, tls=server_tls_context(pki.cert, pki.key)
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server, pki.ca
    finally:
        await server.stop()


async def test_tls_registry_serves_https_and_wss_to_a_node_that_trusts_its_ca(
    tmp_path: Path, clock: Clock
) -> None:
    async with _tls_registry(tmp_path, clock, "127.0.0.1") as (server, ca):
        assert server.url.startswith("https://127.0.0.1:")
        async with RegistryClient(server.url, IDS[0], ca_file=str(ca)) as client:
            assert (await client.health())["status"] == "ok"
            await client.publish(make_record(IDS[0], seq=1))
            assert await client.lookup(IDS[0].node_id, now=NOW) is not None
            async with RegistryConnection(client, IDS[0], connect_timeout=5.0) as socket:
                assert socket.connects == 1  # authenticated over wss://
                assert await socket.send(IDS[0].node_id, b"to myself") == "delivered"


async def test_tls_registry_is_refused_without_its_ca_and_says_how_to_trust_it(
    tmp_path: Path, clock: Clock
) -> None:
    async with _tls_registry(tmp_path, clock, "127.0.0.1") as (server, _):
        async with RegistryClient(server.url) as client:
            with pytest.raises(RegistryUnavailable) as info:
                await client.health()
        assert "certificate is not trusted" in str(info.value)
        assert "registry add URL --ca FILE" in str(info.value)
        assert server.connections == {}


async def test_a_trusted_ca_does_not_vouch_for_another_host_name(
    tmp_path: Path, clock: Clock
) -> None:
    # Signed by the CA the node trusts, but for another name: the host name is checked.
    async with _tls_registry(tmp_path, clock, "registry.example.org") as (server, ca):
        async with RegistryClient(server.url, ca_file=str(ca)) as client:
            with pytest.raises(RegistryUnavailable) as info:
                await client.health()
        assert "not trusted" in str(info.value)
        assert "127.0.0.1" in str(info.value)  # OpenSSL names the mismatch


def test_unusable_tls_files_are_refused_with_their_names(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with pytest.raises(TlsSetupError, match=r"registry\.key"):
        server_tls_context(pki.cert, tmp_path / "pki" / "registry.key.missing")
    with pytest.raises(TlsSetupError, match=r"ca\.pem"):
        server_tls_context(pki.ca, pki.key)  # the CA's certificate with the server's key
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(TlsSetupError, match=r"notes\.txt"):
        RegistryClient("https://127.0.0.1:9", ca_file=str(not_pem)).session()


def test_registry_add_ca_is_kept_in_the_config_and_a_bad_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main
    from node.core.config import NodeHome

    pki = make_pki(tmp_path / "pki")
    home = tmp_path / "node"
    assert (
        main(["--home", str(home), "init", "--no-passphrase", "--name", "N", "--country", "IE"])
        == 0
    )
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate")
    add = ["--home", str(home), "registry", "add", "https://127.0.0.1:8443"]
    assert main([*add, "--ca", str(not_pem)]) == 1
    assert "cannot use" in capsys.readouterr().err
    assert NodeHome(home).load_config().network.registries == []  # nothing half-added
    assert main([*add, "--ca", str(pki.ca)]) == 0
    network = NodeHome(home).load_config().network
    assert network.registries == ["https://127.0.0.1:8443"]
    assert network.registry_ca_file == str(pki.ca.resolve())
