"""The built-in policies on synthetic windows: each makes the decision its model says it should."""

from __future__ import annotations

import itertools
import math

import pytest

from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, Mode
from policies.base import Decision
from policies.cost_model import COPY_BYTES_PER_S, CostModel, epoch_grid
from policies.gilbert import Gilbert
from policies.guard import GuardConfig
from policies.static import StaticColo, StaticMC
from policies.threshold import Threshold
from policies.window import ProtectionPoint, Window
from tests.helpers.policy_windows import point, simulate, steady

MIB = 1024 * 1024


# -- static ----------------------------------------------------------------------------------------------


def test_static_policies_ignore_the_signals() -> None:
    busy = steady({"div.per_s": 500.0, "net.turns_per_s": 1000.0}, Mode.COLO, epoch_ms=80)
    assert StaticMC().decide(busy) == Decision(Mode.MC, DEFAULT_EPOCH_MS, "static: mc 50 ms", None)
    d = StaticMC({"epoch_ms": 30, "passive_secondary": True}).decide(busy)
    assert (d.mode, d.epoch_ms, d.passive_secondary, d.signal) == (Mode.MC, 30, True, None)
    d = StaticColo().decide(busy)
    assert (d.mode, d.epoch_ms) == (Mode.COLO, 80)


# -- gilbert ---------------------------------------------------------------------------------------------


def gilbert_pair(colo_length_ms: float | None, pause_ms: float = 5.0, passive_rate: float = 4.0):
    """COLO checkpoints every ``colo_length_ms`` (+ pause); passive MC at 250 ms (4/s)."""

    def scenario(t: float, now: ProtectionPoint) -> dict[str, float | None]:
        if now.mode is Mode.MC:
            return {"ckpt.per_s": passive_rate}
        if colo_length_ms is None:
            return {"ckpt.per_s": 1000.0 / (1000.0 + pause_ms)}
        return {"ckpt.per_s": 1000.0 / (colo_length_ms + pause_ms), "ckpt.length_ms": colo_length_ms}

    return scenario


def test_gilbert_stays_colo_with_long_checkpoints() -> None:
    run = simulate(Gilbert(), gilbert_pair(1000.0), 40)
    assert all(v.point.mode is Mode.COLO for v in run.verdicts)
    assert "ckpt.length_ms mean=" in run.outcomes[-1].reason and ">= 400" in run.outcomes[-1].reason


def test_gilbert_passive_period_then_retry() -> None:
    # 100 ms COLO checkpoints at 1000/105 per second: 4.76 per 0.5 s sample
    run = simulate(Gilbert(), gilbert_pair(100.0), 70)
    modes = [o.mode for o in run.outcomes]
    first_mc = modes.index(Mode.MC)
    # the mean is trusted only after 5 COLO checkpoints: the 3rd window (2 intervals, 9.5 checkpoints)
    assert first_mc == 2
    assert "of 5 colo checkpoints" in run.outcomes[1].reason
    d = run.outcomes[first_mc]
    assert (d.epoch_ms, d.passive_secondary, d.signal) == (250, True, "ckpt.length_ms")
    assert "< 400 after" in d.reason
    # passive MC: 4 checkpoints/s = 2 per sample; the 100th is counted 50 windows after the switch
    retry = modes.index(Mode.COLO, first_mc)
    assert retry == first_mc + 50
    assert all(run.outcomes[k].passive_secondary for k in range(first_mc, retry))
    assert "100 passive checkpoints >= 100" in run.outcomes[retry].reason
    # COLO again: the mean was reset, so 5 fresh COLO checkpoints are needed before the next switch
    again = modes.index(Mode.MC, retry)
    assert again == retry + 2
    assert "of 5 colo checkpoints" in run.outcomes[retry + 1].reason


def test_gilbert_mean_starts_at_zero_as_in_orbit() -> None:
    # constant 450 ms lengths: after 5 checkpoints the mean is 450 * (1 - 0.7**n) < 400: passive
    run = simulate(Gilbert(), gilbert_pair(450.0), 20)
    assert Mode.MC in [o.mode for o in run.outcomes]
    # 600 ms: 600 * (1 - 0.7**5) = 499 > 400 and the mean only grows: COLO throughout
    run = simulate(Gilbert(), gilbert_pair(600.0), 40)
    assert {o.mode for o in run.outcomes} == {Mode.COLO}


