"""The radmesh terminal app: screens are switched here, everything else lives in screens/."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, runtime_checkable

from rich.color import ColorSystem
from textual.app import App
from textual.binding import Binding
from textual.notifications import SeverityLevel
from textual.screen import Screen

from node.core.display import MAX_NAME_CHARS, printable
from tui.facade import NodeFacade
from tui.screens.help import HelpScreen
from tui.screens.home import HomeScreen
from tui.screens.peers import PeersScreen
from tui.screens.studies import StudiesScreen

MAX_NOTIFICATION_CHARS = 500

T = TypeVar("T")
BLOCKING_THREADS = 2
LOW_BANDWIDTH_ENV = "RADMESH_LOW_BANDWIDTH"
NODE_ERROR_SECONDS = 30.0


@runtime_checkable
class ShowsErrors(Protocol):
    """A node running beside the app (tui.remote) whose errors nobody awaits: the
    app shows them, or they would only reach a log nobody reads while the app is up."""

    def show_errors(self, show: Callable[[str], None]) -> None: ...


class RadmeshApp(App[None]):
    TITLE = "radmesh"
    BINDINGS = [  # noqa: RUF012 - Textual's API
        Binding("f1,question_mark", "help", "help"),
        Binding("ctrl+h", "mode('home')", "home", show=False),
        Binding("f2", "mode('home')", "home"),
        Binding("f3", "mode('studies')", "studies"),
        Binding("f4", "mode('peers')", "peers"),
        Binding("ctrl+q", "quit", "quit"),
    ]

    def __init__(self, node: NodeFacade, *, low_bandwidth: bool | None = None) -> None:
        super().__init__()
        self.node = node
        # --low-bandwidth (or RADMESH_LOW_BANDWIDTH=1): 256 colours at most, and the viewer
        # paints less while slices go by fast (tui.widgets.image_view).
        if low_bandwidth is None:
            low_bandwidth = os.environ.get(LOW_BANDWIDTH_ENV, "") not in ("", "0")
        self.low_bandwidth = low_bandwidth
        if low_bandwidth and self.console._color_system == ColorSystem.TRUECOLOR:
            self.console._color_system = ColorSystem.EIGHT_BIT  # what Textual writes with
        # Disk and network calls run here, never on the UI loop; shut down with the app.
        self._executor = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="radmesh-tui")

    @property
    def _background_screens(self) -> list[Screen[Any]]:
        """Screens that show through the top one: none under an opaque screen. Textual counts
        the screen under it too, so Home's timers (its refresh, a progress bar) repainted the
        whole viewer over a terminal that showed none of Home, every second."""
        stack = self._screen_stack
        if stack and stack[-1].styles.background.a == 1:
            return []
        return super()._background_screens

    def on_mount(self) -> None:
        if isinstance(self.node, ShowsErrors):
            self.node.show_errors(self.node_error)
        self.install_screen(HomeScreen(self.node), "home")
        self.install_screen(StudiesScreen(self.node), "studies")
        self.install_screen(PeersScreen(self.node), "peers")
        self.push_screen("home")

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def on_unmount(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every toast, from any screen, is plain text: what it says often comes from a peer
        (a name, an error it sent back), and markup in it would be parsed or crash the app."""
        super().notify(
            printable(message, MAX_NOTIFICATION_CHARS, multiline=True),
            title=printable(title, MAX_NAME_CHARS),
            severity=severity,
            timeout=timeout,
            markup=False,
        )

    def node_error(self, text: str) -> None:
        self.notify(f"The node hit an error: {text}", severity="error", timeout=NODE_ERROR_SECONDS)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_mode(self, name: str) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()
        self.switch_screen(name)
