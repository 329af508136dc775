"""What the terminal costs over SSH: bytes the TUI writes, through a real pty.

Run: ``python -m bench terminal``. Figures are printed; goals are not asserted.

The app runs in a child process on a pseudo-terminal (``TERM=xterm-256color``,
truecolor unless the run is 256-colour), on a demo-like study: the demo's head
CT phantom (512 x 512, noise included, brain window) in a live consult with a
remote participant (the demo's neurosurgeon). The parent reads everything the
child writes to the terminal and counts it:

- per slice step: one ``j`` at a time, bytes until the terminal is quiet again;
- per idle second: the viewer open, nothing happening, over a few seconds;
- per remote cursor move: the neurosurgeon's cursor moves on the shown slice.
- a burst of steps faster than 10/s (a held key): bytes and image paints in all.

Each in normal mode (truecolor) and ``--low-bandwidth`` (256 colours, coarse frames
while scrolling fast), at 200x55 and 80x24, and once more with the image view's
caching disabled (``--no-cache``: the view repaints whole, as before this bench
existed), which is the baseline the ratios are taken against.

Goals (issue 18): <= 40 KiB per slice step at 200x55 in low-bandwidth mode,
<= 100 KiB in normal mode, 0 B per idle second.

The child takes its commands on a pipe (``ctl``) and answers on another: ``cursor X Y``
moves the remote cursor, ``stats`` reports the image view's counters; tests use the
same :class:`PtyApp`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

QUIET_S = 0.35  # no output for this long: the terminal has everything for now
SETTLE_TIMEOUT_S = 20.0
IDLE_S = 3.0
STEPS = 8
CURSOR_MOVES = 12
BURST_KEYS = 30
BURST_HZ = 30
SIZES = ((200, 55), (80, 24))
ROOT = Path(__file__).resolve().parents[1]  # the child runs `python -m bench.bench_terminal`


@dataclass
class Stats:
    frames: int  # image view redraws asked for
    strips: int  # image rows rendered from pixels (cache misses)
    index: int  # slice shown


class PtyApp:
    """The TUI in a child process on a pty of ``size`` cells; counts what it writes."""

    def __init__(
        self,
        size: tuple[int, int],
        *,
        low_bandwidth: bool = False,
        no_cache: bool = False,
        truecolor: bool = True,
        slices: int = 40,
        rows: int = 512,
    ) -> None:
        self.size = size
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        ctl_r, self._ctl_w = os.pipe()
        self._ans_r, ans_w = os.pipe()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TMUX", "COLORTERM", "TEXTUAL_COLOR_SYSTEM", "RADMESH_LOW_BANDWIDTH")
        }
        env.update(TERM="xterm-256color", RADMESH_GRAPHICS="halfblock")
        if truecolor:
            env["COLORTERM"] = "truecolor"
        args = [sys.executable, "-m", "bench.bench_terminal", "--child"]
        args += ["--ctl", str(ctl_r), "--ans", str(ans_w)]
        args += ["--slices", str(slices), "--rows", str(rows)]
        if low_bandwidth:
            args.append("--low-bandwidth")
        if no_cache:
            args.append("--no-cache")
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            pass_fds=(ctl_r, ans_w),
            start_new_session=True,
            cwd=ROOT,
        )
        os.close(slave)
        os.close(ctl_r)
        os.close(ans_w)
        self.master = master
        self.total = 0
        self.output = bytearray()
        self._answers = b""

    # reading
    def pump(self, timeout: float) -> int:
        """Read what the app wrote within ``timeout`` seconds; returns the byte count."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return 0
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:
            return 0
        self.total += len(data)
        self.output += data
        if len(self.output) > 1 << 22:
            del self.output[: len(self.output) - (1 << 20)]
        return len(data)

    def settle(self, quiet: float = QUIET_S, timeout: float = SETTLE_TIMEOUT_S) -> int:
        """Read until nothing came for ``quiet`` seconds; bytes read."""
        start, deadline = self.total, time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            if self.pump(0.05):
                last = time.monotonic()
            elif time.monotonic() - last >= quiet:
                break
        return self.total - start

    def read_for(self, seconds: float) -> int:
        start, deadline = self.total, time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.pump(min(left, 0.05))
        return self.total - start

    # commands
    def key(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ask(self, command: str, timeout: float = SETTLE_TIMEOUT_S) -> str:
        """Send a command to the child's control pipe; its one-line answer (output is
        read meanwhile, so the app never blocks on a full terminal)."""
        os.write(self._ctl_w, command.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._answers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {command!r}")
            ready, _, _ = select.select([self.master, self._ans_r], [], [], 0.1)
            if self.master in ready:
                self.pump(0)
            if self._ans_r in ready:
                chunk = os.read(self._ans_r, 4096)
                if not chunk:
                    raise EOFError(f"the app exited; it wrote: {self.tail()!r}")
                self._answers += chunk
        line, self._answers = self._answers.split(b"\n", 1)
        return line.decode()

    def stats(self) -> Stats:
        frames, strips, index = (int(v) for v in self.ask("stats").split())
        return Stats(frames, strips, index)

    def wait_ready(self) -> None:
        answer = self.ask("ready", timeout=60)
        assert answer == "ready", answer

    def tail(self) -> bytes:
        return bytes(self.output[-2000:])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._ctl_w, b"quit\n")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self.master, self._ctl_w, self._ans_r):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def pty_app(size: tuple[int, int], **kw: bool | int) -> Iterator[PtyApp]:
    app = PtyApp(size, **kw)  # type: ignore[arg-type]
    try:
        app.wait_ready()
        app.settle()
        yield app
    finally:
        app.close()


