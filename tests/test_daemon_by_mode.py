"""Per-mode figures and the end of auto, without QEMU: the per-mode checkpoint window
(controller.accounting.CheckpointsByMode), the daemon's Prometheus families (signals as
``hybridft_signal{name}``, checkpoints and pauses by mode), the stamped point changes the watch view
shows, and a policy standing down when protection ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.accounting import CheckpointsByMode
from controller.autopilot import Autopilot, AutopilotConfig
from controller.daemon import Daemon
from controller.daemon_config import DaemonConfig
from controller.epoch import EpochRecord
from controller.metrics import DaemonMetrics
from controller.operating_point import PointRequest, PointSource
from controller.pair_state import PairState
from controller.signals import SamplerLinks, SignalSampler
from hybridft_common.control import ControlError
from hybridft_common.vocabulary import Mode


# ------------------------------------------------------------------------------ CheckpointsByMode
def test_rates_are_per_second_spent_in_each_mode() -> None:
    window = CheckpointsByMode(started=0.0, mode="mc", window_s=60.0)
    for i in range(1, 21):  # 20 s of MC, one timer checkpoint a second, 10 ms pauses
        window.checkpoint(float(i), "mc", {"timer": 1}, 0.010)
    window.mode_changed(20.0, "colo")
    for t in (22.0, 24.0, 26.0, 28.0, 30.0):  # 10 s of COLO, a divergence every 2 s, 40 ms pauses
        window.checkpoint(t, "colo", {"compare:payload": 1}, 0.040)
    summary = window.summary(30.0)
    assert summary["mc"]["per_s"] == 1.0 and summary["mc"]["per_s_by_reason"] == {"timer": 1.0}
    assert summary["mc"]["seconds_in_mode"] == 20.0
    assert summary["mc"]["pause_ms"] == {"p50": 10.0, "p99": 10.0, "count": 20}
    assert summary["colo"]["per_s"] == 0.5 and summary["colo"]["per_s_by_reason"] == {"compare:payload": 0.5}
    assert summary["colo"]["pause_ms"] == {"p50": 40.0, "p99": 40.0, "count": 5}
    assert summary["colo"]["window_s"] == 30.0  # the daemon ran 30 s: the window is not 60 s yet


def test_the_window_forgets_what_is_older_than_it() -> None:
    window = CheckpointsByMode(started=0.0, mode="mc", window_s=10.0)
    for i in range(1, 11):
        window.checkpoint(float(i), "mc", {"timer": 1}, 0.5 if i <= 5 else 0.01)
    window.mode_changed(10.0, "colo")
    summary = window.summary(25.0)  # the window is (15, 25]: COLO all along, no checkpoint in it
    assert summary["mc"] == {
        "per_s": None,
        "per_s_by_reason": {},
        "pause_ms": {"p50": None, "p99": None, "count": 0},
        "seconds_in_mode": 0.0,
        "window_s": 10.0,
    }
    assert summary["colo"]["per_s"] == 0.0 and summary["colo"]["seconds_in_mode"] == 10.0
    # half in each mode: (8, 18] has 2 s of MC (checkpoints 9, 10) and 8 s of COLO
    window = CheckpointsByMode(started=0.0, mode="mc", window_s=10.0)
    for i in range(1, 11):
        window.checkpoint(float(i), "mc", {"timer": 1}, 0.5 if i <= 8 else 0.01)
    window.mode_changed(10.0, "colo")
    summary = window.summary(18.0)
    assert summary["mc"]["seconds_in_mode"] == 2.0 and summary["mc"]["per_s"] == 1.0
    assert summary["mc"]["pause_ms"]["p99"] == 10.0  # the 500 ms pauses before the window are gone
    assert summary["colo"]["seconds_in_mode"] == 8.0


def test_a_full_window_says_how_far_back_it_reaches() -> None:
    window = CheckpointsByMode(started=0.0, mode="mc", window_s=60.0, capacity=10)
    for i in range(1, 31):
        window.checkpoint(i * 0.1, "mc", {"timer": 1}, 0.001)
    summary = window.summary(3.0)
    # only the last 10 checkpoints are kept: the window starts at the newest one dropped (2.0)
    assert summary["mc"]["window_s"] == pytest.approx(1.0)
    assert summary["mc"]["per_s"] == pytest.approx(10.0) and summary["mc"]["pause_ms"]["count"] == 10
    with pytest.raises(ValueError):
        CheckpointsByMode(0.0, "mc", window_s=0)


# ------------------------------------------------------------------------------ Prometheus
def test_every_signal_is_a_gauge_and_a_missing_one_is_removed() -> None:
    metrics = DaemonMetrics()
    metrics.set_signals({"cpu.primary": 0.5, "div.per_s.payload": 3.0, "net.hold_p50_ms": None})
    text = metrics.render()
    assert 'hybridft_signal{name="cpu.primary"} 0.5' in text
    assert 'hybridft_signal{name="div.per_s.payload"} 3.0' in text
    assert 'name="net.hold_p50_ms"' not in text  # not measured: absent, never 0
    metrics.set_signals({"cpu.primary": 0.25, "div.per_s.payload": float("nan")})
    text = metrics.render()
    assert 'hybridft_signal{name="cpu.primary"} 0.25' in text
    assert 'name="div.per_s.payload"' not in text  # a stale value would lie


# ------------------------------------------------------------------------------ the daemon's parts
def _daemon(tmp_path: object) -> Daemon:
    return Daemon(
        DaemonConfig(
            primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control=f"unix:{tmp_path}/d.ctl"
        )
    )


def _committed(daemon: Daemon, reasons: dict[str, int], pause_s: float) -> EpochRecord:
    """Run the protocol's bookkeeping of one committed checkpoint (what run_checkpoint does)."""
    protocol = daemon.protocol
    record = protocol.begin(reasons, time.time())
    record.primary_stop, record.primary_resume = 100.0, 100.0 + pause_s
    protocol.sealed(disk_epoch=protocol.next_number)
    protocol.loaded()
    record, _ = protocol.committed_step()
    daemon._note_point_change()
    daemon._checkpoint_done(record, reasons)
    return record


