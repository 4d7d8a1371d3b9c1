"""The decision trace: one JSON line per decision, and its replay.

Each line records everything needed to judge a decision after the fact and to reproduce it: the
window the policy saw, its raw outcome (a decision, or the failure as text), how long ``decide``
took, the guard's verdict and the point the pair runs (or is asked to run) afterwards.  Lines are
strict JSON (NaN is written as null, floats by ``repr``), so a window round-trips bit for bit.

``replay(lines, policy)`` feeds the recorded windows, in order, to a fresh (reset) policy and returns
what it decides now.  Policies are pure (``policies.base``), so replaying a trace with the policy
and parameters that wrote it gives back exactly the recorded outcomes -- the test of purity -- and
replaying it with another policy or other parameters answers "what would X have done here?"
(``hybridft policy replay TRACE --policy NAME``).  :func:`replay_guarded` adds the guard's verdicts,
fed the recorded ``elapsed_s``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.base import Decision, Failure, PolicyError, PolicyLike, describe_outcome, params_to_json
from policies.guard import GuardConfig, GuardVerdict, PolicyGuard
from policies.window import ProtectionPoint, Window

__all__ = [
    "TRACE_VERSION",
    "TraceError",
    "TraceRecord",
    "load_trace",
    "make_record",
    "read_trace",
    "replay",
    "replay_guarded",
]

TRACE_VERSION = 1


class TraceError(PolicyError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "bad-trace"


@dataclass(frozen=True, eq=False)
class TraceRecord:
    """One decision as the daemon made it."""

    seq: int
    policy: str
    window: Window
    outcome: Decision | Failure
    elapsed_s: float
    verdict: GuardVerdict
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def applied(self) -> ProtectionPoint:
        """The point the pair runs, or was asked to run, after this decision."""
        return self.verdict.point

    def to_json(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "v": TRACE_VERSION,
            "seq": self.seq,
            "t": self.window.now,
            "policy": self.policy,
            "params": dict(self.params),
            "window": self.window.to_json(),
            "decision": outcome.to_json() if isinstance(outcome, Decision) else None,
            "error": outcome.error if isinstance(outcome, Failure) else None,
            "elapsed_s": self.elapsed_s,
            "verdict": self.verdict.to_json(),
            "applied": self.applied.to_json(),
        }

    def to_line(self) -> str:
        """One line of strict JSON, no trailing newline."""
        return json.dumps(self.to_json(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TraceRecord:
        if data.get("v") != TRACE_VERSION:
            raise ValueError(f"trace version {data.get('v')!r}, this reader knows {TRACE_VERSION}")
        decision, error = data.get("decision"), data.get("error")
        if (decision is None) == (error is None):
            raise ValueError("a record holds either a decision or an error")
        outcome: Decision | Failure = Decision.from_json(decision) if decision is not None else Failure(error)
        elapsed = data["elapsed_s"]
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)):
            raise ValueError(f"elapsed_s {elapsed!r} is not a number")
        return cls(
            int(data["seq"]),
            str(data["policy"]),
            Window.from_json(data["window"]),
            outcome,
            float(elapsed),
            GuardVerdict.from_json(data["verdict"]),
            dict(data.get("params", {})),
        )

    @classmethod
    def from_line(cls, line: str) -> TraceRecord:
        return cls.from_json(json.loads(line))


def make_record(
    seq: int, policy: PolicyLike, window: Window, outcome: object, elapsed_s: float, verdict: GuardVerdict
) -> TraceRecord:
    """The record of one daemon decision (``outcome`` as ``decide`` returned or raised it)."""
    return TraceRecord(
        seq,
        policy.name,
        window,
        describe_outcome(outcome),
        float(elapsed_s),
        verdict,
        params_to_json(policy.params),
    )


def read_trace(lines: Iterable[str]) -> Iterator[TraceRecord]:
    """The records of trace ``lines`` (blank lines skipped); TraceError names a bad line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield TraceRecord.from_line(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(f"trace line {number}: {exc}") from exc


def load_trace(path: str | Path) -> list[TraceRecord]:
    """A trace file's records; a ``.gz`` file is read through gzip (shipped traces are kept compressed)."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            return list(read_trace(stream))
    with open(path, encoding="utf-8") as stream:
        return list(read_trace(stream))


def _records(trace: Iterable[str] | Iterable[TraceRecord]) -> Iterator[TraceRecord]:
    for item in trace:
        if isinstance(item, TraceRecord):
            yield item
        else:
            yield from read_trace([item])


def _decide(policy: PolicyLike, window: Window) -> Decision | Failure:
    try:
        outcome: object = policy.decide(window)
    except Exception as exc:  # a replay records a failing policy the way the daemon does
        outcome = exc
    return describe_outcome(outcome)


def replay(trace: Iterable[str] | Iterable[TraceRecord], policy: PolicyLike) -> list[Decision | Failure]:
    """What ``policy``, reset, decides on each recorded window in order (trace lines or records).

    A window on which it raises or returns nonsense gives a :class:`Failure` with the text the
    daemon would have recorded, so a replay compares equal to the trace's outcomes.
    """
    policy.reset()
    return [_decide(policy, record.window) for record in _records(trace)]


def replay_guarded(
    trace: Iterable[str] | Iterable[TraceRecord], policy: PolicyLike, guard: GuardConfig | None = None
) -> list[tuple[Decision | Failure, GuardVerdict]]:
    """:func:`replay` plus a fresh guard's verdict on each outcome, with the recorded ``elapsed_s``."""
    policy.reset()
    judge = PolicyGuard(guard)
    results = []
    for record in _records(trace):
        outcome = _decide(policy, record.window)
        results.append((outcome, judge.filter(record.window, outcome, record.elapsed_s)))
    return results
