"""The built-in policies on synthetic windows: each makes the decision its model says it should."""

from __future__ import annotations

import itertools
import math

import numpy as np
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
    # the guard holds the switch for 20 windows (hysteresis): the COLO checkpoints meanwhile do not
    # count as passive ones
    run = simulate(
        Gilbert(),
        gilbert_pair(100.0),
        80,
        guard=GuardConfig(min_dwell_s=10.0, confirm_windows=21, confirm_s=100.0, switches_per_minute=100),
    )
    modes = [o.mode for o in run.outcomes]
    first_mc = modes.index(Mode.MC)
    applied = next(k for k, v in enumerate(run.verdicts) if v.point.mode is Mode.MC)
    assert applied > first_mc + 10  # held by hysteresis (21 consecutive asks)
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


# -- cost model: the shadow's coverage (div.shadow_coverage) ---------------------------------------------
# Measured on a real pair under TCG (8 MiB/s dirtied, MC at 10 ms, 39-52 checkpoints/s): the shadow
# compared 1.2 % of the token answers' bytes and 2.5 % of the RPC answers' (the secondary had answered
# almost nothing by each seal) and counted 4.9 divergences/s where every one of 408 answers/s diverges.
TOKENS_AT_10_MS = {**ROOMY, "net.turns_per_s": 408.0, "div.per_s": 4.89, "div.shadow_coverage": 0.012,
                   "mem.dirty_bytes_per_s": 8.4e6, "ckpt.per_s": 51.6, "ckpt.pause_p50_ms": 14.0}  # fmt: skip
RPC_AT_10_MS = {**TOKENS_AT_10_MS, "net.turns_per_s": 156.0, "div.per_s": 0.0, "div.shadow_coverage": 0.025,
                "ckpt.per_s": 39.3}  # fmt: skip


def test_cost_model_scales_the_shadows_divergences_by_its_coverage() -> None:
    est = CostModel().estimate(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=10))
    assert est.inputs.div_per_s is not None and 400 < est.inputs.div_per_s <= 408  # 4.89 / 0.012, capped
    assert est.inputs.div_source == "shadow, coverage 0.012"
    d = CostModel().decide(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=10))
    assert d.mode is Mode.MC and d.signal == "div.per_s" and "coverage 0.012" in d.reason
    # taken at its word, the shadow's 4.9/s made COLO look cheap in a phase static COLO served at a
    # tenth of MC's rate
    raw = {k: v for k, v in TOKENS_AT_10_MS.items() if k != "div.shadow_coverage"}
    assert CostModel().decide(steady(raw, Mode.MC, epoch_ms=10)).mode is Mode.COLO
    # RPC answers: none of the compared bytes diverged, whatever the coverage
    rpc = CostModel().decide(steady(RPC_AT_10_MS, Mode.MC, epoch_ms=10))
    assert rpc.mode is Mode.COLO and "div.per_s" not in rpc.reason.split(" (cost")[0]


def test_cost_model_caps_the_scaled_rate_at_one_divergence_per_turn() -> None:
    few_turns = {**TOKENS_AT_10_MS, "net.turns_per_s": 50.0}
    assert CostModel().estimate(steady(few_turns, Mode.MC, epoch_ms=10)).inputs.div_per_s == 50.0
    # never below what the shadow itself counted (a stream diverges without turns)
    stream = {**TOKENS_AT_10_MS, "net.turns_per_s": 0.0}
    assert CostModel().estimate(steady(stream, Mode.MC, epoch_ms=10)).inputs.div_per_s == 4.89


