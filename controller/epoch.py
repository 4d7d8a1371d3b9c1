"""The epoch protocol of ARCHITECTURE.md §2: one checkpoint, top to bottom, every step timed.

Why it is split in two:

* :class:`EpochProtocol` is sans-I/O.  It owns every *decision* of the protocol and nothing else:
  which epoch number comes next, the operating point the next epoch runs under
  (:mod:`controller.operating_point`: a change requested at any time lands exactly at a checkpoint
  boundary), what the heartbeat says at each step (:class:`~controller.heartbeat.Heartbeat`), and --
  the part that must never be wrong -- what to do when a step fails: before the seal nothing is
  undone, after the seal but before the secondary loaded the checkpoint the disk epoch is rolled
  back, once the secondary loaded it the epoch is committed whatever else failed (the secondary
  holds that state, so a failover must see it).  :class:`CheckpointScheduler` decides *when*: the
  MC timer, the COLO safety interval and comparator requests, coalesced into one checkpoint.  Both
  are unit-tested without QEMU.
* :func:`run_checkpoint` is the one function that talks to QEMU and the two services in the exact
  order of §2.  It asks the protocol object what to do and reports each step's outcome back.

The order (N = the epoch being closed)::

    1 stop secondary
    2 stop primary          (QMP returns once its I/O drained)
    3 comparator mode (at a mode switch) + seal, disk seal; heartbeat {"epoch": N, "state": "sealed"}
    4 migrate-set-parameters x-checkpoint-delay (fires one checkpoint at once); RESUME on both QEMUs
      (the secondary's RESUME means it loaded N); heartbeat "loaded"
    5 disk commit N, comparator commit; heartbeat "committed"
    6 any failure before "loaded": disk rollback, then the caller handles the lost side (§5)

The secondary stops first, as in QEMU's own COLO checkpoint (whose request/reply stops the secondary
before the primary): the client-visible pause is the primary's, so the secondary's stop round trip
stays outside it.  ARCHITECTURE.md §2 lists the primary first; either order seals the same epoch.

Two ways to stop the VMs (:class:`StopVia`), the same protocol:

* ``qmp`` -- steps 1, 2 and 4 as above: the daemon stops both VMs with QMP ``stop`` and then fires the
  checkpoint.  Works with any QEMU 7.2, stock QEMU on KVM hosts included.  But the primary's pause
  then also holds the stop reply, the fire round trip and QEMU's own CHECKPOINT_REQUEST/REPLY
  exchange (which QEMU's timer runs while the primary still runs): 1.4-1.6x the pause of a
  timer-started checkpoint under TCG.
* ``qemu`` -- the patched build (patch 0005).  ``x-colo-expect-seal`` makes the secondary's next load
  wait, with the state received but not applied, for ``x-colo-sealed``; ``x-colo-checkpoint`` fires a
  checkpoint that stops the secondary (its request/reply) and then the primary, and emits
  X_COLO_CHECKPOINT_STOPPED.  The daemon seals (step 3) while QEMU saves and sends the state, then
  sends ``x-colo-sealed`` to the secondary; the secondary applies the state and resumes, and only then
  the primary.  So both VMs are stopped while sealing exactly as in ``qmp`` (neither runs before the
  secondary's load, which waits for the seal), and the seal runs beside QEMU's own work instead of
  before it.  Steps 1+2 become ``expect-seal`` + ``fire`` + ``stopped``, step 4 becomes ``sealed``; the
  heartbeat is the same, and so is the agent's rule (a secondary RESUME after the seal means it loaded
  N: a load that waits applies nothing when a failover comes first).

``N`` is the disk server's epoch number when a disk server is wired (the agent's ``disk ctl commit N``
must name the same epoch), else the protocol's own counter.  The comparator numbers its epochs itself;
its number is kept beside ``N``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from controller.heartbeat import Heartbeat
from controller.operating_point import OperatingPoint, PointChange, PointRequest, PointSource
from hybridft_common.vocabulary import HELD_EVENT, HOLD_HOOK_COMMAND, HUGE_CHECKPOINT_DELAY_MS, Mode, StopVia

POINT_CHANGES_KEPT = 64  # applied operating point changes kept for status


class Step(StrEnum):
    STOP_SECONDARY = "stop-secondary"
    STOP_PRIMARY = "stop-primary"
    EXPECT_SEAL = "expect-seal"  # stop via qemu: x-colo-expect-seal ‖ the disk's prepare-checkpoint
    STOPPED = "stopped"  # stop via qemu: X_COLO_CHECKPOINT_STOPPED (both VMs stopped)
    SEALED = "sealed"  # stop via qemu: x-colo-sealed to the secondary, which may then apply the state
    COMPARE_MODE = "compare-mode"
    COMPARE_SEAL = "compare-seal"
    DISK_SEAL = "disk-seal"
    FIRE = "fire"
    RESUME_PRIMARY = "resume-primary"
    RESUME_SECONDARY = "resume-secondary"
    DISK_COMMIT = "disk-commit"
    COMPARE_COMMIT = "compare-commit"
    PASSIVE_STOP = "passive-stop"
    DISK_ROLLBACK = "disk-rollback"
    # a held checkpoint (PairLinks.hold, patch 0007): armed before step 1, inspected, then resumed
    HOLD_ARM = "hold-arm"
    HELD = "held"  # X_COLO_CHECKPOINT_HELD on both sides instead of RESUME: the secondary loaded N
    HOLD_INSPECT = "hold-inspect"
    HOLD_RELEASE = "hold-release"  # cont secondary, cont primary
    HOLD_DISARM = "hold-disarm"  # the checkpoint failed before it held: withdraw the request


class Phase(StrEnum):
    """How far the current checkpoint got; decides the recovery after a failure."""

    OPEN = "open"  # nothing done yet, or only VMs stopped
    SEALED = "sealed"  # at least one service sealed N
    LOADED = "loaded"  # the secondary resumed after the seal: it holds N
    COMMITTED = "committed"


class Recovery(StrEnum):
    NONE = "none"  # failed before anything was sealed
    ROLLBACK = "rollback"  # sealed, the secondary does not hold N: drop N on the disk
    COMMIT = "commit"  # the secondary holds N: N must be committed


class ColoExited(Exception):
    """The primary's QEMU left COLO (COLO_EXIT) while a checkpoint waited for it."""


