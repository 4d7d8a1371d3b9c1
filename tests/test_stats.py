"""``hybridft_common.stats``: nearest-rank percentiles, summaries and ratios, as the benchmarks print them."""

from __future__ import annotations

import math

import hypothesis.strategies as st
from hypothesis import given

from hybridft_common.stats import percentile, ratio, summarize

samples = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=200)
quantiles = st.floats(min_value=0.0, max_value=1.0)


def test_percentile_is_the_nearest_rank_of_the_sorted_samples() -> None:
    values = [7.0, 1.0, 10.0, 3.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0]  # 1..10, shuffled
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 0.5) == 6.0  # ordered[int(10 * 0.5)]: the upper middle, no interpolation
    assert percentile(values, 0.99) == 10.0
    assert percentile(values, 1.0) == 10.0  # clamped to the last sample
    assert percentile([4.5], 0.99) == 4.5
    assert percentile(iter([3.0, 1.0, 2.0]), 0.5) == 2.0  # any iterable


def test_percentile_of_no_samples_is_none() -> None:
    assert percentile([], 0.5) is None


@given(samples, quantiles)
def test_percentile_is_an_observed_sample_with_q_of_the_samples_at_or_below_it(
    values: list[float], q: float
) -> None:
    p = percentile(values, q)
    assert p in values
    assert sum(v <= p for v in values) > q * len(values) or q == 1.0
    assert sum(v < p for v in values) <= q * len(values)


def test_summarize_scales_then_rounds() -> None:
    seconds = [0.0031234, 0.0010001, 0.0020049]
    assert summarize(seconds, scale=1000) == {
        "samples": 3,
        "p50": 2.0,
        "p99": 3.12,
        "mean": round(math.fsum(s * 1000 for s in seconds) / 3, 2),
        "min": 1.0,
        "max": 3.12,
    }
    assert summarize(seconds, scale=1000, digits=1)["p99"] == 3.1


def test_summarize_unrounded_keeps_the_measured_values() -> None:
    seconds = [0.0031234, 0.0010001, 0.0020049]
    summary = summarize(seconds, scale=1e6, digits=None)
    assert summary["p50"] == 0.0020049 * 1e6
    assert summary["max"] == 0.0031234 * 1e6
    assert summary["min"] == 0.0010001 * 1e6
    assert isinstance(summary["p50"], float)


@given(samples, st.sampled_from([2, None]))
def test_summarize_agrees_with_percentile(values: list[float], digits: int | None) -> None:
    summary = summarize(values, digits=digits)
    for key, q in (("p50", 0.5), ("p99", 0.99)):
        p = percentile(values, q)
        assert summary[key] == (p if digits is None else round(p, digits))
    assert summary["samples"] == len(values)


def test_summarize_of_no_samples_has_none_for_every_figure() -> None:
    assert summarize([]) == {"samples": 0, "p50": None, "p99": None, "mean": None, "min": None, "max": None}


def test_ratio_rounds_and_refuses_missing_or_zero() -> None:
    assert ratio(2.0, 3.0) == 0.667
    assert ratio(2.0, 3.0, digits=1) == 0.7
    assert ratio(2.0, 3.0, digits=None) == 2.0 / 3.0
    assert ratio(None, 3.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0) is None
    assert ratio(0.0, 2.0) == 0.0
