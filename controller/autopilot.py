"""The daemon's autopilot: signals sampled every period, and -- in ``auto`` -- a policy's decisions.

Why it is its own object: the daemon's epoch loop must never wait for a policy, and a policy must never
cost protection.  So the autopilot runs beside the epochs, on its own period:

1. sample every source (:class:`controller.signals.SignalSampler`) and append the sample, with the
   operating point in force (``op.*``), to a bounded :class:`policies.window.SignalRing`;
2. in ``auto``, hand the policy a frozen :class:`policies.window.Window` of the last ``window_s`` seconds.
   ``decide`` runs in one worker thread with a time limit: a policy that raises, returns nonsense or takes
   too long is rejected by the one :class:`policies.guard.PolicyGuard` (which also enforces dwell,
   switch budget and hysteresis), the point stays as it is, and the failure is counted and shown in
   ``status``.  A hung policy keeps the worker: every later window is a timeout until it returns;
3. an ``apply`` verdict becomes a :class:`~controller.operating_point.PointRequest` with source
   ``policy``, which lands at the next checkpoint boundary exactly like an operator's;
4. every decision, with the window it saw and the verdict, is one JSON line of the decision trace
   (``hybridft policy replay`` and the experiment runner read it).

Forcing a mode (``hybridft mode mc|colo``) turns the autopilot's policy off; sampling goes on.  So does
the end of protection (a failover, a lost secondary: :meth:`Autopilot.stand_down`): with one VM left
there is no mode to choose, and ``status`` says which policy stood down and why (``policy.ended``).
Every sample also goes to ``on_sample`` (the daemon's Prometheus gauges).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.operating_point import OperatingPoint, PointRequest, PointSource
from controller.signals import SignalSampler
from hybridft_common.vocabulary import Mode
from policies.base import PolicyLike
from policies.guard import GuardConfig, GuardVerdict, PolicyGuard, VerdictKind
from policies.registry import load_policy
from policies.trace import make_record
from policies.window import ProtectionPoint, SignalRing

log = logging.getLogger("hybridft.autopilot")

TRACE_MAX_BYTES = 64 << 20  # the trace rotates to <name>.1 past this (bounded disk use)


@dataclass(frozen=True, slots=True)
class AutopilotConfig:
    period_s: float = 0.25
    window_s: float = 5.0
    decide_every_samples: int = 1  # a policy decision every N samples (the window still moves every one)
    guard: GuardConfig = field(default_factory=GuardConfig)
    trace_path: Path | None = None


class PolicyBusy(TimeoutError):
    """The policy has not returned from an earlier window: this one is a timeout too."""


class Autopilot:
    """See the module docstring.  ``point`` and ``request`` are the daemon's operating point and the
    one way to ask for a change; ``active`` says whether the pair is protected (no decisions otherwise)."""

    def __init__(
        self,
        sampler: SignalSampler,
        config: AutopilotConfig,
        *,
        point: Callable[[], OperatingPoint],
        request: Callable[[PointRequest], Any],
        active: Callable[[], bool],
        on_sample: Callable[[Mapping[str, float | None]], None] | None = None,
    ) -> None:
        self.sampler = sampler
        self.config = config
        self._point = point
        self._request = request
        self._active = active
        self._on_sample = on_sample
        self.ring = SignalRing(capacity=max(16, int(config.window_s / config.period_s) * 4))
        self.guard = PolicyGuard(config.guard)
        self.policy: PolicyLike | None = None
        self.latest: dict[str, float | None] = {}
        self.samples = 0
        self.decisions = 0
        self.last_verdict: GuardVerdict | None = None
        self.last_decision_at: float | None = None  # wall clock, for people
        self.last_error: str | None = None
        self.ended: dict[str, Any] | None = None  # the policy that stood down when protection ended
        self._seq = 0
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._busy: concurrent.futures.Future[Any] | None = None
        self._busy_since = 0.0
        self._closing = False

    # -- auto on / off ------------------------------------------------------------------------------
    def engage(self, name: str, params: Mapping[str, object] | None = None) -> PolicyLike:
        """Hand control to policy ``name`` (PolicyError if it cannot be loaded; nothing changes then)."""
        policy = load_policy(name, params)
        self.policy = policy
        self.guard.reset()
        self.last_verdict = None
        self.last_error = None
        self.ended = None
        log.info("auto: policy %s", name)
        return policy

    def disengage(self) -> None:
        if self.policy is not None:
            log.info("auto off: policy %s no longer decides", self.policy.name)
        self.policy = None

    def stand_down(self, why: str) -> None:
        """Protection ended: the policy stops deciding (there is one VM left), and status says so."""
        policy = self.policy
        if policy is None:
            return
        self.ended = {"policy": policy.name, "why": why, "at": time.time()}
        self.policy = None
        log.warning("auto off: policy %s stood down (%s)", policy.name, why)

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.sampler.start()
        next_at = time.monotonic()
        while not self._closing:
            next_at += self.config.period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.config.period_s)  # no catch-up bursts
            try:
                await self.step(time.monotonic())
            except Exception:  # sampling or deciding must never end the loop (protection goes on)
                log.exception("autopilot step failed")

    async def step(self, now: float) -> GuardVerdict | None:
        values = await self.sampler.sample(now)
        point = self._point()
        values["op.colo"] = 1.0 if point.mode is Mode.COLO else 0.0
        values["op.epoch_ms"] = float(point.epoch_ms)
        values["op.passive"] = 1.0 if point.passive_secondary else 0.0
        self.ring.append(now, values)
        self.latest = values
        self.samples += 1
        if self._on_sample is not None:
            self._on_sample(values)
        if self.policy is None or not self._active() or self.samples % self.config.decide_every_samples:
            return None
        return await self._decide(point)

    async def _decide(self, point: OperatingPoint) -> GuardVerdict:
        policy = self.policy
        assert policy is not None
        window = self.ring.window(
            ProtectionPoint(point.mode, point.epoch_ms, point.passive_secondary), span_s=self.config.window_s
        )
        limit = self.config.guard.time_limit_s
        outcome: object
        if self._busy is not None and not self._busy.done():
            elapsed = time.monotonic() - self._busy_since
            outcome = PolicyBusy(
                f"policy {policy.name} is still deciding an earlier window ({elapsed:.1f} s)"
            )
        else:
            started = time.monotonic()
            future = self._worker.submit(policy.decide, window)
            waiting = asyncio.wrap_future(future)
            # whatever the policy raises is read from `future` below (or never, if it hangs): mark it
            # retrieved so asyncio does not report it again as an unhandled error
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
            done, _ = await asyncio.wait({waiting}, timeout=limit * 2 + 0.05)
            elapsed = time.monotonic() - started
            if done:
                self._busy = None
                exc = future.exception()
                outcome = exc if exc is not None else future.result()
            else:
                self._busy, self._busy_since = future, started
                outcome = PolicyBusy(f"policy {policy.name} did not return within {elapsed:.2f} s")
        verdict = self.guard.filter(window, outcome, elapsed)
        self.decisions += 1
        self.last_verdict = verdict
        self.last_decision_at = time.time()
        if verdict.kind is VerdictKind.REJECT:  # kept until the next policy: status must show it
            self.last_error = verdict.error or verdict.why
            log.warning("policy %s rejected: %s", policy.name, verdict.why)
        self._trace(make_record(self._seq, policy, window, outcome, elapsed, verdict).to_line())
        self._seq += 1
        if verdict.kind is VerdictKind.APPLY:
            target = verdict.point
            self._request(
                PointRequest(
                    mode=target.mode,
                    epoch_ms=target.epoch_ms,
                    passive_secondary=target.passive_secondary,
                    source=PointSource.POLICY,
                )
            )
        return verdict

    def _trace(self, line: str) -> None:
        path = self.config.trace_path
        if path is None:
            return
        try:
            if path.exists() and path.stat().st_size > TRACE_MAX_BYTES:
                path.replace(path.with_name(path.name + ".1"))
            with path.open("a") as trace:
                trace.write(line + "\n")
        except OSError as exc:  # a full disk must not stop decisions
            log.warning("decision trace %s: %s", path, exc)

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        policy, verdict = self.policy, self.last_verdict
        last = None
        if verdict is not None and verdict.decision is not None:
            last = {
                "mode": str(verdict.decision.mode),
                "epoch_ms": verdict.decision.epoch_ms,
                "reason": verdict.decision.reason,
                "signal": verdict.decision.signal,
                "at": self.last_decision_at,
            }
        return {
            "name": None if policy is None else policy.name,
            "auto": policy is not None,
            "last_decision": last,
            "last_verdict": None if verdict is None else {"kind": str(verdict.kind), "why": verdict.why},
            "decisions": self.decisions,
            "failures": self.guard.failures,
            "consecutive_failures": self.guard.consecutive_failures,
            "failing": bool(verdict and verdict.policy_failing),
            "last_error": self.last_error,
            "ended": self.ended,
            # CPU the sampler's own code spent per sample in the daemon's loop thread (not the replies' I/O)
            "sample_cpu_ms": round(self.sampler.cpu_cost_s / self.samples * 1000, 3)
            if self.samples
            else None,
        }

    def signals(self) -> dict[str, float | None]:
        return {name: value for name, value in sorted(self.latest.items())}

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self._worker.shutdown(wait=False, cancel_futures=True)
