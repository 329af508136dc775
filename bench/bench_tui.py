"""The viewer under load, in a headless Textual app (Pilot): scrolling and keystroke latency.

Run: ``python -m bench tui``. Figures are printed; goals are not asserted.

(a) Slice scrolling: ``j`` is posted 30 times a second for a few seconds (a
    held key, or cine) through the app's event queue, into a viewer of a
    512x512 series on a ~200x60 cell image. Counted: slices requested, frames
    painted, and how long after each request a frame at least that far along
    was painted; it "falls behind" if that lag grows instead of staying flat.
(b) Keystroke-to-repaint: one ``j`` at a time, from posting the key to the
    compositor asking the image view for a line again with the new slice.
    Baseline with nothing else running, then while a bulk stream runs at full
    speed between two real NodeRuntimes in this same process and event loop
    (``send_bulk`` in a loop over real aiortc on 127.0.0.1, as a study
    transfer sends: both ends' encryption, SCTP and decryption share the
    loop). Goal (issue 8): p95 < 50 ms with the transfer running.

Frames come from memory (precomputed), so the figures are the UI's own: key
handling, the numpy pipeline, half-block strips and compositing.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from textual.strip import Strip

from bench.bench_live import introduce, pct, saturate, start
from crypto.identity import Identity
from peer_transport.rtc import restrict_host_addresses
from tui.app import RadmeshApp
from tui.facade import Frame
from tui.memory import InMemoryNode
from tui.screens.viewer import ViewerScreen
from tui.widgets.image_view import ImageView

SLICES = 120
IMAGE = 512
APP_SIZE = (232, 64)  # an image view of about 200 x 60 cells beside the series list
SCROLL_HZ = 30
SCROLL_S = 4.0
KEYS = 120
KEY_GAP_S = 0.03  # between single keystrokes: no overlap between measurements


class PrecomputedNode(InMemoryNode):
    """The in-memory study with every frame computed once, as if from a warm disk cache."""

    def __init__(self) -> None:
        super().__init__(Identity.generate(), slices=SLICES, size=IMAGE)
        self.frames: dict[str, Frame] = {}
        self.index_of: dict[int, int] = {}  # id(frame) -> slice index
        for ref in self.instances(self.series(self.studies()[0].study_uid)[0].series_uid):
            frame = super().load_frame(ref.sop_uid)
            assert frame is not None
            self.frames[ref.sop_uid] = frame
            self.index_of[id(frame)] = ref.number - 1

    def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
        return self.frames.get(sop_uid) or super().load_frame(sop_uid, frame)


class PaintProbe:
    """Records each repaint of the image view: when, and which slice it showed.

    The view refreshes only the rows that changed, so a repaint is the compositor asking
    for any of its lines: a new pass starts when it asks for a line at or above the last
    one asked for, or the slice shown changed."""

    def __init__(self, view: ImageView, node: PrecomputedNode) -> None:
        self.paints: list[tuple[float, int]] = []
        self.changed = asyncio.Event()
        self._view, self._node = view, node
        self._last: int | None = None
        self._last_y = -1
        render_line = view.render_line

        def probed(y: int) -> Strip:
            shown = view.frame
            index = node.index_of.get(id(shown), -1) if shown is not None else -1
            if y <= self._last_y or index != self._last:
                self.paints.append((time.perf_counter(), index))
                if index != self._last:
                    self._last = index
                    self.changed.set()
            self._last_y = y
            return render_line(y)

        view.render_line = probed  # type: ignore[method-assign]

    def shown_at_least(self, index: int, after: float) -> float | None:
        for at, shown in self.paints:
            if at >= after and shown >= index:
                return at
        return None


async def open_viewer(app: RadmeshApp, node: PrecomputedNode) -> tuple[ViewerScreen, PaintProbe]:
    screen = ViewerScreen(node, node.studies()[0])
    await app.push_screen(screen)
    deadline = time.monotonic() + 10
    while screen.view.frame is None:
        assert time.monotonic() < deadline, "the first slice never showed"
        await asyncio.sleep(0.01)
    return screen, PaintProbe(screen.view, node)


async def scrolling(app: RadmeshApp, node: PrecomputedNode) -> list[float]:
    _, probe = await open_viewer(app, node)
    await asyncio.sleep(0.2)
    requests: list[tuple[float, int]] = []
    loop_start = time.perf_counter()
    count = min(int(SCROLL_HZ * SCROLL_S), SLICES - 1)  # a step past the last paints nothing
    for i in range(count):
        delay = loop_start + i / SCROLL_HZ - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        requests.append((time.perf_counter(), min(SLICES - 1, i + 1)))
        app.simulate_key("j")
    sent_over = time.perf_counter() - loop_start
    deadline = time.monotonic() + 5
    while probe.shown_at_least(requests[-1][1], requests[-1][0]) is None:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    lags = []
    for at, index in requests:
        painted = probe.shown_at_least(index, at)
        lags.append((painted - at) * 1000 if painted is not None else float("inf"))
    distinct = len({index for _, index in probe.paints})
    half = len(lags) // 2
    first, second = statistics.median(lags[:half]), statistics.median(lags[half:])
    behind = "falls behind" if second > 2 * first + 10 else "keeps up"
    print(
        f"  (a) scrolling {SCROLL_HZ}/s for {SCROLL_S:.0f} s ({count} keys posted over "
        f"{sent_over:.2f} s): {distinct - 1} new slices painted, {len(probe.paints)} paints; "
        f"request->painted p50 {pct(lags, 0.5):.1f} ms p95 {pct(lags, 0.95):.1f} ms "
        f"max {max(lags):.1f} ms; first half median {first:.1f} ms, second half "
        f"{second:.1f} ms: {behind}"
    )
    app.pop_screen()
    await asyncio.sleep(0.1)
    return lags


async def keystrokes(app: RadmeshApp, node: PrecomputedNode) -> list[float]:
    viewer, probe = await open_viewer(app, node)
    await asyncio.sleep(0.2)
    latencies = []
    for i in range(KEYS):
        if viewer.index >= SLICES - 1:
            viewer.action_goto(0)
            await asyncio.sleep(0.1)
        target = viewer.index + 1
        probe.changed.clear()
        posted = time.perf_counter()
        app.simulate_key("j")
        try:
            await asyncio.wait_for(probe.changed.wait(), 2)
        except TimeoutError:
            latencies.append(2000.0)
            continue
        painted = probe.shown_at_least(target, posted)
        latencies.append(((painted or time.perf_counter()) - posted) * 1000)
        await asyncio.sleep(KEY_GAP_S if i % 7 else KEY_GAP_S * 2)
    app.pop_screen()
    await asyncio.sleep(0.1)
    return latencies


def report(label: str, latencies: list[float]) -> None:
    p95 = pct(latencies, 0.95)
    verdict = "meets" if p95 < 50 else "MISSES"
    print(
        f"  (b) keystroke->repaint, {label:<36} p50 {pct(latencies, 0.5):6.1f} ms  "
        f"p95 {p95:6.1f} ms  max {max(latencies):6.1f} ms  ({verdict} p95 < 50 ms)"
    )


async def run(root: Path) -> None:
    node = PrecomputedNode()
    app = RadmeshApp(node)
    async with app.run_test(headless=True, size=APP_SIZE):
        await asyncio.sleep(0.2)
        await scrolling(app, node)
        report("idle", await keystrokes(app, node))

        restrict_host_addresses(["127.0.0.1"])
        a, b = await start(root, "ana"), await start(root, "ben")
        try:
            introduce([a, b])
            conn = await a.transport.connect(b.identity.public_key)
            received = [0]

            def on_bulk(data: bytes) -> None:
                received[0] += len(data)

            incoming = b.transport.connection(a.identity.public_key)
            assert incoming is not None
            incoming.set_receiver("bulk", on_bulk)
            stop, sent = asyncio.Event(), [0]
            pump = asyncio.ensure_future(saturate(conn, stop, sent))
            await asyncio.sleep(1.0)
            started, before = time.perf_counter(), received[0]
            await asyncio.sleep(2.0)
            alone = (received[0] - before) / (time.perf_counter() - started) / 1e6
            started, before = time.perf_counter(), received[0]
            latencies = await keystrokes(app, node)
            rate = (received[0] - before) / (time.perf_counter() - started) / 1e6
            report(f"with {rate:.1f} MB/s bulk in this process", latencies)
            print(f"      bulk stream alone (app idle, same process): {alone:.1f} MB/s")
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pump, 5)
        finally:
            await a.stop()
            await b.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


if __name__ == "__main__":
    main()
