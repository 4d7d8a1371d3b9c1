"""The sans-I/O epoch protocol and scheduler, plus run_checkpoint's order and recovery against
in-process recording peers (QMP-like and control-like objects that log every call).

The real-QEMU proof of the same order is tests/test_daemon_qemu.py; here every failure point is
reachable on demand, which a real pair cannot offer.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.epoch import (
    CheckpointError,
    CheckpointScheduler,
    ColoExited,
    EpochProtocol,
    PairLinks,
    Phase,
    Recovery,
    Step,
    run_checkpoint,
)
from controller.heartbeat import Heartbeat
from controller.operating_point import OperatingPoint, PointRequest, PointSource
from hybridft_common.vocabulary import Mode, StopVia


@dataclass
class FakeEvent:
    name: str
    timestamp: float
    data: dict[str, Any] = field(default_factory=dict)


class RecordingQmp:
    """Records commands into a shared log; emits STOP on stop and RESUME on the checkpoint trigger."""

    def __init__(self, name: str, log: list[str], fail_on: str | None = None) -> None:
        self.name, self.log, self.fail_on = name, log, fail_on
        self.queue: list[FakeEvent] = []
        self.running = True
        self.clock = 1000.0

    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any:
        if self.fail_on == command:
            raise ConnectionError(f"{self.name} gone")
        self.log.append(f"{self.name}:{command}")
        self.clock += 0.01
        if command == "stop":
            if self.running:
                self.queue.append(FakeEvent("STOP", self.clock))
            self.running = False
        if command == "migrate-set-parameters":
            self.peer_resume()
        if command == "x-colo-sealed":  # patch 0005: the secondary's waiting load goes on
            self.primary.peer_resume()
        if command == "x-colo-checkpoint":  # patch 0005: QEMU stops both (secondary first), then waits
            for side in reversed(self.peers):
                if side.running:
                    side.queue.append(FakeEvent("STOP", side.clock))
                side.running = False
            if self.fail_on != "stopped":
                self.queue.append(FakeEvent("X_COLO_CHECKPOINT_STOPPED", self.clock))
        return {}

    def peer_resume(self) -> None:
        if any(side.fail_on == "exit" for side in self.peers):  # the secondary died mid-checkpoint
            self.queue.append(FakeEvent("COLO_EXIT", self.clock, {"mode": "primary", "reason": "error"}))
            return
        for side in self.peers:
            if side.fail_on != "load":
                side.running = True
                side.queue.append(FakeEvent("RESUME", side.clock + 0.05))

    async def wait_event(self, names: Any, *, timeout: float, predicate: Any = None) -> Any:
        wanted = {names} if isinstance(names, str) else set(names)
        for i, event in enumerate(self.queue):
            if event.name in wanted:
                del self.queue[i]
                self.log.append(f"{self.name}:{event.name}")
                return event
        await asyncio.sleep(0)
        raise TimeoutError(f"{self.name}: no {names}")

    def take(self, names: Any) -> list[Any]:
        taken = [e for e in self.queue if e.name == names]
        self.queue = [e for e in self.queue if e.name != names]
        return taken


class RecordingService:
    def __init__(self, name: str, log: list[str], fail_on: str | None = None) -> None:
        self.name, self.log, self.fail_on = name, log, fail_on
        self.epoch = 0

    async def call(self, verb: str, **args: Any) -> dict[str, Any]:
        if self.fail_on == verb:
            raise ConnectionError(f"{self.name} gone")
        self.log.append(f"{self.name}:{verb}" + (f" {args['epoch']}" if "epoch" in args else ""))
        if verb == "seal":
            self.epoch += 1
            return {"epoch": self.epoch + (100 if self.name == "disk" else 0)}
        return {"released_frames": 3} if verb == "commit" else {}


def _links(log: list[str], *, fail: dict[str, str] | None = None) -> tuple[PairLinks, list[Heartbeat]]:
    fail = fail or {}
    primary = RecordingQmp("primary", log, fail.get("primary"))
    secondary = RecordingQmp("secondary", log, fail.get("secondary"))
    primary.peers = [primary, secondary]  # type: ignore[attr-defined]
    secondary.peers = []  # type: ignore[attr-defined]
    secondary.primary = primary  # type: ignore[attr-defined]
    beats: list[Heartbeat] = []

    def heartbeat(message: Heartbeat) -> None:
        beats.append(message)
        log.append(f"heartbeat:{message.state}")

    links = PairLinks(
        primary,
        secondary,
        RecordingService("compare", log, fail.get("compare")),
        RecordingService("disk", log, fail.get("disk")),
        heartbeat=heartbeat,
        timeout=1.0,
    )
    return links, beats


def mc50(stop_via: StopVia = StopVia.QMP, passive: bool = False) -> EpochProtocol:
    return EpochProtocol(OperatingPoint(Mode.MC, 50, passive, stop_via))


# both ways of stopping the VMs end alike: both resume (the secondary's RESUME = it loaded N), commit
AFTER_THE_LOAD = [
    "primary:RESUME",
    "secondary:RESUME",
    "heartbeat:loaded",
    "disk:commit 101",
    "compare:commit 1",
    "heartbeat:committed",
]


def test_checkpoint_runs_the_steps_in_protocol_order() -> None:
    log: list[str] = []
    links, beats = _links(log)
    protocol = mc50()
    record = asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    # the secondary first (its stop stays outside the primary's client-visible pause), with
    # prepare-checkpoint beside it: a budget-paused disk server would otherwise block either stop
    assert sorted(log[:2]) == ["disk:prepare-checkpoint", "secondary:stop"]
    assert log[2] == "primary:stop"
    assert sorted(log[3:5]) == ["compare:seal", "disk:seal"]  # the two seals run concurrently
    assert log[5:] == ["heartbeat:sealed", "primary:migrate-set-parameters", *AFTER_THE_LOAD]
    # N is the disk's epoch number (the agent's `disk ctl commit N` must name it)
    assert record.number == 101 and record.compare_epoch == 1 and record.disk_epoch == 101
    assert [b.epoch for b in beats] == [101, 101, 101]
    assert record.outcome == "committed" and record.released_frames == 3
    assert record.primary_pause is not None and record.primary_pause > 0
    assert [name for name, _ in record.steps][:2] == [str(Step.STOP_SECONDARY), str(Step.STOP_PRIMARY)]
    assert protocol.last_committed == 101 and protocol.next_number == 102


def test_stop_via_qemu_fires_first_and_seals_while_qemu_holds_both_stopped() -> None:
    """Patch 0005's order: expect-seal ‖ prepare, fire, QEMU stops both and says so, seal, the
    secondary's x-colo-sealed, resume."""
    log: list[str] = []
    links, beats = _links(log)
    protocol = mc50(StopVia.QEMU)
    record = asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert sorted(log[:2]) == ["disk:prepare-checkpoint", "secondary:x-colo-expect-seal"]
    assert log[2:4] == ["primary:x-colo-checkpoint", "primary:X_COLO_CHECKPOINT_STOPPED"]
    assert sorted(log[4:6]) == ["compare:seal", "disk:seal"]
    assert log[6:] == ["heartbeat:sealed", "secondary:x-colo-sealed", *AFTER_THE_LOAD]
    assert "primary:stop" not in log and "secondary:stop" not in log
    assert [name for name, _ in record.steps][:3] == [
        str(Step.EXPECT_SEAL),
        str(Step.FIRE),
        str(Step.STOPPED),
    ]
    assert record.stop_events == (1, 1) and record.primary_pause is not None
    assert record.outcome == "committed" and [b.state for b in beats] == ["sealed", "loaded", "committed"]


