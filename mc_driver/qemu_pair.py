"""Two QEMUs in COLO on one host, and nothing else: no daemon, no agent, no disk buffer, no comparator.

Used by the fidelity tests (``tests/test_qemu_colo.py``, ``tests/test_daemon_qemu.py``) and by
``hybridft verify-checkpoint``: QEMU's own COLO, checkpoints fired on demand, RAM files to compare.  The
product's launcher is :mod:`mc_driver.pair` (``hybridft pair up``: every process of the architecture);
both build their QEMU command lines from the same pieces, but this one knows nothing about epochs, disks
or policies, which is what a test of QEMU's COLO alone needs.

Wiring (per QEMU's docs/COLO-FT.txt, all sockets are unix sockets in ``workdir`` so parallel pairs
never collide on ports)::

    primary:   tap P on the bridge; filter-mirror  (tx: client->guest copy)   -> mirror.sock -> secondary
               filter-redirector rx outdev=compare0     (primary output  -> colo-compare primary_in)
               filter-redirector rx indev=compare_out   (released frames -> back into the netdev)
               colo-compare primary_in / secondary_in=compare1 (secondary.sock) / outdev
    secondary: tap S (kept off the bridge: its own output only reaches colo-compare)
               filter-redirector f1 tx indev=red0  (mirror.sock),  f2 rx outdev=red1 (secondary.sock)
               filter-rewriter rew0 (TCP sequence numbers)

``compare="none"`` leaves out every filter: the secondary's tap is not on the bridge, so only the primary
talks to clients (a pure memory-replication setup, e.g. for RAM fidelity tests without packet comparison,
or for an external comparator that the caller wires itself through ``extra_*_args``).

Checkpoints: ``x-checkpoint-delay`` is set huge so QEMU never fires on its own; each
``migrate-set-parameters {"x-checkpoint-delay": N}`` fires one at once (QEMU 7.2 notifies the COLO thread
whenever the parameter is applied).  A checkpoint's pause is measured from QEMU's own event timestamps:
``STOP`` -> ``RESUME`` on each side.

Hold mode (``hold_after_checkpoint=True``, patched QEMU only): both QEMUs get
``QEMU_COLO_HOLD_AFTER_CHECKPOINT=1``; after a checkpoint each leaves its VM stopped and emits
``X_COLO_CHECKPOINT_HELD`` (the primary only after the secondary loaded), so both VMs can be inspected
at the same instant; :meth:`ColoPair.release` resumes them.

Guest RAM lives in ``memory-backend-file`` objects in ``/dev/shm`` (``share=on``) so that a held pair's
memory can be compared straight from the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mc_driver.accel import QemuChoice
from mc_driver.guest.control import READY_LINE
from mc_driver.guest.image import GuestImage
from mc_driver.guest.qemu_args import guest_cmdline
from mc_driver.launch import (
    PRIMARY_MIRROR_CHARDEV,
    PRIMARY_TAP,
    SECONDARY_TAP,
    PairFiles,
    add_pair_taps,
    chardev_client,
    chardev_server,
    filter_mirror,
    filter_redirector,
    guest_qemu_args,
    monitor_args,
    qmp_option_args,
    secondary_filter_args,
    secondary_filter_teardown,
)
from mc_driver.netns import NetNamespace
from mc_driver.qmp import QmpCommandError, QmpError, QmpSession, QmpTimeout

HUGE_CHECKPOINT_DELAY_MS = 200_000
HOLD_ENV = "QEMU_COLO_HOLD_AFTER_CHECKPOINT"
HELD_EVENT = "X_COLO_CHECKPOINT_HELD"
RAM_BACKEND_ID = "pc.ram"
CompareMode = Literal["qemu", "none"]


class ColoPairError(Exception):
    """The pair could not start, checkpoint or fail over; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class ColoPairConfig:
    workdir: Path
    image: GuestImage
    qemu: QemuChoice
    compare: CompareMode = "qemu"
    memory_mib: int = 256
    cmdline: str | None = None  # default: guest_cmdline()
    hold_after_checkpoint: bool = False
    primary_tap: str = PRIMARY_TAP
    secondary_tap: str = SECONDARY_TAP
    trace_events: tuple[str, ...] = ()
    extra_primary_args: tuple[str, ...] = ()
    extra_secondary_args: tuple[str, ...] = ()
    shm_dir: Path | None = None  # default: /dev/shm/hybridft-<pid>-<workdir name>


