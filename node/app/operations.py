"""What a running node does for a local command: the control socket's operation table.

Each operation takes the runtime, the command's arguments (msgpack-plain values) and an
``emit`` for progress lines, and returns a plain value for the command to print. The
same table serves a command on the home's running node (:mod:`node.app.control`) and on
a node brought up for it (:func:`node.app.commands.run`), so the two cannot drift.
The command line (:mod:`node.cli`) only builds the arguments and prints the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from consult.errors import LocalConsultError
from consult.report import Score
from consult.requests import Priority
from crypto.identity import NodeId
from node.app.availability import apply_availability
from node.app.consults import Terms
from node.app.retrieve import retrieve_to_node
from node.app.sending import progress_line, send_to_peer

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

Emit = Callable[[str], None]
Operation = Callable[["NodeRuntime", dict[str, Any], Emit], Awaitable[Any]]


async def send_message(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    return await rt.send_message(a["to"], a["kind"], a["wire"])


async def request_consult(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> dict[str, Any]:
    config = rt.config
    jurisdiction = a["jurisdiction"] or config.country
    if not jurisdiction:
        raise LocalConsultError(
            "give the patient's country with --jurisdiction (or set country in config.toml)"
        )
    terms = Terms(
        question=a["question"],
        priority=Priority(a["priority"]),
        subspecialty=a["subspecialty"],
        jurisdiction=jurisdiction,
        language=a["language"] or (config.languages[0] if config.languages else "en"),
        deadline_seconds=a["deadline_seconds"],
        deidentify=a["deidentify"],
        burned_in_checked=bool(a.get("burned_in_checked")),
        black_out_top=int(a.get("black_out_top") or 0),
        priors=tuple(a.get("priors") or ())
        or (rt.consulting.priors_in_store(a["study"]) if a.get("with_priors") else ()),
    )
    if a["to"] is None:
        request, _, sent = await rt.consulting.route_consult(
            a["study"], terms, max_offers=a["max_offers"]
        )
    else:
        peer = NodeId.parse(a["to"])
        found = await rt.directory.resolve(peer, rt.now())
        if found is None:
            raise LocalConsultError(
                f"peer {peer.short()} is not known: find it with `radmesh peers` first"
            )
        request, _, how = await rt.consulting.request_consult(
            found.record.public_key, a["study"], terms
        )
        sent = {peer: how}
    return {
        "id": request.id,
        "priority": request.priority.value,
        "subspecialty": request.subspecialty,
        "sent": {str(node_id): how for node_id, how in sent.items()},
        "wire": rt.consults.info(request.id).request_wire,
        "priors": len(request.priors),
    }


async def review(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    score = Score(a["score"])  # a consult.report.Score value
    return await rt.consulting.reports.send_review(a["id"], score, a["comment"])


async def withdraw(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> list[str]:
    return [str(node_id) for node_id in await rt.consulting.withdraw(a["id"], a["reason"])]


async def fetch(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    progress = await rt.consulting.studies.fetch(
        a["id"], on_progress=lambda p: emit(progress_line(p))
    )
    return f"{progress.instances_done} instances, {progress.bytes_done / 1e6:.1f} MB"


async def report(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    signed = await rt.consulting.reports.send_report(
        a["id"], text=a["text"], impression=a["impression"], critical=a["critical"]
    )
    return "sent as a critical result" if signed.critical else "sent"


async def acknowledge(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> list[Any]:
    how, seconds = await rt.consulting.reports.acknowledge(a["id"], a["by"])
    return [how, seconds]


async def addendum(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> list[Any]:
    signed, how = await rt.consulting.reports.send_addendum(a["id"], a["text"])
    return [signed.number, how]


async def propose_guest(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    return await rt.guests.propose(a["id"], NodeId.parse(a["guest"]))


async def answer_guest(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    return await rt.guests.answer(a["id"], NodeId.parse(a["guest"]), bool(a["approve"]))


async def set_status(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    return await apply_availability(rt, str(a.get("availability", "")))


async def get_status(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return {
        "availability": rt.config.availability,
        "registries": dict(rt.registry_state),
        # `radmesh doctor`: a held DICOM port that is this node's own is no problem
        "dicom": f"{rt.dicom.ae_title} on port {rt.dicom.port}" if rt.dicom is not None else "",
    }


async def publish(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    return await apply_availability(rt, str(a.get("availability") or rt.config.availability))


async def send_study(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> str:
    state = await send_to_peer(
        rt,
        a["study"],
        a["to"],
        identified=bool(a.get("identified")),
        burned_in_checked=bool(a.get("burned_in_checked")),
        black_out_top=int(a.get("black_out_top") or 0),
    )
    return state.value


async def retrieve(rt: NodeRuntime, a: dict[str, Any], emit: Emit) -> dict[str, Any]:
    done = await retrieve_to_node(
        rt, str(a["study_uid"]), str(a["host"]), int(a["port"]), str(a["aet"]), emit
    )
    return dataclasses.asdict(done)


OPERATIONS: dict[str, Operation] = {
    "message.send": send_message,
    "consult.request": request_consult,
    "consult.review": review,
    "consult.withdraw": withdraw,
    "consult.fetch": fetch,
    "consult.report": report,
    "consult.ack": acknowledge,
    "consult.addendum": addendum,
    "consult.guest.propose": propose_guest,
    "consult.guest.answer": answer_guest,
    "status.set": set_status,
    "status.get": get_status,
    "registry.publish": publish,
    "study.send": send_study,
    "dicom.retrieve": retrieve,
}

__all__ = ["OPERATIONS", "Emit", "Operation"]