class CheckpointError(Exception):
    """A checkpoint failed; ``step`` is where, ``recovery`` what was done about it."""

    def __init__(self, step: Step, cause: BaseException, recovery: Recovery, record: EpochRecord) -> None:
        super().__init__(f"checkpoint {record.number} failed at {step}: {cause!r} (recovery: {recovery})")
        self.step = step
        self.cause = cause
        self.recovery = recovery
        self.record = record


@dataclass(slots=True)
class EpochRecord:
    """One checkpoint: what triggered it, its mode, each step's duration, QEMU's pause timestamps."""

    number: int
    mode: Mode
    reasons: dict[str, int]
    started: float  # time.time() when step 1 began
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, seconds it took)
    compare_epoch: int | None = None
    disk_epoch: int | None = None
    primary_stop: float | None = None  # QEMU event timestamps (epoch seconds)
    primary_resume: float | None = None
    secondary_stop: float | None = None
    secondary_resume: float | None = None
    released_frames: int = 0
    stop_events: tuple[int, int] = (0, 0)  # STOP events seen during this checkpoint (primary, secondary)
    phase: Phase = Phase.OPEN
    outcome: str = "running"  # running | committed | rolled-back | failed

    @property
    def primary_pause(self) -> float | None:
        """The guest-visible pause: QEMU's STOP -> RESUME on the primary."""
        if self.primary_stop is None or self.primary_resume is None:
            return None
        return self.primary_resume - self.primary_stop

    def as_dict(self) -> dict[str, Any]:
        pause = self.primary_pause
        return {
            "number": self.number,
            "mode": str(self.mode),
            "reasons": self.reasons,
            "started": self.started,
            "steps_ms": {name: round(sec * 1000, 3) for name, sec in self.steps},
            "compare_epoch": self.compare_epoch,
            "disk_epoch": self.disk_epoch,
            "primary_pause_ms": None if pause is None else round(pause * 1000, 3),
            "secondary_loaded_at": self.secondary_resume,
            "released_frames": self.released_frames,
            "outcome": self.outcome,
        }


