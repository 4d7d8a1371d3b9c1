"""The agent's decisions (when to fail over, commit or roll back the disk) and its CLI's config errors.

The decider is sans-I/O: fed heartbeat messages, QMP event timestamps and the disk server's status, it is
tested here directly; the agent process itself is exercised with real QEMUs in test_pair_qemu.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from controller.agent import (
    DISK_STEP_TIMEOUTS,
    WATCHER_STOP_TIMEOUT,
    Agent,
    DiskDecision,
    DiskStepError,
    FailoverDecider,
    Timeline,
    _disk_call,
    _settle_disk,
    agent_command,
    disk_settled,
)
from controller.heartbeat import Heartbeat
from hybridft_common.control import serve_control
from mc_driver.qmp import Event, QmpTimeout
from tests.test_manifest import manifest_for


def sealed_then(decider: FailoverDecider, epoch: int, t: float, now: float = 0.0) -> None:
    decider.message(Heartbeat(t, epoch, "sealed"), now)


def test_nothing_fires_before_the_first_heartbeat() -> None:
    d = FailoverDecider(silence_limit=0.5)
    assert d.check(100.0) is None
    d.connection_opened(0.0)
    d.connection_closed(1.0)
    assert d.check(100.0) is None
    d.secondary_event("COLO_EXIT", 5.0)
    assert d.check(100.0) is None


def test_silence_fires_only_after_the_limit() -> None:
    d = FailoverDecider(silence_limit=0.5)
    d.message(Heartbeat(1.0, 1, "committed"), 10.0)
    assert d.check(10.4) is None
    d.message(Heartbeat(1.4, 1, "committed"), 10.4)
    assert d.check(10.85) is None
    reason = d.check(10.91)
    assert reason is not None and "silent" in reason


def test_each_trigger_names_itself_and_the_first_one_wins() -> None:
    for message, expected in (
        (Heartbeat(0.1, 0, None, primary_lost=True), "primary lost"),
        (Heartbeat(0.1, 0, "committed", failover=True), "planned"),
    ):
        d = FailoverDecider()
        d.message(Heartbeat(0.0, 0, "committed"), 0.0)
        d.message(message, 0.1)
        assert expected in (d.check(0.1) or "")
        d.connection_closed(0.2)
        assert expected in (d.check(5.0) or "")
    d = FailoverDecider()
    d.message(Heartbeat(0.0, 0, "committed"), 0.0)
    d.connection_closed(0.1)
    assert "closed" in (d.check(0.1) or "")
    d = FailoverDecider()
    d.message(Heartbeat(0.0, 0, "committed"), 0.0)
    d.secondary_event("COLO_EXIT", 0.05)
    assert "COLO_EXIT" in (d.check(0.1) or "")


def test_malformed_heartbeat_lines_are_counted_not_fatal() -> None:
    """The agent's reader: a line that is no heartbeat is counted and skipped, the next one counts."""

    class Writer:
        def close(self) -> None:
            pass

    async def scenario() -> FailoverDecider:
        agent = Agent(manifest_for(Path("/run/hft-pair")), 0.5)
        reader = asyncio.StreamReader()
        malformed = (
            b"[1, 2]",
            b'"x"',
            b"null",
            b"{nope",
            b'{"t": 1, "epoch": "3", "state": 7}',
            b'{"t": 1, "epoch": true, "state": "sealed"}',
            b'{"epoch": 3, "state": "sealed"}',
        )
        for bad in malformed:
            reader.feed_data(bad + b"\n")
        reader.feed_data(Heartbeat(2.0, 4, "sealed").encode())
        reader.feed_eof()
        await agent._on_heartbeat(reader, Writer())  # type: ignore[arg-type]
        return agent.decider

    d = asyncio.run(scenario())
    assert d.bad_messages == 7
    assert d.seal_times == {4: 2.0} and (d.epoch, d.state) == (4, "sealed")
    assert d.armed and "closed" in (d.check(0.1) or "")  # the connection ended after the good line


def test_loaded_epoch_is_committed() -> None:
    d = FailoverDecider()
    sealed_then(d, 7, t=100.0)
    d.secondary_event("STOP", 99.9)
    d.secondary_event("RESUME", 100.2)
    assert d.disk_decision({"sealed": [7], "committed": 6, "committing": None}).action == "commit"
    assert d.disk_decision({"sealed": [7], "committed": 6, "committing": None}).epoch == 7


def test_unloaded_epoch_is_rolled_back() -> None:
    d = FailoverDecider()
    d.secondary_event("RESUME", 99.0)  # the previous checkpoint's resume
    sealed_then(d, 7, t=100.0)
    decision = d.disk_decision({"sealed": [7], "committed": 6, "committing": None})
    assert (decision.action, decision.epoch) == ("rollback", 7)


