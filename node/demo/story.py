"""The demo scenario: a registry and three nodes on loopback, the whole clinical loop.

A rural hospital has a head CT of an 84-year-old woman on apixaban who fell at
home, and asks, STAT, whether she has a subdural haematoma that needs surgery. A
neuroradiologist accepts, pulls the de-identified study over WebRTC, opens a live
session and invites a neurosurgeon; the neuroradiologist presents (the surgeon's
view follows), measures the left convexity collection, the surgeon marks it; they
agree in the chat; the neuroradiologist signs the report, which lands in the
hospital's store (and its PACS when Orthanc is installed) as a DICOM SR filed under
the real patient's name, which the consultant never saw.

:func:`run_headless` runs it scripted and prints each step with its time.
:class:`DemoNetwork` is the set-up the interactive demo reuses.

Why one module: The demo is one story read from top to bottom (stage, live session,
report, audit); its steps share the network object and the case.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from consult.errors import ConsultError
from consult.live import LiveConsult
from consult.presence import Cursor, Viewport
from consult.requests import Event, Priority, State
from consult.shared import AnnotationKind
from crypto.identity import Identity
from crypto.safety import safety_number
from node.dicom import pacs
from node.app import consults
from node.core.config import NetworkConfig, NodeConfig, NodeHome
from node.demo.phantom import DemoPatient, DemoStudy, collection_span, generate_ct
from node.core.errors import NodeError
from node.core.keystore import load_identity, save_identity
from node.app.operations import OPERATIONS, Operation
from node.app.runtime import NodeRuntime
from peer_transport.connection import TransportOptions
from peer_transport.errors import TransportError
from peer_transport.rtc import RtcOptions, restrict_host_addresses
from registry.server import RegistryServer

LOOPBACK = "127.0.0.1"
QUESTION = (
    "84F, fall at home, on apixaban, GCS 14, headache. Subdural haematoma? Mass effect? "
    "Does she need neurosurgery tonight?"
)
# The patient as the hospital knows her; the consultant sees only a pseudonym.
PATIENT = DemoPatient(name="MURPHY^BRIDGET", patient_id="SB4471093", birth_date="19410612", sex="F")
STUDY = DemoStudy(PATIENT, accession="SB26-118204", description="CT HEAD WITHOUT CONTRAST")
# Her head CT after a fall a year earlier, reported normal: the prior the consult carries.
PRIOR = DemoStudy(
    PATIENT, accession="SB25-097311", date="20230611", description="CT HEAD WITHOUT CONTRAST"
)
FINDINGS = (
    "Crescentic hyperdense (about 68 HU) extra-axial collection over the left cerebral "
    "convexity, maximal thickness {thickness:.0f} mm at the level of the thalami, with "
    "effacement of the left cerebral sulci, compression of the left lateral ventricle and "
    "about 4 mm of midline shift to the right. Basal cisterns patent. No fracture seen."
)
IMPRESSION = (
    "Acute left convexity subdural haematoma, {thickness:.0f} mm, with mass effect and "
    "about 4 mm midline shift. Discussed with the neurosurgeon on call (live session): "
    "urgent neurosurgical review; reverse the anticoagulation."
)


@dataclass(frozen=True)
class Role:
    key: str
    name: str
    institution: str
    roles: tuple[str, ...]
    subspecialties: tuple[str, ...]


RURAL = Role("rural", "Rural Hospital CT", "St. Brigid's Rural Hospital", ("referrer",), ())
NEURORAD = Role(
    "neurorad", "Dr. A. Okafor", "Neuroradiology Consult Group", ("radiologist",), ("neuro",)
)
NEUROSURG = Role(
    "neurosurg", "Dr. M. Lindqvist", "University Neurosurgery", ("surgeon",), ("neurosurgery",)
)
ROLES = (RURAL, NEURORAD, NEUROSURG)


def demo_home(root: Path, role: Role) -> tuple[NodeHome, Identity]:
    """The home of one demo node under ``root``: kept if it exists, else a new identity."""
    home = NodeHome(root / role.key)
    if home.exists():
        return home, load_identity(home.key_path, passphrase=None)
    identity = Identity.generate()
    save_identity(home.key_path, identity, None, warn=False)  # throwaway demo keys
    return home, identity


class DemoFailed(NodeError):
    """A step of the demo did not do what it should."""


@dataclass
class DemoNetwork:
    """The registry and the three nodes, started under ``root``."""

    root: Path
    out: TextIO = sys.stdout
    nodes: dict[str, NodeRuntime] = field(default_factory=dict)
    registry_url: str = ""
    pacs_server: pacs.Orthanc | None = None
    _registry: RegistryServer | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    # The case in a few lines, printed once the scenario is over (run_headless).
    summary: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)
    # The interactive demo: this role's node answers a TUI in another process on its
    # control socket, with these operations (node.cli.node.with_tui_operation).
    tui_role: str = ""
    tui_operations: Mapping[str, Operation] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._started:6.2f}s] {text}", file=self.out, flush=True)

    @contextlib.asynccontextmanager
    async def step(self, text: str) -> AsyncIterator[None]:
        begun = time.monotonic()
        self.say(f"{text} ...")
        yield
        self.say(f"  done in {time.monotonic() - begun:.2f}s")

    async def start(self, *, with_pacs: bool) -> None:
        restrict_host_addresses([LOOPBACK])  # the demo never leaves this machine
        self.root.mkdir(parents=True, exist_ok=True)
        self._registry = RegistryServer(self.root / "registry.sqlite")
        self.registry_url = await self._registry.start(LOOPBACK, 0)
        self.say(f"registry on {self.registry_url}")
        if with_pacs and shutil.which("Orthanc"):
            self.pacs_server = self._enter(pacs.orthanc_server(self.root / "pacs"))
            self.say(f"hospital PACS (Orthanc) on DICOM port {self.pacs_server.dicom_port}")
        for role in ROLES:
            home, identity = demo_home(self.root, role)
            config = NodeConfig(
                display_name=role.name,
                institution=role.institution,
                country="IE",
                roles=list(role.roles),
                subspecialties=list(role.subspecialties),
                jurisdictions=["IE", "GB"],
                network=NetworkConfig(
                    registries=[self.registry_url], mdns=False, listen_host=LOOPBACK
                ),
            )
            if role is RURAL and self.pacs_server is not None:
                config.dicom.pacs_host = LOOPBACK
                config.dicom.pacs_port = self.pacs_server.dicom_port
                config.dicom.pacs_ae_title = self.pacs_server.ae_title
            home.save_config(config)
            tui = role.key == self.tui_role
            runtime = NodeRuntime(
                home,
                identity,
                config,
                transport_options=TransportOptions(rtc=RtcOptions(ice_servers=())),
                control=tui,
                operations=self.tui_operations if tui else OPERATIONS,
            )
            await runtime.start()
            runtime.live_hub()
            self.nodes[role.key] = runtime
            self.say(f"{role.name:<18} {identity.node_id}")

    def _enter(self, manager: contextlib.AbstractContextManager[Any]) -> Any:
        return self._stack.enter_context(manager)

    def verify_everyone(self) -> None:
        """What the operators did on the phone: compare safety numbers, mark verified."""
        for a in self.nodes.values():
            for b in self.nodes.values():
                if a is not b:
                    a.trust.mark_verified(b.identity.node_id, a.now())
                    if b.record is not None:  # as looking the peer up once would
                        a.directory.remember(b.record, "demo", a.now())
        rural, neurorad = self.nodes["rural"], self.nodes["neurorad"]
        self.say(
            "safety number rural <-> neuroradiologist: "
            f"{safety_number(rural.identity.node_id, neurorad.identity.node_id)}"
        )

    async def stop(self) -> None:
        for runtime in self.nodes.values():
            with contextlib.suppress(Exception):
                await runtime.stop()
        if self._registry is not None:
            await self._registry.stop()
        self._stack.close()


async def wait_until(predicate: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Staged:
    """The case once the live session is open: what the rest of the scenario works on."""

    consult_id: str
    shared_study_uid: str
    middle_slice: str
    spacing: float
    files: int
    neuroradiologist: LiveConsult
    surgeon: LiveConsult
    series_uid: str = ""
    middle_index: int = 0
    middle_z: float = 0.0


async def scenario(net: DemoNetwork, *, slices: int, rows: int) -> None:
    staged = await stage(net, slices=slices, rows=rows)
    await finish(net, staged, rows=rows)


@dataclass(frozen=True)
class Requested:
    """The STAT request, sent and waiting in the neuroradiologist's worklist."""

    consult_id: str
    shared_study_uid: str
    files: int
    originals: frozenset[bytes]


