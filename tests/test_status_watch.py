"""``hybridft status --watch``: the pure view (controller.watch.render_status) rendered to a recording
rich Console, and the refresh loop against a fake daemon and an unreachable one (no QEMU here; the
live-pair check is in test_pair_qemu.py)."""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from rich.console import Console

from controller.operator_cli import status_command
from controller.watch import BANNER_S, EXIT_UNREACHABLE, render_status, watch

NOW = 1_800_000_000.0


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def a_status(mode: str = "mc", **extra: Any) -> dict[str, Any]:
    """A status reply shaped like the daemon's (the fields the view reads, as the daemon writes them)."""
    status: dict[str, Any] = {
        "state": "protected",
        "state_reason": "",
        "protected": True,
        "mode": mode,
        "epoch_ms": 100,
        "pending_mode": None,
        "last_point_change": None,
        "point_changes": [],
        "last_committed_epoch": 41,
        "checkpoints": {"committed": 40, "rolled_back": 0, "failed": 0, "mode_switches": 0, "by_reason": {}},
        "pause_ms": {"samples": 40, "p50": 12.5, "p99": 30.1},
        "checkpoints_by_mode": {
            "mc": {
                "per_s": 9.8,
                "per_s_by_reason": {"timer": 9.8},
                "pause_ms": {"p50": 12.5, "p99": 30.1, "count": 40},
                "seconds_in_mode": 4.1,
                "window_s": 4.1,
            },
            "colo": {
                "per_s": None,
                "per_s_by_reason": {},
                "pause_ms": {"p50": None, "p99": None, "count": 0},
                "seconds_in_mode": 0.0,
                "window_s": 4.1,
            },
        },
        "heartbeat": {"sent": 120, "connected": True, "max_gap_ms": 101.3},
        "unrequested_stops": 0,
        "policy": {"name": None, "auto": False, "last_decision": None, "failures": 0, "last_error": None},
        "signals": {
            "cpu.primary": 0.73,
            "cpu.host": 0.41,
            "mem.ram_bytes_per_ckpt": 3 << 20,
            "disk.writeout_backlog_bytes": 5 << 20,
            "disk.speculation_bytes": 4096.0,
            "net.held_bytes": 2048.0,
            "net.turns_per_s": 55.0,
            "div.per_s": 1.5,
            "div.per_s.payload": 1.5,
            "ckpt.per_s": 9.8,
            "op.colo": 0.0,
            "x.colo_hold_p50_ms": 0.3,
        },
    }
    status.update(extra)
    return status


def switched_to_colo(at: float) -> dict[str, Any]:
    change = {
        "epoch": 42,
        "before": {"mode": "mc", "epoch_ms": 100, "passive_secondary": False, "stop_via": "qemu"},
        "after": {"mode": "colo", "epoch_ms": 100, "passive_secondary": False, "stop_via": "qemu"},
        "source": "policy",
        "at": at,
        "reason": "divergences 0.0/s: COLO is cheaper",
    }
    policy = {
        "name": "cost-model",
        "auto": True,
        "last_decision": {"mode": "colo", "epoch_ms": 100, "reason": change["reason"], "at": at},
        "failures": 0,
        "last_error": None,
    }
    return a_status("colo", last_point_change=change, point_changes=[change], policy=policy)


def test_the_view_shows_state_mode_policy_figures_and_grouped_signals() -> None:
    text = text_of(render_status(a_status(), None, NOW))
    assert "protected" in text and "mc" in text and "epoch 100 ms" in text
    assert "none (mode forced)" in text and "last committed 41" in text
    assert "p50 12.5 ms, p99 30.1 ms" in text
    assert "timer 9.8/s" in text  # checkpoints/s by reason, MC's row
    assert "held 2.0 KiB" in text and "divergences 1.5/s (shadow)" in text
    covered = a_status()
    covered["signals"]["div.shadow_coverage"] = 0.025  # the MC shadow compared 2.5 % of the primary's bytes
    assert "divergences 1.5/s (shadow, 2.5 % compared)" in text_of(render_status(covered, None, NOW))
    assert "backlog 5.0 MiB" in text and "connected, 120 sent, largest gap 101 ms" in text
    for group, shown in (("cpu.", "primary 0.73"), ("mem.", "ram_bytes_per_ckpt 3.0 MiB"),
                         ("div.", "per_s.payload 1.5"), ("ckpt.", "per_s 9.8"), ("op.", "colo 0"),
                         ("other.", "x.colo_hold_p50_ms 0.3")):  # fmt: skip
        line = next((row for row in text.splitlines() if f" {group} " in row), "")
        assert shown in line, (group, text)
    assert "SWITCH" not in text