def test_cost_model_a_blind_shadows_zero_is_no_measurement() -> None:
    policy = CostModel()
    assert policy.decide(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=10, t0=100.0)).mode is Mode.MC
    blind = {**RPC_AT_10_MS, "div.shadow_coverage": 0.0}
    inputs = policy.inputs(steady(blind, Mode.MC, epoch_ms=10, t0=110.0))
    assert inputs.div_source == "remembered, shadow blind" and inputs.div_per_s is not None
    assert inputs.div_per_s > 400
    d = policy.decide(steady(blind, Mode.MC, epoch_ms=10, t0=110.0))
    assert d.mode is Mode.MC and "shadow blind" in d.reason
    # nothing remembered: unknown, and COLO is estimated without divergences (optimistic, as in passive MC)
    fresh = CostModel().inputs(steady(blind, Mode.MC, epoch_ms=10))
    assert (fresh.div_per_s, fresh.div_source) == (None, "unknown, shadow blind")
    # a passive secondary shadow-compares nothing: its div.per_s of 0 is not a measurement either
    passive = {k: v for k, v in blind.items() if k != "div.shadow_coverage"}
    inputs = policy.inputs(steady(passive, Mode.MC, epoch_ms=10, passive=True, t0=111.0))
    assert inputs.div_source == "remembered" and inputs.div_per_s is not None and inputs.div_per_s > 400


def _window(mode: Mode, series: dict[str, list[float]], *, t0: float = 100.0, dt: float = 0.25,
            epoch_ms: int = 10) -> Window:  # fmt: skip
    n = len(next(iter(series.values())))
    return Window(t0 + np.arange(n) * dt, point(mode, epoch_ms), {k: np.array(v) for k, v in series.items()})


# The cost-model trace of tests/test_phased_auto.py at an RPC -> token change in COLO (4 RPC, 8 token
# clients, 250 ms samples): the hold p50 went from 0.08 to 37 ms on checkpoint waits while the span's
# mean divergence rate stayed under a tenth of its mean turns (the RPC turns of its first half).
AT_THE_CHANGE = {
    "op.colo": [1.0] * 6,
    "net.turns_per_s": [554.0, 555.0, 79.7, 72.1, 93.6, 166.4],
    "div.per_s": [0.0, 0.0, 3.99, 12.0, 12.3, 10.4],
    "net.hold_p50_ms": [0.05, 0.08, 0.17, 0.73, 18.5, 37.4],
}


def test_cost_model_remembers_a_colo_hold_only_from_a_calm_all_colo_span() -> None:
    from policies.cost_model import hold_spans

    w = _window(Mode.COLO, AT_THE_CHANGE)
    pure, calm = hold_spans(w, 0.1)
    assert pure.all() and calm.tolist() == [True, True, True, False, False, False]
    policy = CostModel()
    policy.decide(_window(Mode.COLO, {k: v[:2] for k, v in AT_THE_CHANGE.items()}, t0=99.5))
    policy.decide(w)
    # the mean over the span called this calm and remembered 37.4 ms: it priced the next RPC phase's
    # COLO turns at 37 ms and kept MC there
    rpc = {**RPC_AT_10_MS, "op.colo": 0.0}
    inputs = policy.inputs(steady(rpc, Mode.MC, epoch_ms=10, t0=102.0))
    assert (inputs.hold_source, inputs.hold_s) == ("remembered", pytest.approx(0.00008))
    # while the shadow sees the token answers diverge, COLO is priced at the hold it had then
    tokens = {**TOKENS_AT_10_MS, "op.colo": 0.0}
    inputs = policy.inputs(steady(tokens, Mode.MC, epoch_ms=10, t0=102.0))
    assert (inputs.hold_source, inputs.hold_s) == ("remembered while diverging", pytest.approx(0.0374))
    d = policy.decide(steady(tokens, Mode.MC, epoch_ms=10, t0=102.0))
    assert d.mode is Mode.MC


def test_cost_model_ignores_colo_holds_whose_span_reaches_back_into_mc() -> None:
    """Right after MC -> COLO the comparator's 1 s span still holds MC's releases (26.7 ms measured,
    against 0.05 ms once the span was COLO's): neither used as COLO's hold nor remembered."""
    after_switch = {
        "op.colo": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "net.turns_per_s": [150.0] * 8,
        "div.per_s": [0.0] * 8,
        "net.hold_p50_ms": [26.0, 25.0, 26.7, 21.7, 14.0, 9.0, 3.0, 0.05],
    }
    policy = CostModel()
    early = _window(Mode.COLO, {k: v[:6] for k, v in after_switch.items()})
    assert policy.inputs(early).hold_source == "prior"
    policy.decide(early)
    assert policy.inputs(steady(RPC_AT_10_MS, Mode.MC, epoch_ms=10, t0=102.0)).hold_source == "prior"
    late = _window(Mode.COLO, after_switch)  # the last sample's span [100.75, 101.75] is COLO's
    inputs = policy.inputs(late)
    assert (inputs.hold_source, inputs.hold_s) == ("net.hold_p50_ms", pytest.approx(0.00005))


