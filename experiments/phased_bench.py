"""``hybridft bench phased``: the phased workload under every policy on one pair, in one run.

Why one run on one pair: the question is whether a policy puts the pair, after each change of the
workload's character, in the mode that serves that phase better -- and "better" is only meaningful against
the static modes measured on the same machine at the same time (this machine's load moves every figure).
So the same schedule (:class:`experiments.phased.Phased`: deterministic RPCs and divergent token answers in
turn, memory dirtying under both) runs under ``static-mc``, ``static-colo``, ``cost-model`` and ``gilbert``
one after another on one pair, the policy handed over through the daemon's ``mode`` verb between runs.

Per run it records the phase changes (``on_phase``), the pair's mode polled from ``status`` every
``poll_s`` and the applied decisions from the daemon's decision trace (time, reason, the signal that drove
it).  From the static runs, per phase, the better mode is the one whose client completed more requests per
second; every other policy is then judged per phase: time from the phase change until the pair was in
that mode, switches in the phase, the mode it ended in, and the client's rate and latency p50/p99.

The guard settings are the ``[controller]`` values in :data:`OPERATOR_SETTINGS` (why each value is
defensible for an operator is written beside it); ``tests/test_phased_auto.py`` runs the short version of
the same code with the same settings and asserts the bounds.

It lives in ``experiments/`` (registered in ``bench/cli.py`` by name, as every ``hybridft`` command is):
it drives the experiments' workloads, and ``bench`` and ``experiments`` are both floor 3, which may not
import each other (scripts/import-graph.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from experiments.net_workloads import NetDivergent, NetRR
from experiments.phased import Phased
from experiments.workload import PhaseResult, WorkloadTarget
from hybridft_common.control import call
from hybridft_common.stats import percentile

__all__ = [
    "OPERATOR_SETTINGS",
    "PhaseRow",
    "PolicyRun",
    "TracedDecision",
    "better_modes",
    "format_table",
    "mode_at",
    "mode_changes",
    "phase_rows",
    "phased_workload",
    "run_bench",
    "run_policy",
    "time_to_mode",
    "traced_decisions",
]

POLICIES = ("static-mc", "static-colo", "cost-model", "gilbert")
PATTERN = ("rr", "divergent", "rr", "divergent", "rr")
#: static-mc's epoch, and where every run starts.  10 ms, not the default 50: "the better mode" must
#: compare COLO with MC at its best, and cost-model (whose shortest epoch it is) chose 10 ms in every MC
#: stint measured; on the divergent phases MC served 250-327 requests/s at 10 ms against 136-151 at 50 ms
#: (same run, tests/test_phased_auto.py), where COLO served 149-173
STATIC_MC_EPOCH_MS = 10
RR_CLIENTS = 4
#: 8 token clients: COLO serialises a checkpoint per divergent answer, so its token rate stays near
#: 75/s however many clients wait, while MC's grows with them.  With 4 clients static MC (50 ms) and
#: static COLO served the divergent phases within noise of each other (69-74 vs 49-76 requests/s over
#: three runs), and "the better mode" flipped between runs
DIVERGENT_CLIENTS = 8


def phased_workload(pattern: Sequence[str], phase_s: float, dirty_mib_s: float) -> Phased:
    """The phased workload of the bench and of tests/test_phased_auto.py."""
    return Phased(
        pattern,
        phase_s,
        dirty_mib_s,
        rr=NetRR(clients=RR_CLIENTS),
        divergent=NetDivergent(clients=DIVERGENT_CLIENTS),
    )


#: The [controller] settings of the phased runs (DaemonConfig fields; see hybridft_common.settings).
#: They are the schema's defaults except where said, and each is defensible for an operator:
OPERATOR_SETTINGS: Mapping[str, float | int] = {
    # 4 Hz: the default; the sampling costs < 1 % of a core (test_daemon_auto measures it)
    "sample_period_ms": 250,
    # what a policy sees: cost-model averages 3 s of it (average_s), gilbert integrates all of it
    "window_s": 5.0,
    "decide_every_samples": 1,
    # a policy is pure arithmetic on a window: cost-model decides in ~1 ms; 100 ms only catches a hang
    "policy_timeout_ms": 100,
    # at least 5 s in a mode: at most 12 switches a minute even if a policy wanted to flap, and every
    # switch costs a checkpoint -- shorter would let a flapping policy spend more time switching than
    # protecting; longer could not follow workloads that change every ~10 s
    "min_dwell_s": 5.0,
    # 6 a minute: one switch per phase change for phases down to 10 s
    "switch_budget_per_min": 6,
    # a switch must be asked 2 windows running (0.25-0.5 s): one noisy window cannot flip the mode
    "hysteresis_windows": 2,
}


# --- what a run recorded --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ModeSample:
    t: float  # monotonic (the same clock as the daemon's trace)
    mode: str
    epoch_ms: int
    passive: bool


@dataclasses.dataclass(frozen=True, slots=True)
class TracedDecision:
    """One decision of the policy and the guard's verdict on it, from the decision trace."""

    t: float
    kind: str  # the guard's verdict: apply (a switch asked for), keep, hold, reject
    mode: str | None  # what the policy asked for (None: it failed)
    epoch_ms: int | None
    passive: bool
    reason: str
    signal: str | None


