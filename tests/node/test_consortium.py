"""Consortium trust on running nodes: an organisation signs the nodes of a hospital and two
consultants, each node trusts the organisation, and a case is routed, accepted, fetched,
discussed live and reported with no pairwise safety-number check. The organisation's
revocation list, installed on the hospital while it runs, drops the revoked consultant
at once: its connection closes, its accept and fetch are refused."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from consult.requests import ConsultRequest, Event, Priority, State
from crypto.identity import Identity
from node.app import consults
from node.app.runtime import NodeRuntime
from node.cli import main
from node.core.config import NodeHome
from node.demo.phantom import generate_ct
from peer_transport.errors import PeerRejected
from registry.trust import TrustState, TrustStore
from tests.certs import certificate
from tests.node.test_runtime import FAST, make_home, wait_for

TERMS = consults.Terms(
    question="subdural?", priority=Priority.STAT, subspecialty="neuro", jurisdiction="IE"
)


def _member(tmp_path: Path, org_dir: Path, org_key: str, name: str, registry: str) -> NodeHome:
    """A node home with its certificate installed and the organisation trusted, all
    through the commands the README shows."""
    home, identity = make_home(tmp_path, name, registry, ["neuro"] if name != "hospital" else [])
    cert = tmp_path / f"{name}.cert"
    subs = "neuro" if name != "hospital" else ""
    sign = ["org", "sign", str(org_dir), identity.public_key.hex(), "--name", name]
    assert main([*sign, "--subspecialties", subs, "--jurisdictions", "IE", "--out", str(cert)]) == 0
    assert main(["--home", str(home.root), "org", "install", str(cert)]) == 0
    assert main(["--home", str(home.root), "trust", "org", "add", org_key]) == 0
    return home


async def _start(home: NodeHome) -> NodeRuntime:
    from node.core.keystore import load_identity

    runtime = NodeRuntime(home, load_identity(home.key_path), transport_options=FAST)
    await runtime.start()
    return runtime


async def _route(hospital: NodeRuntime) -> ConsultRequest:
    request, _, sent = await hospital.consulting.route_consult(
        hospital.store.studies()[0].study_uid, TERMS, max_offers=3
    )
    assert all(how == "delivered (LAN)" for how in sent.values())
    return request


async def test_an_org_signed_consortium_routes_reports_and_revokes_without_pairwise_checks(
    tmp_path: Path, registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    org_dir = tmp_path / "org"
    assert main(["org", "init", str(org_dir), "--no-passphrase"]) == 0
    org_key = (org_dir / "org.pub").read_text().strip()
    homes = [_member(tmp_path, org_dir, org_key, n, registry) for n in ("hospital", "ann", "bob")]
    hospital, ann, bob = [await _start(home) for home in homes]
    nodes = (hospital, ann, bob)
    try:
        for node in nodes:  # each publishes its certificate in its record
            assert node.record is not None
            assert node.record.org_certificate == node.home.cert_path.read_bytes()
        for path in generate_ct(tmp_path / "ct", slices=2, rows=32):
            hospital.store.add_file(path, source="test")

        # Routed on the certificates alone: nobody compared a safety number.
        first = await _route(hospital)
        offered = set(hospital.consults.offered(first.id))
        assert offered == {ann.identity.node_id, bob.identity.node_id}
        await wait_for(lambda: first.id in {c.request.id for c in ann.consults.cases()})
        # The request from an org member does not wait in the consultant's inbox.
        assert not ann.trust.inbox()
        await ann.consulting.respond(first.id, Event.ACCEPT)
        await wait_for(lambda: hospital.consults.get(first.id).state is State.ACCEPTED)
        assert hospital.consults.info(first.id).peer_id == ann.identity.node_id
        assert hospital.trust.state(ann.identity.public_key, hospital.now()) is (
            TrustState.TRUSTED_BY_ORG
        )
        progress = await ann.consulting.studies.fetch(first.id)
        assert progress.instances_done == 2
        hub = hospital.live_hub()
        live = hub.open(first.id)
        await hub.invite(first.id, ann.identity.public_key)
        await wait_for(lambda: first.id in ann.live_hub().sessions)
        await ann.consulting.reports.send_report(first.id, text="No bleed.", impression="Normal.")
        await wait_for(lambda: hospital.consults.get(first.id).state is State.REPORTED)
        assert live.is_bound(ann.identity.public_key)

        # A second case is offered to both; then the organisation revokes ann's certificate.
        second = await _route(hospital)
        await wait_for(lambda: second.id in {c.request.id for c in ann.consults.cases()})
        await wait_for(lambda: second.id in {c.request.id for c in bob.consults.cases()})
        ann_cert = tmp_path / "ann.cert"
        assert main(["org", "revoke", str(org_dir), "--cert", str(ann_cert)]) == 0
        revocations = org_dir / "revocations.bin"
        installed = ["--home", str(hospital.home.root), "org", "revocations", "install"]
        assert main([*installed, str(revocations)]) == 0

        # The running hospital applies it at once: connection and live session gone.
        await wait_for(lambda: hospital.transport.connection(ann.identity.public_key) is None)
        await wait_for(lambda: not live.is_bound(ann.identity.public_key), within=2.0)
        assert hospital.trust.state(ann.identity.public_key, hospital.now()) is (TrustState.REVOKED)
        # ann's accept is refused; bob's, sent after it on the same ordered path, wins.
        with caplog.at_level(logging.WARNING, logger="node.app.runtime"):
            await ann.consulting.respond(second.id, Event.ACCEPT)
            await bob.consulting.respond(second.id, Event.ACCEPT)
            await wait_for(lambda: hospital.consults.get(second.id).state is State.ACCEPTED)
        assert hospital.consults.info(second.id).peer_id == bob.identity.node_id
        assert any("was revoked" in r.getMessage() for r in caplog.records)
        # ...and ann can no longer connect to fetch anything.
        await wait_for(lambda: ann.transport.connection(hospital.identity.public_key) is None)
        with pytest.raises(PeerRejected, match="refused"):
            await ann.transport.connect(hospital.identity.public_key)
        # Routing no longer offers ann anything.
        third = await _route(hospital)
        assert set(hospital.consults.offered(third.id)) == {bob.identity.node_id}
        # bob, still a member, fetches the second case's study (now with ann's SR in it).
        fetched = await bob.consulting.studies.fetch(second.id)
        assert fetched.instances_done == fetched.instances_total == 3
    finally:
        for node in nodes:
            await node.stop()


async def test_a_member_never_looked_up_is_accepted_on_its_certificate(
    tmp_path: Path, registry: str
) -> None:
    org_dir = tmp_path / "org"
    assert main(["org", "init", str(org_dir), "--no-passphrase"]) == 0
    org_key = (org_dir / "org.pub").read_text().strip()
    hospital, carl = [
        await _start(_member(tmp_path, org_dir, org_key, n, registry)) for n in ("hospital", "carl")
    ]
    try:
        # carl finds the hospital (a search, a directory); the hospital never looked carl up.
        await carl.directory.resolve(hospital.identity.node_id, carl.now())
        assert hospital.trust.state(carl.identity.public_key, hospital.now()) is (
            TrustState.UNKNOWN
        )
        conn = await carl.transport.connect(hospital.identity.public_key)
        assert conn.is_connected
        assert hospital.trust.state(carl.identity.public_key, hospital.now()) is (
            TrustState.TRUSTED_BY_ORG
        )
        assert not hospital.trust.inbox()
    finally:
        await hospital.stop()
        await carl.stop()


async def test_a_peer_remembered_before_its_org_was_trusted_is_trusted_once_it_is(
    tmp_path: Path,
) -> None:
    from registry.directory import MemoryFinder, PeerDirectory
    from registry.records import NodeRecord

    org, node = Identity.generate(), Identity.generate()
    now = 1_800_000_000
    record = NodeRecord.create(
        node, now=now, sequence=1, org_certificate=_certificate(org, node, now)
    )
    trust = TrustStore(tmp_path / "trust.db")
    directory = PeerDirectory(tmp_path / "peers.db", trust, [MemoryFinder([record])])
    try:
        await directory.resolve(node.node_id, now)  # seen while the org is not trusted
        trust.add_org(org.public_key, now)
        peer = await directory.resolve(node.node_id, now + 1)  # the same record again
        assert peer is not None
        assert peer.trust is TrustState.TRUSTED_BY_ORG
        # What the directory shows is what the transport and message handlers get.
        assert trust.is_trusted(node.public_key, now + 1)
    finally:
        directory.close()
        trust.close()


async def test_a_certificate_installed_while_the_node_runs_is_published_at_once(
    tmp_path: Path, registry: str
) -> None:
    from registry.client import RegistryClient

    org_dir = tmp_path / "org"
    assert main(["org", "init", str(org_dir), "--no-passphrase"]) == 0
    home, identity = make_home(tmp_path, "late", registry, [])
    node = await _start(home)
    try:
        assert node.record is not None
        assert node.record.org_certificate is None
        cert = tmp_path / "late.cert"
        assert (
            main(["org", "sign", str(org_dir), identity.public_key.hex(), "--out", str(cert)]) == 0
        )
        assert main(["--home", str(home.root), "org", "install", str(cert)]) == 0
        async with RegistryClient(registry) as client:
            for _ in range(100):  # bounded: about 10 s
                found = await client.lookup(identity.node_id)
                if found is not None and found.org_certificate == cert.read_bytes():
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the installed certificate never reached the registry")
    finally:
        await node.stop()


def _certificate(org: Identity, node: Identity, now: int, days: int = 1) -> bytes:
    return certificate(
        org, node, now, days, institution="Uni", display_name="n", roles=(),
        jurisdictions=("IE",), languages=("en",), not_before=now,
    )  # fmt: skip


def test_a_kept_certificate_counts_until_it_expires(tmp_path: Path) -> None:
    org, node, stranger_org = Identity.generate(), Identity.generate(), Identity.generate()
    now = 1_800_000_000
    trust = TrustStore(tmp_path / "trust.db")
    try:
        cert = _certificate(org, node, now)
        # Issued by an organisation this node does not trust: not kept, not trusted.
        assert not trust.keep_certificate(node.public_key, cert, now)
        trust.add_org(org.public_key, now)
        assert not trust.keep_certificate(
            node.public_key, _certificate(stranger_org, node, now), now
        )
        assert not trust.is_trusted(node.public_key, now)
        assert trust.keep_certificate(node.public_key, cert, now)
        # Every later check without a certificate (transport, messages) sees the kept one.
        assert trust.is_trusted(node.public_key, now + 10)
        assert not trust.is_trusted(node.public_key, now + 86400)  # expired
        assert not trust.inbox()  # keeping a certificate is no first contact
    finally:
        trust.close()


def test_trust_changes_from_another_process_reach_the_listeners(tmp_path: Path) -> None:
    peer = Identity.generate()
    node_store, cli_store = TrustStore(tmp_path / "t.db"), TrustStore(tmp_path / "t.db")
    calls: list[int] = []
    try:
        node_store.subscribe(lambda: calls.append(1))
        node_store.mark_verified(peer.node_id, 1)
        assert calls == [1]  # this process's own change
        assert node_store.is_trusted(peer.public_key, 2)
        cli_store.revoke(peer.node_id, 3)  # `radmesh trust revoke` while the node runs
        assert not node_store.is_trusted(peer.public_key, 2)  # same second: no stale answer
        assert node_store.poll()
        assert calls == [1, 1]
        assert not node_store.poll()
    finally:
        node_store.close()
        cli_store.close()


def test_an_installed_certificate_must_be_this_nodes(tmp_path: Path) -> None:
    org_dir = tmp_path / "org"
    assert main(["org", "init", str(org_dir), "--no-passphrase"]) == 0
    home, _ = make_home(tmp_path, "n", "", [])
    other = Identity.generate()
    cert = tmp_path / "other.cert"
    assert main(["org", "sign", str(org_dir), other.public_key.hex(), "--out", str(cert)]) == 0
    assert main(["--home", str(home.root), "org", "install", str(cert)]) == 1
    assert not home.cert_path.exists()