ROLLED_BACK = ["disk:prepare-checkpoint", "disk:seal", "disk:rollback"]


@pytest.mark.parametrize("stop_via", list(StopVia))
def test_colo_exit_while_waiting_for_the_checkpoint_fails_it_at_once(stop_via: StopVia) -> None:
    """The secondary died (or took over) mid-checkpoint: the primary's COLO_EXIT ends the wait (not the
    timeout, which would keep the primary paused), and the sealed epoch is rolled back."""
    log: list[str] = []
    links, _ = _links(log, fail={"secondary": "exit"})
    protocol = mc50(stop_via)
    with pytest.raises(CheckpointError) as info:
        asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert info.value.step is Step.RESUME_PRIMARY and isinstance(info.value.cause, ColoExited)
    assert "'reason': 'error'" in str(info.value.cause)
    assert info.value.recovery is Recovery.ROLLBACK and "disk:rollback" in log


@pytest.mark.parametrize(
    ("fail", "step", "recovery", "disk_calls"),
    [
        ({"secondary": "x-colo-expect-seal"}, Step.EXPECT_SEAL, Recovery.NONE, ["disk:prepare-checkpoint"]),
        ({"primary": "x-colo-checkpoint"}, Step.FIRE, Recovery.NONE, ["disk:prepare-checkpoint"]),
        ({"primary": "stopped"}, Step.STOPPED, Recovery.NONE, ["disk:prepare-checkpoint"]),
        ({"compare": "seal"}, Step.COMPARE_SEAL, Recovery.ROLLBACK, ROLLED_BACK),
        ({"secondary": "x-colo-sealed"}, Step.SEALED, Recovery.ROLLBACK, ROLLED_BACK),
        ({"secondary": "load"}, Step.RESUME_SECONDARY, Recovery.ROLLBACK, ROLLED_BACK),
    ],
)  # fmt: skip
def test_stop_via_qemu_recovers_like_the_qmp_order(
    fail: dict[str, str], step: Step, recovery: Recovery, disk_calls: list[str]
) -> None:
    log: list[str] = []
    links, _ = _links(log, fail=fail)
    protocol = mc50(StopVia.QEMU)
    with pytest.raises(CheckpointError) as info:
        asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert info.value.step is step and info.value.recovery is recovery
    assert [entry for entry in log if entry.startswith("disk:")] == disk_calls
    assert "compare:commit 1" not in log
    if step in (Step.EXPECT_SEAL, Step.FIRE, Step.STOPPED, Step.COMPARE_SEAL):
        assert "secondary:x-colo-sealed" not in log  # a failed seal never lets the secondary load


