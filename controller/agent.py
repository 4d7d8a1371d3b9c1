"""``hybridft agent``: the secondary side's watchdog; it fails the pair over to the secondary.

The agent listens on the heartbeat socket (the daemon connects and sends
:class:`~controller.heartbeat.Heartbeat` lines) and watches the
secondary QEMU over its own QMP monitor.  It fails over when

* the heartbeat connection closes, or stays silent longer than ``--silence-ms`` (default 500),
* the daemon says ``{"primary_lost": true}`` (it saw the primary's QMP drop or its process exit),
* the secondary leaves COLO on its own (``COLO_EXIT``), or
* a planned ``{"failover": true}`` arrives (``hybridft failover``).

Nothing arms before the first heartbeat: a daemon that has not started COLO yet is not a lost primary.
A heartbeat that says ``unprotected`` (the daemon declared the secondary lost and runs the primary
alone) makes the agent stand down for good: the secondary's COLO_EXIT that follows, or the daemon's
later death, must not fence the only live copy for a stale one.

Why the disk decision looks the way it does (ARCHITECTURE.md §2 step 6, §5): the daemon announces
``{"epoch": N, "state": "sealed", "t": T}`` *before* it fires checkpoint N, so a secondary ``RESUME``
event whose QEMU timestamp is later than T (and earlier than any ``COLO_EXIT``, after which a resume
is failover's, not a load) proves the secondary loaded N: its memory is at N, so the disk must be at
N too -> ``commit N``.  A sealed epoch without such a resume was never loaded -> ``rollback``.  The
disk server's own ``status`` says which epochs really are sealed; the heartbeats only say when.
:class:`FailoverDecider` holds exactly this logic, fed events and messages, with no I/O, and is
unit-tested on its own.

Failover itself (:func:`fail_over`), every step timed into ``failover.json``, in this order:

0. ``failover-started.json`` (durable) -- from then on the daemon never resumes the primary -- and a
   new fencing generation (``generation`` in the workdir, :mod:`hybridft_common.fencing`), handed to
   the disk server (before its first disk step) and to the comparator (after the tap swap), which
   then refuse the old daemon's requests;
1. fence the primary (best effort ``stop`` on its ops monitor: after a daemon crash the primary may
   still run), beside the steps below;
2. ``x-colo-lost-heartbeat`` on the secondary, then wait (bounded) for its ``COLO_EXIT``, reading the
   QMP events as they come.  Why first: QEMU does not fail a secondary over in the middle of loading
   a checkpoint (``secondary_vm_do_failover`` sees ``vmstate_loading`` and sets ``RELAUNCH``); the load
   finishes, the VM resumes (``RESUME``) and only then does the failover run (``COLO_EXIT``).  Deciding
   the disk before that could roll back an epoch whose memory the secondary was still loading:
   memory at N, disk at N-1.  After ``COLO_EXIT`` no further load can happen, so the RESUMEs before it
   say exactly which epochs the memory holds.  Sent even when a ``COLO_EXIT`` came first: a secondary
   that left COLO with an error is parked until this request, and only then does QEMU end the
   incoming migration, which the agent waits for (bounded) before the next step.  The request asks
   QEMU to keep the VM paused afterwards (``keep-paused``, patch 0010): QEMU 7.2 resumes a secondary
   by itself as it leaves COLO, and one that never loaded the sealed epoch N would then run on a
   disk that already shows N until step 3.  Stock QEMU refuses the argument and gets the plain
   command (the disk buffer's rollback keeps the writes of that gap; its reads are the exposure);
3. ``stop`` the secondary if it runs, so that no write of it lands while its disk changes;
4. disk: ``commit`` every sealed epoch up to the newest the secondary loaded, oldest first (the server
   commits strictly in order), ``rollback`` the rest, then ``failover``; each retried within
   :data:`DISK_RETRY_WINDOW`;
5. ``object-del`` of the two redirectors and ``chardev-remove`` of their sockets (the filter-rewriter
   stays: connections opened since the last checkpoint carry secondary-side sequence numbers only it
   translates), the primary's tap off the bridge and the secondary's on it (which also drops the
   bridge's learned entry for the guest MAC on the old port);
6. ``cont`` -- only if the disk steps all succeeded.  A VM whose disk is in an unknown state is never
   resumed: it stays paused, ``failover.json`` says ``"resumed": false`` with the reason, and the agent
   logs it as an error (an operator decides; availability is not worth a corrupt disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from controller.heartbeat import Heartbeat, HeartbeatError
from hybridft_common import eventloop
from hybridft_common.control import AsyncControlClient, ControlError
from hybridft_common.endpoints import Endpoint, parse_endpoint, start_server
from hybridft_common.fencing import GenerationFile
from hybridft_common.manifest import ManifestError, PairManifest, write_durably
from hybridft_common.processes import pid_alive
from hybridft_common.vocabulary import HELD_EVENT

# what the agent reads of the secondary: a held checkpoint (HELD_EVENT) is a load as a RESUME is
SECONDARY_EVENTS = ("RESUME", HELD_EVENT, "COLO_EXIT", "STOP")

log = logging.getLogger("hybridft.agent")

DEFAULT_SILENCE_MS = 500
WATCH_WAIT = 0.2  # the secondary watcher's longest single wait for an event


class AgentError(Exception):
    """The agent cannot start (bad config, secondary unreachable) or a failover step failed."""


# ---------------------------------------------------------------------------------- sans-I/O core
@dataclass(frozen=True, slots=True)
class DiskDecision:
    """What to do with the disk's sealed epochs.  ``commit``: commit ``commits`` in order (``epoch`` is
    the newest of them), then roll back the sealed epochs above it if ``then_rollback``.  ``rollback``:
    drop every sealed epoch (``epoch`` is the oldest).  ``none``: leave the disk as it is."""

    action: str  # "commit", "rollback" or "none"
    epoch: int | None = None
    why: str = ""
    commits: tuple[int, ...] = ()
    then_rollback: bool = False


@dataclass
class FailoverDecider:
    """When to fail over, and what to do with the disk's sealed epochs.  Times: ``now`` is monotonic
    seconds (silence); heartbeat ``t`` and QMP event timestamps are wall-clock seconds (ordering)."""

    silence_limit: float = DEFAULT_SILENCE_MS / 1000
    armed: bool = False
    last_heard: float = 0.0
    connected: bool = False
    trigger: str | None = None
    epoch: int | None = None
    state: str | None = None
    seal_times: dict[int, float] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)
    resumes: list[float] = field(default_factory=list)
    colo_exit: float | None = None
    bad_messages: int = 0
    triggered_at: float | None = None  # wall clock, for the failover report
    stood_down: bool = False  # the daemon declared the secondary lost: never fail over to it
    last_check: float | None = None  # monotonic time of the previous check()

    def connection_opened(self, now: float) -> None:
        self.connected = True
        self.last_heard = now

    def connection_closed(self, now: float) -> None:
        self.connected = False
        if self.armed:
            self._fire("heartbeat connection closed")

    def message(self, msg: Heartbeat, now: float) -> None:
        """One heartbeat (a line that did not decode is counted in ``bad_messages`` instead)."""
        self.last_heard = now
        self.armed = True
        if msg.unprotected and self.trigger is None:
            self.stood_down = True
        if msg.failover:
            self._fire("planned failover")
        if msg.primary_lost:
            self._fire("primary lost (daemon)")
        epoch, state = msg.epoch, msg.state
        if epoch is not None and state is not None:
            self.epoch, self.state = epoch, state
            if state == "sealed" and epoch not in self.seal_times:
                self.seal_times[epoch] = msg.t
            elif state == "committed":
                self.committed.add(epoch)

    def secondary_event(self, name: str, timestamp: float) -> None:
        if name in ("RESUME", HELD_EVENT):  # held (daemon's `verify`, patch 0007): loaded, not resumed
            self.resumes.append(timestamp)
        elif name == "COLO_EXIT":
            if self.colo_exit is None:
                self.colo_exit = timestamp
            if self.armed:
                self._fire("secondary left COLO (COLO_EXIT)")

    def check(self, now: float) -> str | None:
        """The failover reason, once there is one (silence is judged here).

        Silence is not judged right after the agent itself was stalled (a gap since the previous
        check of more than half the limit: CPU starvation, a long GC): heartbeats that arrived meanwhile
        sit unread in the socket, and the caller's next round reads them first.
        """
        stalled = self.last_check is not None and now - self.last_check > self.silence_limit / 2
        self.last_check = now
        if self.trigger is None and self.armed and not stalled and now - self.last_heard > self.silence_limit:
            self._fire(f"heartbeat silent for {now - self.last_heard:.3f} s")
        return self.trigger

    def _fire(self, reason: str) -> None:
        if self.trigger is None and not self.stood_down:
            self.trigger = reason
            self.triggered_at = time.time()

    def loaded(self, epoch: int) -> bool:
        """Did the secondary resume (= finish loading) after epoch ``epoch`` was sealed?"""
        sealed_at = self.seal_times.get(epoch)
        if sealed_at is None:
            return False
        end = self.colo_exit if self.colo_exit is not None else float("inf")
        return any(sealed_at < t < end for t in self.resumes)

    def disk_decision(self, disk_status: dict[str, Any]) -> DiskDecision:
        """Given the disk server's ``status``: commit every sealed epoch up to the newest one the
        secondary loaded -- oldest first, as the server requires -- and roll back the sealed epochs
        above it; with none loaded, roll back; with none sealed, nothing."""
        if disk_status.get("committing") is not None:
            return DiskDecision("none", disk_status["committing"], "a commit is already in progress")
        sealed = sorted(e for e in disk_status.get("sealed") or [] if isinstance(e, int))
        if not sealed:
            return DiskDecision("none", disk_status.get("committed"), "no sealed, uncommitted epoch")
        loaded = [e for e in sealed if self.loaded(e)]
        if not loaded:
            return DiskDecision("rollback", sealed[0], f"the secondary never loaded sealed epochs {sealed}")
        newest = max(loaded)
        commits = tuple(e for e in sealed if e <= newest)
        above = [e for e in sealed if e > newest]
        why = f"the secondary resumed after epoch {newest} was sealed"
        if above:
            why += f"; it never loaded {above}"
        return DiskDecision("commit", newest, why, commits, then_rollback=bool(above))


# ------------------------------------------------------------------------------------ I/O shell
@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    steps: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, step: str) -> None:
        self.steps.append((step, round(time.monotonic() - self.start, 4)))
        log.info("failover: %s (+%.3f s)", step, self.steps[-1][1])


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AgentError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


# How long each disk verb may take during a failover.  ``status`` and ``rollback`` only touch memory;
# ``commit`` and ``failover`` wait for the write-out and an fdatasync, so they get more.  A step that
# overruns is reported by name in failover.json and the failover goes on with the QMP and tap steps.
DISK_STEP_TIMEOUTS: dict[str, float] = {"status": 2.0, "rollback": 2.0, "commit": 10.0, "failover": 10.0}
DISK_CONNECT_TIMEOUT = 2.0
# A disk step that fails (the server restarting, a refused verb while the daemon's own step lands) is
# tried again for this long before the failover gives up and keeps the secondary paused.
DISK_RETRY_WINDOW = 20.0
DISK_RETRY_PAUSE = 0.5
# How long the secondary may take to leave COLO after x-colo-lost-heartbeat: a checkpoint it is
# loading finishes first (large ones take seconds on a loaded host).
COLO_EXIT_TIMEOUT = 15.0
# How long QEMU may take to end the incoming migration once the secondary left COLO (a bottom half).
INCOMING_END_TIMEOUT = 5.0
# The secondary watcher must end before failover starts; it is asked to and then waited for this long.
WATCHER_STOP_TIMEOUT = 1.0
# How long one QMP command of the failover may take before it is recorded as failed and skipped.
QMP_STEP_TIMEOUT = 5.0
AGENT_NICE = -10  # like the daemon: a starved agent would judge the heartbeat silent falsely


class DiskStepError(Exception):
    """A disk verb of the failover failed or did not answer in time (the message names the verb)."""


async def _disk_call(endpoint: str, verb: str, **args: Any) -> dict[str, Any]:
    limit = DISK_STEP_TIMEOUTS.get(verb, 2.0)
    client = AsyncControlClient(endpoint)
    try:
        try:
            await asyncio.wait_for(client.connect(), timeout=DISK_CONNECT_TIMEOUT)
        except TimeoutError:
            raise DiskStepError(f"{verb}: no connection within {DISK_CONNECT_TIMEOUT} s") from None
        except OSError as exc:
            raise DiskStepError(f"{verb}: cannot connect to {endpoint}: {exc}") from None
        try:
            return await asyncio.wait_for(client.call(verb, **args), timeout=limit)
        except TimeoutError:
            raise DiskStepError(f"{verb}: no answer within {limit} s") from None
        except ControlError as exc:
            raise DiskStepError(f"{verb}: {exc}") from None
        except OSError as exc:
            raise DiskStepError(f"{verb}: {exc}") from None
    finally:
        await client.close()


def _reason(exc: BaseException) -> str:
    """An exception as a reason for the report: its message, else what it is (``asyncio.wait_for``'s
    TimeoutError has no message, and the report said ``stop: `` for a stop that hung)."""
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


def _step_failed(timeline: Timeline, errors: list[str], label: str, exc: BaseException) -> None:
    """A failover step that failed or hung: into ``errors`` (the report) and the timeline."""
    errors.append(f"{label}: {_reason(exc)}")
    timeline.mark(f"{label} failed ({_reason(exc)})")


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.05)  # a dying QEMU's full backlog must not block the event loop
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


async def _fence_comparator(config: PairManifest, timeline: Timeline, generation: int) -> None:
    """Best effort: the comparator refuses the old daemon and releases no more of the old primary's
    output (a dead comparator releases nothing anyway)."""
    client = AsyncControlClient(config.compare_control)
    try:
        await asyncio.wait_for(client.connect(), timeout=DISK_CONNECT_TIMEOUT)
        await asyncio.wait_for(client.call("fence", generation=generation), timeout=2.0)
        timeline.mark(f"comparator fenced at generation {generation}")
    except (OSError, ControlError, TimeoutError) as exc:
        timeline.mark(f"comparator not fenced ({_reason(exc)})")
    finally:
        await client.close()


async def _fence_primary(config: PairManifest, timeline: Timeline) -> None:
    """Best effort: a primary that still runs (daemon crash) must stop talking through its tap."""
    from mc_driver.qmp import QmpError, QmpSession

    path = parse_endpoint(config.qmp.primary.ops).path or ""
    pid = config.pids.primary
    if (pid > 0 and not pid_alive(pid)) or not _listening(path):
        # a dead QEMU (same host: its pid; else its refusing socket): no retry loop on the hot path
        timeline.mark("primary gone (nothing to fence)")
        return
    try:
        session = await asyncio.wait_for(QmpSession.connect(path, name="primary", timeout=0.3), timeout=0.5)
    except (QmpError, TimeoutError):
        timeline.mark("primary unreachable (nothing to fence)")
        return
    try:
        await asyncio.wait_for(session.execute("stop"), timeout=0.5)
        timeline.mark("primary stopped (fenced)")
    except (QmpError, TimeoutError) as exc:
        timeline.mark(f"primary not fenced ({exc})")
    finally:
        await session.close()


async def _qmp_step(
    secondary: Any, timeline: Timeline, errors: list[str], command: str, *, quiet: bool = False, **args: Any
) -> Any:
    """One failover command on the secondary; a refusal or a hang is recorded and the failover goes on
    (the steps after it -- the tap swap above all -- still help the clients)."""
    from mc_driver.qmp import QmpCommandError, QmpError

    label = f"{command} {args.get('id', '')}".strip()
    try:
        result = await asyncio.wait_for(secondary.execute(command, **args), timeout=QMP_STEP_TIMEOUT)
    except QmpCommandError as exc:  # e.g. x-colo-lost-heartbeat after the secondary left COLO by itself
        timeline.mark(f"{label} refused ({exc.description})")
        return None
    except (QmpError, TimeoutError) as exc:
        _step_failed(timeline, errors, label, exc)
        return None
    if not quiet:
        timeline.mark(label)
    return result


async def _request_failover(secondary: Any, timeline: Timeline, errors: list[str]) -> None:
    """``x-colo-lost-heartbeat``, asking QEMU to keep the VM paused once it left COLO (patch 0010), so
    that it runs only after its disk was decided (the steps after it ask QEMU whether the VM runs).

    Without it QEMU resumes the secondary by itself at the end of the failover, before the agent's
    ``stop`` can reach it: with epoch N sealed but never loaded, the VM then reads N's blocks with a
    memory that never had them, and writes into the view the rollback replaces (the rollback keeps
    those writes: :meth:`disk_buffer.store.EpochStore.rollback`).  A QEMU without the patch (stock
    7.2 on a KVM host) refuses the argument and is asked again without it.
    """
    from mc_driver.qmp import QmpCommandError, QmpError

    command = "x-colo-lost-heartbeat"
    try:
        await asyncio.wait_for(secondary.execute(command, {"keep-paused": True}), timeout=QMP_STEP_TIMEOUT)
    except QmpCommandError as exc:
        if "keep-paused" not in exc.description:  # e.g. the secondary left COLO already
            timeline.mark(f"{command} refused ({exc.description})")
            return
        timeline.mark(f"{command}: QEMU cannot keep the VM paused (no patch 0010)")
        await _qmp_step(secondary, timeline, errors, command)
        return
    except (QmpError, TimeoutError) as exc:
        _step_failed(timeline, errors, command, exc)
        return
    timeline.mark(f"{command} (keep paused)")


def disk_settled(decision: DiskDecision, status: dict[str, Any]) -> bool:
    """Is the disk already where ``decision`` wants it (the daemon's own checkpoint step may have
    committed or rolled back the same epoch an instant before the agent asked)?"""
    sealed = [e for e in status.get("sealed") or [] if isinstance(e, int)]
    committed = status.get("committed")
    if status.get("committing") is not None:
        return False
    if decision.action == "commit":
        done = isinstance(committed, int) and decision.epoch is not None and committed >= decision.epoch
        return done and not (decision.then_rollback and sealed)
    if decision.action == "rollback":
        return decision.epoch not in sealed and not (
            isinstance(committed, int) and committed >= (decision.epoch or 0)
        )
    return True


async def _status_without_commit(disk: str, timeline: Timeline) -> dict[str, Any]:
    """The disk's status once no commit is in progress (the daemon's commit of an epoch the
    secondary loaded must land before the agent decides or fails over), bounded."""
    status = await _disk_call(disk, "status")
    if status.get("committing") is None:
        return status
    epoch = status["committing"]
    deadline = time.monotonic() + DISK_STEP_TIMEOUTS["commit"]
    while status.get("committing") is not None:
        if time.monotonic() > deadline:
            raise DiskStepError(
                f"commit of epoch {epoch} still in progress after {DISK_STEP_TIMEOUTS['commit']} s"
            )
        await asyncio.sleep(0.005)
        status = await _disk_call(disk, "status")
    timeline.mark(f"waited for the daemon's commit of epoch {epoch}")
    return status


async def _disk_step(
    disk: str, verb: str, done: Any, timeline: Timeline, generation: int, **args: Any
) -> None:
    """One disk verb of generation ``generation``; a refusal is fine if the disk is in the wanted state
    anyway (``done(status)``: the daemon did the same an instant earlier -- the state is what counts,
    not who got there first)."""
    if generation:
        args["generation"] = generation
    try:
        await _disk_call(disk, verb, **args)
    except DiskStepError:
        if not done(await _status_without_commit(disk, timeline)):
            raise
        timeline.mark(f"disk {verb} {args.get('epoch', '')} was already done".replace("  ", " "))


async def _settle_disk_once(
    disk: str, decider: FailoverDecider, timeline: Timeline, generation: int = 0
) -> DiskDecision:
    """Fence the disk server at ``generation`` (from then on the old daemon's verbs are refused), then
    commit the loaded sealed epochs (oldest first) and roll back the rest (§2 step 6)."""
    if generation:
        await _disk_call(disk, "fence", generation=generation)
        timeline.mark(f"disk fenced at generation {generation}")
    status = await _status_without_commit(disk, timeline)
    decision = decider.disk_decision(status)
    for epoch in decision.commits:
        if isinstance(status.get("committed"), int) and status["committed"] >= epoch:
            continue  # the daemon's own commit got there first
        await _disk_step(
            disk, "commit", lambda st, e=epoch: isinstance(st.get("committed"), int) and st["committed"] >= e,
            timeline, generation, epoch=epoch,
        )  # fmt: skip
    if decision.action == "rollback" or decision.then_rollback:
        status = await _status_without_commit(disk, timeline)
        if status.get("sealed"):
            await _disk_step(disk, "rollback", lambda st: not st.get("sealed"), timeline, generation)
    timeline.mark(f"disk {decision.action} {decision.epoch} ({decision.why})")
    return decision


async def _failover_disk_once(disk: str, timeline: Timeline, generation: int = 0) -> bool:
    await _disk_step(disk, "failover", lambda st: bool(st.get("failed_over")), timeline, generation)
    timeline.mark("disk failover")
    return True


async def _with_retries(step: Any, what: str, timeline: Timeline, window: float) -> tuple[Any, list[str]]:
    """``await step()`` until it succeeds or ``window`` seconds passed; the result and every error."""
    errors: list[str] = []
    deadline = time.monotonic() + window
    while True:
        try:
            return await step(), errors
        except DiskStepError as exc:
            errors.append(str(exc))
            timeline.mark(f"{what} failed (try {len(errors)}): {exc}")
            if time.monotonic() + DISK_RETRY_PAUSE > deadline:
                return None, errors
            await asyncio.sleep(DISK_RETRY_PAUSE)


async def _settle_disk(
    disk: str, decider: FailoverDecider, timeline: Timeline, window: float | None = None, generation: int = 0
) -> tuple[DiskDecision, list[str]]:
    """The disk decision carried out (retried within ``window``); the decision and the errors of the
    last try if it never succeeded, else ``[]``."""
    decision, errors = await _with_retries(
        lambda: _settle_disk_once(disk, decider, timeline, generation), "disk decision", timeline,
        DISK_RETRY_WINDOW if window is None else window,
    )  # fmt: skip
    if decision is None:
        return DiskDecision("none", None, "disk step failed"), errors[-1:]
    return decision, []


async def _await_colo_exit(secondary: Any, decider: FailoverDecider, timeline: Timeline) -> bool:
    """Feed the secondary's events to the decider until its COLO_EXIT (True) or the bound (False).

    The QMP reader must actually run meanwhile: every wait is a real, non-zero wait."""
    from mc_driver.qmp import QmpError, QmpTimeout

    deadline = time.monotonic() + COLO_EXIT_TIMEOUT
    while decider.colo_exit is None:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            event = await asyncio.wait_for(
                secondary.wait_event(SECONDARY_EVENTS, timeout=min(left, WATCH_WAIT)),
                timeout=min(left, WATCH_WAIT) + 1.0,
            )
        except (QmpTimeout, TimeoutError):
            continue
        except QmpError as exc:
            timeline.mark(f"secondary events unreadable: {exc}")
            break
        decider.secondary_event(event.name, event.timestamp)
    if decider.colo_exit is not None:
        timeline.mark("secondary left COLO (COLO_EXIT)")
        return True
    # the event may have been lost with a reconnect: ask QEMU itself
    try:
        reply = await asyncio.wait_for(secondary.execute("query-colo-status"), timeout=2.0)
    except (QmpError, TimeoutError) as exc:
        timeline.mark(f"no COLO_EXIT within {COLO_EXIT_TIMEOUT} s and no colo status ({_reason(exc)})")
        return False
    if reply.get("mode") == "none":
        decider.colo_exit = time.time()  # every event up to now was read above
        timeline.mark("secondary out of COLO (query-colo-status; no COLO_EXIT seen)")
        return True
    timeline.mark(f"no COLO_EXIT within {COLO_EXIT_TIMEOUT} s (COLO mode {reply.get('mode')!r})")
    return False


async def _await_incoming_end(secondary: Any, timeline: Timeline) -> bool:
    """Wait (bounded) until the secondary's incoming migration is over: its ``migration`` yank instance
    is gone, which QEMU removes last, after the failover's own ``vm_start``.

    Why it matters twice.  A secondary that left COLO by itself with an error (COLO_EXIT ``error``:
    the primary died mid-checkpoint) keeps its migration in state ``colo`` and its incoming thread
    parked until ``x-colo-lost-heartbeat`` completes a failover; left so, the VM runs but its next
    ``migrate`` (re-protection) fails with "duplicate yank instance".  And QEMU resumes the VM in a
    bottom half after the failover: a ``stop`` sent before that bottom half ran would be undone by it,
    letting the VM write while its disk is decided."""
    from mc_driver.qmp import QmpError, held_migration

    deadline = time.monotonic() + INCOMING_END_TIMEOUT
    while True:
        try:
            status = await asyncio.wait_for(held_migration(secondary), timeout=4.0)
        except (QmpError, TimeoutError) as exc:
            timeline.mark(f"incoming migration state unreadable ({_reason(exc)})")
            return False
        if status is None:
            timeline.mark("incoming migration ended")
            return True
        if time.monotonic() > deadline:
            timeline.mark(f"incoming migration still {status!r} after {INCOMING_END_TIMEOUT} s")
            return False
        await asyncio.sleep(0.01)


async def fail_over(
    config: PairManifest, decider: FailoverDecider, secondary: Any, timeline: Timeline
) -> dict[str, Any]:
    """Make the secondary the running, network-facing VM (steps and their order: module docstring)."""
    # a new fencing generation, durable before anyone is told of it (hybridft_common.fencing)
    record = GenerationFile(config.workdir / "generation")
    generation = record.load() + 1
    record.store(generation)
    timeline.mark(f"generation {generation}")
    # fencing runs beside the other steps; it must be over before the taps are swapped
    fence = asyncio.create_task(_fence_primary(config, timeline))
    errors: list[str] = []
    kept_paused: str | None = None
    # Always, even after a COLO_EXIT: a secondary that left COLO with an error (the primary died
    # mid-stream) is still a COLO secondary waiting for this request, and only the request ends its
    # incoming migration (see _await_incoming_end).  Refused harmlessly once it is out of COLO.
    await _request_failover(secondary, timeline, errors)
    left_colo = await _await_colo_exit(secondary, decider, timeline)
    incoming_ended = await _await_incoming_end(secondary, timeline) if left_colo else False
    if left_colo and not incoming_ended:
        errors.append("the secondary's incoming migration did not end: no re-protection until it restarts")
    status = await _qmp_step(secondary, timeline, errors, "query-status", quiet=True)
    if (status or {}).get("running"):
        await _qmp_step(secondary, timeline, errors, "stop")
    disk = config.disk_control
    decision = DiskDecision("none", None, "the secondary did not leave COLO: its memory epoch is unknown")
    disk_errors: list[str] = []
    if left_colo:
        decision, disk_errors = await _settle_disk(disk, decider, timeline, generation=generation)
        if not disk_errors:
            done, tries = await _with_retries(
                lambda: _failover_disk_once(disk, timeline, generation),
                "disk failover",
                timeline,
                DISK_RETRY_WINDOW,
            )
            if done is None:  # _failover_disk_once returns True once it succeeded
                disk_errors = tries[-1:]
        if disk_errors:
            kept_paused = f"disk step failed: {disk_errors[-1]}"
    else:
        kept_paused = "the secondary did not leave COLO"
    errors.extend(f"disk: {e}" for e in disk_errors)
    for command, ident in (("object-del", "f1"), ("object-del", "f2"),
                           ("chardev-remove", "red0"), ("chardev-remove", "red1")):  # fmt: skip
        await _qmp_step(secondary, timeline, errors, command, id=ident)
    try:
        await asyncio.wait_for(fence, timeout=1.0)
    except TimeoutError:
        timeline.mark("fencing the primary timed out")
    netns, bridge, taps = config.netns, config.bridge, config.taps
    try:
        _ip("-n", netns, "link", "set", taps.primary, "nomaster")
        _ip("-n", netns, "link", "set", taps.secondary, "master", bridge)
        _ip("-n", netns, "link", "set", taps.secondary, "up")
        timeline.mark("taps swapped")
    except AgentError as exc:
        errors.append(str(exc))
        timeline.mark(f"tap swap failed: {exc}")
    # the comparator last: until the taps are swapped its socket work is on the clients' path
    await _fence_comparator(config, timeline, generation)
    if kept_paused is None:
        status = await _qmp_step(secondary, timeline, errors, "query-status", quiet=True)
        if not (status or {}).get("running"):
            before = len(errors)
            await _qmp_step(secondary, timeline, errors, "cont")
            if len(errors) > before:  # the report must not claim a VM runs that does not
                kept_paused = f"cont failed: {errors[-1]}"
    if kept_paused is not None:
        log.error("NOT resuming the secondary: %s -- the pair is down until an operator acts", kept_paused)
        timeline.mark(f"secondary kept paused: {kept_paused}")
    timeline.mark("done")
    return {
        "reason": decider.trigger,
        "detected_at": decider.triggered_at,
        "generation": generation,
        "resumed": kept_paused is None,
        "kept_paused": kept_paused,
        "disk": {
            "action": decision.action,
            "epoch": decision.epoch,
            "commits": list(decision.commits),
            "why": decision.why,
            "error": "; ".join(disk_errors) or None,
        },
        "last_heartbeat": {"epoch": decider.epoch, "state": decider.state},
        "colo_exit_seen": decider.colo_exit is not None,
        "incoming_migration_ended": incoming_ended,
        "errors": errors,
        "steps": timeline.steps,
        "seconds": timeline.steps[-1][1],
        "finished_at": time.time(),
    }


class Agent:
    """The agent process: heartbeat listener + secondary QMP watcher + the decider."""

    def __init__(self, config: PairManifest, silence_limit: float) -> None:
        self.config = config
        self.decider = FailoverDecider(silence_limit=silence_limit)
        self.wake = asyncio.Event()
        self._stop_watching = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self.refused = 0  # heartbeat connections refused (a second one while the daemon's lives)

    async def _on_heartbeat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Only the pair's daemon reaches this handler (start_server: a unix peer of our uid or root, or a
        # tcp peer with the pair's client certificate).  While its connection lives a second one is
        # refused: it could only be a forger (a same-uid process) ordering a failover or announcing
        # epochs; a daemon that reconnects has closed its old connection first, which the agent already
        # treats as a lost heartbeat once armed.
        if self._writer is not None and not self._writer.is_closing():
            self.refused += 1
            log.warning("a second heartbeat connection refused while the daemon's lives")
            writer.close()
            return
        self._writer = writer
        self.decider.connection_opened(time.monotonic())
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    msg = Heartbeat.decode(line)
                except HeartbeatError as exc:
                    self.decider.bad_messages += 1
                    log.warning("ignoring a malformed heartbeat line %r: %s", line[:200], exc)
                    continue
                self.decider.message(msg, time.monotonic())
                if self.decider.trigger:
                    self.wake.set()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("heartbeat connection error: %s", exc)
        finally:
            if self._writer is writer:
                self._writer = None
                self.decider.connection_closed(time.monotonic())
                self.wake.set()
            writer.close()

    async def _watch_secondary(self, secondary: Any) -> None:
        """Feed the secondary's events to the decider until failover starts.

        It stops by itself once ``_stop_watching`` is set (within one wait): cancelling it alone is
        not enough, because ``asyncio.wait_for`` in Python 3.11 swallows a cancellation that lands in
        the same loop iteration as the awaited item (here: a QMP event) -- the loop would go on for
        ever and a plain ``await`` of the task would hang the failover (issue 5).
        """
        from mc_driver.qmp import QmpTimeout

        while not self._stop_watching.is_set():
            try:
                event = await secondary.wait_event(SECONDARY_EVENTS, timeout=WATCH_WAIT)
            except QmpTimeout:
                continue
            self.decider.secondary_event(event.name, event.timestamp)
            if self.decider.trigger:
                self.wake.set()

    async def stop_watcher(self, watcher: asyncio.Task[None], timeline: Timeline) -> bool:
        """Ask the watcher to end and wait for it, bounded; True when it ended in time."""
        self._stop_watching.set()
        watcher.cancel()
        done, _ = await asyncio.wait({watcher}, timeout=WATCHER_STOP_TIMEOUT)
        if not done:
            timeline.mark(f"secondary watcher still running after {WATCHER_STOP_TIMEOUT} s (left behind)")
            return False
        if not watcher.cancelled() and watcher.exception() is not None:
            timeline.mark(f"secondary watcher had failed: {watcher.exception()!r}")
        return True

    async def run(self) -> dict[str, Any] | None:
        from mc_driver.qmp import QmpDisconnected, QmpError, QmpSession

        qmp_path = parse_endpoint(self.config.qmp.secondary.agent).path or ""
        try:
            secondary = await QmpSession.connect(qmp_path, name="secondary", timeout=30)
        except QmpError as exc:
            raise AgentError(f"cannot reach the secondary's QMP monitor: {exc}") from exc
        hb: Endpoint = parse_endpoint(self.config.heartbeat)
        if hb.kind == "unix" and hb.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hb.path)
        server = await start_server(hb, self._on_heartbeat)
        watcher = asyncio.create_task(self._watch_secondary(secondary))
        print("ready", flush=True)
        try:
            while self.decider.check(time.monotonic()) is None:
                if self.decider.stood_down:
                    log.warning("the daemon declared the secondary lost: standing down (no failover)")
                    return None
                if watcher.done():
                    exc = watcher.exception()
                    if isinstance(exc, QmpDisconnected):
                        log.error("the secondary's QMP connection is gone: nothing left to protect")
                        return None
                    if exc is not None:
                        raise exc
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=0.05)
            timeline = Timeline()
            log.warning("failing over: %s", self.decider.trigger)
            # before any step, durably: the daemon reads "a failover has begun" from this file and
            # then never resumes the primary (controller.pair_state)
            began = {"reason": self.decider.trigger, "detected_at": self.decider.triggered_at}
            write_durably(started_marker(self.config.failover_report), json.dumps(began) + "\n")
            # the events it did not read stay queued in the session: fail_over reads them in order
            await self.stop_watcher(watcher, timeline)
            try:
                report = await fail_over(self.config, self.decider, secondary, timeline)
            except Exception as exc:  # never die silently half-way: say where it stopped
                log.exception("failover crashed")
                _write_report(self.config, {"reason": self.decider.trigger, "crashed": repr(exc),
                                            "steps": timeline.steps})  # fmt: skip
                raise
            _write_report(self.config, report)
            return report
        finally:
            watcher.cancel()
            server.close()
            if self._writer is not None:  # let the heartbeat handler see EOF and end on its own
                self._writer.close()
                await asyncio.sleep(0.05)
            with contextlib.suppress(TimeoutError):  # the report is written; do not hang on exit
                await asyncio.wait_for(secondary.close(), timeout=2.0)
            if hb.kind == "unix" and hb.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hb.path)


def started_marker(report: Path) -> Path:
    """``failover-started.json`` beside ``failover.json``: written before the first failover step, so
    the daemon knows a failover has begun even if the agent dies half-way."""
    return report.with_name("failover-started.json")


def _write_report(config: PairManifest, report: dict[str, Any]) -> None:
    """Replace ``failover.json`` atomically and durably: it is what an operator reads after a crash."""
    write_durably(config.failover_report, json.dumps(report, indent=1) + "\n")


def agent_command_args(config: Path) -> list[str]:
    return ["agent", "--config", str(config)]


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The pair's pair.json (written by `hybridft pair up`).",
)
@click.option(
    "--silence-ms",
    type=click.IntRange(min=10),
    default=DEFAULT_SILENCE_MS,
    show_default=True,
    help="Fail over when no heartbeat arrived for this long.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def agent_command(config_path: Path, silence_ms: int, log_level: str) -> None:
    """Watch the heartbeat and the secondary; fail over to the secondary when the primary is gone."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = PairManifest.load(config_path)
        try:  # as the daemon does: heartbeats must be read on time on a busy host (root only)
            os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
        except OSError as exc:
            log.warning("cannot renice the agent to %d: %s", AGENT_NICE, exc)
        report = eventloop.run(Agent(config, silence_ms / 1000).run(), "agent")
    except (ManifestError, AgentError) as exc:
        raise click.ClickException(str(exc)) from None
    if report is not None:
        click.echo(json.dumps(report))