def test_cost_model_changes_the_running_mc_point_only_for_the_switch_margin() -> None:
    """An epoch or passive change is a switch for the guard (dwell, budget): measured, cost-model
    moved between 10, 11, 12 and 14 ms and went passive for 0.009 s/s, and each change held a mode
    switch for the 5 s dwell."""
    far = CostModel().decide(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=500))
    assert far.mode is Mode.MC and far.epoch_ms < 500  # far dearer: worth a switch
    best = far.epoch_ms
    near = min(e for e in epoch_grid(10, 2000, 64) if e > best)
    est = CostModel().estimate(steady(TOKENS_AT_10_MS, Mode.COLO))
    assert est.mc.epoch_ms == best  # what a policy not running MC would pick
    kept = CostModel().decide(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=near))
    assert kept.mode is Mode.MC and kept.epoch_ms == near and not kept.passive_secondary


def test_cost_model_takes_a_shadows_zero_only_on_enough_compared_bytes() -> None:
    """Measured: in a token phase the shadow once compared 24 bytes/s (coverage 0.2 %) without a
    divergence; remembered, that 0 sent the policy toward COLO a second before the phase ended."""
    policy = CostModel()
    assert policy.decide(steady(TOKENS_AT_10_MS, Mode.MC, epoch_ms=10, t0=100.0)).mode is Mode.MC
    stray = {**TOKENS_AT_10_MS, "div.per_s": 0.0, "div.shadow_coverage": 0.002,
             "div.shadow_compared_bytes_per_s": 24.0}  # fmt: skip
    inputs = policy.inputs(steady(stray, Mode.MC, epoch_ms=10, t0=101.0))
    assert inputs.div_source == "remembered, shadow blind" and inputs.div_per_s is not None
    assert policy.decide(steady(stray, Mode.MC, epoch_ms=10, t0=101.0)).mode is Mode.MC
    # RPC answers at 10 ms: 1.7 KB/s compared, none diverged -- that is a measurement
    rpc = {**RPC_AT_10_MS, "div.shadow_compared_bytes_per_s": 1740.0}
    inputs = policy.inputs(steady(rpc, Mode.MC, epoch_ms=10, t0=102.0))
    assert (inputs.div_per_s, inputs.div_source) == (0.0, "shadow, coverage 0.025")
    # a divergence is evidence however few bytes it took
    few = {**TOKENS_AT_10_MS, "div.shadow_compared_bytes_per_s": 24.0}
    assert CostModel().inputs(steady(few, Mode.MC, epoch_ms=10)).div_source == "shadow, coverage 0.012"


def test_cost_model_pairs_an_epochs_divergences_with_its_bytes_across_a_sample_boundary() -> None:
    """Measured (token phase, MC 10 ms): the shadow counted an epoch's divergences (25.3/s) in one
    sample and the epoch's compared bytes (1348 bytes/s, at its seal) in the next; the divergences'
    sample had just left the 1 s average, and 'compared, none diverged' sent the policy to COLO."""
    n = 8
    series = {
        "op.colo": [0.0] * n,
        "net.turns_per_s": [333.0] * n,
        "div.per_s": [0.0, 0.0, 25.3, 0.0, 0.0, 0.0, 0.0, 0.0],
        "div.shadow_coverage": [0.0, 0.0, 0.0, 0.095, 0.0, 0.0, 0.0, 0.0],
        "div.shadow_compared_bytes_per_s": [0.0, 0.0, 0.0, 1348.0, 0.0, 0.0, 0.0, 0.0],
        "mem.dirty_bytes_per_s": [8.4e6] * n,
        "ckpt.per_s": [50.0] * n,
        "ckpt.pause_p50_ms": [14.0] * n,
        **{k: [v] * n for k, v in ROOMY.items()},
    }
    inputs = CostModel().inputs(_window(Mode.MC, series))
    assert inputs.div_per_s is not None and inputs.div_per_s > 200
    assert inputs.div_source.startswith("shadow, coverage")
