"""Issue 12: the daemon never resumes a primary the agent may have fenced, nor releases held output,
when it does not know whether the secondary took over.

The daemon's QMP sessions and the comparator are stand-ins that record what they were asked; the disk
server is the real :class:`DiskBuffer` behind the real control dispatch.  What is under test is the
daemon's loss handling (``_replication_ended``, ``_count_events``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from controller import daemon as daemon_module
from controller.daemon import Daemon
from controller.daemon_config import DaemonConfig
from controller.pair_state import PairState
from disk_buffer.buffer import DiskBuffer
from hybridft_common.control import serve_control
from mc_driver.qmp import Event


class FakeQemu:
    """A QMP session: answers every command at once, except ``query-colo-status`` when ``hung``."""

    def __init__(self, name: str, *, hung: bool = False, colo: dict[str, Any] | None = None) -> None:
        self.name = name
        self.hung = hung
        self.colo = colo or {"mode": "secondary", "last-mode": "none"}
        self.commands: list[str] = []
        self.running = True
        self.connected = True

    async def execute(self, command: str, arguments: Any = None, **args: Any) -> Any:
        self.commands.append(command)
        if command == "query-colo-status":
            if self.hung:
                await asyncio.Event().wait()
            return self.colo
        if command == "query-status":
            return {"running": self.running}
        if command == "stop":
            self.running = False
        elif command == "cont":
            self.running = True
        return {}

    def events(self) -> list[Event]:
        return []


class FakeCompare:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, verb: str, **args: Any) -> dict[str, Any]:
        self.calls.append(verb)
        return {}

    async def close(self) -> None:
        pass


def _daemon(tmp_path: Path, secondary: FakeQemu, disk_control: str | None = None) -> tuple[Daemon, FakeQemu]:
    config = DaemonConfig(
        primary_qmp=str(tmp_path / "p.qmp"),
        secondary_qmp=str(tmp_path / "s.qmp"),
        control=f"unix:{tmp_path / 'ctl.sock'}",
        disk_control=disk_control,
        mirror_job="mirror0",
        failover_report=str(tmp_path / "failover.json"),
    )
    daemon = Daemon(config)
    primary = FakeQemu("primary")
    daemon.primary, daemon.secondary = primary, secondary  # type: ignore[assignment]
    daemon.compare = FakeCompare()  # type: ignore[assignment]
    daemon.state = PairState.PROTECTED
    return daemon, primary


def test_a_secondary_that_does_not_answer_keeps_the_primary_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint failed and the secondary's QEMU hangs (SIGSTOP, a partition): it may be taking over
    right now.  The primary stays stopped, the held output stays held; once it answers (still a COLO
    secondary) the daemon knows the secondary is lost and only then resumes the primary."""
    monkeypatch.setattr(daemon_module, "UNDECIDED_RETRY", 0.05, raising=False)

    async def scenario() -> tuple[str, list[str], list[str], str, list[str]]:
        secondary = FakeQemu("secondary", hung=True)
        daemon, primary = _daemon(tmp_path, secondary)
        task = asyncio.create_task(daemon._replication_ended("checkpoint failed at fire"))
        await asyncio.sleep(2.6)  # past the 2 s bound on query-colo-status
        held_state, held_primary = str(daemon.state), list(primary.commands)
        held_compare = list(daemon.compare.calls)  # type: ignore[union-attr]
        secondary.hung = False  # it answers again: still the secondary, so it did not take over
        await asyncio.wait_for(task, 10)
        assert daemon._beat().unprotected  # every beat from now on tells the agent to stand down
        return held_state, held_primary, held_compare, str(daemon.state), primary.commands

    held_state, held_primary, held_compare, final_state, primary_commands = asyncio.run(scenario())
    assert held_state == "undecided"
    assert "cont" not in held_primary and "stop" in held_primary
    assert "release-all" not in held_compare
    assert final_state == "unprotected" and primary_commands[-1] == "cont"


