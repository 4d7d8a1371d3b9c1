"""The contract between a workload and whoever runs it (the experiment runner, the phased tests, benchmarks).

Why a contract of its own: the runner compares modes, so every mode must be measured by the same client
with the same score.  A workload is a guest-side program (started over the guest's control channel, never
its network, so starting it adds no packets to the compared streams) plus a host-side client that checks
every byte it receives.  The runner only knows this interface: it hands a workload a
:class:`WorkloadTarget` (where the pair's guest is), calls :meth:`Workload.run` for a duration, and gets a
:class:`WorkloadResult` whose ``score`` means the same thing in every mode (higher is better), so scores
can be normalised to the unreplicated run.

A phased workload changes character every N seconds; it reports one :class:`PhaseResult` per phase and
scores the geometric mean of its phase scores (so no phase dominates by its unit's size).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadTarget:
    """Where a workload's client and guest program run."""

    netns: str | None  # the client's network namespace (None: the host's own)
    guest_ip: str
    guest_control: str  # endpoint of the primary guest's control loop (ttyS1), unix:PATH or tcp:HOST:PORT


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseResult:
    """What the client saw in one phase (a steady workload has exactly one)."""

    name: str  # the phase's workload character, e.g. "net-rr" or "net-divergent"
    start_s: float  # seconds since the workload started
    end_s: float
    work: float  # completed units (requests, bytes, guest work units) in the phase
    latencies_ms: tuple[float, ...] = ()  # per request, where the workload has requests
    errors: tuple[str, ...] = ()  # every wrong, lost or late byte the client found

    @property
    def seconds(self) -> float:
        return max(self.end_s - self.start_s, 1e-9)

    @property
    def score(self) -> float:
        """Units per second in this phase."""
        return self.work / self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadResult:
    workload: str
    unit: str  # what one unit of ``work`` is: "requests", "bytes", "work units"
    phases: tuple[PhaseResult, ...]
    errors: tuple[str, ...] = ()  # errors outside any phase (the guest program would not start...)

    @property
    def score(self) -> float:
        """Units per second; a phased workload: the geometric mean of its phases' scores."""
        scores = [p.score for p in self.phases]
        if not scores or min(scores) <= 0:
            return 0.0
        return math.exp(sum(math.log(s) for s in scores) / len(scores))

    @property
    def ok(self) -> bool:
        return not self.errors and not any(p.errors for p in self.phases)


# Called at each phase change with (phase index, phase name, seconds since start): the runner and the
# phased tests use it to log when the character changed, so switch times can be measured from it.
PhaseListener = Callable[[int, str, float], None]


@runtime_checkable
class Workload(Protocol):
    name: str
    unit: str

    def run(
        self, target: WorkloadTarget, seconds: float, on_phase: PhaseListener | None = None
    ) -> WorkloadResult:
        """Start the guest side, drive the client for ``seconds``, stop the guest side, report.

        Blocking; the guest program is stopped again whatever happens (also on exceptions), so the next
        cell starts from an idle guest.
        """
        ...