def test_passive_secondary_is_stopped_again_after_the_commit_in_mc_only() -> None:
    log: list[str] = []
    links, _ = _links(log)
    protocol = mc50(passive=True)
    asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert log[-1] == "secondary:stop" and log[-2] == "heartbeat:committed"
    log.clear()
    protocol.request(PointRequest(mode=Mode.COLO))
    asyncio.run(run_checkpoint(links, protocol, {"mode-switch": 1}))
    assert log[-1] == "heartbeat:committed"  # the epoch now open is COLO: the secondary must run


def test_passive_secondary_requested_applies_at_the_close_of_the_next_checkpoint() -> None:
    """The passive stop after the commit honours the point in force after that checkpoint's close."""
    log: list[str] = []
    links, _ = _links(log)
    protocol = mc50()
    protocol.request(PointRequest(passive_secondary=True))
    assert protocol.point.passive_secondary is False and protocol.pending is not None
    assert not protocol.mode_switch_pending  # nothing for the comparator: the epochs stay as they are
    asyncio.run(run_checkpoint(links, protocol, {"mode-switch": 1}))
    assert "compare:mode" not in log
    assert log[-1] == "secondary:stop" and protocol.point.passive_secondary is True
    assert protocol.mode_switches == 0 and protocol.pending is None


def test_a_stop_way_change_applies_after_the_checkpoint_that_carries_it() -> None:
    """The checkpoint that applies a new stop way still stops the VMs the way it began with."""
    log: list[str] = []
    links, _ = _links(log)
    protocol = mc50(StopVia.QMP)
    protocol.request(PointRequest(stop_via=StopVia.QEMU))
    asyncio.run(run_checkpoint(links, protocol, {"mode-switch": 1}))
    assert "secondary:stop" in log and "primary:x-colo-checkpoint" not in log
    assert protocol.point.stop_via is StopVia.QEMU
    log.clear()
    asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert "primary:x-colo-checkpoint" in log and "secondary:stop" not in log


