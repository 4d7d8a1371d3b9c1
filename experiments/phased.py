"""A workload that changes character every N seconds: the case an adaptive replication policy exists for.

Why phased: a static mode is right for one kind of traffic and wrong for another.  Deterministic RPCs
(``net-rr``) are what COLO serves best -- the secondary agrees with every answer, so answers leave as soon
as it did, while MC holds each for up to an epoch; divergent answers (``net-divergent``, the token
service) make COLO checkpoint on every answer, which MC does not care about.  A schedule that alternates
them asks a policy to follow, and lets the experiment runner compare it with every static mode and with
an oracle that switches for free.

The schedule (:func:`build_schedule`, pure) cycles a pattern of phase names -- ``rr``, ``divergent`` and
``stream`` (aliases of ``net-rr``, ``net-divergent``, ``net-stream``) -- with ``phase_s`` seconds each over
the run's ``seconds``: ``round(seconds / phase_s)`` phases (at least one), the last ending exactly at
``seconds``, so a run never ends with a sliver of a phase whose rate means nothing.

Under every phase the guest dirties memory at ``dirty_mib_s`` MiB/s (``memdirty``, started over the control
channel once for the whole run and killed at its end; 0 = none): a checkpoint then has real pages to copy
in either mode, as a real service's heap would.  Every service the schedule uses is started before the
first phase and stopped after the last, so a change of character is a change of the clients, as when a
service's users change what they ask: a service started over the control channel mid-run would run on
the primary only until the next checkpoint, and in COLO the secondary's refused connection would hold
the new clients' first answers for the comparator's timeout (3 s, measured) -- a stall of the harness,
not of the workload.  At each change ``on_phase`` is called and the new clients start; a phase's
``start_s`` is that moment, its ``end_s`` when its clients finished (the last request in flight at the
planned end is completed and counted).
Every phase is driven by the same :class:`experiments.net_workloads.NetPhaseDriver` the steady workloads
use, so a phase's rate means exactly what the steady workload's score means.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from experiments.net_workloads import NetDivergent, NetRR, NetStream
from experiments.workload import PhaseListener, PhaseResult, WorkloadResult, WorkloadTarget
from mc_driver.guest import GuestControl, GuestError

__all__ = ["PHASE_NAMES", "Phased", "PlannedPhase", "build_schedule", "parse_pattern"]

#: what a pattern may name, and the phase (workload) name each stands for
PHASE_NAMES = {
    "rr": "net-rr",
    "net-rr": "net-rr",
    "divergent": "net-divergent",
    "net-divergent": "net-divergent",
    "stream": "net-stream",
    "net-stream": "net-stream",
}
#: memdirty's working set, MiB: at 8 MiB/s it takes 8 s to wrap, so a COLO checkpoint interval of up to
#: the working set / rate sees distinct pages (memdirty.c); it fits the test guest's 256 MiB
DEFAULT_WORKING_SET_MIB = 64


def parse_pattern(pattern: str | Sequence[str]) -> tuple[str, ...]:
    """``"rr,divergent"`` or ``["rr", "divergent"]`` -> canonical phase names; ValueError names a bad one."""
    words = [w.strip() for w in pattern.split(",")] if isinstance(pattern, str) else list(pattern)
    if not words or any(not w for w in words):
        raise ValueError(f"a phase pattern needs at least one phase name, got {pattern!r}")
    out = []
    for word in words:
        if word not in PHASE_NAMES:
            raise ValueError(f"unknown phase {word!r}; known: {', '.join(sorted(PHASE_NAMES))}")
        out.append(PHASE_NAMES[word])
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedPhase:
    index: int
    name: str  # canonical workload name
    start_s: float  # planned, seconds since the run started
    end_s: float


def build_schedule(pattern: str | Sequence[str], phase_s: float, seconds: float) -> tuple[PlannedPhase, ...]:
    """The phases of a run of ``seconds`` (see the module docstring)."""
    names = parse_pattern(pattern)
    if not phase_s > 0 or not seconds > 0:
        raise ValueError(f"phase_s and seconds must be > 0, got {phase_s!r} and {seconds!r}")
    count = max(1, round(seconds / phase_s))
    return tuple(
        PlannedPhase(k, names[k % len(names)], k * phase_s, seconds if k == count - 1 else (k + 1) * phase_s)
        for k in range(count)
    )


class Phased:
    """Alternating network phases with memory dirtying under all of them (module docstring)."""

    name = "phased"

    def __init__(
        self,
        pattern: str | Sequence[str] = ("net-rr", "net-divergent"),
        phase_s: float = 15.0,
        dirty_mib_s: float = 8.0,
        *,
        working_set_mib: int = DEFAULT_WORKING_SET_MIB,
        rr: NetRR | None = None,
        divergent: NetDivergent | None = None,
        stream: NetStream | None = None,
    ) -> None:
        self.pattern = parse_pattern(pattern)
        if not phase_s > 0:
            raise ValueError(f"phase_s must be > 0, got {phase_s!r}")
        if dirty_mib_s < 0 or working_set_mib < 1:
            raise ValueError("dirty_mib_s must be >= 0 and working_set_mib >= 1")
        self.phase_s, self.dirty_mib_s, self.working_set_mib = phase_s, dirty_mib_s, working_set_mib
        self.workloads = {
            "net-rr": rr or NetRR(),
            "net-divergent": divergent or NetDivergent(),
            "net-stream": stream or NetStream(),
        }
        units = {self.workloads[n].unit for n in self.pattern}
        self.unit = units.pop() if len(units) == 1 else "requests or bytes (per phase)"

    def schedule(self, seconds: float) -> tuple[PlannedPhase, ...]:
        return build_schedule(self.pattern, self.phase_s, seconds)

    def run(
        self, target: WorkloadTarget, seconds: float, on_phase: PhaseListener | None = None
    ) -> WorkloadResult:
        plan = self.schedule(seconds)
        clock0 = time.monotonic()
        phases: list[PhaseResult] = []
        errors: list[str] = []
        try:
            with GuestControl(target.guest_control) as ctl:
                dirty_pid: int | None = None
                serving: list[str] = []
                drivers = [self.workloads[planned.name].driver() for planned in plan]
                try:
                    for driver in drivers:
                        if driver.service not in serving:
                            ctl.start_service(driver.service)
                            serving.append(driver.service)
                    if self.dirty_mib_s > 0:
                        # report period 0: memdirty's own output is not needed and would only fill /tmp
                        dirty_pid = ctl.run(
                            "memdirty", f"{self.dirty_mib_s:g}", str(self.working_set_mib), "0"
                        )
                    for planned, driver in zip(plan, drivers, strict=True):
                        start_s = time.monotonic() - clock0
                        if on_phase is not None:
                            on_phase(planned.index, planned.name, start_s)
                        phases.append(driver.drive(target, start_s, clock0, clock0 + planned.end_s))
                finally:
                    # the next cell starts from an idle guest, whatever happened
                    try:
                        for service in serving:
                            ctl.stop_service(service)
                    finally:
                        if dirty_pid is not None:
                            ctl.kill(dirty_pid)
        except GuestError as exc:
            errors.append(f"guest: {exc}")
        return WorkloadResult(self.name, self.unit, tuple(phases), tuple(errors))
