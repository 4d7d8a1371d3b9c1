"""Re-protection's record (``DIR/reprotect.json``) and the small decisions it needs, free of I/O.

Why on the ground floor: three processes read it -- ``hybridft pair reprotect`` writes it phase by
phase, ``hybridft status`` shows it (also while no daemon runs: between the old daemon's end and the
new one's start the pair has none), and ``pair down`` reads where the pair's secondaries live.  The
operator commands import only this floor, so the record and its reader live here.

The record is typed (:class:`ReprotectRecord`) and written atomically; progress of the disk copy is
computed by :class:`CopyProgress` from samples the caller feeds it (bytes done, total, its clock), the
case by :func:`decide_case`, and the automatic retries' delays by :class:`Backoff`, so each is tested
on its own table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

REPROTECT_JSON = "reprotect.json"


class Case(StrEnum):
    """What happened to the pair, as re-protection sees it."""

    FAILED_OVER = "failed-over"  # the primary died, the secondary took over and serves
    SECONDARY_LOST = "secondary-lost"  # the secondary died (or left), the primary serves alone


class ReprotectState(StrEnum):
    RUNNING = "running"
    FAILED = "failed"  # the survivor serves, unprotected; the reason says why; retry is possible
    PROTECTED = "protected"


class Phase(StrEnum):
    PREPARE = "prepare"  # stop what is left of the old pair, the survivor's wiring becomes a primary's
    SECONDARY = "secondary"  # namespace, disk server, secondary QEMU (-incoming)
    DISK_COPY = "disk-copy"  # blockdev-mirror sync=full write-blocking, until READY
    MIGRATION = "migration"  # the new agent and daemon: the initial COLO migration
    VERIFY = "verify"  # the guest answers through the comparator


class CaseError(Exception):
    """Nothing to re-protect (the pair is protected, or nothing survives); the message says which."""


def decide_case(*, primary_alive: bool, secondary_alive: bool, failed_over: bool) -> Case:
    """Which side survives.  ``failed_over``: the agent wrote its report for the current layout."""
    if failed_over:
        if not secondary_alive:
            raise CaseError("the pair failed over but the new primary (the old secondary) is gone too")
        return Case.FAILED_OVER
    if primary_alive:
        return Case.SECONDARY_LOST
    raise CaseError("neither QEMU of the pair runs (and no failover happened): `pair down`, then `pair up`")


@dataclass
class CopyProgress:
    """Rate and time left of the disk copy, from (time, bytes done, total) samples over a window."""

    window_s: float = 3.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    done: int = 0
    total: int = 0

    def feed(self, now: float, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def feed_job(self, now: float, job: dict[str, Any]) -> None:
        """A sample from a ``query-block-jobs`` entry of the write-blocking mirror.

        Once the job is READY the copy is done, whatever ``offset`` says: the guest writes that arrive
        then are counted in ``len`` before ``offset`` and are mirrored synchronously, so the two may
        differ by the writes in flight (seen: 4 KiB short at READY under a disk-writing guest).
        """
        total = int(job.get("len", 0))
        self.feed(now, total if job.get("ready") else int(job.get("offset", 0)), total)

    @property
    def rate(self) -> float | None:
        """Bytes per second over the window (None before two samples a moment apart)."""
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (b1 - b0) / (t1 - t0))

    @property
    def seconds_left(self) -> float | None:
        rate = self.rate
        if self.total and self.done >= self.total:
            return 0.0
        if not rate:
            return None
        return (self.total - self.done) / rate

    def as_dict(self) -> dict[str, Any]:
        rate, left = self.rate, self.seconds_left
        return {
            "bytes_done": self.done,
            "bytes_total": self.total,
            "rate_bytes_s": None if rate is None else round(rate),
            "seconds_left": None if left is None else round(left, 1),
        }


@dataclass
class Backoff:
    """Delays between automatic re-protection attempts: doubling from ``first`` up to ``cap``; a
    success resets it."""

    first: float = 5.0
    cap: float = 120.0
    failures: int = 0

    def next_delay(self) -> float:
        return min(self.cap, self.first * (2 ** max(0, self.failures - 1))) if self.failures else 0.0

    def failed(self) -> None:
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0


@dataclass
class AutoReprotect:
    """When the automatic re-protector (``pair up --auto-reprotect``) starts an attempt: the pair failed
    over, or the daemon says the secondary is lost, or (no daemon) the last attempt failed -- and the
    back-off since the last failure has passed.  Fed observations and its caller's clock."""

    backoff: Backoff = field(default_factory=Backoff)
    next_try: float = 0.0

    def due(self, now: float, *, failed_over: bool, daemon_state: str | None, record_state: str) -> bool:
        if daemon_state == "protected" and not failed_over:
            return False
        needed = (
            failed_over
            or daemon_state == "unprotected"
            or (daemon_state is None and record_state == ReprotectState.FAILED)
        )
        return needed and now >= self.next_try

    def attempt_failed(self, now: float) -> float:
        """Count a failure; returns the delay before the next attempt."""
        self.backoff.failed()
        delay = self.backoff.next_delay()
        self.next_try = now + delay
        return delay

    def attempt_succeeded(self) -> None:
        self.backoff.succeeded()
        self.next_try = 0.0


