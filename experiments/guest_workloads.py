"""Workloads whose work happens inside the guest: ``cpu`` (cpuburn), ``memdirty-<rate>`` and ``disk``.

Why the guest counts its own work.  A replicated guest is paused for every checkpoint, and its clock
stops with it, so "how much did the guest get done" can only be answered by the guest's program, read
against the host's clock.  cpuburn and memdirty print a running total every fraction of a second to
their log in the guest's tmpfs; the host reads the newest line over the control channel (ttyS1, never
the guest network, so reading adds no packets to what COLO compares) at the start and at the end of
the measured interval: the difference over the host's seconds is the score.  Both reads lag the
instant they describe by up to one report interval, in the same way, so the lags cancel on average.
The diskwriter reports each durable record over TCP itself ("S\\n" after fdatasync), so the ``disk``
client counts records as they arrive.

Every byte checked.  The whole report log is parsed at the end (each line exactly the program's
format, totals never going back); the diskwriter stream must be exactly ``RUN <hex>`` and then 1, 2,
3, ... with nothing else.  Anything else is an error of the run, never silently skipped.

The parsers are sans-I/O (:class:`ReportLog`, :class:`DiskStreamChecker`); :class:`GuestProgram` and the
three workload classes are the thin blocking shells the runner calls.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from experiments.workload import PhaseListener, PhaseResult, WorkloadResult, WorkloadTarget

REPORT_SECONDS = 0.25  # how often cpuburn / memdirty print their total (guest seconds)
WARMUP_TIMEOUT = 30.0  # the program's first report must come within this (a slow TCG guest)
DISK_PORT = 9100  # the diskwriter's report port
DISK_DEVICE = "/dev/vda"
MEMDIRTY_WORKING_SET_MIB = 64

CPUBURN_LINE = re.compile(r"cpuburn: rounds=(\d+)")
MEMDIRTY_LINE = re.compile(r"memdirty: pages=(\d+) mib_per_s=\d+\.\d\d")
MEMDIRTY_START = re.compile(r"memdirty: started rate=\d+\.\d MiB/s working_set=\d+ pages")


class WorkloadError(Exception):
    """The workload could not run (the guest program would not start, the client could not connect)."""


# ------------------------------------------------------------------------------------------ sans-I/O
@dataclass
class ReportLog:
    """A guest program's report log: every line must be a report (or an allowed header line), and the
    totals must never go back.  ``feed`` the log's full text; ``totals`` and ``errors`` come out."""

    pattern: re.Pattern[str]
    header: re.Pattern[str] | None = None
    totals: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def feed(self, text: str) -> None:
        self.totals.clear()
        self.errors.clear()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for number, line in enumerate(lines, 1):
            if number == 1 and self.header is not None and self.header.fullmatch(line):
                continue
            match = self.pattern.fullmatch(line)
            if match is None:
                self.errors.append(f"report line {number} is not the program's format: {line[:80]!r}")
                continue
            total = int(match.group(1))
            if self.totals and total < self.totals[-1]:
                self.errors.append(f"report line {number}: total {total} went back from {self.totals[-1]}")
            self.totals.append(total)

    @staticmethod
    def total_of(line: str, pattern: re.Pattern[str]) -> int | None:
        match = pattern.fullmatch(line.strip())
        return int(match.group(1)) if match else None


@dataclass
class DiskStreamChecker:
    """The diskwriter's report stream: ``RUN <hex>\\n`` and then ``1\\n``, ``2\\n``, ... exactly.

    ``feed`` takes bytes as they arrive and returns how many new durable records they completed.
    ``FULL``/``DONE``/``ERROR`` or any other byte is an error (the stream is then not trusted further).
    """

    run: int | None = None
    records: int = 0
    errors: list[str] = field(default_factory=list)
    _buf: bytes = b""

    def feed(self, data: bytes) -> int:
        if self.errors:
            return 0
        self._buf += data
        new = 0
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            if self.run is None:
                if not re.fullmatch(rb"RUN [0-9a-f]{1,16}", raw):
                    self.errors.append(f"diskwriter's first line is not RUN <hex>: {raw[:40]!r}")
                    return new
                self.run = int(raw[4:], 16)
                continue
            expected = str(self.records + 1).encode()
            if raw != expected:
                what = {b"FULL": "the disk is full", b"ERROR": "a write failed in the guest"}.get(raw)
                self.errors.append(
                    f"diskwriter: {what}" if what else f"diskwriter sent {raw[:40]!r}, expected {expected!r}"
                )
                return new
            self.records += 1
            new += 1
        if len(self._buf) > 64:
            self.errors.append(f"diskwriter sent a line longer than any record number: {self._buf[:40]!r}")
        return new