def test_gilbert_mean_equals_per_checkpoint_updates() -> None:
    policy = Gilbert()
    lengths = [(3, 120.0), (1, 900.0), (2, 40.0)]  # (checkpoints in the interval, their length)
    t, counts, lens = [0.0], [math.nan], [math.nan]
    for n, length in lengths:
        t.append(t[-1] + 1.0)
        counts.append(float(n))
        lens.append(length)
    window = Window(t, point(Mode.COLO), {"ckpt.per_s": counts, "ckpt.length_ms": lens, "op.colo": [1.0] * 4})
    policy.decide(window)
    mean = 0.0
    for n, length in lengths:
        for _ in range(n):
            mean = 0.7 * mean + 0.3 * length  # Gilbert's loop, one checkpoint at a time
    assert policy.mean_ms == pytest.approx(mean, rel=1e-12)
    assert policy.colo_count == 6


def test_gilbert_counts_passive_checkpoints_only_once_mc_runs() -> None:
    # the guard holds the switch for 10 s: the COLO checkpoints meanwhile do not count as passive ones
    run = simulate(
        Gilbert(),
        gilbert_pair(100.0),
        80,
        guard=GuardConfig(min_dwell_s=10.0, confirm_windows=1, switches_per_minute=100),
    )
    modes = [o.mode for o in run.outcomes]
    first_mc = modes.index(Mode.MC)
    applied = next(k for k, v in enumerate(run.verdicts) if v.point.mode is Mode.MC)
    assert applied > first_mc + 10  # held by dwell (10 s = 20 windows from the start)
    assert all(w.mode is Mode.COLO for w in run.windows[: applied + 1])
    retry = modes.index(Mode.COLO, first_mc)
    assert retry == applied + 50  # 100 passive checkpoints counted from when MC ran


def test_gilbert_without_checkpoint_lengths_stays_colo() -> None:
    run = simulate(Gilbert(), gilbert_pair(None), 20)
    assert {o.mode for o in run.outcomes} == {Mode.COLO}
    assert "ckpt.length_ms absent" in run.outcomes[-1].reason


def test_gilbert_params() -> None:
    run = simulate(
        Gilbert({"passive_count": 10, "passive_time_ms": 100}), gilbert_pair(100.0, passive_rate=10.0), 20
    )
    modes = [o.mode for o in run.outcomes]
    first_mc = modes.index(Mode.MC)
    assert run.outcomes[first_mc].epoch_ms == 100
    assert modes.index(Mode.COLO, first_mc) == first_mc + 2  # 10 checkpoints at 5 per sample


# -- threshold -------------------------------------------------------------------------------------------


def test_threshold_hysteresis_bands() -> None:
    policy = Threshold()
    assert policy.decide(steady({"div.per_s": 1.0}, Mode.COLO)).mode is Mode.COLO  # in the band
    d = policy.decide(steady({"div.per_s": 3.0}, Mode.COLO))
    assert (d.mode, d.signal) == (Mode.MC, "div.per_s") and d.reason.startswith("div.per_s=3 > 2")
    assert policy.decide(steady({"div.per_s": 1.0}, Mode.MC)).mode is Mode.MC  # in the band: stay
    d = policy.decide(steady({"div.per_s": 0.2}, Mode.MC))
    assert (d.mode, d.signal) == (Mode.COLO, "div.per_s") and "< 0.5" in d.reason


def test_threshold_dirty_rate() -> None:
    policy = Threshold()
    d = policy.decide(steady({"div.per_s": 0.0, "mem.dirty_bytes_per_s": 100 * MIB}, Mode.COLO))
    assert (d.mode, d.signal) == (Mode.MC, "mem.dirty_bytes_per_s")
    d = policy.decide(steady({"div.per_s": 0.0, "mem.dirty_bytes_per_s": 40 * MIB}, Mode.MC))
    assert (d.mode, d.signal) == (Mode.MC, "mem.dirty_bytes_per_s")  # above the low band: stay MC
    d = policy.decide(steady({"div.per_s": 0.0, "mem.dirty_bytes_per_s": 10 * MIB}, Mode.MC))
    assert d.mode is Mode.COLO