@pytest.mark.parametrize(
    ("fail", "recovery", "disk_calls"),
    [
        # prepare-checkpoint goes out beside the first stop, so it is there in every case
        ({"primary": "stop"}, Recovery.NONE, ["disk:prepare-checkpoint"]),
        ({"secondary": "stop"}, Recovery.NONE, ["disk:prepare-checkpoint"]),
        # nothing sealed on the disk: nothing to roll back
        ({"disk": "seal"}, Recovery.ROLLBACK, ["disk:prepare-checkpoint"]),
        ({"secondary": "load"}, Recovery.ROLLBACK, ["disk:prepare-checkpoint", "disk:seal", "disk:rollback"]),
        (
            {"primary": "migrate-set-parameters"},
            Recovery.ROLLBACK,
            ["disk:prepare-checkpoint", "disk:seal", "disk:rollback"],
        ),
        ({"compare": "commit"}, Recovery.COMMIT, ["disk:prepare-checkpoint", "disk:seal", "disk:commit 101"]),
    ],
)
def test_failure_recovery_depends_on_whether_the_secondary_loaded(
    fail: dict[str, str], recovery: Recovery, disk_calls: list[str]
) -> None:
    log: list[str] = []
    links, beats = _links(log, fail=fail)
    protocol = mc50()
    with pytest.raises(CheckpointError) as info:
        asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
    assert info.value.recovery is recovery
    assert [entry for entry in log if entry.startswith("disk:")] == disk_calls
    assert protocol.current is None  # the next checkpoint can start
    if recovery is Recovery.COMMIT:
        assert protocol.last_committed == 101
    else:
        assert protocol.last_committed is None
        assert "compare:commit 1" not in log  # sealed output is never released unless loaded
    assert beats[-1].state == "committed"


def test_mode_switch_applies_only_at_a_checkpoint_boundary() -> None:
    protocol = mc50()
    protocol.request(PointRequest(mode=Mode.COLO, epoch_ms=200))
    assert protocol.point.mode is Mode.MC and protocol.mode_switch_pending
    assert protocol.next_point() == OperatingPoint(Mode.COLO, 200)
    record = protocol.begin({"mode-switch": 1}, 0.0)
    assert protocol.point.mode is Mode.MC and record.mode is Mode.MC  # the closing epoch was MC
    protocol.sealed(disk_epoch=7)
    protocol.loaded()
    protocol.committed_step()
    assert protocol.point == OperatingPoint(Mode.COLO, 200) and protocol.mode_switches == 1
    change = protocol.changes[-1]
    assert (change.epoch, change.before, change.after) == (7, OperatingPoint(Mode.MC, 50), protocol.point)
    assert change.source is PointSource.OPERATOR
    # nothing sealed: the comparator never got the new mode, so the switch stays pending
    protocol.request(PointRequest(mode=Mode.MC, source=PointSource.POLICY))
    protocol.begin({"mode-switch": 1}, 0.0)
    protocol.failed_step(protocol.recovery_for_failure())
    assert protocol.point.mode is Mode.COLO and protocol.pending == OperatingPoint(Mode.MC, 200)
    assert len(protocol.changes) == 1
    # ... and lands, with its source, at the next boundary that sealed
    protocol.begin({"mode-switch": 1}, 0.0)
    protocol.sealed(disk_epoch=8)
    protocol.failed_step(protocol.recovery_for_failure())  # rolled back after the seal: still a boundary
    assert protocol.point == OperatingPoint(Mode.MC, 200)
    assert protocol.changes[-1].source is PointSource.POLICY
    # asking for what already runs withdraws the pending request: nothing waits for a checkpoint
    protocol.request(PointRequest(mode=Mode.COLO, stop_via=StopVia.QEMU))
    assert protocol.pending is not None
    protocol.request(PointRequest(mode=Mode.MC, epoch_ms=200))
    assert protocol.pending is None and not protocol.mode_switch_pending