class EpochProtocol:
    """The sans-I/O decisions of the epoch protocol (see the module docstring).

    ``point`` is the operating point of the epoch now open; ``pending`` the one requested for the next
    epochs, applied when a checkpoint closes (:meth:`_close`), or None.  A checkpoint carries the
    pending point it began with (``opening``: the comparator is told that one's mode at the seal), so a
    request made while it runs waits for the next checkpoint instead of landing at this one's close
    with the comparator never told.
    """

    def __init__(self, point: OperatingPoint | None = None, *, first_epoch: int = 1) -> None:
        self.point = point if point is not None else OperatingPoint()
        self.pending: OperatingPoint | None = None
        self.pending_source = PointSource.OPERATOR
        self.opening: OperatingPoint | None = None  # the pending point the running checkpoint carries
        self._opening_source = PointSource.OPERATOR
        self.changes: deque[PointChange] = deque(maxlen=POINT_CHANGES_KEPT)
        self.next_number = first_epoch
        self.current: EpochRecord | None = None
        self.last_committed: int | None = None
        self.committed = 0
        self.rolled_back = 0
        self.failed = 0
        self.mode_switches = 0

    # -- the operating point: requested any time, applied at the next checkpoint's close ----------
    def request(self, change: PointRequest) -> None:
        """Make the current point with ``change``'s fields the pending one (replacing any other).

        A request for what already runs withdraws a pending one: nothing waits for a checkpoint.  While
        a checkpoint runs, "what already runs" is the point it opens (``opening``, else ``point``).
        Raises ValueError for a field out of range (nothing changes then).
        """
        base = self.opening if self.opening is not None else self.point
        wanted = base.changed_by(change)
        if wanted == base:
            self.pending = None
            return
        self.pending, self.pending_source = wanted, change.source

    @property
    def opening_switches_mode(self) -> bool:
        """The running checkpoint opens epochs of another kind (mode or length): tell the comparator."""
        return self.opening is not None and self.opening.switches_mode_from(self.point)

    @property
    def mode_switch_pending(self) -> bool:
        """A pending point changes the epochs themselves (mode or length): the comparator must be told."""
        return self.pending is not None and self.pending.switches_mode_from(self.point)

    def next_point(self) -> OperatingPoint:
        """The point of the epoch the current checkpoint opens (the comparator gets its mode before seal)."""
        return self.pending if self.pending is not None else self.point

    # -- one checkpoint --------------------------------------------------------------------------
    def begin(self, reasons: Counter[str] | dict[str, int], now: float) -> EpochRecord:
        if self.current is not None:
            raise RuntimeError(f"checkpoint {self.current.number} is still running")
        self.current = EpochRecord(self.next_number, self.point.mode, dict(reasons), now)
        self.opening, self._opening_source = self.pending, self.pending_source
        return self.current

    def _record(self) -> EpochRecord:
        if self.current is None:
            raise RuntimeError("no checkpoint is running")
        return self.current

    def step_done(self, step: Step, seconds: float) -> None:
        self._record().steps.append((str(step), seconds))

    def sealed(self, *, disk_epoch: int | None = None, compare_epoch: int | None = None) -> Heartbeat:
        """Services sealed; returns the heartbeat message.  The disk's number becomes N."""
        record = self._record()
        if disk_epoch is not None:
            record.disk_epoch = disk_epoch
            record.number = disk_epoch
        if compare_epoch is not None:
            record.compare_epoch = compare_epoch
        record.phase = Phase.SEALED
        return self.heartbeat()

    def loaded(self) -> Heartbeat:
        record = self._record()
        if record.phase is not Phase.SEALED:
            raise RuntimeError(f"checkpoint {record.number} loaded while {record.phase}")
        record.phase = Phase.LOADED
        return self.heartbeat()

    def committed_step(self) -> tuple[EpochRecord, Heartbeat]:
        """Both services committed N: the epoch is closed; a pending operating point takes effect now."""
        record = self._record()
        if record.phase is not Phase.LOADED:
            raise RuntimeError(f"checkpoint {record.number} committed while {record.phase}")
        record.phase = Phase.COMMITTED
        record.outcome = "committed"
        message = self.heartbeat()
        self.last_committed = record.number
        self.committed += 1
        self._close(record)
        return record, message

    def recovery_for_failure(self) -> Recovery:
        """What a failure at the current point requires (§2 step 6)."""
        phase = self._record().phase
        if phase is Phase.OPEN:
            return Recovery.NONE
        if phase is Phase.SEALED:
            return Recovery.ROLLBACK
        return Recovery.COMMIT

    def failed_step(self, recovery: Recovery) -> EpochRecord:
        """Close the current checkpoint as failed after ``recovery`` was carried out."""
        record = self._record()
        record.outcome = {"rollback": "rolled-back", "commit": "committed", "none": "failed"}[recovery]
        if recovery is Recovery.ROLLBACK:
            self.rolled_back += 1
        elif recovery is Recovery.COMMIT:
            self.last_committed = record.number
            self.committed += 1
        else:
            self.failed += 1
        self._close(record)
        return record

    def _close(self, record: EpochRecord) -> None:
        # The boundary: the epoch that follows runs under the point this checkpoint carried once the
        # comparator got its mode at this seal (sealed or later); with nothing sealed the comparator
        # still is in the old mode, so the change stays pending and the daemon re-sends the mode at the
        # next seal.  A request made during the checkpoint stays pending for the next one.
        opening, self.opening = self.opening, None
        if record.phase in (Phase.COMMITTED, Phase.LOADED, Phase.SEALED) and opening is not None:
            if opening.switches_mode_from(self.point):
                self.mode_switches += 1
            self.changes.append(PointChange(record.number, self.point, opening, self._opening_source))
            self.point = opening
            if self.pending == opening:
                self.pending = None
        elif opening is not None and self.pending is None:  # withdrawn meanwhile as "already so"
            self.pending, self.pending_source = opening, self._opening_source
        if self.pending == self.point:
            self.pending = None
        base = record.disk_epoch if record.disk_epoch is not None else record.number
        self.next_number = max(self.next_number, base + 1)
        self.current = None

    def heartbeat(self, now: float | None = None) -> Heartbeat:
        """The heartbeat message for the current state (``t`` is wall-clock seconds)."""
        t = time.time() if now is None else now
        current = self.current  # read once: the heartbeat thread calls this too
        if current is not None:
            return Heartbeat(t, current.number, str(current.phase))
        return Heartbeat(t, self.last_committed, str(Phase.COMMITTED))


