"""The Window contract and the SignalRing the daemon samples into."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridft_common.vocabulary import Mode
from policies.window import SIGNALS, ProtectionPoint, SignalRing, Window, is_signal_name
from tests.helpers.policy_windows import point, steady


def test_window_is_immutable_and_owns_its_arrays() -> None:
    source = np.array([1.0, 2.0, 3.0])
    w = Window([0.0, 1.0, 2.0], point(), {"cpu.primary": source})
    source[0] = 99.0  # the caller's array is not the window's
    assert w.series("cpu.primary")[0] == 1.0
    with pytest.raises(ValueError):
        w.series("cpu.primary")[0] = 5.0
    with pytest.raises(ValueError):
        w.t[0] = 5.0
    with pytest.raises(TypeError):
        w.signals["cpu.host"] = np.zeros(3)  # type: ignore[index]
    with pytest.raises(AttributeError):
        w.point = point(Mode.MC)  # type: ignore[misc]


@pytest.mark.parametrize(
    "t, signals, message",
    [
        ([], {}, "at least one sample"),
        ([0.0, 0.0], {}, "strictly increasing"),
        ([1.0, 0.5], {}, "strictly increasing"),
        ([0.0, math.nan], {}, "finite"),
        ([0.0, 1.0], {"cpu.primary": [1.0]}, "shape"),
        ([0.0, 1.0], {"cpu.primary": [1.0, math.inf]}, "infinite"),
        ([0.0, 1.0], {"cpu.primry": [1.0, 1.0]}, "unknown signal"),
    ],
)
def test_window_rejects_malformed_input(t: list[float], signals: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Window(t, point(), signals)


def test_signal_names() -> None:
    assert all(is_signal_name(name) for name in SIGNALS)
    assert is_signal_name("div.per_s.payload")
    assert is_signal_name("ckpt.per_s.compare:payload")
    assert is_signal_name("ckpt.per_s.disk-pressure")
    assert is_signal_name("x.app.queue_len")
    assert not is_signal_name("div.per_s.")
    assert not is_signal_name("cpu.primary.extra")
    assert not is_signal_name("app.queue_len")


def test_absent_is_not_zero() -> None:
    w = Window(
        [0.0, 1.0, 2.0],
        point(),
        {"cpu.primary": [math.nan, math.nan, math.nan], "cpu.host": [0.5, math.nan, 0.0]},
    )
    assert not w.has("cpu.primary")  # carried but never measured
    assert w.latest("cpu.primary") is None and w.mean("cpu.primary") is None
    assert not w.has("div.per_s") and w.latest("div.per_s") is None and w.ewma("div.per_s", 1.0) is None
    assert w.has("cpu.host")
    assert w.latest("cpu.host") == 0.0  # a measured 0 is a value
    assert w.mean("cpu.host") == 0.25  # the NaN sample is skipped, not counted as 0


def test_latest_mean_with_age_and_span() -> None:
    w = Window([0.0, 1.0, 2.0, 3.0], point(), {"cpu.primary": [1.0, 2.0, 3.0, math.nan]})
    assert w.now == 3.0 and w.span_s == 3.0 and len(w) == 4
    assert w.latest("cpu.primary") == 3.0
    assert w.latest("cpu.primary", max_age_s=1.0) == 3.0
    assert w.latest("cpu.primary", max_age_s=0.5) is None  # the newest measured sample is 1 s old
    assert w.mean("cpu.primary", last_s=2.0) == 2.5  # samples at t >= 1.0
    assert w.mean("cpu.primary") == 2.0


def test_ewma_half_life() -> None:
    w = Window([0.0, 2.0], point(), {"cpu.primary": [0.0, 1.0]})
    # one half-life later the new sample takes half the weight
    assert w.ewma("cpu.primary", half_life_s=2.0) == pytest.approx(0.5)
    assert w.ewma("cpu.primary", half_life_s=1.0) == pytest.approx(0.75)
    irregular = Window([0.0, 1.0, 3.0], point(), {"cpu.primary": [0.0, math.nan, 1.0]})
    assert irregular.ewma("cpu.primary", half_life_s=3.0) == pytest.approx(0.5)  # dt from the measured one
    with pytest.raises(ValueError):
        w.ewma("cpu.primary", 0.0)


def test_integral_counts_events_of_a_rate() -> None:
    w = Window([0.0, 0.5, 1.0, 2.0], point(), {"ckpt.per_s": [99.0, 10.0, math.nan, 4.0]})
    # the first sample has no interval in the window; the NaN interval counts nothing
    assert w.integral("ckpt.per_s") == pytest.approx(10 * 0.5 + 4 * 1.0)
    assert w.integral("ckpt.per_s", after=0.5) == pytest.approx(4.0)
    assert w.integral("div.per_s") == 0.0


def test_samples_after() -> None:
    w = Window([0.0, 1.0, 2.0], point(), {"cpu.host": [0.1, math.nan, 0.3]})
    assert list(w.samples("cpu.host")) == [(0.0, 0.1), (2.0, 0.3)]
    assert list(w.samples("cpu.host", after=0.0)) == [(2.0, 0.3)]
    assert list(w.samples("cpu.secondary")) == []


def test_operating_point_validation() -> None:
    with pytest.raises(ValueError):
        ProtectionPoint("mc", 50)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ProtectionPoint(Mode.MC, 0)
    with pytest.raises(ValueError):
        ProtectionPoint(Mode.MC, 50, 1)  # type: ignore[arg-type]
    assert ProtectionPoint.from_json(point(Mode.MC, 20, True).to_json()) == point(Mode.MC, 20, True)


def test_json_round_trip_keeps_nan_negative_zero_and_every_bit() -> None:
    values = [0.1, -0.0, math.nan, 1e-310, 1.7976931348623157e308, 123456789.123456789]
    w = Window(
        [0.0, 0.1, 0.2, 0.30000000000000004, 1e9, 1e9 + 0.5],
        point(Mode.MC, 37, True),
        {"mem.dirty_bytes_per_s": values, "x.test": [1.0] * 6},
    )
    text = json.dumps(w.to_json(), allow_nan=False)  # strict JSON: NaN travels as null
    back = Window.from_json(text)
    assert back == w
    assert math.copysign(1.0, back.series("mem.dirty_bytes_per_s")[1]) == -1.0
    assert back.series("mem.dirty_bytes_per_s").tolist()[3] == 1e-310
    assert back != Window(
        w.t,
        w.point,
        {
            "mem.dirty_bytes_per_s": [
                0.1,
                0.0,
                math.nan,
                1e-310,
                1.7976931348623157e308,
                123456789.123456789,
            ],
            "x.test": [1.0] * 6,
        },
    )  # +0.0 is not -0.0


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    st.lists(st.floats(min_value=-1e12, max_value=1e12), min_size=1, max_size=20, unique=True),
    st.dictionaries(
        st.sampled_from(sorted(SIGNALS)),
        st.lists(st.one_of(finite, st.just(math.nan)), min_size=20, max_size=20),
        max_size=6,
    ),
    st.sampled_from(list(Mode)),
    st.integers(1, 600_000),
    st.booleans(),
)
def test_json_round_trip_property(times, signals, mode, epoch, passive) -> None:
    t = sorted(times)
    n = len(t)
    w = Window(t, ProtectionPoint(mode, epoch, passive), {k: v[:n] for k, v in signals.items()})
    line = json.dumps(w.to_json(), allow_nan=False)
    back = Window.from_json(json.loads(line))
    assert back == w
    assert json.dumps(back.to_json(), allow_nan=False) == line


def test_from_json_rejects_garbage() -> None:
    for bad in (
        "[]",
        '{"t": [0.0]}',
        '{"t": ["x"], "point": {"mode": "mc", "epoch_ms": 5}}',
        '{"t": [0.0], "point": {"mode": "remus", "epoch_ms": 5}}',
    ):
        with pytest.raises(ValueError):
            Window.from_json(bad)


# -- the ring ------------------------------------------------------------------------------------------


def test_ring_wraps_and_keeps_order() -> None:
    ring = SignalRing(capacity=4)
    for k in range(10):
        ring.append(float(k), {"cpu.primary": float(k)})
    w = ring.window(point())
    assert w.t.tolist() == [6.0, 7.0, 8.0, 9.0]
    assert w.series("cpu.primary").tolist() == [6.0, 7.0, 8.0, 9.0]
    assert len(ring) == 4


def test_ring_signal_appearing_late_reads_nan_before() -> None:
    ring = SignalRing(capacity=8)
    ring.append(0.0, {"cpu.primary": 1.0})
    ring.append(1.0, {"cpu.primary": 1.0, "div.per_s": 3.0})
    ring.append(2.0, {"cpu.primary": 1.0})  # not measured this time
    w = ring.window(point())
    div = w.series("div.per_s")
    assert math.isnan(div[0]) and div[1] == 3.0 and math.isnan(div[2])


def test_ring_overwritten_slot_does_not_leak_an_old_value() -> None:
    ring = SignalRing(capacity=2)
    ring.append(0.0, {"div.per_s": 5.0})
    ring.append(1.0, {"cpu.primary": 1.0})
    ring.append(2.0, {"cpu.primary": 1.0})  # reuses slot 0, which held div.per_s=5
    w = ring.window(point())
    assert not w.has("div.per_s")
    assert "div.per_s" not in w.names()  # all-NaN series are left out: absent


def test_ring_span_and_max_samples() -> None:
    ring = SignalRing(capacity=100)
    for k in range(20):
        ring.append(k * 0.5, {"cpu.host": 0.5})
    assert ring.window(point(), span_s=2.0).t.tolist() == [7.5, 8.0, 8.5, 9.0, 9.5]
    assert ring.window(point(), max_samples=3).t.tolist() == [8.5, 9.0, 9.5]
    assert len(ring.window(point(), span_s=0.0)) == 1


def test_ring_refuses_bad_samples_and_counts_infinities() -> None:
    ring = SignalRing(capacity=4, max_signals=2)
    with pytest.raises(ValueError):
        ring.window(point())  # empty
    ring.append(1.0, {"cpu.primary": math.inf, "cpu.host": None})
    assert ring.nonfinite == 1
    assert not ring.window(point()).has("cpu.primary")
    with pytest.raises(ValueError, match="not after"):
        ring.append(1.0, {})
    with pytest.raises(ValueError, match="unknown signal"):
        ring.append(2.0, {"cpu.bogus": 1.0})
    with pytest.raises(ValueError, match="more than 2 signals"):
        ring.append(2.0, {"div.per_s": 1.0})
    with pytest.raises(ValueError, match="number"):
        ring.append(2.0, {"cpu.host": "high"})  # type: ignore[dict-item]
    ring.append(2.0, {"cpu.host": np.float32(0.25)})
    assert ring.window(point()).latest("cpu.host") == 0.25


def test_ring_memory_is_bounded() -> None:
    ring = SignalRing(capacity=16)
    for k in range(10_000):
        ring.append(float(k), {"cpu.primary": 1.0, "div.per_s": float(k % 3)})
    assert all(a.size == 16 for a in ring._series.values())
    assert ring._t.size == 16
    assert ring.window(point()).t[0] == 10_000 - 16


def test_steady_builder() -> None:
    w = steady({"cpu.host": 0.5}, Mode.MC, epoch_ms=20, passive=True)
    assert w.mode is Mode.MC and w.epoch_ms == 20 and w.passive_secondary and w.latest("cpu.host") == 0.5