def test_a_request_made_during_a_checkpoint_waits_for_the_next_one() -> None:
    """Found by tests/test_phased_auto.py: ``mode colo`` arriving between a checkpoint's seal and its
    commit used to land at that commit while the comparator, told at the seal, stayed in MC -- the pair
    then ran "COLO" with an MC comparator (output released only at the 10 s safety checkpoints)."""
    protocol = mc50()
    protocol.begin({"timer": 1}, 0.0)
    assert not protocol.opening_switches_mode  # nothing to tell the comparator at this seal
    protocol.sealed(disk_epoch=7)
    protocol.request(PointRequest(mode=Mode.COLO))  # after the seal
    protocol.loaded()
    protocol.committed_step()
    assert protocol.point.mode is Mode.MC and protocol.pending is not None  # not at this close
    protocol.begin({"mode-switch": 1}, 0.0)
    assert protocol.opening_switches_mode  # this seal tells the comparator
    protocol.sealed(disk_epoch=8)
    protocol.loaded()
    protocol.committed_step()
    assert protocol.point.mode is Mode.COLO and protocol.pending is None


def test_withdrawing_the_point_a_checkpoint_carries_switches_back_at_the_next_one() -> None:
    protocol = mc50()
    protocol.request(PointRequest(mode=Mode.COLO))
    protocol.begin({"mode-switch": 1}, 0.0)  # carries COLO: the comparator is told at the seal
    protocol.request(PointRequest(mode=Mode.MC))  # "back to MC" while it runs
    assert protocol.pending == OperatingPoint(Mode.MC, 50)
    protocol.sealed(disk_epoch=7)
    protocol.loaded()
    protocol.committed_step()
    assert protocol.point.mode is Mode.COLO and protocol.pending == OperatingPoint(Mode.MC, 50)
    # asked for what the running checkpoint opens: nothing more waits; a checkpoint that fails before
    # its seal keeps the request pending
    protocol.begin({"mode-switch": 1}, 0.0)
    protocol.request(PointRequest(mode=Mode.MC))
    assert protocol.pending is None
    protocol.failed_step(protocol.recovery_for_failure())
    assert protocol.point.mode is Mode.COLO and protocol.pending == OperatingPoint(Mode.MC, 50)


def test_a_request_is_partial_and_replaces_the_pending_one() -> None:
    protocol = EpochProtocol(OperatingPoint(Mode.COLO, 80, True, StopVia.QEMU))
    protocol.request(PointRequest(epoch_ms=30))
    assert protocol.pending == OperatingPoint(Mode.COLO, 30, True, StopVia.QEMU)
    # a new request starts from the point in force, not from the pending one
    protocol.request(PointRequest(passive_secondary=False))
    assert protocol.pending == OperatingPoint(Mode.COLO, 80, False, StopVia.QEMU)
    assert not protocol.mode_switch_pending
    # a refused request changes nothing
    with pytest.raises(ValueError):
        protocol.request(PointRequest(epoch_ms=600_001))
    assert protocol.pending == OperatingPoint(Mode.COLO, 80, False, StopVia.QEMU)


def test_comparator_gets_the_new_mode_just_before_its_seal() -> None:
    log: list[str] = []
    links, _ = _links(log)
    protocol = mc50()
    protocol.request(PointRequest(mode=Mode.COLO))
    asyncio.run(run_checkpoint(links, protocol, {"mode-switch": 1}))
    compare_calls = [entry for entry in log if entry.startswith("compare:")]
    assert compare_calls[:2] == ["compare:mode", "compare:seal"]  # the new mode, then at once the seal
    assert (
        log.index("compare:seal")
        < log.index("heartbeat:sealed")
        < log.index("primary:migrate-set-parameters")
    )
    log.clear()
    asyncio.run(run_checkpoint(links, protocol, {"safety-interval": 1}))
    assert "compare:mode" not in log