# --- the child: the app on the pty ------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    import asyncio

    import numpy as np
    from textual.app import App

    from consult.presence import Cursor
    from crypto.identity import Identity
    from node.demo import phantom
    from tui.app import RadmeshApp
    from tui.facade import Frame, SeriesInfo
    from tui.imaging import Window
    from tui.memory import SERIES_UID, STUDY_UID, InMemoryNode
    from tui.screens.viewer import ViewerScreen
    from tui.widgets.image_view import ImageView

    rows, slices = args.rows, args.slices
    spacing = phantom.HEAD_FOV_MM / rows
    rng = np.random.default_rng(1)
    positions = phantom.slice_positions(slices)

    def head(index: int) -> Frame:
        hu = phantom.head_hu(rows, positions[index], rng=rng)
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
        return Frame(stored, 1.0, -1024.0, (spacing, spacing), True, None, None, Window(40, 80))

    class HeadNode(InMemoryNode):
        def __init__(self) -> None:
            super().__init__(Identity.generate(), slices=slices, size=rows)
            self.frames = {ref.sop_uid: head(ref.number - 1) for ref in self.instances(SERIES_UID)}

        def series(self, study_uid: str) -> list[SeriesInfo]:
            return [SeriesInfo(SERIES_UID, STUDY_UID, 2, "CT", "AX HEAD 5/5 BRAIN", slices)]

        def load_frame(self, sop_uid: str, frame: int = 0) -> Frame | None:
            return self.frames.get(sop_uid)

    node = HeadNode()
    ctl, ans = args.ctl, args.ans

    class BenchApp(RadmeshApp):
        viewer: ViewerScreen | None = None

        def on_ready(self) -> None:
            self.surgeon = node.live.join("Dr. M. Lindqvist", "#ff8700")
            self.viewer = ViewerScreen(node, node.studies()[0], live=True)
            self.push_screen(self.viewer)
            asyncio.get_running_loop().add_reader(ctl, self._command)

        def _answer(self, text: str) -> None:
            os.write(ans, text.encode() + b"\n")

        def _command(self) -> None:
            data = os.read(ctl, 4096)
            for line in data.decode().splitlines():
                try:
                    self._run(line.split())
                except Exception as exc:  # said on the answer pipe, not drawn over the app
                    self._answer(f"error {exc!r}")

        def _run(self, words: list[str]) -> None:
            viewer = self.viewer
            if not words or viewer is None:
                return
            if words[0] == "quit":
                self.exit()
                return
            if words[0] == "ready":

                def shown() -> bool:
                    if not viewer.is_attached:
                        return False
                    return any(view.frame is not None for view in viewer.query(ImageView))

                self._when(shown, lambda: self._answer("ready"))
                return
            view = viewer.query_one(ImageView)
            if words[0] == "cursor":
                ref = viewer.current
                assert ref is not None
                cursor = Cursor(ref.sop_uid, viewer.frame_no, float(words[1]), float(words[2]))
                self.surgeon.cursor(cursor)
                self.call_after_refresh(self._answer, "ok")
            elif words[0] == "goto":
                viewer.action_goto(int(words[1]))
                self._when(lambda: not view.waiting, lambda: self._answer("ok"))
            elif words[0] == "stats":
                self._answer(f"{view.frames_rendered} {view.strips_rendered} {viewer.index}")

        def _when(self, ready: object, then: object) -> None:
            assert callable(ready)
            assert callable(then)
            if ready():
                self.call_after_refresh(then)
            else:
                self.set_timer(0.05, lambda: self._when(ready, then))

    if args.no_cache:  # the baseline: as before the terminal work
        ImageView.caching = False
        BenchApp._background_screens = App._background_screens  # type: ignore[method-assign]
    BenchApp(node, low_bandwidth=args.low_bandwidth).run()