class CheckpointScheduler:
    """When the next checkpoint is due, and which triggers it coalesces (sans-I/O, monotonic seconds).

    MC: a checkpoint every ``epoch_ms``, measured from the start of the previous one as QEMU's own
    timer does (the same interval then means the same dirty memory per checkpoint), but never less
    than half an epoch after the previous one ended, so that a checkpoint longer than the epoch cannot
    starve the guest.  COLO: a comparator request at once, else the safety interval after the last end.
    Operator and comparator requests in any mode are due at once.  Requests that arrive while a
    checkpoint runs are answered by the next one, all together.  A comparator request
    raised in an epoch that has already been sealed is stale (the seal resolved it) and is dropped.

    Shadow probes (MC with an active secondary while a policy that reads the shadow decides,
    ``shadowed``): at most once every ``probe_every_s`` one epoch shorter than ``probe_epoch_ms`` is
    stretched to it.  The comparator's shadow compares only what the secondary answered before the
    seal, and at short epochs it had answered almost nothing (measured under TCG at 10 ms: 0-2.5 % of
    the primary's bytes compared, 30-40 % at 50 ms; ``colo_compare.signals``, "Shadow coverage"), so a
    policy in MC could not see a workload turn deterministic.  A probe epoch gives it a sample every
    ``probe_every_s``.  100 ms, not 50: a lone 50 ms probe after 10 ms epochs compared nothing in most
    seconds (likely: under TCG the secondary starts each epoch with cold translations), and cost-model then
    took 5.8 s to notice an RPC phase (tests/test_phased_auto.py); at 100 ms it took 1.1-1.8 s in three
    runs.  Its cost is bounded: the answers produced in it wait up to ``probe_epoch_ms`` instead of the
    epoch, about 10 % of the time at the defaults (MC's p99 latency becomes about the probe epoch).
    Not a change of the operating point: the guard and status see the epoch the policy or operator
    chose.  ``probe_every_s`` 0 turns probes off.
    """

    def __init__(
        self, safety_interval_ms: int = 10_000, *, probe_every_s: float = 1.0, probe_epoch_ms: int = 100
    ) -> None:
        self.safety_interval_ms = safety_interval_ms
        self.probe_every_s = probe_every_s
        self.probe_epoch_ms = probe_epoch_ms
        self.last_end: float | None = None
        self.last_start: float | None = None
        self.pending: Counter[str] = Counter()
        self.coalesced = 0
        self.stale_dropped = 0
        self.last_sealed_compare_epoch: int | None = None
        self.probes = 0  # probe epochs so far
        self._last_probe: float | None = None  # end of the checkpoint that opened the last probe epoch
        self._probe_for: float | None = None  # the epoch (its opening checkpoint's end) decided for
        self._probing = False

    def request(self, reason: str, *, compare_epoch: int | None = None, extra: int = 0) -> bool:
        """Record a request; ``extra`` = how many more the source already coalesced.  False if stale."""
        if (
            compare_epoch is not None
            and self.last_sealed_compare_epoch is not None
            and compare_epoch <= self.last_sealed_compare_epoch
        ):
            self.stale_dropped += 1 + extra
            return False
        if self.pending:
            self.coalesced += 1
        self.pending[reason] += 1
        self.coalesced += extra
        return True

    def due_at(self, mode: Mode, epoch_ms: int, *, shadowed: bool = False) -> float | None:
        """Monotonic time the next timer checkpoint is due (None: not before the first one ended).

        ``shadowed``: MC with an active secondary, whose output the comparator shadow-compares."""
        if self.last_end is None:
            return None
        if mode is Mode.COLO:
            return self.last_end + self.safety_interval_ms / 1000.0
        period = epoch_ms / 1000.0
        if shadowed and self._probe_epoch(epoch_ms):
            period = self.probe_epoch_ms / 1000.0
        start = self.last_end if self.last_start is None else self.last_start
        return max(start + period, self.last_end + period / 2)

    def _probe_epoch(self, epoch_ms: int) -> bool:
        """Whether the open epoch (opened by the checkpoint that ended at ``last_end``) is a probe."""
        if self.probe_every_s <= 0 or epoch_ms >= self.probe_epoch_ms:
            return False
        if self._probe_for != self.last_end:  # decided once per epoch
            self._probe_for = self.last_end
            assert self.last_end is not None
            last = self._last_probe
            self._probing = last is None or self.last_end - last >= self.probe_every_s
            if self._probing:
                self._last_probe = self.last_end
                self.probes += 1
        return self._probing

    def take(self, mode: Mode, epoch_ms: int, now: float, *, shadowed: bool = False) -> Counter[str] | None:
        """The reasons for a checkpoint now, or None if none is due."""
        reasons = Counter(self.pending)
        due = self.due_at(mode, epoch_ms, shadowed=shadowed)
        if due is not None and now >= due:
            reasons["timer" if mode is Mode.MC else "safety-interval"] += 1
        if not reasons:
            return None
        self.pending.clear()
        return reasons

    def begun(self, now: float) -> None:
        """A checkpoint starts now (the MC period is measured from here)."""
        self.last_start = now

    def ended(self, now: float, compare_epoch: int | None = None) -> None:
        self.last_end = now
        if compare_epoch is not None:
            self.last_sealed_compare_epoch = compare_epoch