@dataclass
class PhaseRecord:
    name: str
    started_at: float
    ended_at: float | None = None
    error: str | None = None


@dataclass
class Layout:
    """Where the pair's sides live (``pair.json`` knows the endpoints; this knows the hosts)."""

    primary_netns: str = ""
    secondary_netns: str = ""
    # the disk server that holds the primary's own disk (0: the primary's disk is a local image)
    primary_storage_pid: int = 0


@dataclass
class ReprotectRecord:
    """The whole record.  ``generation`` counts secondaries added by re-protection (the first pair is 0)."""

    generation: int = 0
    attempt: int = 0
    state: str = ""
    case: str = ""
    mode: str = ""
    phase: str = ""
    phases: list[PhaseRecord] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    unprotected_since: float | None = None
    protected_at: float | None = None
    unprotected_seconds: float | None = None
    initial_migration_pause_ms: float | None = None
    layout: Layout = field(default_factory=Layout)
    pids: dict[str, int] = field(default_factory=dict)  # the new secondary's processes of this attempt
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier generations, newest last
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReprotectRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["phases"] = [PhaseRecord(**p) for p in values.get("phases") or []]
        values["layout"] = Layout(**(values.get("layout") or {}))
        return cls(**values)

    @classmethod
    def load(cls, workdir: Path) -> ReprotectRecord | None:
        try:
            return cls.from_dict(json.loads((workdir / REPROTECT_JSON).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, workdir: Path) -> None:
        path = workdir / REPROTECT_JSON
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    def summary(self, now: float) -> dict[str, Any]:
        """What ``status`` shows: state, phase with progress, the reason of a failure, time unprotected."""
        unprotected = self.unprotected_seconds
        if unprotected is None and self.unprotected_since is not None:
            unprotected = now - self.unprotected_since
        return {
            "state": self.state,
            "generation": self.generation,
            "attempt": self.attempt,
            "case": self.case,
            "phase": self.phase,
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "progress": self.progress,
            "reason": self.reason,
            "unprotected_seconds": None if unprotected is None else round(unprotected, 3),
            "initial_migration_pause_ms": self.initial_migration_pause_ms,
        }


def format_summary(summary: dict[str, Any]) -> str:
    """Lines for ``hybridft status`` (human form)."""
    lines = [
        f"reprotect        {summary['state']} (generation {summary['generation']}, "
        f"attempt {summary['attempt']}, {summary['case']}), phase {summary['phase']}"
    ]
    progress = summary.get("progress") or {}
    if progress.get("bytes_total"):
        rate = progress.get("rate_bytes_s")
        left = progress.get("seconds_left")
        lines.append(
            f"disk copy        {progress['bytes_done']} of {progress['bytes_total']} bytes"
            + (f", {rate / (1 << 20):.1f} MiB/s" if rate else "")
            + (f", {left} s left" if left is not None else "")
        )
    if summary.get("unprotected_seconds") is not None:
        lines.append(f"unprotected      {summary['unprotected_seconds']} s")
    if summary.get("initial_migration_pause_ms") is not None:
        lines.append(f"migration pause  {summary['initial_migration_pause_ms']} ms")
    if summary.get("reason"):
        lines.append(f"reprotect reason {summary['reason']}")
    return "\n".join(lines)