def test_resume_after_colo_exit_is_not_a_load() -> None:
    d = FailoverDecider()
    sealed_then(d, 3, t=50.0)
    d.secondary_event("COLO_EXIT", 50.5)
    d.secondary_event("RESUME", 50.6)  # QEMU's own failover resumed it, it never loaded 3
    assert d.disk_decision({"sealed": [3], "committed": 2, "committing": None}).action == "rollback"


def test_a_seal_the_agent_never_heard_of_is_rolled_back() -> None:
    # the daemon sealed the disk and died before its "sealed" heartbeat: it never fired the checkpoint
    d = FailoverDecider()
    sealed_then(d, 4, t=10.0)
    d.message(Heartbeat(10.2, 4, "committed"), 0.0)
    d.secondary_event("RESUME", 10.1)
    decision = d.disk_decision({"sealed": [5], "committed": 4, "committing": None})
    assert (decision.action, decision.epoch) == ("rollback", 5)


def test_nothing_sealed_means_no_disk_action() -> None:
    d = FailoverDecider()
    sealed_then(d, 4, t=10.0)
    d.secondary_event("RESUME", 10.1)
    assert d.disk_decision({"sealed": [], "committed": 4, "committing": None}).action == "none"
    assert d.disk_decision({"sealed": [4], "committed": 3, "committing": 4}).action == "none"


def test_repeated_sealed_heartbeats_keep_the_first_seal_time() -> None:
    # the 100 ms heartbeat repeats "sealed" while the checkpoint runs: the seal time must not move
    d = FailoverDecider()
    sealed_then(d, 9, t=20.0)
    d.secondary_event("RESUME", 20.05)
    sealed_then(d, 9, t=20.1)
    assert d.seal_times[9] == 20.0
    assert d.disk_decision({"sealed": [9], "committed": 8, "committing": None}).action == "commit"


@given(
    seal=st.floats(0, 1000),
    resumes=st.lists(st.floats(0, 1000), max_size=5),
    colo_exit=st.none() | st.floats(0, 1000),
)
def test_commit_exactly_when_a_resume_falls_between_seal_and_exit(
    seal: float, resumes: list[float], colo_exit: float | None
) -> None:
    d = FailoverDecider()
    sealed_then(d, 1, t=seal)
    if colo_exit is not None:
        d.colo_exit = colo_exit
    for t in resumes:
        d.secondary_event("RESUME", t)
    end = colo_exit if colo_exit is not None else float("inf")
    expected = "commit" if any(seal < t < end for t in resumes) else "rollback"
    assert d.disk_decision({"sealed": [1], "committed": 0, "committing": None}).action == expected


def test_agent_cli_refuses_a_bad_config(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(agent_command, ["--config", str(tmp_path / "missing.json")])
    assert result.exit_code == 1 and "cannot read" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = runner.invoke(agent_command, ["--config", str(bad)])
    assert result.exit_code == 1 and "not valid JSON" in result.output
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"workdir": str(tmp_path)}))
    result = runner.invoke(agent_command, ["--config", str(partial)])
    assert result.exit_code == 1 and "has no 'netns'" in result.output


def test_silence_is_not_judged_right_after_the_agent_itself_stalled() -> None:
    d = FailoverDecider(silence_limit=0.5)
    d.message(Heartbeat(1.0, 1, "committed"), 10.0)
    assert d.check(10.05) is None
    # the agent was descheduled for 2 s: the heartbeats of that time are still unread in its socket
    assert d.check(12.05) is None
    d.message(Heartbeat(3.0, 1, "committed"), 12.06)
    assert d.check(12.1) is None
    # a real silence still fires once the agent runs normally again
    assert d.check(12.4) is None
    reason = d.check(12.6)
    assert reason is not None and "silent" in reason


