"""Critical results on a running node: the paging hook and the escalation timer.

The hospital's node raises an alert when a critical report arrives (before the SR
export and PACS push, which can take seconds): a banner the TUI shows until a
named person acknowledges, and the site's ``[alerts] critical_command``. Until the
acknowledgement the hospital's node escalates and the consultant's node re-sends
the report, both on :class:`consult.alerts.EscalationSchedule`; the steps taken
are kept in the consult store, so a restart neither forgets nor repeats them.

The hook is run without a shell, with only the consult id as data (never patient
data: a pager gateway logs its arguments), with a timeout; a failure is logged,
audited and shown, and never stops the alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consult.alerts import AckPolicy, EscalationSchedule, ReportAck
from consult.errors import ConsultError
from consult.requests import TRANSITIONS, Event, Role
from node.core.audit import AuditKind
from node.core.config import AlertsConfig
from node.core.errors import NodeError

if TYPE_CHECKING:
    from node.app.runtime import NodeRuntime

log = logging.getLogger(__name__)

TICK_SECONDS = 15.0  # how often the timer looks for due re-sends and escalations
_CONSULT_ID = re.compile(r"[0-9A-Za-z]{1,64}")
Resend = Callable[[str], Awaitable[str]]


def policy_of(config: AlertsConfig) -> AckPolicy:
    return AckPolicy(
        config.ack_routine_minutes * 60,
        config.ack_urgent_minutes * 60,
        config.ack_stat_minutes * 60,
        config.ack_critical_minutes * 60,
    )


def schedule_of(config: AlertsConfig) -> EscalationSchedule:
    return EscalationSchedule(config.critical_repeat_minutes * 60, config.critical_max_repeats)


def hook_argv(template: Sequence[str], consult_id: str, escalation: int) -> list[str]:
    """The command line for one alert: ``{consult}`` replaced by the id, and
    ``--escalation K`` appended from the first escalation on."""
    if not template or not all(isinstance(part, str) for part in template):
        raise NodeError("[alerts] critical_command must be a list of strings: program, arguments")
    if not _CONSULT_ID.fullmatch(consult_id):
        raise NodeError("a consult id for the alert command must be letters and digits")
    argv = [part.replace("{consult}", consult_id) for part in template]
    return argv + (["--escalation", str(escalation)] if escalation > 0 else [])


@dataclass(frozen=True)
class HookResult:
    ok: bool
    detail: str  # exit status, or why it did not run


async def run_hook(argv: Sequence[str], limit_s: float) -> HookResult:
    """Run ``argv`` (no shell, no input, output discarded), killed after ``limit_s`` seconds."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return HookResult(False, f"could not start {argv[0]}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(limit_s):
            code = await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return HookResult(False, f"{argv[0]} did not finish within {limit_s:g} s and was killed")
    return HookResult(code == 0, f"exit status {code}")


class CriticalAlerts:
    """One node's critical-result alerts: raise, escalate, re-send, clear on ack (the
    runtime builds it as ``rt.alerts``; ``resend`` sends a kept report again)."""

    def __init__(self, rt: NodeRuntime, resend: Resend) -> None:
        self.rt = rt
        self._resend = resend
        self._lock = asyncio.Lock()
        self.hook_results: list[HookResult] = []  # for `status` and tests

    @property
    def config(self) -> AlertsConfig:
        return self.rt.config.alerts

    def banners(self) -> list[ReportAck]:
        """Critical results received here and not acknowledged yet (the Home banner);
        ``steps`` is the escalation level."""
        return [
            r
            for r in self.rt.consults.report_acks(unacknowledged=True)
            if r.critical and r.role is Role.REQUESTER
        ]

    def raise_alert(self, consult_id: str, level: int = 0) -> None:
        """Show and page a critical result (``level`` 0 on arrival, then each escalation).

        The command runs in the background: the message loop that brought the report (and
        the peer's delivery waiting on it) does not wait for a slow pager."""
        short = consult_id[:8]
        what = "CRITICAL RESULT" if level == 0 else f"CRITICAL RESULT, escalation {level}"
        self.rt.notify(
            f"{what} on consult {short}: acknowledge it by name "
            f"(`radmesh consult ack {short} --by NAME`, or k on Home)"
        )
        self.rt.audit.append(
            AuditKind.CONSULT,
            now=self.rt.clock(),
            details={"consult": consult_id, "event": "critical-alert", "level": level},
        )
        if self.config.critical_command:
            self.rt.spawn(self._page(consult_id, level))

    async def _page(self, consult_id: str, level: int) -> None:
        try:
            argv = hook_argv(self.config.critical_command, consult_id, level)
        except NodeError as exc:
            result = HookResult(False, str(exc))
        else:
            result = await run_hook(argv, float(self.config.command_timeout_seconds))
        self.hook_results.append(result)
        if not result.ok:
            log.warning("critical alert command failed for consult %s: %s", consult_id, result)
            self.rt.audit.append(
                AuditKind.CONSULT,
                now=self.rt.clock(),
                details={"consult": consult_id, "event": "critical-alert-command-failed"},
            )
            self.rt.notify(
                f"The critical alert command failed ({result.detail}): page the team by "
                "other means, and fix [alerts] critical_command"
            )

    async def tick(self, now: int | None = None) -> None:
        """Take every re-send and escalation due at ``now`` (default: the node's clock)."""
        now = self.rt.now() if now is None else now
        schedule = schedule_of(self.config)
        async with self._lock:
            for row in self.rt.consults.report_acks(unacknowledged=True):
                step = schedule.due(row.reported_at, row.steps, now) if row.critical else None
                if step is None:
                    continue
                try:
                    state = self.rt.consults.get(row.consult_id).state
                    if (state, Event.ACKNOWLEDGE) not in TRANSITIONS:
                        continue  # withdrawn meanwhile, or acknowledged: nothing to repeat
                    self.rt.consults.set_steps(row.consult_id, step)
                    if step == schedule.max_steps:
                        self._last_step(row)
                    if row.role is Role.CONSULTANT:
                        how = await self._resend(row.consult_id)
                        log.info("critical report %s re-sent (%d): %s", row.consult_id, step, how)
                    else:
                        self.raise_alert(row.consult_id, step)
                except (ConsultError, NodeError) as exc:
                    log.warning("critical result %s: step %d failed: %s", row.consult_id, step, exc)

    def _last_step(self, row: ReportAck) -> None:
        """The bounded repeats end here: from now on it takes a person on the phone."""
        short = row.consult_id[:8]
        self.rt.notify(
            f"The critical result on consult {short} is still not acknowledged after the last "
            + (
                "re-send: phone the referring team"
                if row.role is Role.CONSULTANT
                else "escalation: no more pages will be sent; find the responsible clinician"
            )
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.tick()
            except Exception:  # one bad round must not end the timer
                log.exception("critical-result timer round failed; trying again")