@dataclass(frozen=True, slots=True)
class SidePause:
    """QEMU's timestamps (epoch seconds) of one side's STOP and of its RESUME (or, held, its HELD event)."""

    stop: float | None  # None: held while already stopped (no STOP event)
    done: float

    @property
    def seconds(self) -> float | None:
        return None if self.stop is None else self.done - self.stop


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One fired checkpoint: each side's STOP (and RESUME, unless held) and the wall time it took."""

    number: int
    primary: SidePause
    secondary: SidePause
    held: bool
    wall_seconds: float
    requested: bool = True  # False: a checkpoint colo-compare asked for, found held


@dataclass(frozen=True, slots=True)
class FailoverReport:
    colo_exit_seen: bool
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, seconds since kill)
    total_seconds: float = 0.0


def primary_args(config: ColoPairConfig, paths: PairFiles) -> list[str]:
    """The primary QEMU's command line (binary first)."""
    return [*_common_args(config, paths, "primary"), *_primary_filter_args(config, paths),
            *config.extra_primary_args]  # fmt: skip


def secondary_args(config: ColoPairConfig, paths: PairFiles) -> list[str]:
    """The secondary QEMU's command line (binary first); it waits on ``-incoming``."""
    return [*_common_args(config, paths, "secondary"), *_secondary_filter_args(config, paths),
            "-incoming", f"unix:{paths.migrate}", *config.extra_secondary_args]  # fmt: skip


def _common_args(config: ColoPairConfig, paths: PairFiles, side: str) -> list[str]:
    args = guest_qemu_args(
        config.qemu,
        config.image,
        tap=config.primary_tap if side == "primary" else config.secondary_tap,
        disk=paths.disk(side),
        console=paths.console(side),
        control=paths.control(side),
        cmdline=config.cmdline if config.cmdline is not None else guest_cmdline(),
        memory_mib=config.memory_mib,
    )
    args += [
        "-name", side,
        "-object", f"memory-backend-file,id={RAM_BACKEND_ID},size={config.memory_mib}M,"
                   f"mem-path={paths.ram(side)},share=on",
        "-machine", f"memory-backend={RAM_BACKEND_ID}",
        *qmp_option_args(paths.qmp(side)),
        *monitor_args("qmpaux", paths.qmp_aux(side)),
    ]  # fmt: skip
    for event in config.trace_events:
        args += ["-trace", f"{event},file={paths.trace(side)}"]
    return args


def _primary_filter_args(config: ColoPairConfig, paths: PairFiles) -> list[str]:
    if config.compare == "none":
        return []
    primary_out = paths.sock("primary-out")  # the primary guest's output -> colo-compare
    secondary_out = paths.sock("secondary-out")  # the secondary guest's output -> colo-compare
    released = paths.sock("released")  # colo-compare's released frames -> back into the netdev
    return [
        *chardev_server(PRIMARY_MIRROR_CHARDEV, paths.mirror),
        *chardev_server("compare1", secondary_out),
        *chardev_server("compare0", primary_out),
        *chardev_client("compare0-0", primary_out),
        *chardev_server("compare_out", released),
        *chardev_client("compare_out0", released),
        *filter_mirror("m0", PRIMARY_MIRROR_CHARDEV),
        *filter_redirector("redire0", "rx", indev="compare_out"),
        *filter_redirector("redire1", "rx", outdev="compare0"),
        "-object", "iothread,id=iothread1",
        "-object", "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,"
                   "outdev=compare_out0,iothread=iothread1",
    ]  # fmt: skip


def _secondary_filter_args(config: ColoPairConfig, paths: PairFiles) -> list[str]:
    if config.compare == "none":
        return []
    return secondary_filter_args(paths.mirror, paths.sock("secondary-out"))


