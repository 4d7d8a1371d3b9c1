"""``auto`` on a real pair: a policy moves the mode by itself, a broken third-party policy (installed
through the entry point; it raises, then it hangs) never costs protection, and the live decision trace
replays offline to the same decisions.

Its own pair (module-scoped fixtures of tests/helpers/daemon_harness.py).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.daemon import Daemon
from hybridft_common.vocabulary import Mode, StopVia
from policies.registry import ENTRY_POINT_GROUP, load_policy
from policies.trace import load_trace, replay
from tests.helpers.daemon_harness import Harness, running_daemon

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.netns]

BROKEN = '''
import threading
import time
from policies.base import Decision


class Broken:
    """Raises on every window until HANG is set, then never returns (until released)."""

    name = "broken"
    description = "fails on purpose (a test of the daemon's guard)"
    params = None
    HANG = threading.Event()
    RELEASE = threading.Event()

    def __init__(self, params=None):
        pass

    def decide(self, window):
        if self.HANG.is_set():
            self.RELEASE.wait(60)
            return Decision("mc", 50, "late")
        raise RuntimeError("broken policy: deliberate failure")

    def reset(self):
        pass
'''


@pytest.fixture(scope="module")
def stop_via() -> StopVia:
    return StopVia.QEMU


@pytest.fixture
def broken_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A third-party distribution laid out on sys.path as pip would, registering ``broken``."""
    (tmp_path / "broken_policy.py").write_text(BROKEN)
    dist = tmp_path / "broken_policy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-policy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = broken_policy:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    module = importlib.import_module("broken_policy")
    yield module.Broken
    module.Broken.RELEASE.set()
    sys.modules.pop("broken_policy", None)


@pytest.fixture
def auto_daemon(harness: Harness, tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(harness, trace_path=str(tmp_path / "decisions.jsonl"), epoch_ms=100) as daemon:
        yield daemon


async def _wait(condition: Any, timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {daemon.status()['policy']}"
        await asyncio.sleep(0.1)


def test_a_policy_switches_the_mode_and_its_trace_replays(
    harness: Harness, auto_daemon: Daemon, tmp_path: Path
) -> None:
    daemon = auto_daemon

    async def run() -> None:
        await _wait(lambda: "cpu.primary" in daemon.status()["signals"], 5, "no CPU signal", daemon)
        policy = daemon.status()["policy"]
        assert policy["auto"] is False and policy["name"] is None and policy["last_decision"] is None
        reply = await daemon.dispatch("mode", {"mode": "auto", "policy": "static-colo"})
        assert reply["auto"] is True and reply["policy"] == "static-colo"
        # the guard's confirmation ([controller] default: 2 windows; no dwell at the hand-over), then a
        # boundary
        await _wait(lambda: daemon.protocol.point.mode is Mode.COLO, 40, "auto never reached COLO", daemon)
        # enough decisions in COLO too for the replay below to mean something
        await _wait(lambda: daemon.status()["policy"]["decisions"] >= 10, 20, "too few decisions", daemon)
        status = daemon.status()
        assert status["policy"]["auto"] is True and status["policy"]["name"] == "static-colo"
        assert status["policy"]["last_decision"]["mode"] == "colo"
        assert status["last_point_change"]["source"] == "policy"
        signals = status["signals"]
        for name in ("cpu.primary", "cpu.secondary", "cpu.host", "ckpt.per_s", "disk.speculation_bytes",
                     "net.turns_per_s", "op.colo"):  # fmt: skip
            assert name in signals, sorted(signals)
        assert daemon.autopilot is not None and daemon.autopilot.sampler.failures.get("compare", 0) < 3
        # the switch as status shows it: when, and the policy's reason; each mode's figures apart
        change = status["last_point_change"]
        assert change["at"] > 0 and change["reason"] == status["policy"]["last_decision"]["reason"]
        by_mode = status["checkpoints_by_mode"]
        assert by_mode["mc"]["pause_ms"]["count"] > 0 and by_mode["mc"]["per_s_by_reason"].get("timer", 0) > 0
        assert by_mode["colo"]["seconds_in_mode"] > 0 and by_mode["mc"]["seconds_in_mode"] > 0
        # every signal is a Prometheus gauge too; pauses and checkpoints carry their mode
        # the gauges are the latest sample's: a signal that sample did not measure (None) is absent from
        # it (MetricsRegistry.set_signals), so a few samples are allowed for all four to be present at once
        wanted = [
            f'hybridft_signal{{name="{n}"}}'
            for n in ("cpu.primary", "cpu.host", "net.turns_per_s", "op.colo")
        ]
        for _ in range(8):
            metrics = (await daemon.dispatch("metrics", {}))["text"]
            if all(w in metrics for w in wanted):
                break
            await asyncio.sleep(0.25)
        for w in wanted:
            assert w in metrics, w
        assert 'hybridft_checkpoint_pause_seconds_count{mode="mc"}' in metrics
        assert 'hybridft_checkpoints_total{mode="mc",reason="timer"}' in metrics
        # the bound: sampling at 4 Hz costs at most 2 % of a core, i.e. 5 ms of CPU per sample
        print("sampling CPU per sample (ms):", status["policy"]["sample_cpu_ms"])
        assert status["policy"]["sample_cpu_ms"] < 5.0
        # forcing a mode ends auto
        await daemon.dispatch("mode", {"mode": "mc", "epoch_ms": 100})
        policy = daemon.status()["policy"]
        assert policy["auto"] is False and policy["name"] is None

    harness.run(run(), timeout=120)
    trace = load_trace(tmp_path / "decisions.jsonl")
    assert len(trace) >= 10
    replayed = replay(trace, load_policy("static-colo"))
    assert [r.outcome for r in trace] == replayed


def test_a_broken_third_party_policy_never_costs_protection(
    harness: Harness, auto_daemon: Daemon, broken_policy: Any
) -> None:
    daemon = auto_daemon

    async def run() -> None:
        mode_before = daemon.protocol.point.mode
        await daemon.dispatch("mode", {"mode": "auto", "policy": "broken"})
        await _wait(lambda: daemon.status()["policy"]["failures"] >= 3, 10, "no failure counted", daemon)
        status = daemon.status()
        assert "deliberate failure" in (status["policy"]["last_error"] or "")
        assert status["state"] == "protected" and daemon.protocol.point.mode is mode_before
        record = await daemon.request_checkpoint("test", timeout=30)  # checkpoints go on
        assert record.outcome == "committed"
        # now it hangs: every window is a timeout, the epochs go on
        failures = daemon.status()["policy"]["failures"]
        broken_policy.HANG.set()
        await _wait(lambda: daemon.status()["policy"]["failures"] >= failures + 3, 15, "no timeout", daemon)
        last_error = daemon.status()["policy"]["last_error"] or ""
        assert "time limit" in last_error or "still deciding" in last_error, last_error
        record = await daemon.request_checkpoint("test", timeout=30)
        assert record.outcome == "committed" and daemon.protocol.point.mode is mode_before
        assert daemon.status()["state"] == "protected"

    harness.run(run(), timeout=120)