@dataclasses.dataclass
class PolicyRun:
    policy: str
    phases: list[PhaseResult]
    phase_t: list[float]  # monotonic time of each phase's start (on_phase)
    end_t: float
    timeline: list[ModeSample]
    decisions: list[TracedDecision]
    errors: list[str]

    @property
    def applied(self) -> list[TracedDecision]:
        """The decisions the guard applied: the switches the policy asked for."""
        return [d for d in self.decisions if d.kind == "apply"]

    def to_json(self) -> dict[str, Any]:
        t0 = self.phase_t[0] if self.phase_t else 0.0
        return {
            "policy": self.policy,
            "errors": self.errors,
            "phase_start_s": [round(t - t0, 3) for t in self.phase_t],
            "modes": [
                [round(s.t - t0, 2), s.mode, s.epoch_ms, s.passive] for s in _changes_only(self.timeline)
            ],
            "decisions": [
                [round(d.t - t0, 2), d.kind, d.mode, d.epoch_ms, d.reason]
                for d in self.decisions
                if d.kind != "keep"  # a policy content with the running point is most of the trace
            ],
        }


def _changes_only(timeline: Sequence[ModeSample]) -> list[ModeSample]:
    return [s for k, s in enumerate(timeline) if k == 0 or timeline[k - 1].mode != s.mode]


# --- pure evaluation -----------------------------------------------------------------------------------
def mode_at(timeline: Sequence[ModeSample], t: float) -> str | None:
    """The mode last polled at or before ``t`` (None before the first sample)."""
    found = None
    for sample in timeline:
        if sample.t > t:
            break
        found = sample.mode
    return found


def mode_changes(timeline: Sequence[ModeSample], start: float, end: float) -> list[tuple[float, str, str]]:
    """``(t, before, after)`` for every mode change polled in ``[start, end)``."""
    out = []
    for a, b in itertools.pairwise(timeline):
        if a.mode != b.mode and start <= b.t < end:
            out.append((b.t, a.mode, b.mode))
    return out


def time_to_mode(timeline: Sequence[ModeSample], mode: str, start: float, end: float) -> float | None:
    """Seconds from ``start`` until the pair was first polled in ``mode`` (0: already there); None: not
    before ``end``."""
    if mode_at(timeline, start) == mode:
        return 0.0
    for sample in timeline:
        if start <= sample.t < end and sample.mode == mode:
            return sample.t - start
    return None