# ------------------------------------------------------------------ issue 5: the failover must not hang
class QueueBackedSecondary:
    """Stands in for the secondary's QMP session (not the thing under test: the agent's watcher is).
    Its ``wait_event`` has the shape of ``mc_driver.qmp.QmpSession.wait_event``: ``asyncio.wait_for``
    on the event listener's queue, bounded by the timeout."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    async def wait_event(self, names: Any, *, timeout: float) -> Event:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise QmpTimeout("no event") from None


def test_the_watcher_stops_when_an_event_lands_with_the_cancellation() -> None:
    """The race behind the 3-in-20 hung failovers: an event arriving in the same loop iteration as the
    watcher's cancellation.  Python 3.11's wait_for then returns the event and drops the cancel, so the
    old ``watcher.cancel(); await watcher`` never returned.  Deterministic: both happen in one tick."""

    async def scenario() -> tuple[bool, bool, float]:
        # first show that the race is real with the plain cancel (on this Python)
        plain = QueueBackedSecondary()
        old_agent = Agent(manifest_for(Path("/run/hft-pair")), 0.5)
        old_style = asyncio.create_task(old_agent._watch_secondary(plain))
        await asyncio.sleep(0.01)
        plain.events.put_nowait(Event("RESUME", {}, 1.0, 1.0))
        old_style.cancel()
        done, _ = await asyncio.wait({old_style}, timeout=0.6)
        plain_cancel_ended = bool(done)
        old_agent._stop_watching.set()  # let it end before the loop closes
        await asyncio.wait({old_style}, timeout=1.0)

        secondary = QueueBackedSecondary()
        agent = Agent(manifest_for(Path("/run/hft-pair")), 0.5)
        watcher = asyncio.create_task(agent._watch_secondary(secondary))
        await asyncio.sleep(0.01)
        secondary.events.put_nowait(Event("RESUME", {}, 2.0, 2.0))
        started = time.monotonic()
        ended = await agent.stop_watcher(watcher, Timeline())
        return plain_cancel_ended, ended, time.monotonic() - started

    plain_cancel_ended, ended, took = asyncio.run(scenario())
    if sys.version_info < (3, 12):  # 3.12's wait_for no longer loses the cancellation
        assert not plain_cancel_ended, "the race did not reproduce: the regression test proves nothing"
    assert ended
    assert took <= WATCHER_STOP_TIMEOUT


def test_a_disk_step_that_never_answers_is_reported_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def scenario() -> tuple[str, float]:
        async def dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
            await asyncio.Event().wait()  # a disk server that hangs on this verb
            return {}

        endpoint = f"unix:{tmp_path / 'disk-ctl.sock'}"
        server = await serve_control(endpoint, dispatch)
        started = time.monotonic()
        try:
            await _disk_call(endpoint, "rollback")
        except DiskStepError as exc:
            return str(exc), time.monotonic() - started
        finally:
            server.close()
        return "", 0.0

    monkeypatch.setitem(DISK_STEP_TIMEOUTS, "rollback", 0.2)
    message, took = asyncio.run(scenario())
    assert message.startswith("rollback: no answer within 0.2 s")
    assert took < 2.0


def test_an_absent_disk_server_is_a_disk_step_error(tmp_path: Path) -> None:
    with pytest.raises(DiskStepError, match="status: cannot connect"):
        asyncio.run(_disk_call(f"unix:{tmp_path / 'nobody.sock'}", "status"))


def _disk_buffer(tmp_path: Path) -> Any:
    from disk_buffer.buffer import DiskBuffer, Export

    image = tmp_path / "replica.img"
    image.write_bytes(bytes(1 << 20))
    buffer = DiskBuffer.open(image, tmp_path / "state")
    buffer.write(Export.REPLICA, 0, b"p" * 4096)  # a primary write of the open epoch
    return buffer


def test_the_agent_and_the_daemon_rolling_back_the_same_epoch_is_not_an_error(tmp_path: Path) -> None:
    """A real disk buffer; the daemon's rollback lands between the agent's status and its rollback (the
    race of failover-2 in the bench).  The agent sees the disk already where it wanted it, and the disk
    failover still runs (it used to be skipped after any refused disk step)."""

    async def scenario() -> tuple[DiskDecision, list[str], Timeline, dict[str, Any]]:
        from disk_buffer.server import make_control_dispatch

        buffer = _disk_buffer(tmp_path)
        epoch = buffer.seal()
        real = make_control_dispatch(buffer)

        async def daemon_first(verb: str, args: dict[str, Any]) -> dict[str, Any]:
            if verb == "rollback" and buffer.status()["sealed"]:
                await real("rollback", {})  # the daemon's checkpoint recovery, an instant earlier
            return await real(verb, args)

        endpoint = f"unix:{tmp_path / 'disk-ctl.sock'}"
        server = await serve_control(endpoint, daemon_first)
        decider = FailoverDecider()
        decider.message(Heartbeat(1.0, epoch, "sealed"), 0.0)  # sealed, never loaded
        timeline = Timeline()
        try:
            decision, errors = await _settle_disk(endpoint, decider, timeline)
            await _disk_call(endpoint, "failover")
            status = await _disk_call(endpoint, "status")
        finally:
            server.close()
            await buffer.aclose()
        return decision, errors, timeline, status

    decision, errors, timeline, status = asyncio.run(scenario())
    assert decision.action == "rollback" and errors == []
    assert any("already done" in step for step, _ in timeline.steps)
    assert status["failed_over"] and status["sealed"] == []


def test_disk_settled_says_whether_the_decision_already_holds() -> None:
    commit5, rollback5 = DiskDecision("commit", 5), DiskDecision("rollback", 5)
    assert disk_settled(commit5, {"committed": 5, "sealed": [], "committing": None})
    assert not disk_settled(commit5, {"committed": 4, "sealed": [5], "committing": None})
    assert not disk_settled(commit5, {"committed": 4, "sealed": [5], "committing": 5})
    assert disk_settled(rollback5, {"committed": 4, "sealed": [], "committing": None})
    # the epoch the agent wanted dropped was committed instead: that is a conflict, not settled
    assert not disk_settled(rollback5, {"committed": 5, "sealed": [], "committing": None})
    assert not disk_settled(rollback5, {"committed": 4, "sealed": [5], "committing": None})
