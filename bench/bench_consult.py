"""Live consultation state: late joiner with 1,000 annotations, edit throughput, presence.

Run: ``python -m bench consult``. Baselines measured in the same run: shipping
the same content as one JSON document (what a naive "send the whole state"
design would do) and JSON-encoding each edit. Cursor latency over the real
transport comes once peer_transport's live channel exists.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from consult.presence import Cursor, Presence
from consult.shared import AnnotationKind, LiveSession, SharedState
from crypto.identity import Identity

ANNOTATIONS = 1_000
EDITS = 2_000


def _best(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _json(value: dict[str, object]) -> dict[str, object]:
    """The JSON baselines carry the key and signature too, as hex."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in value.items()}


def _populated() -> SharedState:
    host = SharedState("bench", Identity.generate(), client_id=1)
    kinds = list(AnnotationKind)
    counts = {"point": 1, "arrow": 2, "length": 2, "angle": 3, "ellipse": 2}
    for i in range(ANNOTATIONS):
        kind = kinds[i % len(kinds)]
        points = tuple((float(i % 512) + k, float(i // 512) + k) for k in range(counts[kind]))
        host.add_annotation(
            kind,
            f"2.25.{1000 + i // 50}",
            i % 4,
            points,
            float(i),
            text="finding" if kind == AnnotationKind.ARROW else "",
            values={"length_mm": 12.5} if kind == AnnotationKind.LENGTH else {},
        )
    for i in range(100):
        host.say(f"message {i}: compare with the prior study", float(i))
    host.insert_report(0, "Findings. " * 300)
    return host


def late_joiner(host: SharedState) -> None:
    def join() -> SharedState:
        joiner = SharedState("bench", Identity.generate())
        reply = host.receive(joiner.sync_step1())
        assert reply is not None
        joiner.receive(reply)
        return joiner

    joiner = join()
    assert joiner.snapshot() == host.snapshot()
    step2 = host.receive(SharedState("bench", Identity.generate()).sync_step1())
    assert step2 is not None
    crdt_s = _best(join)
    snapshot_s = _best(lambda: join().snapshot(), repeat=3)

    plain = {
        "annotations": {a.id: _json(a.to_py()) for a in host.annotations()},
        "chat": [_json(m.to_py()) for m in host.snapshot().chat],
        "report": host.report_text,
    }
    encoded = json.dumps(plain).encode()
    json_s = _best(lambda: json.loads(json.dumps(plain).encode()))
    print(f"late joiner, {ANNOTATIONS} annotations + 100 chat + 3 kB report:")
    ratio = len(step2) / len(encoded)
    print(
        f"  step 2 size        {len(step2) / 1024:8.1f} KiB"
        f"   (JSON of same: {len(encoded) / 1024:.1f} KiB, ratio {ratio:.2f})"
    )
    print(f"  sync (step1+step2+apply) {crdt_s * 1000:8.2f} ms")
    print(f"  sync + read snapshot     {snapshot_s * 1000:8.2f} ms")
    print(
        f"  baseline JSON dump+load  {json_s * 1000:8.2f} ms"
        f"   (CRDT sync / JSON = {crdt_s / json_s:.1f}x)"
    )


def edit_throughput() -> None:
    author = SharedState("bench", Identity.generate(), client_id=1)
    peer = SharedState("bench", Identity.generate(), client_id=2)
    wire: list[bytes] = []
    LiveSession(author, wire.append).connect()
    wire.clear()
    start = time.perf_counter()
    for i in range(EDITS):
        author.add_annotation(AnnotationKind.POINT, "2.25.1", 0, ((float(i), 1.0),), float(i))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for message in wire:
        peer.receive(message)
    apply_s = time.perf_counter() - start
    assert len(peer.annotations()) == EDITS
    sizes = [len(m) for m in wire]

    typing_wire: list[bytes] = []
    session = LiveSession(author, typing_wire.append)
    session.connect()
    typing_wire.clear()
    start = time.perf_counter()
    for i in range(EDITS):
        author.insert_report(i, "x")
    type_s = time.perf_counter() - start

    sample = _json(author.annotations()[0].to_py())
    json_s = _best(lambda: [json.loads(json.dumps(sample)) for _ in range(EDITS)], repeat=3)
    print(f"edits ({EDITS} annotation adds, author -> peer):")
    print(f"  encode  {EDITS / encode_s:10.0f} edits/s   ({encode_s / EDITS * 1e6:.0f} us each)")
    print(f"  apply   {EDITS / apply_s:10.0f} edits/s   ({apply_s / EDITS * 1e6:.0f} us each)")
    print(f"  update message median {statistics.median(sizes):.0f} B, max {max(sizes)} B")
    print(f"  report typing {EDITS / type_s:10.0f} keystrokes/s")
    print(
        f"  baseline JSON round trip {EDITS / json_s:10.0f} /s"
        f"   (CRDT encode+apply is {(encode_s + apply_s) / json_s:.0f}x slower)"
    )


def presence_throughput() -> None:
    a = Presence("a", "A", "#f00", 0.0, client_id=1)
    b = Presence("b", "B", "#0f0", 0.0, client_id=2)
    moves = 3_000
    sent = 0
    start = time.perf_counter()
    for i in range(moves):
        now = i / 300  # a mouse at 300 Hz for 10 s
        a.set_cursor(Cursor("2.25.1", 0, float(i % 512), 10.0), now)
        message = a.poll(now)
        if message is not None:
            b.receive(message, now)
            sent += 1
    elapsed = time.perf_counter() - start
    print(
        f"presence: {moves} cursor moves at 300 Hz -> {sent} messages "
        f"(coalescing {moves / sent:.0f}:1), {elapsed / moves * 1e6:.0f} us per move"
    )


def main() -> None:
    late_joiner(_populated())
    edit_throughput()
    presence_throughput()


if __name__ == "__main__":
    main()