# --- the parent: the figures ------------------------------------------------------------


def _kib(n: float) -> str:
    return f"{n / 1024:7.1f} KiB"


def measure(size: tuple[int, int], **kw: bool | int) -> dict[str, float]:
    with pty_app(size, **kw) as app:
        app.ask("goto 16")  # the middle of the head: the widest slices
        app.settle()
        steps = []
        for _ in range(STEPS):
            app.key("j")
            steps.append(app.settle())
        idle = app.read_for(IDLE_S) / IDLE_S
        rows = 512
        moves = []
        before = app.stats()
        for i in range(CURSOR_MOVES):
            sent = app.total
            app.ask(f"cursor {rows * (0.3 + 0.03 * i):.1f} {rows * 0.45:.1f}")
            app.settle(quiet=0.15)
            moves.append(app.total - sent)
        after = app.stats()
        app.ask("goto 5")
        app.settle()
        start = app.stats()
        total = 0
        t0 = time.monotonic()
        for i in range(BURST_KEYS):
            delay = t0 + i / BURST_HZ - time.monotonic()
            if delay > 0:
                total += app.read_for(delay)
            app.key("j")
        total += app.settle(quiet=0.6)
        end = app.stats()
    return {
        "step": sorted(steps)[len(steps) // 2],
        "idle": idle,
        "cursor": sorted(moves)[len(moves) // 2],
        "cursor_strips": (after.strips - before.strips) / CURSOR_MOVES,
        "burst": total,
        "burst_frames": end.frames - start.frames,
        "burst_slices": end.index - start.index,
    }


def main() -> None:
    if "--child" in sys.argv:
        return
    print(
        "  bytes the TUI writes to its terminal (pty), demo head CT 512x512 in a live consult;"
        " medians"
    )
    print(
        f"  {'size':>7} {'mode':<22} {'per step':>12} {'per idle s':>12} {'per cursor':>12}"
        f"  {'burst of ' + str(BURST_KEYS) + ' j at 30/s':<34}"
    )
    for size in SIZES:
        base: dict[str, float] | None = None
        runs: list[tuple[str, dict[str, bool | int]]] = [
            ("baseline (no cache)", {"no_cache": True}),
            ("normal truecolor", {}),
            ("normal 256 colours", {"truecolor": False}),
            ("--low-bandwidth", {"low_bandwidth": True}),
        ]
        for label, kw in runs:
            try:
                r = measure(size, **kw)
            except Exception as exc:  # one broken run must not hide the others
                print(f"  {size[0]}x{size[1]:<3} {label:<22} FAILED: {exc!r}")
                continue
            base = base or r
            ratio = ""
            if r is not base:
                ratio = (
                    f"  step x{base['step'] / max(1, r['step']):.1f},"
                    f" cursor x{base['cursor'] / max(1, r['cursor']):.1f} smaller than baseline"
                )
            print(
                f"  {size[0]:>3}x{size[1]:<3} {label:<22} {_kib(r['step']):>12} "
                f"{r['idle']:>8.0f} B/s {_kib(r['cursor']):>12}  "
                f"{_kib(r['burst'])} {r['burst_frames']:.0f} paints for "
                f"{r['burst_slices']:.0f} slices; image rows re-rendered per cursor move "
                f"{r['cursor_strips']:.1f}{ratio}"
            )
    print(
        "  goals (issue 18, 200x55): <= 40 KiB per step with --low-bandwidth, <= 100 KiB"
        " normal, 0 B per idle second"
    )


if __name__ == "__main__":
    if "--child" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--child", action="store_true")
        parser.add_argument("--ctl", type=int, required=True)
        parser.add_argument("--ans", type=int, required=True)
        parser.add_argument("--slices", type=int, default=40)
        parser.add_argument("--rows", type=int, default=512)
        parser.add_argument("--low-bandwidth", action="store_true")
        parser.add_argument("--no-cache", action="store_true")
        _child(parser.parse_args())
    else:
        main()