def test_threshold_epoch_from_turns() -> None:
    policy = Threshold()
    many = policy.decide(steady({"div.per_s": 9.0, "net.turns_per_s": 80.0}, Mode.COLO))
    few = policy.decide(steady({"div.per_s": 9.0, "net.turns_per_s": 5.0}, Mode.COLO))
    assert (many.mode, many.epoch_ms) == (Mode.MC, 20) and "net.turns_per_s=80 > 50" in many.reason
    assert (few.mode, few.epoch_ms) == (Mode.MC, 100)
    band = steady({"div.per_s": 9.0, "net.turns_per_s": 30.0}, Mode.MC, epoch_ms=20)
    assert policy.decide(band).epoch_ms == 20  # inside the band the current epoch stays


def test_threshold_copes_with_absence() -> None:
    policy = Threshold()
    d = policy.decide(steady({"cpu.host": 0.5}, Mode.MC, epoch_ms=40, passive=True))
    assert (d.mode, d.epoch_ms) == (Mode.MC, 40) and "div.per_s absent" in d.reason and d.signal is None
    d = policy.decide(steady({"cpu.host": 0.5}, Mode.COLO))
    assert d.mode is Mode.COLO and "absent" in d.reason


def test_threshold_averages_over_its_window() -> None:
    # one spike in 10 samples: mean 2.7 over the last 3 s when the spike is recent, 0.3 when old
    values = [0.0] * 9 + [27.0]
    w = Window([k * 0.5 for k in range(10)], point(Mode.COLO), {"div.per_s": values})
    assert Threshold({"average_s": 3.0}).decide(w).mode is Mode.MC
    assert Threshold({"average_s": 60.0}).decide(w).mode is Mode.MC  # 2.7 > 2 still
    quiet = Window([k * 0.5 for k in range(10)], point(Mode.COLO), {"div.per_s": [27.0] + [0.0] * 9})
    assert Threshold({"average_s": 3.0}).decide(quiet).mode is Mode.COLO


# -- cost model ------------------------------------------------------------------------------------------

ROOMY = {"cpu.cores": 8.0, "cpu.primary": 0.9, "cpu.secondary": 0.9, "cpu.host": 0.3}
TWO_CORES_BUSY = {"cpu.cores": 2.0, "cpu.primary": 0.9, "cpu.secondary": 0.9, "cpu.host": 1.0}


def test_cost_model_deterministic_rpc_runs_colo() -> None:
    rpc = {**ROOMY, "net.turns_per_s": 200.0, "div.per_s": 0.0, "mem.dirty_bytes_per_s": 3e6}
    # in COLO: only the safety interval checkpoints, 1 ms hold
    d = CostModel().decide(
        steady({**rpc, "ckpt.per_s": 0.1, "ckpt.pause_p50_ms": 5.0, "net.hold_p50_ms": 1.0})
    )
    assert d.mode is Mode.COLO and d.signal == "net.turns_per_s"
    assert "cost colo" in d.reason and "<= mc" in d.reason
    # in MC the shadow comparison sees no divergence either: switch to COLO
    d = CostModel().decide(steady({**rpc, "ckpt.per_s": 20.0, "ckpt.pause_p50_ms": 5.0}, Mode.MC))
    assert d.mode is Mode.COLO and d.reason.startswith("net.turns_per_s=200 (cost colo")


def test_cost_model_does_not_remember_a_hold_measured_behind_divergences() -> None:
    """Measured in tests/test_phased_auto.py: COLO's hold while every answer diverged (892 ms) is the
    wait for the divergences' checkpoints, not the secondary's lag; remembered, it kept the policy in MC
    through the next deterministic phase."""
    policy = CostModel()
    divergent = {**ROOMY, "net.turns_per_s": 75.0, "div.per_s": 75.0, "mem.dirty_bytes_per_s": 8e6,
                 "ckpt.per_s": 40.0, "ckpt.pause_p50_ms": 20.0, "net.hold_p50_ms": 892.0}  # fmt: skip
    assert policy.decide(steady(divergent, Mode.COLO, t0=100.0)).mode is Mode.MC
    rpc = {**ROOMY, "net.turns_per_s": 150.0, "div.per_s": 0.0, "mem.dirty_bytes_per_s": 8e6,
           "ckpt.per_s": 40.0, "ckpt.pause_p50_ms": 8.0}  # fmt: skip
    decision = policy.decide(steady(rpc, Mode.MC, t0=110.0))
    assert decision.mode is Mode.COLO and policy.inputs(steady(rpc, Mode.MC, t0=111.0)).hold_source == "prior"
    # a calm COLO window's hold is remembered
    policy.decide(steady({**rpc, "ckpt.per_s": 0.1, "net.hold_p50_ms": 7.0}, Mode.COLO, t0=120.0))
    inputs = policy.inputs(steady(rpc, Mode.MC, t0=130.0))
    assert inputs.hold_source == "remembered" and inputs.hold_s == 0.007