# --------------------------------------------------------------------------------------------- shells
class GuestProgram:
    """One program run in the guest over its control channel, stopped again whatever happens."""

    def __init__(self, target: WorkloadTarget, program: str, *args: str) -> None:
        from mc_driver.guest.control import GuestControl

        self.program = program
        self.ctl = GuestControl(target.guest_control, timeout=30)
        try:
            self.pid = self.ctl.run(program, *args)
        except BaseException:
            self.ctl.close()
            raise
        self.log_path = f"/tmp/{program}.{self.pid}.log"

    def last_line(self) -> tuple[str, float]:
        """The newest line of the program's log and the host's time of the read (mid round trip)."""
        before = time.monotonic()
        reply = self.ctl.sh("tail", "-n", "1", self.log_path)
        return (reply.lines[-1] if reply.lines else ""), (before + time.monotonic()) / 2

    def log_text(self) -> str:
        return self.ctl.sh("cat", self.log_path, timeout=60).text

    def running(self) -> bool:
        return any(pid == self.pid and state == "running" for pid, state, _ in self.ctl.jobs())

    def stop(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self.ctl.kill(self.pid, "KILL")
        finally:
            self.ctl.close()


def _wait_for_total(prog: GuestProgram, pattern: re.Pattern[str], timeout: float) -> tuple[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        line, at = prog.last_line()
        total = ReportLog.total_of(line, pattern)
        if total is not None:
            return total, at
        if time.monotonic() > deadline:
            tail = prog.log_text()[-300:]
            raise WorkloadError(f"{prog.program} printed no report within {timeout:.0f} s: {tail!r}")
        if not prog.running():
            raise WorkloadError(f"{prog.program} exited in the guest: {prog.log_text()[-300:]!r}")
        time.sleep(0.1)


class _ReportingWorkload:
    """A guest program that reports a running total: the score is its growth per host second."""

    def __init__(
        self,
        name: str,
        unit: str,
        program: str,
        args: tuple[str, ...],
        pattern: re.Pattern[str],
        header: re.Pattern[str] | None = None,
    ) -> None:
        self.name, self.unit, self.program, self.args = name, unit, program, args
        self.pattern, self.header = pattern, header

    def run(
        self, target: WorkloadTarget, seconds: float, on_phase: PhaseListener | None = None
    ) -> WorkloadResult:
        errors: list[str] = []
        try:
            prog = GuestProgram(target, self.program, *self.args)
        except Exception as exc:
            return WorkloadResult(self.name, self.unit, (), (f"{self.program} would not start: {exc}",))
        try:
            first, t0 = _wait_for_total(prog, self.pattern, WARMUP_TIMEOUT)
            if on_phase is not None:
                on_phase(0, self.name, 0.0)
            while time.monotonic() - t0 < seconds:
                time.sleep(min(0.5, max(0.0, seconds - (time.monotonic() - t0))))
            last, t1 = _wait_for_total(prog, self.pattern, WARMUP_TIMEOUT)
            if not prog.running():
                errors.append(f"{self.program} exited before the end of the run")
            report = ReportLog(self.pattern, self.header)
            report.feed(prog.log_text())
            errors += report.errors
            for total in (first, last):
                if total not in report.totals:
                    errors.append(f"the total {total} read during the run is not in the full log")
        except Exception as exc:
            return WorkloadResult(self.name, self.unit, (), (f"{type(exc).__name__}: {exc}",))
        finally:
            prog.stop()
        phase = PhaseResult(self.name, 0.0, t1 - t0, float(last - first), (), tuple(errors))
        return WorkloadResult(self.name, self.unit, (phase,))


class Cpu(_ReportingWorkload):
    """Guest cpuburn: rounds of 10^6 integer steps per second (no memory dirtied)."""

    def __init__(self) -> None:
        super().__init__("cpu", "rounds", "cpuburn", ("0", str(REPORT_SECONDS)), CPUBURN_LINE)


class MemDirty(_ReportingWorkload):
    """Guest memdirty at ``rate_mib_s``: pages dirtied per second (a paused guest dirties fewer)."""

    def __init__(self, rate_mib_s: int, working_set_mib: int = MEMDIRTY_WORKING_SET_MIB) -> None:
        if not 1 <= rate_mib_s <= 4096:
            raise ValueError(f"memdirty rate must be 1..4096 MiB/s, not {rate_mib_s}")
        self.rate_mib_s = rate_mib_s
        super().__init__(
            f"memdirty-{rate_mib_s}",
            "pages",
            "memdirty",
            (str(rate_mib_s), str(working_set_mib), str(REPORT_SECONDS)),
            MEMDIRTY_LINE,
            MEMDIRTY_START,
        )


@contextlib.contextmanager
def _client_socket(target: WorkloadTarget, port: int, timeout: float) -> Iterator[socket.socket]:
    """A TCP connection to the guest from the client's namespace, retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if target.netns:
            from mc_driver.netns import NetNamespace

            with NetNamespace(target.netns).entered():
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        try:
            sock.connect((target.guest_ip, port))
            break
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise WorkloadError(f"cannot connect to {target.guest_ip}:{port}: {exc}") from None
            time.sleep(0.2)
    try:
        yield sock
    finally:
        sock.close()


@dataclass
class Disk:
    """Guest diskwriter, fsync-heavy: durable 4 KiB records per second, each acknowledged over TCP.

    Its "latencies" are the gaps between consecutive acknowledgements as the client receives them (the
    client sends no requests): 0 for acknowledgements that arrive together, as MC releases a commit's."""

    name: str = "disk"
    unit: str = "records"
    device: str = DISK_DEVICE
    port: int = DISK_PORT

    def run(
        self, target: WorkloadTarget, seconds: float, on_phase: PhaseListener | None = None
    ) -> WorkloadResult:
        try:
            prog = GuestProgram(target, "diskwriter", self.device, "--port", str(self.port))
        except Exception as exc:
            return WorkloadResult(self.name, self.unit, (), (f"diskwriter would not start: {exc}",))
        checker = DiskStreamChecker()
        arrivals: list[float] = []
        try:
            with _client_socket(target, self.port, WARMUP_TIMEOUT) as sock:
                sock.settimeout(WARMUP_TIMEOUT)
                t0: float | None = None
                while not checker.errors:
                    data = sock.recv(65536)
                    now = time.monotonic()
                    if not data:
                        checker.errors.append("the diskwriter closed the connection")
                        break
                    new = checker.feed(data)
                    if new and t0 is None:
                        t0 = now  # the first durable record starts the measured interval
                        arrivals.append(now)
                        new -= 1
                        if on_phase is not None:
                            on_phase(0, self.name, 0.0)
                    arrivals.extend([now] * new)
                    if t0 is not None and now - t0 >= seconds:
                        break
        except Exception as exc:
            return WorkloadResult(self.name, self.unit, (), (f"{type(exc).__name__}: {exc}",))
        finally:
            prog.stop()
        if t0 is None:
            return WorkloadResult(self.name, self.unit, (), tuple(checker.errors) or ("no record arrived",))
        gaps = tuple(round((b - a) * 1000, 3) for a, b in itertools.pairwise(arrivals))
        phase = PhaseResult(
            self.name, 0.0, arrivals[-1] - t0, float(len(arrivals) - 1), gaps, tuple(checker.errors)
        )
        return WorkloadResult(self.name, self.unit, (phase,))
