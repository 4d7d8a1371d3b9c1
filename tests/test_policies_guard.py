"""PolicyGuard: sanity, time limit, hysteresis, dwell, budget, failure counting."""

from __future__ import annotations

import pytest

from hybridft_common.vocabulary import Mode
from policies.base import Decision
from policies.guard import GuardConfig, GuardVerdict, PolicyGuard, VerdictKind, same_point
from policies.window import ProtectionPoint, Window
from tests.helpers.policy_windows import point

COLO = point(Mode.COLO, 50)
MC40 = point(Mode.MC, 40)


def at(t: float, p: ProtectionPoint = COLO) -> Window:
    return Window([t - 0.5, t], p, {})


def mc(epoch: int = 40, passive: bool = False) -> Decision:
    return Decision(Mode.MC, epoch, "test", "div.per_s", passive)


def colo(epoch: int = 50) -> Decision:
    return Decision(Mode.COLO, epoch, "test", "div.per_s")


def quick(**kw: object) -> PolicyGuard:
    settings = dict(min_dwell_s=0.0, confirm_windows=1, confirm_s=0.0, switches_per_minute=100)
    settings.update(kw)
    return PolicyGuard(GuardConfig(**settings))  # type: ignore[arg-type]


class Odd:
    mode = Mode.MC
    epoch_ms = 40


def tampered(**fields: object) -> Decision:
    d = mc()
    for name, value in fields.items():
        object.__setattr__(d, name, value)
    return d


@pytest.mark.parametrize(
    "outcome, why",
    [
        (RuntimeError("model exploded"), "raised RuntimeError: model exploded"),
        ("mc", "nonsense: not a Decision: str"),
        (None, "nonsense: not a Decision: NoneType"),
        (Odd(), "nonsense: not a Decision: Odd"),
        (tampered(mode="remus"), "nonsense: mode 'remus' is not one of"),
        (tampered(epoch_ms=0), "nonsense: epoch_ms 0 outside 1..600000"),
        (tampered(epoch_ms="40"), "nonsense: epoch_ms '40' is not an integer"),
        (tampered(passive_secondary=None), "nonsense: passive_secondary None is not a bool"),
    ],
)
def test_failures_are_rejected_and_keep_the_current_point(outcome: object, why: str) -> None:
    guard = quick()
    verdict = guard.filter(at(10.0), outcome, 0.01)
    assert verdict.kind is VerdictKind.REJECT
    assert verdict.why.startswith(why) and verdict.error == verdict.why
    assert verdict.point == COLO
    assert guard.failures == 1 and verdict.consecutive_failures == 1


def test_time_limit() -> None:
    guard = quick(time_limit_s=0.5)
    verdict = guard.filter(at(10.0), mc(), 0.75)
    assert verdict.kind is VerdictKind.REJECT and verdict.why == "took 0.750 s > time limit 0.5 s"
    assert verdict.decision == mc() and verdict.point == COLO
    assert guard.filter(at(11.0), mc(), 0.5).kind is VerdictKind.APPLY  # at the limit is in time
    assert quick().filter(at(10.0), mc(), float("nan")).kind is VerdictKind.REJECT


def test_epoch_outside_the_guard_range() -> None:
    guard = quick(epoch_ms_min=20, epoch_ms_max=1000)
    verdict = guard.filter(at(10.0), mc(10), 0.0)
    assert verdict.kind is VerdictKind.REJECT and "outside the guard's 20..1000" in verdict.why
    # a COLO decision's epoch is not applied (the running MC epoch is kept), so it is not checked
    running = at(11.0, point(Mode.MC, 100))
    verdict = guard.filter(running, colo(5), 0.0)
    assert verdict.kind is VerdictKind.APPLY and verdict.point == point(Mode.COLO, 100)


def test_consecutive_failures_flag_a_failing_policy_and_reset_on_success() -> None:
    guard = quick(max_consecutive_failures=3)
    verdicts = [guard.filter(at(10.0 + k), ValueError("x"), 0.0) for k in range(3)]
    assert [v.policy_failing for v in verdicts] == [False, False, True]
    ok = guard.filter(at(20.0), colo(), 0.0)
    assert ok.kind is VerdictKind.KEEP and ok.consecutive_failures == 0 and not ok.policy_failing
    assert guard.failures == 3