def closed_form_epoch_ms(pause_fixed_s: float, turns: float, dirty: float) -> float:
    """The cost model docstring's E* for the regime P < E/2."""
    a = dirty / COPY_BYTES_PER_S
    return 1000 * math.sqrt((2 * pause_fixed_s + turns * pause_fixed_s**2) / (turns * (1 + a + a * a)))


def grid_neighbours(epoch_ms: float) -> tuple[int, int]:
    grid = epoch_grid(10, 2000, 64)
    below = max(g for g in grid if g <= epoch_ms)
    above = min(g for g in grid if g >= epoch_ms)
    return below, above


def test_cost_model_divergences_by_timeout_run_mc_at_the_model_epoch() -> None:
    # the secondary answers nothing comparable: each divergence waits the 3 s compare timeout
    w = steady(
        {
            **ROOMY,
            "net.turns_per_s": 20.0,
            "div.per_s": 5.0,
            "div.per_s.timeout": 5.0,
            "net.hold_p50_ms": 2.0,
            "ckpt.per_s": 5.0,
            "mem.dirty_bytes_per_s": 3e6,
        }
    )
    d = CostModel().decide(w)
    assert (d.mode, d.signal, d.passive_secondary) == (Mode.MC, "div.per_s", False)
    assert d.reason.startswith("div.per_s=5 (5/s by timeout) > ")
    expected = closed_form_epoch_ms(0.005, 20.0, 3e6)  # 23 ms, where P < E/2 holds
    assert d.epoch_ms in grid_neighbours(expected)
    assert d.epoch_ms != w.epoch_ms


def test_cost_model_divergent_responses_on_a_short_cpu_run_passive_mc() -> None:
    # every response diverges and the secondary competes for the 2 cores: passive MC
    w = steady(
        {
            **TWO_CORES_BUSY,
            "net.turns_per_s": 100.0,
            "div.per_s": 100.0,
            "net.hold_p50_ms": 10.0,
            "ckpt.per_s": 40.0,
            "ckpt.pause_p50_ms": 8.0,
            "mem.dirty_bytes_per_s": 3e7,
        }
    )
    policy = CostModel()
    d = policy.decide(w)
    assert d.mode is Mode.MC and d.passive_secondary
    est = policy.estimate(w)
    assert est.colo.cpu > 0.3 and est.mc.cpu == 0.0
    assert est.mc.epoch_ms == d.epoch_ms
    # the chosen epoch is the cheapest on the grid
    from policies.cost_model import mc_cost

    costs = {e: mc_cost(est.inputs, e, True).total for e in epoch_grid(10, 2000, 64)}
    assert costs[d.epoch_ms] == min(costs.values())
    # same load with the secondary's CPU to spare: no reason to stop it
    roomy = CostModel().decide(
        steady(
            {
                **ROOMY,
                "net.turns_per_s": 100.0,
                "div.per_s": 100.0,
                "net.hold_p50_ms": 10.0,
                "mem.dirty_bytes_per_s": 3e7,
            },
            Mode.MC,
        )
    )
    assert not roomy.passive_secondary


def test_cost_model_heavy_dirtying_shortens_epochs() -> None:
    epochs = []
    for dirty in (1e6, 3e8, 1e9, 3e9):
        w = steady(
            {
                **ROOMY,
                "net.turns_per_s": 20.0,
                "div.per_s": 5.0,
                "div.per_s.timeout": 5.0,
                "mem.dirty_bytes_per_s": dirty,
            },
            Mode.MC,
        )
        d = CostModel().decide(w)
        assert d.mode is Mode.MC
        epochs.append(d.epoch_ms)
    assert epochs == sorted(epochs, reverse=True) and epochs[0] > epochs[-1]


