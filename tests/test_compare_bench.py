"""``hybridft bench compare --quick --json``: the shape of the report and zero false miscompares.

This runs the real benchmark briefly (real processes and sockets); it checks structure and
correctness (no false miscompare, every injected divergence detected, every frame delivered),
never speed: speed goals live in the benchmark's own report.
"""

from __future__ import annotations

import json
import subprocess

from hybridft_common.cli import hybridft_command


def test_bench_compare_quick_json() -> None:
    cli = [*hybridft_command()]
    out = subprocess.run(
        [*cli, "bench", "compare", "--quick", "--json"],
        capture_output=True,
        timeout=300,
        check=True,
    )
    res = json.loads(out.stdout)
    assert res["quick"] is True
    assert set(res["scenarios"]) == {"bulk", "rpc", "noise", "divergence", "mc", "latency"}
    for name in ("bulk", "rpc", "noise", "mc", "latency"):
        sc = res["scenarios"][name]
        for who in ("comparator", "relay"):
            r = sc[who]
            assert r["frames"] == r["expected_frames"] > 0, (name, who, r)  # nothing lost or stuck
            assert r["frames_per_s"] > 0
            assert r["framing_errors"] == 0
            # the service did work for the frames, at most all of one core over the interval its CPU
            # was read across (its one thread), give or take the CPU clock's two 10 ms ticks
            assert r["service_cpu_us_per_frame"] >= 0
            window = r["service_cpu_window_s"]
            assert 0 <= r["service_cpu_share"] * window <= window + 0.02 + 1e-3
            assert 0 < r["harness_cpu_share"] * window <= 2 * (window + 0.02) + 1e-3  # two processes
        if name != "latency":
            assert sc["comparator"]["mbit_per_s"] > 0
            assert sc["comparator"]["ratio_to_relay"] > 0
    lat = res["scenarios"]["latency"]["comparator"]
    assert 0 < lat["latency_p50_us"] <= lat["latency_p99_us"]
    for who in ("comparator", "relay"):
        r = res["scenarios"]["latency"][who]
        assert r["machine_stalls"] >= 0 and 0 <= r["latency_samples_in_stalls"] <= r["latency_samples"]
        if r["latency_samples_in_stalls"] < r["latency_samples"]:
            assert r["latency_p99_outside_stalls_us"] > 0
    assert lat["p50_over_relay_us"] == round(
        lat["latency_p50_us"] - res["scenarios"]["latency"]["relay"]["latency_p50_us"], 1
    )
    assert res["scenarios"]["mc"]["comparator"]["checkpoints"] >= 1
    assert res["false_miscompares"] == 0
    assert res["frames_compared"] > 10_000
    det = res["detections"]
    assert det["detected"] == det["injected"] > 0
    assert det["delivered"] == det["expected"]
    assert res["core"]["mc_core"]["frames_per_s"] > 0
    assert res["core"]["colo_core"]["released"] == res["core"]["colo_core"]["frames"]


def test_samples_in_flight_during_a_stall_are_the_ones_left_out() -> None:
    from bench.compare import split_by_stalls

    samples = [(0, 10), (10, 25), (20, 30), (31, 40), (45, 60), (100, 101)]
    stalls = [(25, 31), (59, 70)]
    outside, hit = split_by_stalls(samples, stalls)
    # (20, 30) overlaps the first stall, (45, 60) the second; (10, 25) and (31, 40) only touch it
    assert hit == 2
    assert outside == [10, 15, 9, 1]
    assert split_by_stalls(samples, []) == ([10, 15, 10, 9, 15, 1], 0)


def test_the_mc_workload_is_a_stream_the_shadow_compares_whole() -> None:
    """``mc-bulk`` models the secondary of MC mode: after its SYN/ACK its segments are in the
    primary's sequence space, as after any checkpoint.  The shadowed MC core then compares every
    byte sealed; ``bulk``'s secondary, which keeps its own ISN across checkpoints, leaves the shadow
    blind after the first epoch (what the MC figures measured until the workload was fixed)."""
    from bench.compare import build_workload
    from colo_compare.core import Comparator
    from colo_compare.transport import FrameDecoder
    from hybridft_common.vocabulary import Mode

    coverage = {}
    for kind in ("bulk", "mc-bulk"):
        p_chunks, s_chunks, _ = build_workload(kind, 20_000, 4)
        primary = [FrameDecoder().feed(c) for c in p_chunks]
        secondary = [FrameDecoder().feed(c) for c in s_chunks]
        core = Comparator(Mode.MC)
        for i, (p, s) in enumerate(zip(primary, secondary, strict=True)):
            core.feed_primary(p, 0.0)
            core.feed_secondary(s, 0.0)
            if i % 8 == 7:
                core.commit(core.seal())
        core.commit(core.seal())
        signals = core.signals()
        assert signals.shadow_divergences.total == 0, (kind, signals.shadow_divergences)
        coverage[kind] = signals.shadow_compared_bytes / signals.shadow_sealed_bytes
    assert coverage["mc-bulk"] == 1.0
    assert coverage["bulk"] < 0.5