def test_keep_when_the_point_runs_already_within_epoch_tolerance() -> None:
    guard = quick(epoch_tolerance=0.1)
    running = at(10.0, MC40)
    assert guard.filter(running, mc(40), 0.0).kind is VerdictKind.KEEP
    assert guard.filter(running, mc(43), 0.0).kind is VerdictKind.KEEP  # within 10 %
    assert guard.filter(at(11.0, MC40), mc(46), 0.0).kind is VerdictKind.APPLY
    # MC 46 is requested, not yet shown: asking for 40 again is a switch back (cancelling it)
    back = guard.filter(at(12.0, MC40), mc(40), 0.0)
    assert back.kind is VerdictKind.APPLY and back.point == MC40
    # the window shows COLO, which nobody here asked for (an operator): it is what runs now
    external = guard.filter(at(13.0, COLO), colo(999), 0.0)
    assert external.kind is VerdictKind.KEEP and external.why == "already running" and external.point == COLO


def test_hysteresis_by_windows() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=0.0, confirm_windows=3, confirm_s=100.0))
    kinds = [guard.filter(at(10.0 + k), mc(), 0.0).kind for k in range(3)]
    assert kinds == [VerdictKind.HOLD, VerdictKind.HOLD, VerdictKind.APPLY]


def test_hysteresis_by_seconds() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=0.0, confirm_windows=100, confirm_s=5.0))
    first = guard.filter(at(10.0), mc(), 0.0)
    assert first.kind is VerdictKind.HOLD and first.why.startswith(
        "hysteresis: mc 40 ms asked 1 of 100 windows"
    )
    assert guard.filter(at(14.9), mc(), 0.0).kind is VerdictKind.HOLD
    assert guard.filter(at(15.0), mc(), 0.0).kind is VerdictKind.APPLY


def test_hysteresis_restarts_when_the_request_changes_or_fails() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=0.0, confirm_windows=2, confirm_s=100.0))
    assert guard.filter(at(10.0), mc(40), 0.0).kind is VerdictKind.HOLD
    assert guard.filter(at(11.0), mc(40, passive=True), 0.0).kind is VerdictKind.HOLD  # another switch
    assert guard.filter(at(12.0), ValueError("x"), 0.0).kind is VerdictKind.REJECT
    assert guard.filter(at(13.0), mc(40, passive=True), 0.0).kind is VerdictKind.HOLD
    assert guard.filter(at(14.0), colo(), 0.0).kind is VerdictKind.KEEP  # asks for what runs: streak over
    assert guard.filter(at(15.0), mc(40, passive=True), 0.0).kind is VerdictKind.HOLD
    verdict = guard.filter(at(16.0), mc(42, passive=True), 0.0)  # same switch within tolerance
    assert verdict.kind is VerdictKind.APPLY and verdict.point == point(Mode.MC, 42, True)


def test_no_dwell_at_hand_over_then_dwell_from_each_switch() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=10.0, confirm_windows=1))
    # the point found at the hand-over (daemon start, `mode auto`) was not the policy's switch
    assert guard.filter(at(100.0), mc(), 0.0).kind is VerdictKind.APPLY
    # the daemon applies it; from now the MC point must dwell 10 s
    assert guard.filter(at(101.0, MC40), colo(), 0.0).why.startswith("dwell: mc 40 ms for 1.0 s")
    assert guard.filter(at(109.5, MC40), colo(), 0.0).kind is VerdictKind.HOLD
    assert guard.filter(at(110.0, MC40), colo(), 0.0).kind is VerdictKind.APPLY


def test_a_reset_is_a_new_hand_over() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=10.0, confirm_windows=1))
    assert guard.filter(at(100.0), mc(), 0.0).kind is VerdictKind.APPLY
    guard.reset()
    assert guard.filter(at(101.0, MC40), colo(), 0.0).kind is VerdictKind.APPLY