def test_cost_model_epoch_follows_turns_and_pause() -> None:
    def epoch(signals: dict[str, float]) -> int:
        base = {"div.per_s": 5.0, "div.per_s.timeout": 5.0, "mem.dirty_bytes_per_s": 1e6}
        return CostModel().decide(steady({**base, **signals}, Mode.MC)).epoch_ms

    assert (
        epoch({"net.turns_per_s": 200.0}) < epoch({"net.turns_per_s": 20.0}) < epoch({"net.turns_per_s": 2.0})
    )
    # no turns: nothing waits for the commit, the longest epoch is cheapest
    idle = CostModel().decide(steady({"div.per_s": 5.0, "div.per_s.timeout": 5.0}, Mode.MC))
    assert (
        idle.epoch_ms == 2000
        and "net.turns_per_s absent" in idle.reason
        and "dirty rate unknown" in idle.reason
    )
    # a dearer measured pause (recalibrated fixed part) makes epochs longer
    assert epoch({"net.turns_per_s": 20.0, "ckpt.pause_p50_ms": 20.0}) > epoch(
        {"net.turns_per_s": 20.0, "ckpt.pause_p50_ms": 5.0}
    )
    assert (
        CostModel({"max_epoch_ms": 500})
        .decide(steady({"div.per_s": 5.0, "div.per_s.timeout": 5.0}, Mode.MC))
        .epoch_ms
        == 500
    )


def test_cost_model_switch_margin() -> None:
    # dirtying makes the COLO pause dear: the two modes cost within 20 % of each other
    signals = {**ROOMY, "net.turns_per_s": 20.0, "div.per_s": 30.0, "mem.dirty_bytes_per_s": 3e8}
    est = CostModel().estimate(steady(signals, Mode.MC))
    cheaper, dearer = sorted((est.mc, est.colo), key=lambda c: c.total)
    assert dearer.total < cheaper.total * 1.2
    # running the dearer mode, the gain is inside the margin: stay, and say so
    d = CostModel().decide(steady(signals, dearer.mode))
    assert d.mode is dearer.mode and "within the switch margin" in d.reason
    assert CostModel().decide(steady(signals, cheaper.mode)).mode is cheaper.mode
    # without a margin the cheaper mode wins from either side
    no_margin = {"switch_margin": 0.0, "min_gain": 0.0}
    assert CostModel(no_margin).decide(steady(signals, dearer.mode)).mode is cheaper.mode


def test_cost_model_remembers_divergences_through_passive_mc() -> None:
    heavy = {
        **TWO_CORES_BUSY,
        "net.turns_per_s": 100.0,
        "div.per_s": 100.0,
        "net.hold_p50_ms": 10.0,
        "mem.dirty_bytes_per_s": 3e7,
    }
    passive_no_div = {k: v for k, v in heavy.items() if k not in ("div.per_s", "net.hold_p50_ms")}
    passive_no_div["cpu.secondary"] = 0.0
    passive_no_div["cpu.host"] = 0.5
    policy = CostModel({"memory_s": 60.0})
    assert policy.decide(steady(heavy, Mode.COLO, t0=0.0)).passive_secondary
    # 30 s later, passive: no divergence signal, the remembered 100/s keeps MC
    d = policy.decide(steady(passive_no_div, Mode.MC, passive=True, t0=30.0))
    assert d.mode is Mode.MC and "remembered" in d.reason
    # 100 s later the memory is stale: COLO is estimated without divergences and tried
    d = policy.decide(steady(passive_no_div, Mode.MC, passive=True, t0=100.0))
    assert d.mode is Mode.COLO
    # a fresh policy never saw the divergences
    assert CostModel().decide(steady(passive_no_div, Mode.MC, passive=True)).mode is Mode.COLO


def test_cost_model_without_any_signal_still_decides() -> None:
    for mode in Mode:
        d = CostModel().decide(Window([0.0], point(mode), {}))
        assert isinstance(d, Decision)
        assert "absent" in d.reason or "unknown" in d.reason


def test_epoch_grid() -> None:
    grid = epoch_grid(10, 2000, 64)
    assert grid[0] == 10 and grid[-1] == 2000 and list(grid) == sorted(set(grid))
    ratio = 200 ** (1 / 63)  # geometric, up to the rounding to whole milliseconds
    assert all(b <= a * ratio + 1 for a, b in itertools.pairwise(grid))
    assert epoch_grid(50, 50) == (50,)