async def stage(net: DemoNetwork, *, slices: int, rows: int) -> Staged:
    """From the CT at the rural hospital to a live session with the neurosurgeon in it."""
    requested = await send_request(net, slices=slices, rows=rows)
    neurorad = net.nodes[NEURORAD.key]
    rural = net.nodes[RURAL.key]
    async with net.step("neuroradiologist: accept"):
        await neurorad.consulting.respond(requested.consult_id, Event.ACCEPT)
        await wait_until(
            lambda: rural.consults.get(requested.consult_id).state is State.ACCEPTED,
            "acceptance",
        )

    async with net.step("neuroradiologist: pull the study over WebRTC (encrypted, verified)"):
        progress = await neurorad.consulting.studies.fetch(requested.consult_id)
        received = check_received(net, requested)
        net.say(
            f"  {progress.instances_done} instances, {progress.bytes_done / 1e6:.1f} MB, "
            f"patient shown as {neurorad.store.study(requested.shared_study_uid).patient_name}"
        )
        check_prior(net, requested)
    return await open_live(net, requested, received)


def check_prior(net: DemoNetwork, requested: Requested) -> None:
    """The prior came after the study, under the same pseudonymous patient."""
    neurorad = net.nodes[NEURORAD.key]
    [prior] = neurorad.consults.get(requested.consult_id).request.priors
    current = neurorad.store.study(requested.shared_study_uid)
    earlier = neurorad.store.study(prior)
    if earlier.patient_id != current.patient_id or earlier.instance_count != requested.files:
        raise DemoFailed("the prior did not arrive whole under the study's pseudonymous patient")
    kind = earlier.description or "/".join(earlier.modalities) or "study"
    day = earlier.study_date
    net.summary.append(
        f"Prior: {kind} of {day[:4]}-{day[4:6]}-{day[6:]} as the consultant sees it (dates "
        "shifted, one pseudonymous patient); p on the study in Studies compares them"
    )
    net.say(f"  {net.summary[-1]}")