# ------------------------------------------------------------------------------------------ the I/O
class QmpLike(Protocol):
    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any: ...
    async def wait_event(self, names: Any, *, timeout: float, predicate: Any = None) -> Any: ...
    def take(self, names: Any) -> list[Any]: ...


class ControlLike(Protocol):
    async def call(self, verb: str, **args: Any) -> dict[str, Any]: ...


@dataclass(slots=True)
class PairLinks:
    """What one checkpoint talks to.  ``compare``/``disk`` may be None (not wired: the step is skipped).

    How it stops the VMs and whether it stops a passive secondary again come from the protocol's
    operating point, not from here: they change only at a checkpoint boundary.
    """

    primary: QmpLike
    secondary: QmpLike
    compare: ControlLike | None
    disk: ControlLike | None
    heartbeat: Callable[[Heartbeat], None] = lambda message: None
    timeout: float = 30.0
    # False once the primary is gone: the agent then owns the disk (it sees what the secondary really
    # loaded); a recovery from here would race it, e.g. roll back an epoch the secondary resumed from
    primary_alive: Callable[[], bool] = lambda: True
    # Set: this checkpoint holds both VMs once the secondary loaded it (patch 0007), awaits this with
    # both stopped at N (the daemon's `verify` compares their RAM), then resumes them.  It must not
    # raise for what it finds; an exception fails the checkpoint (after both VMs were resumed).
    hold: Callable[[], Awaitable[None]] | None = None