def test_checkpoints_are_counted_per_mode_and_switches_stamped(tmp_path: object) -> None:
    daemon = _daemon(tmp_path)
    _committed(daemon, {"timer": 1}, 0.02)
    daemon.protocol.request(PointRequest(mode=Mode.COLO, source=PointSource.POLICY))
    before = time.time()
    switching = _committed(daemon, {"mode-switch": 1}, 0.03)
    assert switching.mode is Mode.MC and daemon.protocol.point.mode is Mode.COLO
    _committed(daemon, {"compare:payload": 1}, 0.05)
    status = daemon.status()
    by_mode = status["checkpoints_by_mode"]
    assert by_mode["mc"]["pause_ms"]["count"] == 2 and by_mode["colo"]["pause_ms"]["count"] == 1
    assert by_mode["colo"]["pause_ms"]["p50"] == 50.0
    assert set(by_mode["mc"]["per_s_by_reason"]) == {"timer", "mode-switch"}
    assert set(by_mode["colo"]["per_s_by_reason"]) == {"compare:payload"}
    change = status["last_point_change"]
    assert change["source"] == "policy" and change["after"]["mode"] == "colo" and change["at"] >= before
    assert status["point_changes"] == [change]
    assert status["pause_ms"]["samples"] == 3  # the existing all-modes figure is still there
    text = daemon.metrics.render()
    assert 'hybridft_checkpoints_total{mode="mc",reason="mode-switch"} 1.0' in text
    assert 'hybridft_checkpoints_total{mode="colo",reason="compare:payload"} 1.0' in text
    assert 'hybridft_checkpoint_pause_seconds_count{mode="mc"} 2.0' in text
    assert 'hybridft_checkpoint_pause_seconds_count{mode="colo"} 1.0' in text


def test_a_policy_stands_down_when_protection_ends(tmp_path: object) -> None:
    daemon = _daemon(tmp_path)
    daemon.state = PairState.PROTECTED
    daemon.autopilot = Autopilot(
        SignalSampler(SamplerLinks()),
        AutopilotConfig(),
        point=lambda: daemon.protocol.point,
        request=daemon.request_point,
        active=lambda: daemon.state == PairState.PROTECTED,
        on_sample=daemon.metrics.set_signals,
    )
    try:
        reply = asyncio.run(daemon.dispatch("mode", {"mode": "auto", "policy": "static-colo"}))
        assert reply["auto"] is True and daemon.status()["policy"]["ended"] is None
        asyncio.run(daemon.autopilot.step(time.monotonic()))  # a sample reaches the gauges
        assert 'hybridft_signal{name="cpu.cores"}' in daemon.metrics.render()  # a level: no rate yet
        daemon.state, daemon.state_reason = PairState.PRIMARY_LOST, "the primary QEMU exited"
        policy = daemon.status()["policy"]
        assert policy["auto"] is False and policy["name"] is None
        assert policy["ended"]["policy"] == "static-colo" and "primary-lost" in policy["ended"]["why"]
        assert asyncio.run(daemon.autopilot.step(time.monotonic())) is None  # nothing decides any more
        with pytest.raises(ControlError, match="no mode for a policy to choose") as info:
            asyncio.run(daemon.dispatch("mode", {"mode": "auto", "policy": "static-colo"}))
        assert info.value.code == "not-protected"
    finally:
        daemon.autopilot.close()
