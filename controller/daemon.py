"""The daemon: the controller of one protected pair -- when checkpoints happen, and what then.

The daemon is the only thing that fires checkpoints (``x-checkpoint-delay`` stays huge; one fires
per ``migrate-set-parameters``).  Each checkpoint is :func:`controller.epoch.run_checkpoint`; this
module is the asyncio shell around it and around the other sans-I/O parts, which decide:

* **when** -- :class:`~controller.epoch.CheckpointScheduler`: MC every ``epoch_ms``; COLO on comparator
  requests (a long-poll on ``next-request`` over its own connection) and the safety interval; operator
  requests; all coalesced: triggers that arrive while a checkpoint runs are answered by one next
  checkpoint.  Operating point changes (``mode`` verb: mode, epoch length, passive secondary, stop
  way) are the protocol's pending point and land at the next checkpoint boundary.
* **heartbeat** -- :class:`~controller.heartbeat.Heartbeat` lines to the agent every 100 ms and at each
  protocol step; ``primary_lost`` the moment the primary's QEMU exits or its QMP connection drops;
  ``failover`` for a planned failover.
* **loss handling** (ARCHITECTURE.md §5) -- primary lost: say so and stop (the agent fails over).
  COLO ended or a checkpoint failed while the primary is fine: did the secondary take over
  (:class:`~controller.pair_state.ReplicationEndDecider`)?  Then the primary stays stopped.  Else the
  secondary is lost (so too for its QEMU, its QMP, the disk server, a mirror job error): release the
  held output, ``x-colo-lost-heartbeat`` on the primary, cancel the mirror, make sure the primary
  runs, and carry on unprotected; ``status`` says so (:class:`~controller.pair_state.PairState`).
* **accounting** -- :class:`~controller.accounting.EventAccounting`: every STOP event on the primary
  is counted against the checkpoints the daemon started, so a checkpoint QEMU fired on its own shows
  up as ``unrequested_stops`` (must stay 0); :class:`~controller.accounting.CheckpointsByMode`: each
  mode's checkpoint rate by reason and pause percentiles over the last minute
  (``status``'s ``checkpoints_by_mode``).
* **auto** -- :class:`~controller.autopilot.Autopilot` samples the signals (each one also a Prometheus
  gauge) and, in ``auto``, lets a policy ask for operating points; when protection ends (a failover, a
  lost secondary) its policy stands down: with one VM there is nothing to choose.
* **requests** -- :mod:`controller.requests` checks every control request before anything changes.
* **verify** -- the ``verify`` verb (``hybridft verify``) makes the next checkpoint a held one
  (``PairLinks.hold``, patch 0007): both VMs stay stopped at it while
  :func:`mc_driver.ram_compare.compare_held_ram` compares their RAM, then resume.

Watching events: the checkpoint function consumes RESUME/STOP events while it runs; between
checkpoints a watcher task takes the events (so they are never stale for the next checkpoint) and
reacts to COLO_EXIT, SHUTDOWN, BLOCK_JOB_ERROR and the mirror job's state.

Its settings are :mod:`controller.daemon_config`; the ``hybridft daemon`` command is
:mod:`controller.daemon_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from controller.accounting import CheckpointsByMode, EventAccounting
from controller.autopilot import Autopilot
from controller.daemon_config import DaemonConfig, DaemonError
from controller.epoch import (
    CheckpointError,
    CheckpointScheduler,
    EpochProtocol,
    EpochRecord,
    PairLinks,
    run_checkpoint,
)
from controller.heartbeat import Heartbeat, HeartbeatSender
from controller.metrics import DaemonMetrics
from controller.operating_point import OperatingPoint, PointRequest
from controller.pair_state import (
    NO_ANSWER,
    ColoStatus,
    NoAnswer,
    PairState,
    ReplicationEnd,
    ReplicationEndDecider,
)
from controller.requests import parse_checkpoint_request, parse_mode_request, resolve_stop_via
from controller.signals import CheckpointFigures, SamplerLinks, SignalSampler
from hybridft_common import eventloop, fastpath
from hybridft_common.control import AsyncControlClient, ControlError, serve_control
from hybridft_common.endpoints import parse_endpoint
from hybridft_common.processes import pid_alive
from hybridft_common.settings import AUTO, DEFAULT_POLICY
from hybridft_common.stats import percentile
from hybridft_common.vocabulary import (
    HOLD_HOOK_COMMAND,
    HUGE_CHECKPOINT_DELAY_MS,
    SEAL_HOOK_COMMAND,
    StopVia,
)
from mc_driver.ckpt_stats import DONE_EVENT, CheckpointStats, CheckpointStatsError
from mc_driver.qmp import QmpError, QmpSession
from mc_driver.ram_compare import HeldCheckpointVerdict, RamCompareError, compare_held_ram
from policies.base import PolicyError, params_to_json

log = logging.getLogger("hybridft.daemon")

WATCH_INTERVAL = 0.02
DISK_POLL_INTERVAL = 0.05  # how often the disk server's checkpoint_needed is read
RECENT = 512  # checkpoint records kept for status/percentiles
SWITCHES_SHOWN = 8  # applied operating point changes in status (point_changes)
UNDECIDED_RETRY = 1.0  # how often "took over or lost?" is asked again while the answer is "don't know"
VERIFY_TIMEOUT_DEFAULT = 60.0  # `verify`: the next checkpoint plus copying and comparing both RAMs
STAND_DOWN_GRACE = 0.2  # time for the agent to read "unprotected" before the secondary leaves COLO


def _pid_alive(pid: int | None) -> bool:
    """A pid the daemon does not know (None) counts as alive: its QMP connection decides."""
    return pid is None or pid_alive(pid)


class ServiceClient(AsyncControlClient):
    """A control client that drops its connection when a call dies half-way (timeout, cancel, I/O).

    Otherwise the reply of the abandoned request would be read as the answer to the next one.
    """

    async def call(self, verb: str, **args: Any) -> dict[str, Any]:
        try:
            return await super().call(verb, **args)
        except ControlError as exc:
            if exc.code == "closed":
                await self.close()
            raise
        except BaseException:
            await self.close()
            raise


class Daemon:
    """One pair's controller: ``await daemon.start()``, later ``await daemon.close()`` (:func:`run_daemon`
    does both around a signal); tests may :meth:`attach` already-open QMP sessions first and start with
    ``connect=False``, or drive its parts directly."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        # the stop way is resolved at start (``auto`` depends on the QEMUs): QMP until then
        self.protocol = EpochProtocol(
            OperatingPoint(config.mode, config.epoch_ms, config.passive_secondary, StopVia.QMP)
        )
        probes = config.controller_settings()  # validated: a bad value is a DaemonError naming it
        self.scheduler = CheckpointScheduler(
            config.safety_interval_ms,
            probe_every_s=probes.shadow_probe_every_s,
            probe_epoch_ms=probes.shadow_probe_epoch_ms,
        )
        self.metrics = DaemonMetrics()
        self.metrics.set_mode(str(config.mode))
        self.primary: QmpSession | None = None
        self.secondary: QmpSession | None = None
        self.compare: ServiceClient | None = None
        self.disk: ServiceClient | None = None
        self.heartbeat = HeartbeatSender(config.heartbeat, self._beat)
        self.autopilot: Autopilot | None = None
        self.state = PairState.STARTING
        self._started_at = time.time()  # wall clock, compared with the agent's marker's mtime
        self.seal_hook = False  # both QEMUs have x-colo-checkpoint / x-colo-expect-seal (patch 0005)
        self.hold_hook = False  # both QEMUs have x-colo-hold-next-checkpoint (patch 0007): `verify`
        self._verify_waiters: list[asyncio.Future[dict[str, Any]]] = []  # for the next checkpoint
        self.state_reason = ""
        self.records: deque[EpochRecord] = deque(maxlen=RECENT)
        self.figures: deque[CheckpointFigures] = deque(maxlen=RECENT)  # what the sampler reads
        self.by_mode = CheckpointsByMode(time.monotonic(), str(config.mode))
        # applied point changes as status shows them: when (wall clock) and, from a policy, its reason
        self.switches: deque[dict[str, Any]] = deque(maxlen=SWITCHES_SHOWN)
        self._last_change_seen: object = None
        self._sampler_clients: list[ServiceClient] = []
        self._checkpoint_began = 0.0
        self.accounting = EventAccounting()
        self.replication_end = ReplicationEndDecider()
        self.reasons: Counter[str] = Counter()
        self.divergences: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.timeline: list[tuple[str, float]] = []
        self._in_checkpoint = False
        self._wake = asyncio.Event()
        self._closing = False  # close() was called: every loop ends at its next turn
        self._waiters: list[tuple[int, asyncio.Future[EpochRecord]]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()
        # the control verbs, in the order the bad-verb reply lists them
        self._verbs: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self._verb_status,
            "mode": self._verb_mode,
            "checkpoint": self._verb_checkpoint,
            "failover": self._verb_failover,
            "metrics": self._verb_metrics,
            "history": self._verb_history,
            "policy": self._verb_policy,
            "verify": self._verb_verify,
        }

    @property
    def state(self) -> PairState:
        return self._state

    @state.setter
    def state(self, value: PairState) -> None:
        self._state = value
        if value not in (PairState.PROTECTED, PairState.STARTING) and self.autopilot is not None:
            self.autopilot.stand_down(f"the pair is {value}: no mode to choose")

    # ------------------------------------------------------------------------------ start / stop
    async def connect(self) -> None:
        cfg = self.config
        self.primary = await QmpSession.connect(
            cfg.primary_qmp, name="primary", timeout=30, alive=lambda: _pid_alive(cfg.primary_pid)
        )
        self.secondary = await QmpSession.connect(
            cfg.secondary_qmp, name="secondary", timeout=30, alive=lambda: _pid_alive(cfg.secondary_pid)
        )
        if cfg.compare_control:
            self.compare = ServiceClient(cfg.compare_control)
            await self.compare.connect()
        if cfg.disk_control:
            self.disk = ServiceClient(cfg.disk_control)
            await self.disk.connect()

    async def start_colo(self) -> None:
        """Enter COLO: primary stopped, disk and comparator at a clean epoch, ``migrate`` with x-colo."""
        primary, secondary = self._sessions()
        cfg = self.config
        if (await primary.execute("query-status")).get("running"):
            await primary.execute("stop")
        if self.disk is not None:
            sealed = await self.disk.call("seal")
            await self.disk.call("commit", epoch=int(sealed["epoch"]))
            self.protocol.next_number = int(sealed["epoch"]) + 1
        if self.compare is not None:
            await self.compare.call("mode", mode=str(self.protocol.point.mode))
            sealed = await self.compare.call("seal")
            await self.compare.call("commit", epoch=int(sealed["epoch"]))
            self.scheduler.last_sealed_compare_epoch = int(sealed["epoch"])
        colo = {"capabilities": [{"capability": "x-colo", "state": True}]}
        await secondary.execute("migrate-set-capabilities", colo)
        await primary.execute("migrate-set-capabilities", colo)
        await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": HUGE_CHECKPOINT_DELAY_MS})
        if not cfg.migrate_uri:
            raise DaemonError("no migrate_uri: cannot start COLO")
        await primary.execute("migrate", uri=cfg.migrate_uri)
        deadline = time.monotonic() + 120
        while (status := (await primary.execute("query-migrate")).get("status")) != "colo":
            if status in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
                raise DaemonError(f"initial COLO migration ended as {status!r}")
            await asyncio.sleep(0.05)
        while not (await secondary.execute("query-status")).get("running"):
            if time.monotonic() > deadline:
                raise DaemonError("the secondary did not start running after the initial migration")
            await asyncio.sleep(0.05)
        # QEMU's COLO thread starts the primary itself; until then it may still be in finish-migrate,
        # where `cont` is refused ("Migration is not finalized yet"), so only a plain pause gets one
        while not (run := await primary.execute("query-status")).get("running"):
            if run.get("status") == "paused":
                await primary.execute("cont")
            elif time.monotonic() > deadline:
                raise DaemonError(f"the primary is {run.get('status')!r} after the initial migration")
            await asyncio.sleep(0.05)

    async def _resolve_stop_via(self) -> None:
        """``auto`` means ``qemu`` if both QEMUs have the seal hook (the patched build), else ``qmp``."""
        found, holds = [], []
        for session in self._sessions():
            commands = {entry.get("name") for entry in await session.execute("query-commands")}
            found.append(SEAL_HOOK_COMMAND in commands)
            holds.append(HOLD_HOOK_COMMAND in commands)
        self.seal_hook = all(found)
        self.hold_hook = all(holds)
        try:
            stop_via = resolve_stop_via(self.config.stop_via, self.seal_hook)
        except ValueError as exc:
            raise DaemonError(str(exc)) from None
        # the point the first epoch starts with, not a change of it: no checkpoint has run yet
        self.protocol.point = dataclasses.replace(self.protocol.point, stop_via=stop_via)

    def attach(self, primary: QmpSession, secondary: QmpSession) -> None:
        """Use sessions opened elsewhere (tests drive a ColoPair already in COLO)."""
        self.primary, self.secondary = primary, secondary

    async def start(self, *, connect: bool = True) -> None:
        """Connect (unless attached), start COLO if configured, then the loops and the control socket."""
        self.config.autopilot_config()  # a bad [controller] value fails here, before the pair is touched
        if connect:
            await self.connect()
        elif self.config.compare_control or self.config.disk_control:
            if self.config.compare_control:
                self.compare = ServiceClient(self.config.compare_control)
                await self.compare.connect()
            if self.config.disk_control:
                self.disk = ServiceClient(self.config.disk_control)
                await self.disk.connect()
        await self._resolve_stop_via()
        if self.config.start_colo:
            await self.start_colo()
        for session in self._sessions():
            self._count_events(session, session.events())
        self.state = PairState.PROTECTED
        self.metrics.protected.set(1)
        self.scheduler.ended(time.monotonic())
        # the per-mode window counts protected time only (not the initial migration)
        self.by_mode = CheckpointsByMode(time.monotonic(), str(self.protocol.point.mode))
        self._server = await serve_control(self.config.control, self.dispatch)
        self._tasks = [
            asyncio.create_task(self._epoch_loop(), name="epochs"),
            asyncio.create_task(self._watch_loop(), name="watch"),
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
        ]
        if self.config.compare_control:
            self._tasks.append(asyncio.create_task(self._request_loop(), name="requests"))
        if self.config.disk_control:
            self._tasks.append(asyncio.create_task(self._disk_pressure_loop(), name="disk-pressure"))
        self.autopilot = self._make_autopilot()
        if self.config.policy:
            try:
                self.autopilot.engage(self.config.policy, self.config.policy_params)
            except PolicyError as exc:
                raise DaemonError(f"policy {self.config.policy!r}: {exc.message}") from None
        self._tasks.append(asyncio.create_task(self.autopilot.run(), name="autopilot"))
        if self.config.metrics_port:
            self.metrics.serve_http(self.config.metrics_port)

    def _make_autopilot(self) -> Autopilot:
        """Signals from their own connections (a sample never queues behind a checkpoint's seal)."""
        cfg = self.config
        compare = ServiceClient(cfg.compare_control) if cfg.compare_control else None
        disk = ServiceClient(cfg.disk_control) if cfg.disk_control else None
        self._sampler_clients = [client for client in (compare, disk) if client is not None]
        links = SamplerLinks(
            primary=self.primary,
            secondary=self.secondary,
            compare=compare,
            disk=disk,
            primary_pid=cfg.primary_pid,
            secondary_pid=cfg.secondary_pid,
            drive=cfg.drive,
            checkpoints=lambda: self.figures,
            dirty_rate_fallback=not self.seal_hook,  # stock QEMU: no per-checkpoint RAM figures
        )
        return Autopilot(
            SignalSampler(links),
            cfg.autopilot_config(),
            point=lambda: self.protocol.point,
            request=self.request_point,
            active=lambda: self.state == PairState.PROTECTED and not self._closing,
            on_sample=self.metrics.set_signals,
        )

    async def close(self) -> None:
        # One cancellation (a checkpoint it interrupts still runs its recovery to the end), and the loops
        # also end at their next turn: Python 3.11's asyncio.wait_for swallows a cancellation that lands
        # in the same loop iteration as what it awaited, and every checkpoint step is a wait_for.
        self._closing = True
        self._wake.set()
        # A checkpoint in flight finishes first (bounded by its own timeouts): cancelled half-way it
        # would leave the pair stopped, or sealed epochs behind that the next checkpoint must sweep up.
        epochs = [task for task in self._tasks if task.get_name() == "epochs" and not task.done()]
        if epochs:
            await asyncio.wait(epochs, timeout=self.config.checkpoint_timeout * 2 + 5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, stuck = await asyncio.wait(self._tasks, timeout=10)
            for task in stuck:
                log.error("task %s did not stop: %s", task.get_name(), task.get_stack())
        self._tasks = []
        if self.autopilot is not None:
            self.autopilot.close()
        for client in self._sampler_clients:
            await client.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        ep = parse_endpoint(self.config.control)
        if ep.kind == "unix" and ep.path:
            Path(ep.path).unlink(missing_ok=True)
        await self.heartbeat.flush()
        self.heartbeat.close()
        for client in (self.compare, self.disk):
            if client is not None:
                await client.close()
        if self.state not in (PairState.PRIMARY_LOST, PairState.FAILED_OVER):
            self.state = PairState.STOPPED

    def _sessions(self) -> tuple[QmpSession, QmpSession]:
        if self.primary is None or self.secondary is None:
            raise DaemonError("not connected to both QEMUs")
        return self.primary, self.secondary

    # ------------------------------------------------------------------------------ checkpoints
    def _beat(self) -> Heartbeat:
        message = self.protocol.heartbeat()
        if self.state == PairState.PRIMARY_LOST:  # in every beat: the agent may have missed the first
            message = dataclasses.replace(message, primary_lost=True)
        elif self.state == PairState.UNPROTECTED:
            message = dataclasses.replace(message, unprotected=True)
        return message

    def _count_events(self, session: QmpSession, events: list[Any]) -> None:
        """Count events taken between checkpoints and react to the ones that end replication."""
        side = session.name
        self.accounting.seen(side, (event.name for event in events))
        for event in events:
            if event.name in ("BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                if self.config.mirror_job and event.data.get("device") == self.config.mirror_job:
                    # the disk server failing over (the agent took over) also ends the mirror job:
                    # decide, never assume the secondary is the one that is gone
                    why = f"mirror job {event.name}: {dict(event.data)}"
                    self._tasks.append(asyncio.create_task(self._replication_ended(why)))
            elif event.name == "COLO_EXIT" and self.state == PairState.PROTECTED and not self._in_checkpoint:
                # the primary leaves COLO when its peer is gone *or* has taken over: decide which
                why = f"COLO_EXIT on the {side}: {dict(event.data)}"
                self._tasks.append(asyncio.create_task(self._replication_ended(why)))
            elif event.name == "SHUTDOWN" and self.state == PairState.PROTECTED:
                self._lost_later(side, f"{side} QEMU shut down")
            elif event.name == DONE_EVENT and self.figures:
                self._attach_ram_figures(event)
        self.metrics.unrequested_stops.set(self.accounting.unrequested_stops)

    def _attach_ram_figures(self, event: Any) -> None:
        """Patch 0006's per-checkpoint RAM figures go on the newest checkpoint's figures (they come
        after its RESUME, so after or just before the daemon closed it)."""
        try:
            stats = CheckpointStats.from_data(event.data)
        except CheckpointStatsError as exc:
            log.warning("ignoring a malformed %s: %s", DONE_EVENT, exc)
            return
        latest = self.figures[-1]
        if latest.ram_bytes is None:
            self.figures[-1] = dataclasses.replace(
                latest, ram_bytes=stats.ram_bytes, ram_pages=stats.ram_pages
            )

    def _lost_later(self, side: str, why: str) -> None:
        self._tasks.append(asyncio.create_task(self._side_lost(side, why)))

    async def checkpoint(self, reasons: Counter[str] | dict[str, int]) -> EpochRecord:
        """Run one checkpoint now (serialised with every other); loss handling on failure."""
        async with self._lock:
            primary, secondary = self._sessions()
            if self.state != PairState.PROTECTED:
                raise ControlError(f"the pair is {self.state}: no checkpoint possible", "not-protected")
            # Events that came since the last look, taken before the checkpoint counts as started: a
            # COLO_EXIT among them (the pair broke between checkpoints) must end replication, not be
            # ignored as part of this checkpoint, whose fire would then wait for a RESUME in vain.
            seen = [(session, session.events()) for session in (primary, secondary)]
            for session, events in seen:
                self._count_events(session, events)
            if any(event.name == "COLO_EXIT" for _, events in seen for event in events):
                error = ControlError("COLO ended before this checkpoint could start", "not-protected")
                for _, future in self._waiters:
                    if not future.done():
                        future.set_exception(error)
                self._waiters = []
                raise error
            self._in_checkpoint = True
            verifying, self._verify_waiters = self._verify_waiters, []
            try:
                self.accounting.checkpoint_started()
                self._checkpoint_began = time.monotonic()
                self.scheduler.begun(self._checkpoint_began)
                links = PairLinks(
                    primary,
                    secondary,
                    self.compare,
                    self.disk,
                    heartbeat=self.heartbeat.send,
                    timeout=self.config.checkpoint_timeout,
                    primary_alive=self._primary_ok,
                    hold=self._held_ram_check(verifying) if verifying else None,
                )
                try:
                    record = await run_checkpoint(links, self.protocol, dict(reasons))
                except CheckpointError as exc:
                    self._record_failure(exc)
                    why = f"the checkpoint failed at {exc.step}: {exc.cause!r}"
                    for future in verifying:
                        if not future.done():
                            future.set_exception(ControlError(why, "checkpoint-failed"))
                    raise
                self.accounting.checkpoint_completed(record.stop_events)
            finally:
                self._in_checkpoint = False
                self._note_point_change()
            self._checkpoint_done(record, reasons)
            return record

    def _note_point_change(self) -> None:
        """A checkpoint closed: if it applied a new operating point, stamp it (time, the policy's
        reason) for status and the watch view, and start the new mode's share of the window."""
        changes = self.protocol.changes
        if not changes or changes[-1] is self._last_change_seen:
            return
        change = self._last_change_seen = changes[-1]
        reason = None
        if change.source == "policy" and self.autopilot is not None:
            last = self.autopilot.status()["last_decision"]
            reason = None if last is None else last["reason"]
        self.switches.append(change.as_dict() | {"at": time.time(), "reason": reason})
        self.by_mode.mode_changed(time.monotonic(), str(change.after.mode))

    def _record_failure(self, exc: CheckpointError) -> None:
        self.failures.append(
            {
                "epoch": exc.record.number,
                "step": str(exc.step),
                "cause": repr(exc.cause),
                "recovery": str(exc.recovery),
                "at": time.time(),
            }
        )
        self.metrics.failures.labels(recovery=str(exc.recovery)).inc()
        self.records.append(exc.record)
        log.error("%s", exc)
        for number, future in self._waiters:
            if self.accounting.checkpoints_started >= number and not future.done():
                future.set_exception(ControlError(str(exc), "checkpoint-failed"))
        self._waiters = [(n, f) for n, f in self._waiters if not f.done()]

    def _checkpoint_done(self, record: EpochRecord, reasons: Counter[str] | dict[str, int]) -> None:
        self.records.append(record)
        previous_end = self.scheduler.last_end
        ended = time.monotonic()
        self.scheduler.ended(ended, record.compare_epoch)
        self.figures.append(
            CheckpointFigures(
                ended=ended,
                reasons=dict(reasons),
                pause_s=record.primary_pause,
                ran_before_s=None
                if previous_end is None
                else max(0.0, self._checkpoint_began - previous_end),
            )
        )
        mode = str(record.mode)  # the mode it ran under (a switching checkpoint closes the old mode)
        self.by_mode.checkpoint(ended, mode, reasons, record.primary_pause)
        for reason, count in reasons.items():
            self.reasons[reason] += count
            self.metrics.checkpoints.labels(reason=reason, mode=mode).inc(count)
        if record.primary_pause is not None:
            self.metrics.pause.labels(mode=mode).observe(record.primary_pause)
        self.metrics.epoch.set(record.number)
        self.metrics.set_mode(str(self.protocol.point.mode))
        for number, future in list(self._waiters):
            if self.accounting.checkpoints_started >= number and not future.done():
                future.set_result(record)
        self._waiters = [(n, f) for n, f in self._waiters if not f.done()]

    def _policy_reads_shadow(self) -> bool:
        """Whether a policy that reads the MC shadow comparison decides now: only then does the
        scheduler stretch its probe epochs (a forced mode, or a policy that never reads the shadow,
        pays nothing).  A third-party policy without the ``reads_shadow`` attribute is assumed to."""
        policy = None if self.autopilot is None else self.autopilot.policy
        return policy is not None and bool(getattr(policy, "reads_shadow", True))

    async def _epoch_loop(self) -> None:
        while not self._closing:
            if self.state != PairState.PROTECTED:
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            point = self.protocol.point
            shadowed = not point.passive_secondary and self._policy_reads_shadow()
            reasons = self.scheduler.take(point.mode, point.epoch_ms, now, shadowed=shadowed)
            if reasons is None:
                due = self.scheduler.due_at(point.mode, point.epoch_ms, shadowed=shadowed)
                wait = 0.05 if due is None else max(0.0, due - now)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            try:
                await self.checkpoint(reasons)
            except CheckpointError as exc:
                await self._after_failure(exc)
            except ControlError:
                continue

    async def _after_failure(self, exc: CheckpointError) -> None:
        """Which side is gone?  Primary: tell the agent.  Otherwise decide between lost and taken over."""
        why = f"checkpoint failed at {exc.step}: {exc.cause!r}"
        if not self._primary_ok():
            await self._side_lost("primary", why)
        else:
            await self._replication_ended(why)

    async def _secondary_colo_status(self) -> ColoStatus | NoAnswer:
        """The secondary's ``query-colo-status``, bounded at 2 s, or NO_ANSWER."""
        secondary = self.secondary
        if secondary is None or not secondary.connected:
            return NO_ANSWER
        try:
            reply = await asyncio.wait_for(secondary.execute("query-colo-status"), 2.0)
        except (QmpError, TimeoutError):
            return NO_ANSWER
        return ColoStatus.from_reply(reply)

    async def _disk_failed_over(self) -> bool | NoAnswer:
        """The disk server's ``failed_over`` (a connection of its own, bounded at 2 s), or NO_ANSWER."""
        if not self.config.disk_control:
            return False
        client = ServiceClient(self.config.disk_control)
        try:
            await asyncio.wait_for(client.connect(), 2.0)
            status = await asyncio.wait_for(client.call("status"), 2.0)
        except (ControlError, OSError, TimeoutError):
            return NO_ANSWER
        finally:
            await client.close()
        return bool(status.get("failed_over"))

    def _agent_failing_over(self) -> bool:
        """The agent writes failover-started.json (beside failover.json) before its first failover
        step (same host only; the disk server's answer covers two hosts).  Only a marker written since
        this daemon started counts: one left by an earlier failover (a re-protected pair) is history."""
        report = self.config.failover_report
        if report is None:
            return False
        try:
            written = Path(report).with_name("failover-started.json").stat().st_mtime
        except OSError:
            return False
        return written >= self._started_at

    async def _decide_end(self) -> ReplicationEnd:
        alive = _pid_alive(self.config.secondary_pid)
        colo_status = await self._secondary_colo_status() if alive else NO_ANSWER
        return self.replication_end.decide(
            secondary_alive=alive,
            colo_status=colo_status,
            disk_failed_over=await self._disk_failed_over(),
            agent_failing_over=self._agent_failing_over(),
        )

    async def _fence_own_primary(self, why: str) -> None:
        if self.primary is not None:
            with contextlib.suppress(QmpError, TimeoutError):
                await asyncio.wait_for(self.primary.execute("stop"), 5.0)
                self.timeline.append((f"primary fenced (stopped): {why}", 0.0))

    async def _replication_ended(self, why: str) -> None:
        """COLO ended or a checkpoint failed while the primary lives: took over, lost or don't know
        (:class:`~controller.pair_state.ReplicationEndDecider`).  Taken over (the agent failed over,
        e.g. after a heartbeat gap): the primary must stay stopped -- resuming it would give two live
        copies of the guest.  Lost: the primary runs on unprotected.  Don't know: the primary stays
        stopped and its output held until a later answer says which."""
        if self.state != PairState.PROTECTED:
            return
        self.state = PairState.UNDECIDED
        self.state_reason = f"deciding whether the secondary took over ({why})"
        self.metrics.protected.set(0)
        end = await self._decide_end()
        if end is ReplicationEnd.DONT_KNOW:
            log.error("replication ended (%s); the secondary does not answer: the primary stays stopped", why)
            self.state_reason = (
                f"the secondary does not answer: the primary is kept stopped, its output held, until it is "
                f"known whether the secondary took over ({why})"
            )
            await self._fence_own_primary("the secondary does not answer")
            while end is ReplicationEnd.DONT_KNOW and not self._closing:
                await asyncio.sleep(UNDECIDED_RETRY)
                end = await self._decide_end()
            if self._closing:
                return
        if end is ReplicationEnd.LOST:
            await self._side_lost("secondary", why)
            return
        self.state, self.state_reason = PairState.FAILED_OVER, f"the secondary took over ({why})"
        log.error("the secondary took over (%s): keeping the primary stopped", why)
        await self._fence_own_primary("the secondary took over")

    def _primary_ok(self) -> bool:
        return _pid_alive(self.config.primary_pid) and self._session_up(self.primary)

    def _secondary_ok(self) -> bool:
        return _pid_alive(self.config.secondary_pid) and self._session_up(self.secondary)

    @staticmethod
    def _session_up(session: QmpSession | None) -> bool:
        return session is not None and session.connected

    async def _side_lost(self, side: str, why: str) -> None:
        if self.state not in (PairState.PROTECTED, PairState.STARTING, PairState.UNDECIDED):
            return
        started = time.monotonic()
        if side == "primary":
            self.state, self.state_reason = PairState.PRIMARY_LOST, why
            self.metrics.protected.set(0)
            self.heartbeat.send(Heartbeat(time.time(), self.protocol.last_committed, None, primary_lost=True))
            await self.heartbeat.flush()
            self.timeline.append(("primary lost: agent told", 0.0))
            log.error("primary lost (%s): the agent fails over", why)
            return
        self.state, self.state_reason = PairState.UNPROTECTED, why
        self.metrics.protected.set(0)
        log.error("secondary lost (%s): releasing held output, continuing unprotected", why)
        # The agent stands down first: x-colo-lost-heartbeat below ends COLO on the secondary too, and
        # an agent that took its COLO_EXIT for a lost primary would fence the only live copy.
        self.heartbeat.send(Heartbeat(time.time(), self.protocol.last_committed, None, unprotected=True))
        if self.heartbeat.connected:
            await asyncio.sleep(STAND_DOWN_GRACE)
            self.timeline.append(("agent told to stand down", round(time.monotonic() - started, 4)))
        if self._agent_failing_over():
            # it fired before it read that (its marker comes before any step): it takes over, so the
            # primary stays stopped and nothing held is released
            self.state, self.state_reason = PairState.FAILED_OVER, f"the secondary took over ({why})"
            log.error(
                "the agent began a failover as the secondary was declared lost: keeping the primary stopped"
            )
            await self._fence_own_primary("the agent took over")
            return
        primary = self.primary
        steps: list[tuple[str, Any]] = []
        if self.compare is not None:
            steps.append(("compare release-all", self.compare.call("release-all")))
        if primary is not None:
            steps.append(("x-colo-lost-heartbeat", primary.execute("x-colo-lost-heartbeat")))
            if self.config.mirror_job:
                steps.append(
                    (
                        "block-job-cancel",
                        primary.execute("block-job-cancel", device=self.config.mirror_job, force=True),
                    )
                )
        released = False
        for name, action in steps:
            try:
                await asyncio.wait_for(action, 5.0)
                self.timeline.append((name, round(time.monotonic() - started, 4)))
                released = released or name == "compare release-all"
            except (QmpError, ControlError, OSError, TimeoutError) as exc:
                self.timeline.append((f"{name} failed: {exc}", round(time.monotonic() - started, 4)))
        if not released and primary is not None:
            # no comparator to pass the primary's output on: the primary talks to its tap directly
            # (frames held in the dead comparator are lost in flight; TCP sends them again)
            for ident in self.config.primary_redirectors:
                try:
                    await asyncio.wait_for(primary.execute("object-del", id=ident), 5.0)
                    self.timeline.append(
                        (f"primary redirector {ident} removed", round(time.monotonic() - started, 4))
                    )
                except (QmpError, TimeoutError) as exc:
                    self.timeline.append(
                        (f"object-del {ident} failed: {exc}", round(time.monotonic() - started, 4))
                    )
        if primary is not None:
            with contextlib.suppress(QmpError, TimeoutError):
                if not (await asyncio.wait_for(primary.execute("query-status"), 5.0)).get("running"):
                    await primary.execute("cont")
                    self.timeline.append(("primary cont", round(time.monotonic() - started, 4)))

    async def _watch_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.state != PairState.PROTECTED:
                continue
            if not self._primary_ok():
                await self._side_lost("primary", "the primary QEMU exited or its QMP connection dropped")
                continue
            if not self._in_checkpoint:
                for session in self._sessions():
                    self._count_events(session, session.events())
            if not self._secondary_ok() and not self._in_checkpoint:
                await self._replication_ended("the secondary QEMU exited or its QMP connection dropped")

    async def _request_loop(self) -> None:
        assert self.config.compare_control is not None
        client = ServiceClient(self.config.compare_control)
        try:
            while not self._closing:
                try:
                    reply = await client.call("next-request", timeout=1.0)
                except (ControlError, OSError) as exc:
                    if self.state == PairState.PROTECTED and self.compare is not None:
                        log.warning("comparator request poll failed: %s", exc)
                    await client.close()
                    await asyncio.sleep(0.2)
                    continue
                request = reply.get("request")
                if not request:
                    continue
                for reason, count in (reply.get("reasons") or {request["reason"]: 1}).items():
                    self.divergences[reason] += int(count)
                    self.metrics.divergences.labels(reason=reason).inc(int(count))
                if self.scheduler.request(
                    f"compare:{request['reason']}",
                    compare_epoch=reply.get("epoch"),
                    extra=int(reply.get("coalesced", 0)),
                ):
                    self._wake.set()
        finally:
            await client.close()

    async def _disk_pressure_loop(self) -> None:
        """A checkpoint when the disk server's speculation passes its checkpoint mark.

        In COLO nothing else would checkpoint a guest that writes a lot but whose output matches;
        without this the disk server would reach its budget and pause the primary's writes.
        """
        assert self.config.disk_control is not None
        client = ServiceClient(self.config.disk_control)
        try:
            while not self._closing:
                await asyncio.sleep(DISK_POLL_INTERVAL)
                if self.state != PairState.PROTECTED or self._in_checkpoint:
                    continue
                try:
                    status = await client.call("status")
                except (ControlError, OSError) as exc:
                    log.warning("disk status poll failed: %s", exc)
                    await client.close()
                    await asyncio.sleep(0.2)
                    continue
                if (
                    status.get("checkpoint_needed")
                    and "disk-pressure" not in self.scheduler.pending
                    and self.scheduler.request("disk-pressure")
                ):
                    self._wake.set()
        finally:
            await client.close()

    # ------------------------------------------------------------------------------ control API
    def _held_ram_check(self, waiters: list[asyncio.Future[dict[str, Any]]]) -> Callable[[], Awaitable[None]]:
        """What the held checkpoint does with both VMs stopped at N: compare their RAM, answer ``verify``.

        It never raises: a comparison that fails or runs long is the verify's error, not the
        checkpoint's (a failed checkpoint would end protection).  Its own bound stays below the
        checkpoint step's, so the VMs are always resumed by the checkpoint, never by a timeout.
        """
        primary, secondary = self._sessions()
        bound = max(1.0, self.config.checkpoint_timeout * 0.8)

        async def inspect() -> None:
            record, point = self.protocol.current, self.protocol.point
            answer: dict[str, Any] | ControlError
            try:
                found = await compare_held_ram(primary, secondary, timeout=bound)
                epoch = None if record is None else record.number
                verdict = HeldCheckpointVerdict(epoch, str(point.mode), str(point.stop_via), found)
                answer = verdict.as_dict()
            except (RamCompareError, QmpError, OSError, TimeoutError) as exc:
                answer = ControlError(f"RAM comparison failed: {exc}", "verify-failed")
            for future in waiters:
                if future.done():
                    continue
                if isinstance(answer, ControlError):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

        return inspect

    async def verify_ram(self, timeout: float = VERIFY_TIMEOUT_DEFAULT) -> dict[str, Any]:
        """Hold the next checkpoint on both sides, compare both VMs' RAM at it, resume them (``verify``).

        Rides on the next checkpoint the epoch protocol runs (asked for at once, reason ``verify``),
        in whatever mode and stop way it runs; requests made meanwhile share one comparison.
        """
        if self.state != PairState.PROTECTED:
            raise ControlError(f"the pair is {self.state}: no checkpoint to verify", "not-protected")
        if not self.hold_hook:
            raise ControlError(
                f"this pair's QEMUs lack {HOLD_HOOK_COMMAND} (patch 0007): the RAM check needs"
                " hybridft's patched build with it (`hybridft qemu build`)",
                "no-hold-hook",
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._verify_waiters.append(future)
        self.scheduler.request("verify")
        self._wake.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ControlError(f"no verified checkpoint within {timeout} s", "timeout") from None
        finally:
            if future in self._verify_waiters:
                self._verify_waiters.remove(future)

    async def request_checkpoint(self, reason: str = "operator", timeout: float = 30.0) -> EpochRecord:
        """Ask for a checkpoint and wait for the first one that starts after this request."""
        future: asyncio.Future[EpochRecord] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.accounting.checkpoints_started + 1, future))
        self.scheduler.request(reason)
        self._wake.set()
        return await asyncio.wait_for(future, timeout)

    def status(self) -> dict[str, Any]:
        pauses = [r.primary_pause for r in self.records if r.primary_pause is not None]
        p50, p99 = percentile(pauses, 0.5), percentile(pauses, 0.99)
        last = self.records[-1].as_dict() if self.records else None
        point, pending = self.protocol.point, self.protocol.pending
        # checkpoints alone do not protect: without the agent nobody would fail over
        agent_missing = self.config.heartbeat is not None and not self.heartbeat.connected
        reason = self.state_reason
        if self.state == PairState.PROTECTED and agent_missing:
            reason = "the agent is not connected (heartbeat): nobody would fail over"
        return {
            "state": str(self.state),
            "state_reason": reason,
            "protected": self.state == PairState.PROTECTED and not agent_missing,
            "agent_connected": not agent_missing,
            # the operating point in force, field by field (tools read these), then the pending one
            "mode": str(point.mode),
            "epoch_ms": point.epoch_ms,
            "pending_mode": None if pending is None else str(pending.mode),
            "passive_secondary": point.passive_secondary,
            "stop_via": str(point.stop_via),
            "pending": None
            if pending is None
            else pending.as_dict() | {"source": str(self.protocol.pending_source)},
            # with `at` (wall clock) and `reason` (a policy's; None from an operator) when it was applied
            "last_point_change": self._last_point_change(),
            "point_changes": list(self.switches),
            "seal_hook": self.seal_hook,
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "runtime": {"event_loop": eventloop.running_loop_name(), "fastpath": fastpath.describe()},
            "last_committed_epoch": self.protocol.last_committed,
            "checkpoints": {
                "daemon_started": self.accounting.checkpoints_started,
                "committed": self.protocol.committed,
                "rolled_back": self.protocol.rolled_back,
                "failed": self.protocol.failed,
                "mode_switches": self.protocol.mode_switches,
                "by_reason": dict(self.reasons),
                "coalesced": self.scheduler.coalesced,
                "stale_requests_dropped": self.scheduler.stale_dropped,
            },
            "qemu_events": self.accounting.as_dict(),
            "primary_stop_events": self.accounting.primary_stops,
            "unrequested_stops": self.accounting.unrequested_stops,
            "divergences": dict(self.divergences),
            "pause_ms": {
                "samples": len(pauses),
                "p50": None if p50 is None else round(p50 * 1000, 2),
                "p99": None if p99 is None else round(p99 * 1000, 2),
            },
            "checkpoints_by_mode": self.by_mode.summary(time.monotonic()),
            "last_checkpoint": last,
            "failures": self.failures[-10:],
            "loss_timeline": self.timeline,
            "heartbeat": {
                "endpoint": self.config.heartbeat,
                "sent": self.heartbeat.sent,
                "connected": self.heartbeat.connected,
                "max_gap_ms": round(self.heartbeat.max_gap * 1000, 1),
            },
            "policy": self._policy_status(),
            "signals": {} if self.autopilot is None else self.autopilot.signals(),
        }

    def _last_point_change(self) -> dict[str, Any] | None:
        changes = self.protocol.changes
        if not changes:
            return None
        stamped = self.switches[-1] if self.switches and changes[-1] is self._last_change_seen else None
        return stamped if stamped is not None else changes[-1].as_dict()

    def _policy_status(self) -> dict[str, Any]:
        if self.autopilot is None:
            return {"name": None, "auto": False, "last_decision": None}
        return self.autopilot.status()

    async def planned_failover(self) -> dict[str, Any]:
        """A checkpoint, then stop the primary, then tell the agent to fail over."""
        started = time.monotonic()
        record = await self.request_checkpoint("planned-failover")
        primary, _ = self._sessions()
        async with self._lock:
            await primary.execute("stop")
            self.state, self.state_reason = PairState.FAILED_OVER, "planned failover"
            self.metrics.protected.set(0)
            self.heartbeat.send(Heartbeat(time.time(), record.number, "committed", failover=True))
            await self.heartbeat.flush()
        return {
            "epoch": record.number,
            "seconds": round(time.monotonic() - started, 4),
            "agent_told": self.heartbeat.connected,
        }

    def request_point(self, request: PointRequest) -> dict[str, Any]:
        """Ask for an operating point change; it lands at the next checkpoint boundary, which is
        asked for at once.  Returns the ``mode`` verb's reply."""
        self.protocol.request(request)
        pending = self.protocol.pending
        if pending is not None:  # it applies when a checkpoint closes: ask for one
            self.scheduler.request("mode-switch")
            self._wake.set()
        return {
            "mode": str(self.protocol.point.mode),
            "pending_mode": None if pending is None else str(pending.mode),
            "epoch_ms": self.protocol.next_point().epoch_ms,
            "pending": None if pending is None else pending.as_dict(),
            "applies": "at the next checkpoint" if pending is not None else "now (already so)",
        }

    # ------------------------------------------------------------------------------ control verbs
    async def dispatch(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        """One control request: arguments are checked (controller.requests) before anything changes."""
        handler = self._verbs.get(verb)
        if handler is None:
            raise ControlError(f"unknown verb {verb!r} ({', '.join(self._verbs)})", "bad-verb")
        return await handler(args)

    async def _verb_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _verb_mode(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("mode") == AUTO:
            return self._engage_policy(args)
        request = parse_mode_request(args, seal_hook=self.seal_hook)  # checked before auto goes off
        if self.autopilot is not None:
            self.autopilot.disengage()  # a forced mode stays until `mode auto`
        return self.request_point(request)

    def _engage_policy(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("policy") or self.config.policy or DEFAULT_POLICY
        params = args.get("params") or {}
        if not isinstance(name, str) or not isinstance(params, dict):
            raise ControlError("auto takes 'policy' (a name) and 'params' (an object)", "bad-args")
        if self.autopilot is None:
            raise ControlError("the daemon has not started its autopilot yet", "not-ready")
        if self.state != PairState.PROTECTED:
            raise ControlError(f"the pair is {self.state}: no mode for a policy to choose", "not-protected")
        try:
            self.autopilot.engage(name, params)
        except PolicyError as exc:
            raise ControlError(exc.message, "bad-policy") from None
        return {"mode": str(self.protocol.point.mode), "auto": True, "policy": name}

    async def _verb_policy(self, args: dict[str, Any]) -> dict[str, Any]:
        """The policy in charge, its parameters and its recent decisions (``hybridft policy show``)."""
        status = self._policy_status()
        autopilot = self.autopilot
        policy = None if autopilot is None else autopilot.policy
        status["params"] = None if policy is None else params_to_json(policy.params)
        status["description"] = None if policy is None else policy.description
        return status

    async def _verb_checkpoint(self, args: dict[str, Any]) -> dict[str, Any]:
        request = parse_checkpoint_request(args)
        if self.state != PairState.PROTECTED:
            raise ControlError(f"the pair is {self.state}: no checkpoint possible", "not-protected")
        try:
            record = await self.request_checkpoint("operator", request.timeout)
        except TimeoutError:
            raise ControlError("no checkpoint completed in time", "timeout") from None
        return record.as_dict()

    async def _verb_failover(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.state != PairState.PROTECTED:
            raise ControlError(f"the pair is {self.state}: nothing to fail over to", "not-protected")
        try:
            return await self.planned_failover()
        except TimeoutError:
            raise ControlError("the final checkpoint did not complete", "timeout") from None

    async def _verb_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        """Both VMs' RAM compared at a held checkpoint: ``identical``, page counts, differing runs."""
        request = parse_checkpoint_request({"timeout": args.get("timeout", VERIFY_TIMEOUT_DEFAULT)})
        return await self.verify_ram(request.timeout)

    async def _verb_metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"text": self.metrics.render()}

    async def _verb_history(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"checkpoints": [r.as_dict() for r in self.records]}


async def run_daemon(config: DaemonConfig, ready: Callable[[Daemon], None] | None = None) -> None:
    """Run a daemon until SIGINT/SIGTERM; ``ready`` is called once it protects the pair."""
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        if ready is not None:
            ready(daemon)
        await stop.wait()
    finally:
        await daemon.close()
        for session in (daemon.primary, daemon.secondary):
            if session is not None:
                await session.close()
