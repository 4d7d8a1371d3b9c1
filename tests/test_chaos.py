"""``hybridft bench chaos``: its sans-I/O parts (plan, judgement, outcome) and a short drill on real pairs.

The short drill is three iterations, each a fresh pair with checked clients and one fault (the long one is
``hybridft bench chaos --iterations N``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import bench.chaos as chaos
from bench.chaos import (
    COMPONENTS,
    Clients,
    FaultPlan,
    Observation,
    judge,
    outcome_of,
    plan_fault,
    run_iteration,
    summarize,
)


def test_every_component_is_hit_in_turn_and_plans_are_seeded() -> None:
    plans = [plan_fault(random.Random(5), i) for i in range(12)]
    assert [p.component for p in plans] == list(COMPONENTS) * 2
    again = [plan_fault(random.Random(5), i) for i in range(12)]
    assert plans == again
    for plan in plans:
        assert plan.fault in ("kill", "stop") and plan.mode in ("colo", "mc")
        assert 0.5 <= plan.stop_seconds <= 4.0
        assert plan.delay <= (0.02 if plan.moment == "mid-checkpoint" else 3.0)


def test_judge_names_each_violation() -> None:
    clean = Observation(served_again=True, outcome="protected")
    assert judge(clean) == []
    assert judge(Observation(corrupt=["echo"], served_again=True, outcome="protected")) == ["corrupt"]
    assert judge(Observation(cut=["blob"], served_again=True, outcome="unprotected", reason="r")) == ["lost"]
    assert judge(Observation(served_again=False, outcome="failed-over", reason="r")) == ["lost"]
    assert judge(Observation(missing_records=2, served_again=True, outcome="protected")) == ["disk"]
    assert judge(Observation(both_live=True, served_again=True, outcome="protected")) == ["split"]
    assert judge(Observation(served_again=True, outcome="unprotected")) == ["unclear"]  # no reason given
    assert judge(Observation(outcome="unknown")) == ["unclear"]
    # a VM kept paused on purpose, with its reason: an outage, clearly stated, not lost bytes
    assert judge(Observation(cut=["echo"], outcome="kept-paused", reason="disk step failed")) == []


def test_outcome_reads_the_agents_report_before_the_daemons_status() -> None:
    assert outcome_of({"protected": True, "state": "protected"}, None) == ("protected", "")
    assert outcome_of(None, {"resumed": True, "reason": "primary lost"})[0] == "failed-over"
    assert outcome_of(None, {"resumed": False, "kept_paused": "disk step failed: x"}) == (
        "kept-paused",
        "disk step failed: x",
    )
    agent_gone = {"protected": False, "state": "protected", "state_reason": "the agent is not connected"}
    assert outcome_of(agent_gone, None) == ("unprotected", "the agent is not connected")
    assert (
        outcome_of({"protected": False, "state": "undecided", "state_reason": "r"}, None)[0] == "kept-paused"
    )
    assert outcome_of(None, None) == ("unknown", "")


def test_summary_counts_per_component() -> None:
    results = [
        {"plan": {"component": "disk"}, "outcome": "unprotected", "violations": []},
        {"plan": {"component": "disk"}, "outcome": "protected", "violations": ["lost"]},
        {"plan": {"component": "agent"}, "error": "pair up: boom"},
    ]
    summary = summarize(results)
    assert summary["disk"] == {"iterations": 2, "outcomes": {"unprotected": 1, "protected": 1},
                               "violations": {"lost": 1}}  # fmt: skip
    assert summary["agent"]["violations"] == {"error": 1}


def test_stalls_are_the_longest_wait_for_progress_since_the_fault_was_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(chaos.time, "monotonic", lambda: clock[0])
    clients = Clients(netns=None, guest_ip="10.0.0.2")
    assert clients.stalls() == {}  # not armed yet
    clients._progressed("echo")
    clients.mark()
    clock[0] = 101.0
    clients._progressed("echo")
    clock[0] = 104.0
    clients._progressed("echo")
    clients._progressed("blob")
    clock[0] = 104.5
    clients._progressed("disk")
    assert clients.stalls() == {"echo": 3.0, "blob": 4.0, "disk": 4.5}
    clock[0] = 110.0  # nothing since: the open waits count
    assert clients.stalls() == {"echo": 6.0, "blob": 6.0, "disk": 5.5}


def test_a_client_whose_parser_fails_is_counted_corrupt_not_lost_silently() -> None:
    from mc_driver.guest.errors import GuestError

    clients = Clients(netns=None, guest_ip="10.0.0.2")

    def disk() -> None:
        clients.stop.set()  # one round only
        raise GuestError("diskwriter reported 7 after 5")

    clients._forever(disk)
    assert clients.corrupt == ["disk: GuestError: diskwriter reported 7 after 5"] and clients.cut == []


@pytest.mark.qemu
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan("primary", "kill", "mid-checkpoint", 0.005, 1.0, "mc"),
        FaultPlan("daemon", "stop", "random", 0.5, 2.0, "colo"),
        FaultPlan("disk", "kill", "random", 0.5, 1.0, "mc"),
    ],
    ids=lambda p: f"{p.fault}-{p.component}",
)
def test_short_drill(tmp_path: Path, plan: FaultPlan) -> None:
    result = run_iteration(tmp_path / "pair", plan)
    # the whole result, untruncated (pytest shortens a dict's repr): the observation, the stalls, the
    # failover's report -- a CI run that fails here once must say why
    whole = json.dumps(result, indent=1, default=str)
    assert "error" not in result, whole
    assert result["violations"] == [], whole