async def run_checkpoint(links: PairLinks, protocol: EpochProtocol, reasons: dict[str, int]) -> EpochRecord:
    """Run checkpoint N (§2) from step 1 to step 5; on failure recover per step 6 and raise.

    Raises :class:`CheckpointError` (with the recovery carried out) when any step fails; the caller
    decides which side was lost.  Stale STOP/RESUME events must have been taken off the sessions
    before calling (the caller counts them).
    """
    # the stop way in force when the checkpoint begins: one that applies a change still runs as begun
    stop_via = protocol.point.stop_via
    record = protocol.begin(reasons, time.time())
    step = Step.STOP_SECONDARY
    disk_committed = False

    async def timed(this: Step, action: Any) -> Any:
        nonlocal step
        step = this
        started = time.perf_counter()
        result = await asyncio.wait_for(action, links.timeout)
        record.steps.append((str(this), time.perf_counter() - started))
        return result

    async def with_disk_prepared(first_command: Any) -> None:
        # Every stop drains its VM's in-flight I/O, and a disk server paused by its speculation budget
        # reads no NBD connection at all: not the primary's write-blocking mirror, not the secondary's
        # `view`.  So prepare-checkpoint (lifting that pause until the commit) travels beside the
        # checkpoint's first command, before any VM is stopped: the secondary's `stop` (qmp), or its
        # `x-colo-expect-seal` ahead of the fire (qemu: the load must wait once the state arrives).
        disk = links.disk
        if disk is None:
            await first_command
            return
        await asyncio.gather(first_command, disk.call("prepare-checkpoint"))

    async def primary_event(name: str) -> Any:
        # A checkpoint the secondary cannot complete (it died, or took over) ends the primary's COLO at
        # once with COLO_EXIT, while the primary stays stopped until it is told; waiting out the
        # timeout for the event that will never come would keep the guest paused that long.
        event = await links.primary.wait_event((name, "COLO_EXIT"), timeout=links.timeout)
        if event.name == "COLO_EXIT":
            raise ColoExited(f"the primary left COLO during the checkpoint: {dict(event.data)}")
        return event

    held = False  # both VMs hold after the load (links.hold): from then on they must be resumed

    async def release() -> None:
        nonlocal held
        if not links.primary_alive():  # the agent fails over from the held secondary and resumes it
            raise ColoExited("the primary was lost while both VMs were held")
        # the secondary first, as after any hold: the primary's COLO thread may then start the next
        # checkpoint at once, which the secondary must be running (or at least not held) for
        await timed(Step.HOLD_RELEASE, links.secondary.execute("cont"))
        await timed(Step.HOLD_RELEASE, links.primary.execute("cont"))
        held = False

    try:
        if links.hold is not None:
            # Armed before anything of this checkpoint happens: the daemon fires every checkpoint, so
            # none can complete between the two requests and both sides hold this same one (N).
            await timed(
                Step.HOLD_ARM,
                asyncio.gather(
                    links.primary.execute(HOLD_HOOK_COMMAND), links.secondary.execute(HOLD_HOOK_COMMAND)
                ),
            )
        if stop_via is StopVia.QEMU:
            await timed(Step.EXPECT_SEAL, with_disk_prepared(links.secondary.execute("x-colo-expect-seal")))
            await timed(Step.FIRE, links.primary.execute("x-colo-checkpoint"))
            await timed(Step.STOPPED, primary_event("X_COLO_CHECKPOINT_STOPPED"))
        else:
            await timed(Step.STOP_SECONDARY, with_disk_prepared(links.secondary.execute("stop")))
            await timed(Step.STOP_PRIMARY, links.primary.execute("stop"))
        # 3: both seals at once (they are independent; the pause is the sum of the steps)
        compare, disk = links.compare, links.disk

        async def seal_compare() -> int:
            assert compare is not None
            opening = protocol.opening
            if protocol.opening_switches_mode and opening is not None:
                await timed(Step.COMPARE_MODE, compare.call("mode", mode=str(opening.mode)))
            return int((await timed(Step.COMPARE_SEAL, compare.call("seal")))["epoch"])

        async def seal_disk() -> int:
            assert disk is not None
            return int((await timed(Step.DISK_SEAL, disk.call("seal")))["epoch"])

        jobs: dict[Step, Any] = {}
        if compare is not None:
            jobs[Step.COMPARE_SEAL] = seal_compare()
        if disk is not None:
            jobs[Step.DISK_SEAL] = seal_disk()
        step = Step.COMPARE_SEAL if compare is not None else Step.DISK_SEAL
        results = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True), strict=True))
        compare_epoch = results.get(Step.COMPARE_SEAL)
        sealed_ok = {k: v for k, v in results.items() if not isinstance(v, BaseException)}
        # whatever did seal is recorded first, so that a failure of the other rolls it back
        message = protocol.sealed(
            disk_epoch=sealed_ok.get(Step.DISK_SEAL), compare_epoch=sealed_ok.get(Step.COMPARE_SEAL)
        )
        for failed_step, value in results.items():
            if isinstance(value, BaseException):
                step = failed_step
                raise value
        links.heartbeat(message)
        if stop_via is StopVia.QEMU:
            await timed(Step.SEALED, links.secondary.execute("x-colo-sealed"))
        else:
            await timed(
                Step.FIRE,
                links.primary.execute(
                    "migrate-set-parameters", {"x-checkpoint-delay": HUGE_CHECKPOINT_DELAY_MS}
                ),
            )
        loaded_told = False
        if links.hold is not None:
            # The held event replaces RESUME: the secondary emits it once it loaded N (before telling
            # the primary), the primary once the secondary told it.  Both stopped at N from here.
            await timed(Step.HELD, primary_event(HELD_EVENT))
            held = True
            await timed(Step.HELD, links.secondary.wait_event(HELD_EVENT, timeout=links.timeout))
            links.heartbeat(protocol.loaded())
            loaded_told = True
            try:
                await timed(Step.HOLD_INSPECT, links.hold())
            except BaseException:
                inspecting = step
                await release()  # both resume before the failure is handled (else its failure is)
                step = inspecting
                raise
            await release()
        p_resume = await timed(Step.RESUME_PRIMARY, primary_event("RESUME"))
        s_resume = await timed(
            Step.RESUME_SECONDARY, links.secondary.wait_event("RESUME", timeout=links.timeout)
        )
        record.primary_resume = p_resume.timestamp
        record.secondary_resume = s_resume.timestamp
        p_stops, s_stops = links.primary.take("STOP"), links.secondary.take("STOP")
        record.primary_stop = p_stops[-1].timestamp if p_stops else None
        record.secondary_stop = s_stops[-1].timestamp if s_stops else None
        record.stop_events = (len(p_stops), len(s_stops))
        if not loaded_told:
            links.heartbeat(protocol.loaded())
        if links.disk is not None:
            await timed(Step.DISK_COMMIT, links.disk.call("commit", epoch=record.number))
            disk_committed = True
        if links.compare is not None and isinstance(compare_epoch, int):
            committed = await timed(Step.COMPARE_COMMIT, links.compare.call("commit", epoch=compare_epoch))
            record.released_frames = int(committed.get("released_frames", 0))
        done, message = protocol.committed_step()
        links.heartbeat(message)
        # the point in force after the close: the epoch now open decides whether the secondary rests
        if protocol.point.passive_secondary and protocol.point.mode is Mode.MC:
            await timed(Step.PASSIVE_STOP, links.secondary.execute("stop"))
        return done
    except (Exception, asyncio.CancelledError) as exc:
        if protocol.current is None:  # failed after the commit (passive stop): the epoch is closed
            raise CheckpointError(step, exc, Recovery.COMMIT, record) from exc
        failed_at = step  # the recovery's own steps below move `step` on
        await _undo_hold(links, held, record)
        recovery = protocol.recovery_for_failure()
        if recovery is not Recovery.NONE and not links.primary_alive():
            record.steps.append((f"{recovery} left to the agent (primary lost)", 0.0))
            recovery = Recovery.NONE
        try:
            if recovery is Recovery.ROLLBACK and links.disk is not None and record.disk_epoch is not None:
                await timed(Step.DISK_ROLLBACK, links.disk.call("rollback"))
            elif recovery is Recovery.COMMIT and links.disk is not None and not disk_committed:
                await timed(Step.DISK_COMMIT, links.disk.call("commit", epoch=record.number))
        except Exception as second:  # the disk server itself is gone: the caller treats it as lost
            record.steps.append((f"recovery-failed:{second!r}", 0.0))
        protocol.failed_step(recovery)
        links.heartbeat(protocol.heartbeat())
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CheckpointError(failed_at, exc, recovery, record) from exc