async def wait_for_line(
    path: Path, needle: str, timeout: float, alive: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Wait until ``needle`` appears in the file at ``path`` (a serial console); fail early if QEMU exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if needle in path.read_text(errors="replace"):
                return
        for proc in alive:
            if proc.poll() is not None:
                raise ColoPairError(f"QEMU exited ({proc.returncode}) while waiting for {needle!r} in {path}")
        await asyncio.sleep(0.1)
    raise ColoPairError(f"{needle!r} did not appear in {path} within {timeout:.0f} s")


class ColoPair:
    """A running pair: ``await ColoPair.start(config, netns)``, then always ``await pair.close()``."""

    def __init__(self, config: ColoPairConfig, netns: NetNamespace) -> None:
        self.config = config
        self.netns = netns
        shm = config.shm_dir or Path("/dev/shm") / f"hybridft-{os.getpid()}-{config.workdir.name}"
        self.shm_dir = shm
        self.paths = PairFiles(config.workdir, shm)
        self.primary_proc: subprocess.Popen[bytes] | None = None
        self.secondary_proc: subprocess.Popen[bytes] | None = None
        self.primary: QmpSession | None = None
        self.secondary: QmpSession | None = None
        self.checkpoints = 0
        self.held = False
        self.failed_over = False
        self._logs: list[object] = []

    # ---------------------------------------------------------------------------------------- start
    @classmethod
    async def start(
        cls, config: ColoPairConfig, netns: NetNamespace, *, boot_timeout: float = 120.0
    ) -> ColoPair:
        """Boot the primary (guest ready), start the secondary, and enter COLO (initial full migration)."""
        pair = cls(config, netns)
        try:
            await pair._start(boot_timeout)
        except BaseException:
            await pair.close()
            raise
        return pair

    async def __aenter__(self) -> ColoPair:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, side: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config.hold_after_checkpoint:
            env[HOLD_ENV] = "1"
        else:
            env.pop(HOLD_ENV, None)
        log = self.paths.log(side).open("wb")
        self._logs.append(log)
        return self.netns.popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    async def _start(self, boot_timeout: float) -> None:
        cfg, paths = self.config, self.paths
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.shm_dir.mkdir(parents=True, exist_ok=True)
        if cfg.hold_after_checkpoint and not cfg.qemu.patched:
            raise ColoPairError("hold_after_checkpoint needs the patched QEMU (X_COLO_CHECKPOINT_HELD)")
        for side in ("primary", "secondary"):
            with paths.disk(side).open("wb") as disk:
                disk.truncate(1 << 20)
            for stale in (paths.qmp(side), paths.qmp_aux(side), paths.control(side), paths.console(side)):
                stale.unlink(missing_ok=True)
        add_pair_taps(self.netns, cfg.primary_tap, cfg.secondary_tap)

        self.primary_proc = self._spawn("primary", primary_args(cfg, paths))
        self.secondary_proc = self._spawn("secondary", secondary_args(cfg, paths))
        procs = (self.primary_proc, self.secondary_proc)
        self.primary = await QmpSession.connect(
            paths.qmp("primary"), name="primary", alive=lambda: self.primary_proc.poll() is None, timeout=30
        )
        self.secondary = await QmpSession.connect(
            paths.qmp("secondary"),
            name="secondary",
            alive=lambda: self.secondary_proc.poll() is None,
            timeout=30,
        )
        await wait_for_line(paths.console("primary"), READY_LINE, boot_timeout, procs)

        colo_cap = {"capabilities": [{"capability": "x-colo", "state": True}]}
        await self.secondary.execute("migrate-set-capabilities", colo_cap)
        await self.primary.execute("migrate-set-capabilities", colo_cap)
        await self.primary.execute("migrate-set-parameters", {"x-checkpoint-delay": HUGE_CHECKPOINT_DELAY_MS})
        await self.primary.execute("migrate", uri=f"unix:{paths.migrate}")
        deadline = time.monotonic() + 120
        while True:
            status = (await self.primary.execute("query-migrate")).get("status")
            if status == "colo":
                break
            if status in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
                raise ColoPairError(f"initial COLO migration ended as {status!r}; see {paths.log('primary')}")
            await asyncio.sleep(0.1)
        # COLO is established once the secondary runs its copy of the guest.
        while True:
            state = await self.secondary.execute("query-status")
            if state.get("running"):
                break
            if time.monotonic() > deadline:
                raise ColoPairError(f"secondary did not resume after the initial migration: {state}")
            await asyncio.sleep(0.05)
        self.primary.discard_events()
        self.secondary.discard_events()

    # ---------------------------------------------------------------------------------- checkpoints
    def sessions(self) -> tuple[QmpSession, QmpSession]:
        """The (primary, secondary) QMP sessions; raises if the pair is not running."""
        if self.primary is None or self.secondary is None:
            raise ColoPairError("the pair is not running")
        return self.primary, self.secondary

    async def checkpoint(self, timeout: float = 30.0) -> Checkpoint:
        """Fire one checkpoint and wait until it completed on both sides (held, in hold mode).

        colo-compare may also ask QEMU for checkpoints on its own (packet mismatch, hold timeout).
        Without the hold, events of such earlier checkpoints are dropped before firing, and the result
        is the first checkpoint that completes after the request.  In hold mode every checkpoint,
        requested or not, ends held; if one is already held when this is called, it is returned
        without firing (``requested=False``): the patched primary starts no checkpoint while held,
        so whatever is returned is a checkpoint both VMs are stopped at.
        """
        primary, secondary = self.sessions()
        if self.held:
            raise ColoPairError("the pair is held after the previous checkpoint: release() it first")
        started = time.monotonic()
        hold = self.config.hold_after_checkpoint
        requested = True
        if hold:
            requested = not primary.pending(HELD_EVENT)
        else:
            primary.discard_events(["STOP", "RESUME"])
            secondary.discard_events(["STOP", "RESUME"])
        if requested:
            await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": HUGE_CHECKPOINT_DELAY_MS})
        done = HELD_EVENT if hold else "RESUME"
        try:
            if hold:
                # A held VM that was already stopped emits no STOP; the HELD event is what counts.
                p_done = await primary.wait_event(done, timeout=timeout)
                s_done = await secondary.wait_event(done, timeout=timeout)
                p_stop = self._take_stop(primary)
                s_stop = self._take_stop(secondary)
            else:
                p_stop = (await primary.wait_event("STOP", timeout=timeout)).timestamp
                s_stop = (await secondary.wait_event("STOP", timeout=timeout)).timestamp
                p_done = await primary.wait_event(done, timeout=timeout)
                s_done = await secondary.wait_event(done, timeout=timeout)
        except QmpTimeout as exc:
            raise ColoPairError(f"checkpoint {self.checkpoints + 1} did not complete: {exc}") from exc
        self.held = hold
        self.checkpoints += 1
        return Checkpoint(
            number=self.checkpoints,
            primary=SidePause(p_stop, p_done.timestamp),
            secondary=SidePause(s_stop, s_done.timestamp),
            held=self.held,
            wall_seconds=time.monotonic() - started,
            requested=requested,
        )

    @staticmethod
    def _take_stop(session: QmpSession) -> float | None:
        stops = session.take("STOP")
        return stops[-1].timestamp if stops else None

    async def release(self) -> None:
        """Resume both VMs held after a checkpoint (hold mode)."""
        primary, secondary = self.sessions()
        if not self.held:
            return
        await secondary.execute("cont")
        await primary.execute("cont")
        await primary.wait_event("RESUME", timeout=10)
        await secondary.wait_event("RESUME", timeout=10)
        self.held = False

    # ------------------------------------------------------------------------------------- failover
    async def kill_primary_and_failover(self, *, keep_rewriter: bool = True) -> FailoverReport:
        """kill -9 the primary QEMU and make the secondary the running, network-facing VM.

        Steps (QEMU 7.2): ``x-colo-lost-heartbeat`` (the secondary may already have left COLO by itself:
        that is fine), ``object-del`` of its redirectors, ``chardev-remove`` of their sockets, optionally
        the rewriter too, then the secondary's tap goes on the bridge and the dead primary's tap off it.
        The rewriter is kept by default: connections opened since the last checkpoint have a secondary-side
        ISN, and only the rewriter still maps their sequence numbers to what the client saw.
        """
        _, secondary = self.sessions()
        assert self.primary_proc is not None
        killed = time.monotonic()
        steps: list[tuple[str, float]] = []

        def mark(step: str) -> None:
            steps.append((step, round(time.monotonic() - killed, 4)))

        self.primary_proc.send_signal(signal.SIGKILL)
        self.primary_proc.wait()
        mark("primary killed")
        if self.primary is not None:
            await self.primary.close()
            self.primary = None
        self.netns.detach_tap(self.config.primary_tap)
        mark("primary tap detached")
        try:
            await secondary.execute("x-colo-lost-heartbeat")
            mark("x-colo-lost-heartbeat")
        except QmpCommandError as exc:
            mark(f"x-colo-lost-heartbeat refused ({exc.description})")
        colo_exit = False
        try:
            await secondary.wait_event("COLO_EXIT", timeout=5)
            colo_exit = True
            mark("COLO_EXIT")
        except QmpTimeout:
            mark("no COLO_EXIT within 5 s")
        if self.config.compare == "qemu":
            for command, ident in secondary_filter_teardown(keep_rewriter=keep_rewriter):
                try:
                    await secondary.execute(command, id=ident)
                except QmpCommandError as exc:
                    raise ColoPairError(f"failover: {command} {ident}: {exc.description}") from exc
            mark("redirectors removed")
        self.netns.attach_tap(self.config.secondary_tap)
        mark("secondary tap attached")
        status = await secondary.execute("query-status")
        if not status.get("running"):
            await secondary.execute("cont")
            mark("secondary cont")
        self.failed_over = True
        return FailoverReport(colo_exit, steps, round(time.monotonic() - killed, 4))

    # ---------------------------------------------------------------------------------------- close
    async def close(self) -> None:
        """Stop both QEMUs (quit, then SIGKILL), remove the RAM files; the namespace stays the caller's."""
        for session in (self.primary, self.secondary):
            if session is not None:
                with contextlib.suppress(QmpError, OSError):
                    await asyncio.wait_for(session.execute("quit"), timeout=2)
                await session.close()
        self.primary = self.secondary = None
        for proc in (self.primary_proc, self.secondary_proc):
            if proc is None:
                continue
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            with contextlib.suppress(Exception):
                log.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------- helpers
    def console_text(self, side: str) -> str:
        try:
            return self.paths.console(side).read_text(errors="replace")
        except OSError:
            return ""
