"""Golden bytes of the node's own message formats: the control socket's frames (a
command and the running node) and the body of a sealed node message."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto import canonical
from node.app import control
from node.app.courier import NodeMessage

GOLDEN = Path(__file__).parent / "golden"

CONTROL = [
    (control.ControlRequest("status", {"verbose": True}), "control_request"),
    (control.Progress("50%"), "control_progress"),
    (control.Answer([1, b"x"]), "control_answer"),
    (control.Failure("no such study"), "control_failure"),
]


@pytest.mark.parametrize(("message", "name"), CONTROL)
def test_control_frame_bytes(message: control.ControlMessage, name: str) -> None:
    golden = (GOLDEN / f"{name}.bin").read_bytes()
    assert message.to_wire() == golden
    payload = golden[4:]  # after the 4-byte length
    if isinstance(message, control.ControlRequest):
        assert control.ControlRequest.from_wire(payload) == message
    else:
        assert control.decode_reply(payload) == message


def test_node_message_body_bytes() -> None:
    golden = (GOLDEN / "node_message_body.bin").read_bytes()
    message = NodeMessage("consult.request", b"\x01\x02")
    assert canonical.encode(message.to_body()) == golden
    assert NodeMessage.from_body(canonical.decode(golden)) == message