def better_modes(static_mc: PolicyRun, static_colo: PolicyRun) -> list[str]:
    """Per phase, the mode whose static run served the client more requests per second."""
    return [
        "mc" if mc.score >= colo.score else "colo"
        for mc, colo in zip(static_mc.phases, static_colo.phases, strict=True)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseRow:
    policy: str
    index: int
    phase: str
    better: str  # the better mode from the static runs
    rate_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    time_to_better_s: float | None  # from the phase change; None: never in the phase
    switches: int
    mode_at_end: str | None
    colo_share: float  # of the phase's polled samples
    reasons: tuple[str, ...]  # of the switches applied in the phase
    signals: tuple[str | None, ...]
    errors: int


def phase_rows(run: PolicyRun, better: Sequence[str]) -> list[PhaseRow]:
    rows = []
    bounds = [*run.phase_t, run.end_t]
    for k, phase in enumerate(run.phases):
        start, end = bounds[k], bounds[k + 1]
        inside = [s for s in run.timeline if start <= s.t < end]
        applied = [a for a in run.applied if start <= a.t < end]
        rows.append(
            PhaseRow(
                run.policy,
                k,
                phase.name,
                better[k],
                phase.score,
                percentile(phase.latencies_ms, 0.5),
                percentile(phase.latencies_ms, 0.99),
                time_to_mode(run.timeline, better[k], start, end),
                len(mode_changes(run.timeline, start, end)),
                mode_at(run.timeline, end),
                sum(s.mode == "colo" for s in inside) / len(inside) if inside else math.nan,
                tuple(a.reason for a in applied),
                tuple(a.signal for a in applied),
                len(phase.errors),
            )
        )
    return rows


def format_table(rows: Sequence[PhaseRow]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"{'policy':<12} {'#':>1} {'phase':<14} {'better':<6} {'to better s':>11} {'switches':>8} "
        f"{'mode at end':<11} {'colo %':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    ]
    for r in rows:
        share = "-" if math.isnan(r.colo_share) else f"{100 * r.colo_share:.0f}"
        lines.append(
            f"{r.policy:<12} {r.index:>1} {r.phase:<14} {r.better:<6} {ms(r.time_to_better_s):>11} "
            f"{r.switches:>8} {r.mode_at_end or '-':<11} {share:>6} {r.rate_per_s:>8.1f} {ms(r.p50_ms):>8} "
            f"{ms(r.p99_ms):>8} {r.errors:>6}"
        )
    return "\n".join(lines)


# --- driving a daemon through its control socket --------------------------------------------------------
class ModePoller(threading.Thread):
    """Polls the daemon's ``status`` every ``period_s``: the pair's mode over time."""

    def __init__(self, control: str, period_s: float) -> None:
        super().__init__(name="mode-poller", daemon=True)
        self.control, self.period_s = control, period_s
        self.samples: list[ModeSample] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                status = call(self.control, "status", io_timeout=5.0)
                self.samples.append(
                    ModeSample(
                        time.monotonic(), status["mode"], status["epoch_ms"], status["passive_secondary"]
                    )
                )
            except (OSError, ValueError, KeyError):
                self.failures += 1
            self._halt.wait(self.period_s)

    def stop(self) -> list[ModeSample]:
        self._halt.set()
        self.join(10)
        return self.samples


def _status(control: str) -> dict[str, Any]:
    return call(control, "status")


def _settle(control: str, timeout_s: float = 30.0) -> None:
    """Wait until no point change is pending (the daemon applies one at its next checkpoint)."""
    deadline = time.monotonic() + timeout_s
    while _status(control)["pending_mode"] is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def _force(
    control: str,
    mode: str,
    epoch_ms: int | None = None,
    *,
    compare: str | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Force ``mode`` (this ends auto) and wait until the pair runs it, and the comparator with it.

    One request at a time, each waited for: a request that replaces or withdraws a pending one while a
    checkpoint is between its seal and its commit leaves the comparator in the withdrawn mode
    (controller/epoch.py tells the comparator the pending mode at the seal), so the comparator's mode is
    checked too.
    """
    _settle(control)
    args: dict[str, Any] = {"mode": mode}
    if mode == "mc":
        args["epoch_ms"] = epoch_ms or STATIC_MC_EPOCH_MS
        args["passive_secondary"] = False
    call(control, "mode", **args)
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(control)
        compare_mode = None
        if compare is not None:
            compare_mode = (call(compare, "stats", signals_only=True).get("signals") or {}).get("mode")
        if status["mode"] == mode and status["pending_mode"] is None and compare_mode in (None, mode):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the pair did not reach {mode} in {timeout_s:g} s: daemon {status['mode']} "
                f"(pending {status['pending_mode']}), comparator {compare_mode}"
            )
        time.sleep(0.1)


def traced_decisions(trace: Path, policy: str, since: float) -> list[TracedDecision]:
    """Every decision of ``policy`` after ``since`` with the guard's verdict, from the trace."""
    out: list[TracedDecision] = []
    if not trace.exists():
        return out
    for line in trace.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash is not a decision
        verdict, decision = record.get("verdict") or {}, record.get("decision") or {}
        if record.get("policy") != policy or record.get("t", 0) < since:
            continue
        asked = verdict.get("point") if verdict.get("kind") == "apply" else decision
        out.append(
            TracedDecision(
                record["t"],
                str(verdict.get("kind")),
                (asked or {}).get("mode"),
                (asked or {}).get("epoch_ms"),
                bool((asked or {}).get("passive_secondary", False)),
                decision.get("reason") or verdict.get("why", ""),
                decision.get("signal"),
            )
        )
    return out


def start_point(policy: str) -> tuple[str, int]:
    """Where a policy's run starts: static-colo and gilbert (a COLO hybrid) in COLO, the rest in MC at
    static-mc's epoch -- so a static run measures its mode from the first request."""
    return (
        ("colo", STATIC_MC_EPOCH_MS) if policy in ("static-colo", "gilbert") else ("mc", STATIC_MC_EPOCH_MS)
    )


def run_policy(
    control: str,
    target: WorkloadTarget,
    workload: Phased,
    seconds: float,
    policy: str,
    trace: Path,
    *,
    compare: str | None = None,
    poll_s: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> PolicyRun:
    """One run of ``workload`` with ``policy`` in auto (see the module docstring)."""
    mode, epoch_ms = start_point(policy)
    _force(control, "mc", epoch_ms, compare=compare)  # also the MC epoch a later MC starts with
    if mode == "colo":
        _force(control, "colo", compare=compare)
    engaged_at = time.monotonic()
    params = {"epoch_ms": STATIC_MC_EPOCH_MS} if policy == "static-mc" else {}
    reply = call(control, "mode", mode="auto", policy=policy, params=params)
    if not reply.get("auto"):
        raise RuntimeError(f"the daemon did not hand control to {policy}: {reply}")
    poller = ModePoller(control, poll_s)
    poller.start()
    phase_t: list[float] = []

    def on_phase(index: int, name: str, at_s: float) -> None:
        phase_t.append(time.monotonic())
        if progress is not None:
            progress(f"{policy}: phase {index} {name}")

    try:
        result = workload.run(target, seconds, on_phase)
        end_t = time.monotonic()
    finally:
        timeline = poller.stop()
        _force(control, "mc", STATIC_MC_EPOCH_MS, compare=compare)  # auto off between runs
    errors = list(result.errors) + [f"phase {p.name}: {e}" for p in result.phases for e in p.errors]
    if poller.failures:
        errors.append(f"{poller.failures} status polls failed")
    return PolicyRun(
        policy,
        list(result.phases),
        phase_t,
        end_t,
        timeline,
        traced_decisions(trace, policy, engaged_at),
        errors,
    )


@dataclasses.dataclass
class BenchResult:
    runs: dict[str, PolicyRun]
    better: list[str]
    rows: list[PhaseRow]

    def to_json(self) -> dict[str, Any]:
        return {
            "better": self.better,
            "phases": [dataclasses.asdict(r) for r in self.rows],
            "runs": {name: run.to_json() for name, run in self.runs.items()},
        }


def run_bench(
    control: str,
    target: WorkloadTarget,
    workload: Phased,
    seconds: float,
    trace: Path,
    policies: Sequence[str] = POLICIES,
    *,
    compare: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Every policy on the same schedule; the static ones must come first (they define "better")."""
    if list(policies[:2]) != ["static-mc", "static-colo"]:
        raise ValueError("the static runs come first: policies must start with static-mc, static-colo")
    runs = {
        p: run_policy(control, target, workload, seconds, p, trace, compare=compare, progress=progress)
        for p in policies
    }
    better = better_modes(runs["static-mc"], runs["static-colo"])
    rows = [row for run in runs.values() for row in phase_rows(run, better)]
    return BenchResult(runs, better, rows)


# --- the command ---------------------------------------------------------------------------------------
@click.command("phased")
@click.option("--phase-s", default=15.0, show_default=True, help="Seconds per phase.")
@click.option("--pattern", default=",".join(PATTERN), show_default=True, help="Phases, in order.")
@click.option("--dirty-mib-s", default=8.0, show_default=True, help="memdirty under every phase, MiB/s.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the pair runs (default: a new temporary directory).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Only the JSON document.")
def bench_phased(
    phase_s: float, pattern: str, dirty_mib_s: float, workdir: Path | None, as_json: bool
) -> None:
    """The phased workload under static-mc, static-colo, cost-model and gilbert on one pair."""
    import os
    import tempfile

    from hybridft_common.manifest import PairManifest
    from hybridft_common.settings import parse_settings
    from mc_driver.pair import down, up
    from mc_driver.pair_cli import pair_config

    names = [w.strip() for w in pattern.split(",")]
    workload = phased_workload(names, phase_s, dirty_mib_s)
    seconds = phase_s * len(names)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="hft-phased-"))
    controller = {k: v for k, v in OPERATOR_SETTINGS.items()}
    settings = parse_settings({"protection": {"mode": "mc", "epoch_ms": STATIC_MC_EPOCH_MS},
                               "controller": controller})  # fmt: skip

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    progress(f"pair up in {workdir}")
    up(pair_config(workdir, settings))
    try:
        manifest = PairManifest.load(workdir / "pair.json")
        target = WorkloadTarget(manifest.netns, manifest.guest_ip, manifest.guest_control.primary)
        load_before = os.getloadavg()
        result = run_bench(
            manifest.daemon_control,
            target,
            workload,
            seconds,
            workdir / "decisions.jsonl",
            compare=manifest.compare_control,
            progress=progress,
        )
        load_after = os.getloadavg()
    finally:
        down(workdir)
    document = result.to_json() | {
        "phase_s": phase_s,
        "pattern": names,
        "dirty_mib_s": dirty_mib_s,
        "controller": controller,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    click.echo(json.dumps(document, indent=None if as_json else 1, default=str))
    if not as_json:
        click.echo(format_table(result.rows))
        click.echo(f"load average before {load_before}, after {load_after}")