def test_protocol_refuses_out_of_order_steps() -> None:
    protocol = EpochProtocol()
    with pytest.raises(RuntimeError):
        protocol.loaded()
    protocol.begin({}, 0.0)
    with pytest.raises(RuntimeError):
        protocol.begin({}, 0.0)
    with pytest.raises(RuntimeError):
        protocol.loaded()  # not sealed
    with pytest.raises(ValueError):
        protocol.request(PointRequest(mode=Mode.MC, epoch_ms=0))
    with pytest.raises(ValueError):
        EpochProtocol(OperatingPoint(Mode.MC, -1))


def test_scheduler_stretches_one_shadowed_mc_epoch_per_probe_period() -> None:
    """Shadow probes: at 10 ms the shadow compared 0-2.5 % of the primary's bytes, at 50 ms 30-40 %;
    one 50 ms epoch a second lets a policy in MC see the workload without changing the point."""
    scheduler = CheckpointScheduler(probe_every_s=1.0, probe_epoch_ms=50)
    scheduler.begun(0.99)
    scheduler.ended(1.0)
    assert scheduler.due_at(Mode.MC, 10, shadowed=True) == pytest.approx(1.04)  # 0.99 + 50 ms: a probe
    assert scheduler.take(Mode.MC, 10, 1.02, shadowed=True) is None
    assert scheduler.take(Mode.MC, 10, 1.04, shadowed=True) == Counter({"timer": 1})
    t = 1.04
    for _ in range(20):  # the probe period runs at the chosen epoch
        scheduler.begun(t)
        scheduler.ended(t + 0.005)
        assert scheduler.due_at(Mode.MC, 10, shadowed=True) == pytest.approx(t + 0.010)
        t += 0.010
    while t < 2.0:
        scheduler.begun(t)
        scheduler.ended(t + 0.005)
        t += 0.010
    scheduler.begun(t)
    scheduler.ended(t + 0.005)  # a second after the last probe opened: the next probe
    assert scheduler.due_at(Mode.MC, 10, shadowed=True) == pytest.approx(t + 0.050)
    assert scheduler.probes == 2
    # a passive secondary (nothing to compare), an epoch already as long, COLO, or probes off: none
    for mode, epoch_ms, shadowed, every in (
        (Mode.MC, 10, False, 1.0), (Mode.MC, 50, True, 1.0), (Mode.MC, 10, True, 0.0)
    ):  # fmt: skip
        plain = CheckpointScheduler(probe_every_s=every, probe_epoch_ms=50)
        plain.begun(0.99)
        plain.ended(1.0)
        period = epoch_ms / 1000
        assert plain.due_at(mode, epoch_ms, shadowed=shadowed) == pytest.approx(
            max(0.99 + period, 1.0 + period / 2)
        )
        assert plain.probes == 0
    colo = CheckpointScheduler()
    colo.ended(1.0)
    assert colo.due_at(Mode.COLO, 10, shadowed=True) == pytest.approx(11.0)