def check_received(net: DemoNetwork, requested: Requested) -> list[Any]:
    """The consultant's copy: every instance there, none of them the hospital's original."""
    neurorad = net.nodes[NEURORAD.key]
    received = neurorad.store.instances(requested.shared_study_uid)
    if len(received) != requested.files:
        raise DemoFailed(f"{len(received)} of {requested.files} instances arrived")
    got = {neurorad.store.read_instance(r.sop_instance_uid) for r in received}
    if got & requested.originals:
        raise DemoFailed("an instance left the hospital without de-identification")
    return received


async def open_live(net: DemoNetwork, requested: Requested, received: list[Any]) -> Staged:
    neurorad, neurosurg = net.nodes[NEURORAD.key], net.nodes[NEUROSURG.key]
    request_id = requested.consult_id
    async with net.step("live session: neuroradiologist invites the neurosurgeon"):
        # A guest needs both parties' approval: the hospital's, then the consultant's own.
        rural, surgeon_key = net.nodes[RURAL.key], neurosurg.identity.public_key
        surgeon_id = str(neurosurg.identity.node_id)
        await rural.consulting.approve_live_guest(request_id, surgeon_key)
        await wait_until(
            lambda: (
                str(rural.identity.node_id)
                in neurorad.consults.guest_approvers(request_id, surgeon_id)
            ),
            "the hospital's approval of the neurosurgeon",
        )
        await neurorad.consulting.approve_live_guest(request_id, surgeon_key)
        hub = neurorad.live_hub()
        live: LiveConsult = hub.open(request_id, "CT head - STAT", requested.shared_study_uid)
        await hub.invite(request_id, surgeon_key)
        await wait_until(lambda: request_id in neurosurg.live_hub().sessions, "the join")
        surgeon_live = neurosurg.live_hub().sessions[request_id]

    spacing = received[0].pixel_spacing or (0.5, 0.5)
    middle = received[len(received) // 2]
    position = middle.image_position or (0.0, 0.0, 0.0)
    return Staged(
        request_id,
        requested.shared_study_uid,
        middle.sop_instance_uid,
        float(spacing[0]),
        requested.files,
        live,
        surgeon_live,
        series_uid=middle.series_uid,
        middle_index=len(received) // 2,
        middle_z=float(position[2]),
    )


async def surgeon_when_ready(
    net: DemoNetwork,
    requested: Requested,
    rows: int,
    *,
    within: float = 3600.0,
    moves: int = 20_000,
    period: float = 0.15,
) -> None:
    """Interactive demo: once the person at the TUI accepted the request and fetched the
    study, open the live session, invite the neurosurgeon and let the script run."""
    neurorad = net.nodes[NEURORAD.key]
    try:
        await wait_until(
            lambda: len(neurorad.store.instances(requested.shared_study_uid)) == requested.files,
            "the study at the neuroradiologist (accept with a, fetch with f in the worklist)",
            within=within,
        )
        staged = await open_live(net, requested, check_received(net, requested))
    except (NodeError, ConsultError, TransportError) as exc:
        neurorad.notify(f"demo: the neurosurgeon cannot join: {exc}")
        return
    neurorad.notify("The neurosurgeon joined the live session: press enter on the request")
    await scripted_surgeon(staged, rows, moves=moves, period=period)


async def send_request(net: DemoNetwork, *, slices: int, rows: int) -> Requested:
    """From the CT at the rural hospital to the STAT request in the consultant's worklist."""
    rural, neurorad, _ = (net.nodes[r.key] for r in ROLES)
    net.verify_everyone()

    async with net.step(
        f"rural hospital: CT head, {slices} slices of {rows}x{rows}, into its store"
    ):
        files = await asyncio.to_thread(
            generate_ct, net.root / "ct", slices=slices, rows=rows, study=STUDY
        )
        for path in files:
            rural.store.add_file(path, source="modality")
        study = rural.store.study(STUDY.study_uid)
        prior = await asyncio.to_thread(
            generate_ct,
            net.root / "prior",
            slices=slices,
            rows=rows,
            study=PRIOR,
            haematoma=False,
            seed=1,
        )
        for path in prior:
            rural.store.add_file(path, source="modality")
        net.say(f"  and her prior, CT head of {PRIOR.date[:4]}-{PRIOR.date[4:6]}-{PRIOR.date[6:]}")
        originals = {
            rural.store.read_instance(uid)
            for uid in rural.store.iter_instance_uids(study.study_uid)
        }

    async with net.step("rural hospital: find an online neuroradiologist through the registry"):
        from registry.client import SearchQuery

        found = await rural.directory.search(
            SearchQuery(subspecialty="neuro", jurisdiction="IE", online=True), rural.now()
        )
        if not any(p.record.public_key == neurorad.identity.public_key for p in found):
            raise DemoFailed("the neuroradiologist was not found by subspecialty search")
        net.say(f"  found: {', '.join(p.record.display_name for p in found)}")

    async with net.step("rural hospital: STAT consult request, study de-identified"):
        net.summary.append(f"Question ({Priority.STAT.value.upper()}): {QUESTION}")
        net.say(f"  {net.summary[-1]}")
        request, share, how = await rural.consulting.request_consult(
            neurorad.identity.public_key,
            study.study_uid,
            consults.Terms(
                question=QUESTION,
                priority=Priority.STAT,
                subspecialty="neuro",
                jurisdiction="IE",
                priors=rural.consulting.priors_in_store(study.study_uid),
            ),
        )
        net.say(f"  request {request.id[:8]} {how}, with {len(request.priors)} prior study")
        await wait_until(lambda: bool(neurorad.consults.cases()), "request in the worklist")
    return Requested(request.id, share.shared_study_uid, len(files), frozenset(originals))


async def finish(net: DemoNetwork, staged: Staged, *, rows: int) -> None:
    """Annotate and chat together, report, and check it reached the hospital."""
    rural = net.nodes[RURAL.key]
    neurorad = net.nodes[NEURORAD.key]
    live, surgeon_live, middle = staged.neuroradiologist, staged.surgeon, staged.middle_slice
    request_id = staged.consult_id
    async with net.step("live session: the neuroradiologist presents, the surgeon follows"):
        view = Viewport(staged.series_uid, staged.middle_index, window=80.0, level=40.0)
        live.set_viewport(view)
        live.present(True)
        surgeon_live.follow()
        await wait_until(
            lambda: surgeon_live.presence.me.viewport == view, "the surgeon's view following"
        )
        net.say(
            f"  the neurosurgeon's view follows: slice {view.slice_index + 1} of "
            f"{staged.files}, brain window W{view.window:.0f}/L{view.level:.0f}"
        )

    async with net.step("live session: both annotate, measure and chat"):
        span = collection_span(rows, staged.middle_z)
        if span is None:  # a tiny test study that misses the collection: any segment
            span = ((rows * 0.75, rows * 0.5), (rows * 0.75 - 18, rows * 0.5))
        (c0, r0), (c1, r1) = span
        length_mm = math.hypot(c1 - c0, r1 - r0) * staged.spacing
        live.add_annotation(
            AnnotationKind.LENGTH,
            middle,
            0,
            span,
            text="SDH thickness",
            values={"length_mm": length_mm},
        )
        live.say(
            f"Acute left convexity subdural, {length_mm:.0f} mm at the thalami, left "
            "ventricle squeezed, about 4 mm shift to the right."
        )
        head = ((c0 + c1) / 2, (r0 + r1) / 2)
        surgeon_live.add_annotation(
            AnnotationKind.ARROW,
            middle,
            0,
            ((head[0] - rows * 0.16, head[1] - rows * 0.1), head),
            text="acute SDH",
        )
        surgeon_live.say(
            "Agree. With that shift on apixaban we take her tonight: reverse the apixaban "
            "and send her over."
        )
        await wait_until(
            lambda: len(live.annotations()) == 2 and len(surgeon_live.annotations()) == 2,
            "both annotations on both sides",
        )
        await wait_until(
            lambda: len(live.chat()) == 2 and len(surgeon_live.chat()) == 2, "chat on both sides"
        )
        await wait_until(lambda: len(live.participants()) == 2, "the surgeon's presence")
        net.say(
            f"  participants seen by the neuroradiologist: "
            f"{', '.join(p.name for p in live.participants())}"
        )
        names = {p.node: p.name for p in live.participants()}
        for message in sorted(live.chat(), key=lambda m: m.at):
            net.say(f"  chat, {names.get(message.author, 'someone')}: {message.text}")

    async with net.step("neuroradiologist: sign the report, send it back"):
        measurements, marks = neurorad.consulting.reports.report_items_of(
            request_id, live.annotations()
        )
        net.say(f"  {len(measurements)} measurement(s) and {len(marks)} mark(s), on their slice")
        for m in measurements:
            net.summary.append(f"Measurement: {m.label or m.quantity} {m.value:.1f} {m.unit.value}")
            net.say(f"  {net.summary[-1]}")
        thickness = measurements[0].value if measurements else 9.0
        findings, impression = (
            FINDINGS.format(thickness=thickness),
            IMPRESSION.format(thickness=thickness),
        )
        await neurorad.consulting.reports.send_report(
            request_id,
            text=findings,
            impression=impression,
            # Both annotations, on the slice they were drawn on; that slice is the key image.
            measurements=measurements,
            marks=marks,
            key_images=tuple({m.image for m in measurements if m.image}),
        )
        await wait_until(lambda: request_id in rural.reports, "the report at the hospital")
        sr_uid = rural.reports[request_id]
        net.say(f"  DICOM SR {sr_uid[:24]}... filed under the real patient in the hospital store")
    await asyncio.to_thread(_print_filed_report, net, sr_uid, staged)

    if net.pacs_server is not None:
        async with net.step("hospital PACS: the report arrived"):
            server = net.pacs_server
            await wait_until(lambda: bool(server.instance_ids()), "the SR in Orthanc")
            net.say(f"  Orthanc holds {len(server.instance_ids())} instance(s)")

    async with net.step("audit: every node's log verifies"):
        for key, runtime in net.nodes.items():
            report = runtime.audit.verify()
            if not report.ok:
                raise DemoFailed(f"{key} audit log: {report.problems}")
    digest = hashlib.sha256(repr(sorted(r.kind for r in rural.audit.records())).encode())
    net.say(
        f"hospital audit trail: {len(rural.audit.records())} records ({digest.hexdigest()[:8]})"
    )


def _print_filed_report(net: DemoNetwork, sr_uid: str, staged: Staged) -> None:
    """The report as the hospital holds it: re-identified, with its text."""
    import pydicom

    rural, neurorad = net.nodes[RURAL.key], net.nodes[NEURORAD.key]
    with rural.store.open_instance(sr_uid) as stream:
        sr = pydicom.dcmread(stream)
    seen_as = neurorad.store.study(staged.shared_study_uid).patient_name
    net.summary += [
        *_sr_text(sr),
        f"filed at the hospital under {sr.PatientName} (ID {sr.PatientID}, sex "
        f"{sr.get('PatientSex', '?')}); the consultant saw only {seen_as}",
    ]


def _sr_text(sr: Any) -> list[str]:
    """The report's text items (findings, impression, ...), in document order."""
    lines: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            if getattr(item, "ValueType", "") == "TEXT" and "ConceptNameCodeSequence" in item:
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                if meaning in ("Finding", "Impression"):
                    lines.append(f"{meaning}: {item.TextValue}")
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return lines


async def run_headless(
    root: Path,
    *,
    slices: int = 40,
    rows: int = 512,
    with_pacs: bool = True,
    out: TextIO = sys.stdout,
) -> int:
    """The scripted scenario; 0 when every step worked."""
    await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
    net = DemoNetwork(root, out)
    try:
        await net.start(with_pacs=with_pacs)
        await scenario(net, slices=slices, rows=rows)
    except Exception as exc:  # every failure is reported, then the exit code says it
        net.say(f"FAILED: {exc}")
        return 1
    finally:
        await net.stop()
    net.say("demo complete: request, accept, transfer, live session, signed report, PACS")
    print("\nThe case:", file=out)
    for line in net.summary:
        print(f"  {line}", file=out)
    return 0


async def scripted_surgeon(
    staged: Staged, rows: int, *, moves: int = 20_000, period: float = 0.15
) -> None:
    """The neurosurgeon as a script: a moving cursor, an annotation, a few chat lines.

    Bounded: ``moves`` cursor moves (about 50 minutes at the default period), or
    until cancelled when the person quits the TUI.
    """
    live = staged.surgeon
    centre = rows / 2
    for move in range(moves):
        angle = move * 0.12
        live.move_cursor(
            Cursor(
                staged.middle_slice,
                0,
                centre + rows * 0.22 * math.cos(angle),
                centre + rows * 0.16 * math.sin(angle),
            )
        )
        if move == 25:
            span = collection_span(rows, staged.middle_z)
            (c0, r0), (c1, r1) = span or ((rows * 0.75, rows * 0.5), (rows * 0.72, rows * 0.5))
            live.add_annotation(
                AnnotationKind.POINT,
                staged.middle_slice,
                0,
                (((c0 + c1) / 2, (r0 + r1) / 2),),
                text="thickest point?",
            )
            live.say("Hyperdense, so acute. Is this the thickest point? Can you measure it?")
        if move == 50:
            live.set_viewport(Viewport(staged.series_uid, staged.middle_index, 80.0, 40.0))
            live.present(True)
            live.say("I am presenting: press f in the viewer to follow my view.")
        if move == 80:
            live.say("If it is 9 mm with shift we take her tonight. Can you finish the report?")
        await asyncio.sleep(period)
