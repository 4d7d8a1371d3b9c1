"""Builders shared by the policy tests (no tests here): synthetic windows and a tiny daemon loop.

The loop stands in for the daemon's policy task: it samples a scenario into a SignalRing, hands the
policy a window, passes the outcome through a PolicyGuard and applies an ``apply`` verdict at once
(the daemon applies it at the next checkpoint boundary; the tests do not need that delay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from hybridft_common.vocabulary import Mode
from policies.base import PolicyLike
from policies.guard import GuardConfig, GuardVerdict, PolicyGuard, VerdictKind
from policies.trace import TraceRecord, make_record
from policies.window import ProtectionPoint, SignalRing, Window

Scenario = Callable[[float, ProtectionPoint], Mapping[str, float | None]]


def point(mode: Mode | str = Mode.COLO, epoch_ms: int = 50, passive: bool = False) -> ProtectionPoint:
    return ProtectionPoint(Mode(mode), epoch_ms, passive)


def steady(
    signals: Mapping[str, float],
    mode: Mode | str = Mode.COLO,
    *,
    epoch_ms: int = 50,
    passive: bool = False,
    samples: int = 10,
    dt: float = 0.5,
    t0: float = 100.0,
) -> Window:
    """A window whose every signal holds one value over ``samples`` samples ``dt`` apart."""
    t = t0 + np.arange(samples) * dt
    return Window(t, point(mode, epoch_ms, passive), {k: np.full(samples, v) for k, v in signals.items()})


@dataclass
class Run:
    windows: list[Window] = field(default_factory=list)
    outcomes: list[object] = field(default_factory=list)
    verdicts: list[GuardVerdict] = field(default_factory=list)
    records: list[TraceRecord] = field(default_factory=list)

    @property
    def points(self) -> list[ProtectionPoint]:
        return [w.point for w in self.windows]


def simulate(
    policy: PolicyLike,
    scenario: Scenario,
    steps: int,
    *,
    start: ProtectionPoint | None = None,
    dt: float = 0.5,
    guard: GuardConfig | None = None,
    span_s: float = 5.0,
    t0: float = 1000.0,
) -> Run:
    """Run ``steps`` sample -> decide -> guard -> apply rounds; the op.* signals come from the point."""
    ring = SignalRing(capacity=64)
    judge = PolicyGuard(guard or GuardConfig(min_dwell_s=0, confirm_windows=1, switches_per_minute=1000))
    current = start or point()
    run = Run()
    policy.reset()
    for k in range(steps):
        now = t0 + k * dt
        values = dict(scenario(now, current))
        values.setdefault("op.colo", 1.0 if current.mode is Mode.COLO else 0.0)
        values.setdefault("op.epoch_ms", float(current.epoch_ms))
        values.setdefault("op.passive", 1.0 if current.passive_secondary else 0.0)
        ring.append(now, values)
        window = ring.window(current, span_s=span_s)
        try:
            outcome: object = policy.decide(window)
        except Exception as exc:
            outcome = exc
        verdict = judge.filter(window, outcome, 0.001)
        run.windows.append(window)
        run.outcomes.append(outcome)
        run.verdicts.append(verdict)
        run.records.append(make_record(k, policy, window, outcome, 0.001, verdict))
        if verdict.kind is VerdictKind.APPLY:
            current = verdict.point
    return run