async def _undo_hold(links: PairLinks, held: bool, record: EpochRecord) -> None:
    """After a failed held checkpoint: no VM stays held, and no request to hold outlives it.

    Best effort and bounded: the side that failed may be gone.  A side that holds (``held``, or its
    held event arrived) is resumed, the secondary first; elsewhere the request not yet used is
    withdrawn (``enable: false``), else some later checkpoint would hold a VM with nobody there to
    resume it.  With the primary lost, the secondary is the agent's: it fails over from the state
    the secondary holds and resumes it itself, and a ``cont`` from here could let the VM write while
    the agent changes its disk.
    """
    if links.hold is None:
        return
    limit = min(links.timeout, 5.0)
    primary_alive = links.primary_alive()
    for side, session in (("secondary", links.secondary), ("primary", links.primary)):
        if side == "secondary" and not primary_alive:
            record.steps.append((f"{Step.HOLD_DISARM}:secondary left to the agent (primary lost)", 0.0))
            continue
        try:
            if held or session.take(HELD_EVENT):
                await asyncio.wait_for(session.execute("cont"), limit)
            else:
                await asyncio.wait_for(session.execute(HOLD_HOOK_COMMAND, {"enable": False}), limit)
        except Exception as exc:
            record.steps.append((f"{Step.HOLD_DISARM}:{side}:{exc!r}", 0.0))