def test_scheduler_mc_timer_colo_safety_interval_and_coalescing() -> None:
    scheduler = CheckpointScheduler(safety_interval_ms=10_000)
    assert scheduler.take(Mode.MC, 50, 0.0) is None  # nothing before the first checkpoint ended
    scheduler.ended(1.0, compare_epoch=4)
    assert scheduler.take(Mode.MC, 50, 1.04) is None
    assert scheduler.take(Mode.MC, 50, 1.05) == Counter({"timer": 1})
    # MC: every epoch_ms from the start of the previous checkpoint, as QEMU's own timer ...
    scheduler.begun(1.05)
    scheduler.ended(1.06)
    assert scheduler.due_at(Mode.MC, 50) == pytest.approx(1.10)
    assert scheduler.take(Mode.MC, 50, 1.099) is None
    assert scheduler.take(Mode.MC, 50, 1.10) == Counter({"timer": 1})
    # ... but at least half an epoch of guest time after a checkpoint longer than the epoch
    scheduler.begun(1.10)
    scheduler.ended(1.18)
    assert scheduler.due_at(Mode.MC, 50) == pytest.approx(1.205)
    assert scheduler.take(Mode.MC, 50, 1.2) is None
    assert scheduler.take(Mode.MC, 50, 1.21) == Counter({"timer": 1})
    scheduler.ended(1.0, compare_epoch=4)  # COLO's safety interval counts from the end
    assert scheduler.take(Mode.COLO, 50, 5.0) is None
    assert scheduler.take(Mode.COLO, 50, 11.0) == Counter({"safety-interval": 1})
    # three requests while a checkpoint runs: one checkpoint answers them all
    assert scheduler.request("compare:divergence", compare_epoch=5)
    assert scheduler.request("compare:divergence", compare_epoch=5, extra=2)
    assert scheduler.request("operator")
    assert scheduler.take(Mode.COLO, 50, 2.0) == Counter({"compare:divergence": 2, "operator": 1})
    assert scheduler.coalesced == 4
    # a request raised in an epoch that is already sealed was resolved by that seal
    assert not scheduler.request("compare:divergence", compare_epoch=4)
    assert scheduler.stale_dropped == 1 and scheduler.take(Mode.COLO, 50, 2.0) is None


def test_heartbeat_messages_follow_the_phase() -> None:
    protocol = EpochProtocol()
    assert protocol.heartbeat(5.0) == Heartbeat(5.0, None, "committed")
    protocol.begin({}, 0.0)
    assert protocol.heartbeat(6.0).state == str(Phase.OPEN)
    assert protocol.sealed(disk_epoch=3).state == "sealed"
    loaded = protocol.loaded()
    assert (loaded.epoch, loaded.state) == (3, "loaded")
    protocol.committed_step()
    assert protocol.heartbeat(7.0).encode() == b'{"t":7.0,"epoch":3,"state":"committed"}\n'


def test_a_lost_primary_leaves_the_disk_to_the_agent() -> None:
    """Issue 5: the primary dies after the fire; the secondary loaded N and resumed, the primary's
    RESUME never comes.  The daemon alone would roll N back (it never saw the load) -- racing the
    agent, which commits N because the secondary resumed after the seal.  With the primary lost the
    daemon must not touch the disk."""
    for primary_alive, disk_calls, recovery in (
        (True, ["disk:prepare-checkpoint", "disk:seal", "disk:rollback"], Recovery.ROLLBACK),
        (False, ["disk:prepare-checkpoint", "disk:seal"], Recovery.NONE),
    ):
        log: list[str] = []
        links, _ = _links(log, fail={"primary": "load"})
        links.primary_alive = lambda alive=primary_alive: alive
        protocol = mc50()
        with pytest.raises(CheckpointError) as info:
            asyncio.run(run_checkpoint(links, protocol, {"timer": 1}))
        assert info.value.recovery is recovery
        assert info.value.step is Step.RESUME_PRIMARY  # where it failed, not the rollback after it
        assert [entry for entry in log if entry.startswith("disk:")] == disk_calls
        assert protocol.current is None


def test_probe_epochs_only_while_a_policy_that_reads_the_shadow_decides() -> None:
    """A forced mode, static-mc/static-colo and gilbert never read div.*: no probe epoch (and its
    latency) for them; cost-model, threshold and learned do, and so is a third-party policy assumed to."""
    from types import SimpleNamespace

    from controller.daemon import Daemon
    from policies.cost_model import CostModel
    from policies.gilbert import Gilbert
    from policies.static import StaticColo, StaticMC

    def reads(policy: object) -> bool:
        stub = SimpleNamespace(autopilot=SimpleNamespace(policy=policy))
        return Daemon._policy_reads_shadow(stub)  # type: ignore[arg-type]

    assert not reads(None)  # a forced mode
    assert not reads(StaticMC()) and not reads(StaticColo()) and not reads(Gilbert())
    assert reads(CostModel())
    assert reads(SimpleNamespace(name="third-party"))
    assert not Daemon._policy_reads_shadow(SimpleNamespace(autopilot=None))  # type: ignore[arg-type]