def test_a_mirror_job_error_after_the_disk_failed_over_is_a_takeover(tmp_path: Path) -> None:
    """The agent failed the disk over, which ends the primary's mirror job with an error: that is the
    secondary taking over, not the secondary lost -- the primary must stay stopped."""

    async def scenario() -> tuple[str, list[str], list[str]]:
        image = tmp_path / "replica.img"
        image.write_bytes(bytes(1 << 20))
        buffer = DiskBuffer.open(image, tmp_path / "state")
        await buffer.failover()
        from disk_buffer.server import make_control_dispatch

        endpoint = f"unix:{tmp_path / 'disk-ctl.sock'}"
        server = await serve_control(endpoint, make_control_dispatch(buffer))
        # the secondary's QEMU still reports COLO (the agent's QMP step is yet to come)
        daemon, primary = _daemon(tmp_path, FakeQemu("secondary"), endpoint)
        try:
            now = time.time()
            error = Event("BLOCK_JOB_ERROR", {"device": "mirror0", "operation": "write"}, now, now)
            daemon._count_events(primary, [error])  # type: ignore[arg-type]
            await asyncio.wait_for(asyncio.gather(*daemon._tasks), 10)
        finally:
            server.close()
            await buffer.aclose()
        return str(daemon.state), primary.commands, daemon.compare.calls  # type: ignore[union-attr]

    state, primary_commands, compare_calls = asyncio.run(scenario())
    assert state == "failed-over"
    assert "cont" not in primary_commands and "release-all" not in compare_calls


def test_the_agents_started_marker_is_a_takeover(tmp_path: Path) -> None:
    """The agent began failing over (its marker is written before its first step) and the secondary's
    QEMU does not say so yet: the primary stays stopped."""

    async def scenario() -> tuple[str, list[str]]:
        daemon, primary = _daemon(tmp_path, FakeQemu("secondary"))
        (tmp_path / "failover-started.json").write_text("{}\n")  # the agent of this daemon's pair
        await daemon._replication_ended("COLO_EXIT on the primary")
        return str(daemon.state), primary.commands

    state, primary_commands = asyncio.run(scenario())
    assert state == "failed-over" and "cont" not in primary_commands


def test_an_agent_that_fired_while_the_secondary_was_declared_lost_wins(tmp_path: Path) -> None:
    """The secondary answers as a COLO secondary (so: lost), but the agent had already begun failing
    over (its marker appears during the stand-down grace): the primary is not resumed, nothing held
    is released."""

    async def scenario() -> tuple[str, list[str], list[str]]:
        daemon, primary = _daemon(tmp_path, FakeQemu("secondary"))
        daemon.config.heartbeat = f"unix:{tmp_path / 'hb.sock'}"
        daemon.heartbeat.endpoint = daemon.config.heartbeat

        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # the "unprotected" beat, read too late: it had fired already
            (tmp_path / "failover-started.json").write_text("{}\n")
            await reader.read()

        server = await asyncio.start_unix_server(agent, path=str(tmp_path / "hb.sock"))
        daemon.heartbeat._connect()
        try:
            await daemon._replication_ended("checkpoint failed at fire")
        finally:
            daemon.heartbeat.close()
            server.close()
        return str(daemon.state), primary.commands, daemon.compare.calls  # type: ignore[union-attr]

    state, primary_commands, compare_calls = asyncio.run(scenario())
    assert state == "failed-over"
    assert "cont" not in primary_commands and "x-colo-lost-heartbeat" not in primary_commands
    assert "release-all" not in compare_calls


def test_without_a_comparator_the_unprotected_primary_talks_to_its_tap_directly(tmp_path: Path) -> None:
    """The comparator was killed: the checkpoint failed, the secondary answers as a COLO secondary, so it
    is lost and the primary runs on alone -- but its output still goes to the dead comparator unless its
    redirectors are removed (the drill saw every client stall)."""

    class DeadCompare(FakeCompare):
        async def call(self, verb: str, **args: Any) -> dict[str, Any]:
            raise ConnectionResetError("Connection lost")

    async def scenario() -> tuple[str, list[str]]:
        daemon, primary = _daemon(tmp_path, FakeQemu("secondary"))
        daemon.config.primary_redirectors = ("rout", "rin")
        daemon.compare = DeadCompare()  # type: ignore[assignment]
        await daemon._replication_ended("checkpoint failed at compare-commit")
        return str(daemon.state), primary.commands

    state, commands = asyncio.run(scenario())
    assert state == "unprotected"
    assert commands.count("object-del") == 2 and "x-colo-lost-heartbeat" in commands


def test_a_marker_left_by_an_earlier_failover_is_history(tmp_path: Path) -> None:
    """A re-protected pair: failover-started.json is still there from the failover before this daemon
    started.  It must not make this daemon keep its primary stopped when its new secondary is lost."""

    async def scenario() -> tuple[str, list[str]]:
        marker = tmp_path / "failover-started.json"
        marker.write_text("{}\n")
        old = time.time() - 3600
        os.utime(marker, (old, old))
        daemon, primary = _daemon(tmp_path, FakeQemu("secondary"))
        await daemon._replication_ended("checkpoint failed at fire")
        return str(daemon.state), primary.commands

    state, commands = asyncio.run(scenario())
    assert state == "unprotected" and "x-colo-lost-heartbeat" in commands