def test_a_switch_shows_as_a_banner_while_it_is_news() -> None:
    before = a_status("mc")
    after = switched_to_colo(at=NOW - 0.4)
    text = text_of(render_status(after, before, NOW))
    assert "SWITCH mc → colo (policy: divergences 0.0/s: COLO is cheaper)" in text
    assert "cost-model (auto)" in text and "why: policy at" in text
    assert "epoch 42: mc 100 ms → colo 100 ms (policy" in text  # the last switches list
    # the next refresh: same mode, but the daemon applied it moments ago -> still up
    assert "SWITCH mc → colo" in text_of(render_status(after, after, NOW + 1))
    # a few seconds later it is history
    assert "SWITCH" not in text_of(render_status(after, after, NOW + BANNER_S + 1))


def test_a_switch_seen_only_between_refreshes_still_shows() -> None:
    """An older daemon without the stamped change: the mode differs from the previous refresh."""
    before = a_status("colo")
    after = a_status("mc", last_point_change={"epoch": 7, "before": {"mode": "colo"}, "after": {"mode": "mc"},
                                              "source": "operator"})  # fmt: skip
    assert "SWITCH colo → mc (operator)" in text_of(render_status(after, before, NOW))


def test_old_minimal_and_odd_status_dicts_render() -> None:
    assert "?" in text_of(render_status({}, None, NOW))
    old = {"state": "starting", "state_reason": "", "protected": False, "mode": "mc", "epoch_ms": 50,
           "checkpoints": {"by_reason": {"timer": 3}},
           "pause_ms": {"samples": 0, "p50": None, "p99": None}}  # fmt: skip
    text = text_of(render_status(old, {"mode": None}, NOW))
    assert "starting" in text and "none sampled yet" in text and "all   -      timer 3" in text
    odd = a_status(
        policy="weird",
        signals={"cpu.primary": None, "nan": float("nan"), "op": 1, "div.per_s": "x"},
        checkpoints_by_mode={"mc": None},
        last_point_change={"at": "later", "before": None},
        point_changes=[None, {"epoch": 1}],
        heartbeat=[],
        future_field={"anything": 1},
    )
    text = text_of(render_status(odd, a_status("colo"), NOW))
    assert "cpu." in text and "SWITCH colo → mc" in text


def test_a_policy_that_stood_down_says_so() -> None:
    status = a_status(
        "colo",
        state="primary-lost",
        protected=False,
        state_reason="the primary QEMU exited",
        policy={
            "name": None,
            "auto": False,
            "last_decision": None,
            "ended": {
                "policy": "static-colo",
                "why": "the pair is primary-lost: no mode to choose",
                "at": NOW,
            },
        },
    )
    text = text_of(render_status(status, None, NOW))
    assert "primary-lost (the primary QEMU exited)" in text
    assert "static-colo stood down: the pair is primary-lost" in text


def test_the_loop_refreshes_and_reports_a_daemon_that_goes_away() -> None:
    replies: list[Any] = [a_status("mc"), switched_to_colo(time.time()), OSError("connection refused")]

    def fetch() -> dict[str, Any]:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return copy.deepcopy(reply)

    console = Console(record=True, width=160, color_system=None, force_terminal=False, file=io.StringIO())
    slept: list[float] = []
    assert watch(fetch, "unix:/x", interval=0.5, count=3, console=console, sleep=slept.append) == 0
    text = console.export_text()
    assert slept == [0.5, 0.5]
    assert "SWITCH mc → colo" in text
    assert (
        "cannot reach the daemon at unix:/x: connection refused" in text
        and "last seen: state protected" in text
    )


def test_the_command_against_no_daemon_keeps_trying_then_fails(tmp_path: Path) -> None:
    started = time.monotonic()
    result = CliRunner().invoke(
        status_command,
        ["--control", f"unix:{tmp_path}/none.ctl", "--watch", "--count", "2", "--interval", "0.1"],
    )
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert (
        result.output.count("cannot reach the daemon") == 2
        and "2 refresh(es) in a row failed" in result.output
    )
    assert time.monotonic() - started < 10
    usage = CliRunner().invoke(status_command, ["--control", f"unix:{tmp_path}/none.ctl", "--count", "2"])
    assert usage.exit_code == 2 and "go with --watch" in usage.output
    both = CliRunner().invoke(status_command, ["--control", f"unix:{tmp_path}/none.ctl", "--watch", "--json"])
    assert both.exit_code == 2 and "--json prints one reply" in both.output
    json.dumps(a_status())  # the fixture is what --json would print: plain JSON
