"""The one guard between any policy and the pair: a policy that fails never costs protection.

The daemon runs ``policy.decide(window)`` in a worker thread with a time limit and hands the outcome
-- a decision, the exception it raised, or whatever else it returned -- to :meth:`PolicyGuard.filter`
with the time it took.  The guard answers with a :class:`GuardVerdict`:

* ``apply``  -- switch to ``verdict.point`` (the daemon's operating point, applied at the next
  checkpoint boundary: ARCHITECTURE.md section 3);
* ``keep``   -- the policy asks for the point already running (or already requested);
* ``hold``   -- a switch was asked for but not now, and ``why`` says which rule held it;
* ``reject`` -- the policy raised, returned nonsense (not a Decision, a mode that is not a Mode, an
  epoch outside the guard's range, a wrong type) or took longer than ``time_limit_s``; the current
  point stays and the failure counters grow.

The rules, in order, for a decision that asks for a different point:

1. hysteresis -- the same switch must be asked for ``confirm_windows`` consecutive windows or for
   ``confirm_s`` seconds, so one noisy window cannot flip the mode;
2. dwell -- the current point must have run ``min_dwell_s`` since the guard applied it, or since a
   window showed someone else change it (an operator's forced mode, a failover).  The point the guard
   finds when it starts (the daemon's start, ``mode auto`` handing the pair to a policy) does not
   dwell: dwell protects a switch until it could pay for itself and stops a policy from undoing an
   operator's choice at once, and a hand-over is neither -- it asks the policy to choose.  The
   first window after a reset or start anchors nothing; hysteresis and the budget still apply;
3. budget -- at most ``switches_per_minute`` applied switches in any 60 s.

A held switch stays confirmed, so it applies as soon as dwell and budget allow.  Every change of the
point counts, an MC epoch change included, except that two MC epochs within ``epoch_tolerance``
(relative) are the same point: a cost model that wobbles between 37 and 38 ms is not switching.  In
COLO only the mode matters: a COLO point keeps the running MC epoch and passive setting for the next
MC (a policy's epoch in a COLO decision is ignored, so it cannot slip past the guard's range).

Pure and deterministic: time comes from ``window.now``, never from a clock, so the daemon's trace
replays through a fresh guard to the same verdicts.  An applied switch is "requested" until a window
shows it (the daemon applies it at a checkpoint boundary); asking for it again meanwhile is a
``keep``, not a second switch.  A request no window confirmed within ``apply_timeout_s`` is
forgotten (the daemon must have refused it) and may be asked for again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, Failure, describe_outcome
from policies.window import ProtectionPoint, Window

__all__ = ["GuardConfig", "GuardVerdict", "PolicyGuard", "VerdictKind", "same_point"]

BUDGET_WINDOW_S = 60.0


class VerdictKind(StrEnum):
    APPLY = "apply"
    KEEP = "keep"
    HOLD = "hold"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class GuardConfig:
    min_dwell_s: float = 10.0
    switches_per_minute: int = 4
    confirm_windows: int = 3
    confirm_s: float = 5.0
    time_limit_s: float = 0.5
    epoch_ms_min: int = EPOCH_MS_MIN
    epoch_ms_max: int = EPOCH_MS_MAX
    epoch_tolerance: float = 0.1
    apply_timeout_s: float = 30.0
    max_consecutive_failures: int = 5

    def __post_init__(self) -> None:
        for name in ("min_dwell_s", "confirm_s", "time_limit_s", "epoch_tolerance", "apply_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"guard {name} must be a finite number >= 0, got {value!r}")
        for name in ("switches_per_minute", "confirm_windows", "max_consecutive_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"guard {name} must be an integer >= 1, got {value!r}")
        if not EPOCH_MS_MIN <= self.epoch_ms_min <= self.epoch_ms_max <= EPOCH_MS_MAX:
            raise ValueError(
                f"guard epoch range {self.epoch_ms_min}..{self.epoch_ms_max} must lie in "
                f"{EPOCH_MS_MIN}..{EPOCH_MS_MAX}"
            )

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuardConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown guard settings {sorted(unknown)}")
        return cls(**data)


def same_point(a: ProtectionPoint, b: ProtectionPoint, epoch_tolerance: float = 0.0) -> bool:
    """Whether running ``a`` or ``b`` is the same protection (see the module docstring)."""
    if a.mode is not b.mode:
        return False
    if a.mode is Mode.COLO:
        return True
    if a.passive_secondary != b.passive_secondary:
        return False
    return abs(a.epoch_ms - b.epoch_ms) <= epoch_tolerance * max(a.epoch_ms, b.epoch_ms)


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """What the daemon does with one decision.  ``point`` is the point to run: the new one for
    ``apply``, else the one running (or requested and not yet shown)."""

    kind: VerdictKind
    point: ProtectionPoint
    why: str
    decision: Decision | None = None
    error: str | None = None
    consecutive_failures: int = 0
    policy_failing: bool = False  # consecutive failures reached the limit: the daemon should say so

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "point": self.point.to_json(),
            "why": self.why,
            "decision": None if self.decision is None else self.decision.to_json(),
            "error": self.error,
            "consecutive_failures": self.consecutive_failures,
            "policy_failing": self.policy_failing,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuardVerdict:
        try:
            decision = data.get("decision")
            return cls(
                VerdictKind(data["kind"]),
                ProtectionPoint.from_json(data["point"]),
                data["why"],
                None if decision is None else Decision.from_json(decision),
                data.get("error"),
                data.get("consecutive_failures", 0),
                data.get("policy_failing", False),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a guard verdict: {data!r}") from exc


@dataclass(slots=True)
class _Pending:
    target: ProtectionPoint
    first_t: float
    windows: int


class PolicyGuard:
    """Dwell, budget, hysteresis, sanity and a failure count for whatever policy runs (pure)."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.reset()

    def reset(self) -> None:
        self.failures = 0
        self.consecutive_failures = 0
        self._running: ProtectionPoint | None = None  # the point the last window showed
        self._since = 0.0  # when the running point was applied or changed by someone else
        self._requested: tuple[ProtectionPoint, float] | None = None  # applied, not yet shown
        self._pending: _Pending | None = None  # a switch being confirmed
        self._switches: deque[float] = deque()  # times of applied switches, last 60 s

    # -- state fed by windows -----------------------------------------------------------------------
    def _observe(self, window: Window) -> None:
        now, shown = window.now, window.point
        if self._running is None:  # hand-over: the point found here has no dwell to serve
            self._running, self._since = shown, -math.inf
        elif not same_point(shown, self._running):
            self._running = shown
            if self._requested is not None and same_point(shown, self._requested[0]):
                self._since = max(self._since, self._requested[1])  # entered when we applied it
            else:
                self._since = now  # changed by someone else (operator, failover): start dwelling
                self._pending = None
            self._requested = None
        if self._requested is not None and now - self._requested[1] > self.config.apply_timeout_s:
            self._requested = None
        while self._switches and self._switches[0] <= now - BUDGET_WINDOW_S:
            self._switches.popleft()

    # -- verdicts -----------------------------------------------------------------------------------
    def _verdict(
        self,
        kind: VerdictKind,
        point: ProtectionPoint,
        why: str,
        decision: Decision | None = None,
        error: str | None = None,
    ) -> GuardVerdict:
        return GuardVerdict(
            kind,
            point,
            why,
            decision,
            error,
            self.consecutive_failures,
            self.consecutive_failures >= self.config.max_consecutive_failures,
        )

    def _reject(
        self, current: ProtectionPoint, why: str, decision: Decision | None, error: str
    ) -> GuardVerdict:
        self.failures += 1
        self.consecutive_failures += 1
        self._pending = None  # a failure breaks "asked for K consecutive windows"
        return self._verdict(VerdictKind.REJECT, current, why, decision, error)

    def filter(self, window: Window, outcome: object, elapsed_s: float) -> GuardVerdict:
        """The verdict on ``outcome`` (a Decision, an exception, anything) that took ``elapsed_s``."""
        cfg = self.config
        self._observe(window)
        now = window.now
        assert self._running is not None
        current = self._requested[0] if self._requested is not None else self._running
        described = describe_outcome(outcome)
        decision = described if isinstance(described, Decision) else None
        if isinstance(elapsed_s, bool) or not isinstance(elapsed_s, (int, float)) or math.isnan(elapsed_s):
            why = f"elapsed time {elapsed_s!r} is not a number"
            return self._reject(current, why, decision, f"timeout: {why}")
        if elapsed_s > cfg.time_limit_s:
            why = f"took {elapsed_s:.3f} s > time limit {cfg.time_limit_s:g} s"
            return self._reject(current, why, decision, f"timeout: {why}")
        if isinstance(described, Failure):
            return self._reject(current, described.error, None, described.error)
        assert decision is not None
        if not cfg.epoch_ms_min <= decision.epoch_ms <= cfg.epoch_ms_max and decision.mode is Mode.MC:
            why = (
                f"nonsense: epoch_ms {decision.epoch_ms} outside the guard's "
                f"{cfg.epoch_ms_min}..{cfg.epoch_ms_max}"
            )
            return self._reject(current, why, decision, why)
        self.consecutive_failures = 0
        target = decision.point
        if target.mode is Mode.COLO:  # the MC epoch in force waits for the next MC
            target = ProtectionPoint(Mode.COLO, current.epoch_ms, current.passive_secondary)
        if same_point(target, current, cfg.epoch_tolerance):
            self._pending = None
            why = "already requested" if self._requested is not None else "already running"
            return self._verdict(VerdictKind.KEEP, current, why, decision)

        pending = self._pending
        if pending is not None and same_point(pending.target, target, cfg.epoch_tolerance):
            pending.windows += 1
            pending.target = target  # the newest epoch within tolerance is the one to apply
        else:
            pending = self._pending = _Pending(target, now, 1)
        asked_s = now - pending.first_t
        if pending.windows < cfg.confirm_windows and asked_s < cfg.confirm_s:
            return self._verdict(
                VerdictKind.HOLD,
                current,
                f"hysteresis: {target.describe()} asked {pending.windows} of {cfg.confirm_windows} windows, "
                f"{asked_s:.1f} of {cfg.confirm_s:g} s",
                decision,
            )
        dwelt = now - self._since
        if dwelt < cfg.min_dwell_s:
            return self._verdict(
                VerdictKind.HOLD,
                current,
                f"dwell: {current.describe()} for {dwelt:.1f} s < {cfg.min_dwell_s:g} s",
                decision,
            )
        if len(self._switches) >= cfg.switches_per_minute:
            return self._verdict(
                VerdictKind.HOLD,
                current,
                f"budget: {len(self._switches)} switches in the last {BUDGET_WINDOW_S:g} s "
                f"(at most {cfg.switches_per_minute})",
                decision,
            )
        self._switches.append(now)
        self._requested = (target, now)
        self._since = now
        self._pending = None
        return self._verdict(
            VerdictKind.APPLY,
            target,
            f"{current.describe()} -> {target.describe()} after {pending.windows} windows / {asked_s:.1f} s",
            decision,
        )