def test_an_operator_switch_restarts_dwell_and_drops_the_pending_switch() -> None:
    guard = PolicyGuard(GuardConfig(min_dwell_s=10.0, confirm_windows=2, confirm_s=100.0))
    assert guard.filter(at(100.0), mc(), 0.0).kind is VerdictKind.HOLD
    # an operator forced MC 80 ms; the policy's earlier request (1 window) does not carry over
    forced = point(Mode.MC, 80)
    v = guard.filter(at(130.0, forced), colo(), 0.0)
    assert v.kind is VerdictKind.HOLD and v.why.startswith("hysteresis")
    v = guard.filter(at(131.0, forced), colo(), 0.0)
    assert v.kind is VerdictKind.HOLD and v.why == "dwell: mc 80 ms for 1.0 s < 10 s"
    assert guard.filter(at(140.0, forced), colo(), 0.0).kind is VerdictKind.APPLY


def test_budget_per_minute() -> None:
    guard = quick(switches_per_minute=2)
    assert guard.filter(at(0.0, COLO), mc(), 0.0).kind is VerdictKind.APPLY
    assert guard.filter(at(1.0, MC40), colo(), 0.0).kind is VerdictKind.APPLY
    v = guard.filter(at(2.0, COLO), mc(), 0.0)
    assert v.kind is VerdictKind.HOLD and v.why == "budget: 2 switches in the last 60 s (at most 2)"
    assert guard.filter(at(59.9, COLO), mc(), 0.0).kind is VerdictKind.HOLD
    assert guard.filter(at(60.0, COLO), mc(), 0.0).kind is VerdictKind.APPLY  # the first left the window


def test_requested_switch_is_not_applied_twice() -> None:
    guard = quick(apply_timeout_s=30.0)
    assert guard.filter(at(0.0), mc(), 0.0).kind is VerdictKind.APPLY
    # the daemon has not reached a checkpoint boundary yet: the window still shows COLO
    v = guard.filter(at(1.0), mc(), 0.0)
    assert v.kind is VerdictKind.KEEP and v.why == "already requested" and v.point == MC40
    assert guard.filter(at(2.0, MC40), mc(), 0.0).why == "already running"
    assert len(guard._switches) == 1
    # a request the daemon never applied is forgotten after apply_timeout_s
    assert guard.filter(at(3.0, MC40), colo(), 0.0).kind is VerdictKind.APPLY
    assert guard.filter(at(20.0, MC40), colo(), 0.0).kind is VerdictKind.KEEP
    assert guard.filter(at(34.0, MC40), colo(), 0.0).kind is VerdictKind.APPLY


def test_guard_is_deterministic_and_resettable() -> None:
    script = [(at(10.0 + k, COLO if k < 5 else MC40), mc() if k % 3 else colo(), 0.01 * k) for k in range(12)]

    def run(guard: PolicyGuard) -> list[GuardVerdict]:
        return [guard.filter(w, d, e) for w, d, e in script]

    guard = PolicyGuard(GuardConfig(min_dwell_s=2.0, confirm_windows=2, time_limit_s=0.08))
    first = run(guard)
    guard.reset()
    assert run(guard) == first
    assert {v.kind for v in first} >= {VerdictKind.HOLD, VerdictKind.REJECT}


def test_verdict_json_round_trip() -> None:
    v = quick().filter(at(1.0), mc(), 0.0)
    assert GuardVerdict.from_json(v.to_json()) == v
    r = quick().filter(at(1.0), ValueError("x"), 0.0)
    assert GuardVerdict.from_json(r.to_json()) == r


def test_config_validation_and_same_point() -> None:
    for bad in (
        dict(min_dwell_s=-1.0),
        dict(confirm_windows=0),
        dict(switches_per_minute=1.5),
        dict(epoch_ms_min=0),
        dict(epoch_ms_min=100, epoch_ms_max=50),
        dict(time_limit_s=float("inf")),
    ):
        with pytest.raises(ValueError):
            GuardConfig(**bad)  # type: ignore[arg-type]
    assert GuardConfig.from_json(GuardConfig().to_json()) == GuardConfig()
    with pytest.raises(ValueError):
        GuardConfig.from_json({"dwell": 3})
    assert same_point(point(Mode.COLO, 10), point(Mode.COLO, 90, True))
    assert not same_point(point(Mode.MC, 40), point(Mode.MC, 40, True))
    assert same_point(point(Mode.MC, 100), point(Mode.MC, 109), 0.1)
    assert not same_point(point(Mode.MC, 100), point(Mode.MC, 112), 0.1)
