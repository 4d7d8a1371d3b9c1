"""Issue 12, failover order: the agent fails the secondary over first, waits for its COLO_EXIT, and only
then decides the disk; it commits sealed epochs oldest first; it never resumes a VM whose disk step
failed (after retrying within a bound).

The secondary here is a stand-in with the shape of ``mc_driver.qmp.QmpSession`` (``execute``,
``wait_event``) that behaves as QEMU's ``migration/colo.c`` does when ``x-colo-lost-heartbeat`` lands
in the middle of loading a checkpoint: the load finishes, the VM resumes (``RESUME``), and only then is
the failover carried out (``COLO_EXIT``).  The disk server is the real :class:`DiskBuffer` behind the
real control dispatch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from controller import agent as agent_module
from controller.agent import FailoverDecider, Timeline, _settle_disk, fail_over
from controller.heartbeat import Heartbeat
from disk_buffer.buffer import DiskBuffer, Export
from hybridft_common.control import ControlError, serve_control
from mc_driver.qmp import Event, QmpCommandError, QmpTimeout
from tests.test_manifest import manifest_for


class LoadingSecondary:
    """A COLO secondary that is loading a checkpoint when the failover request comes (``loading``), or
    idle (then COLO_EXIT follows the request at once)."""

    def __init__(self, *, loading: bool, load_left: float = 0.3, running: bool = True) -> None:
        self.loading = loading
        self.load_left = load_left
        self.running = running
        self.in_colo = True
        self.incoming = "colo"  # query-migrate (incoming side); its yank instance lives until "completed"
        self.commands: list[str] = []
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    async def _finish_load_then_fail_over(self) -> None:
        if self.loading:
            await asyncio.sleep(self.load_left)  # colo.c: the load finishes first (RELAUNCH) ...
            now = time.time()
            self.running = True
            self.events.put_nowait(Event("RESUME", {}, now, now))
        await asyncio.sleep(0.01)
        now = time.time()
        self.in_colo = False  # ... and only then does the failover run
        self.events.put_nowait(Event("COLO_EXIT", {"mode": "secondary", "reason": "request"}, now, now))
        await asyncio.sleep(0.01)
        self.running = True  # process_incoming_migration_bh: vm_start, then the migration ends
        self.incoming = "completed"

    async def execute(self, command: str, arguments: Any = None, **args: Any) -> Any:
        self.commands.append(command)
        if command == "x-colo-lost-heartbeat":
            if not self.in_colo:
                raise QmpCommandError(command, "GenericError", "VM is not in COLO mode")
            asyncio.get_running_loop().create_task(self._finish_load_then_fail_over())
            return {}
        if command == "query-status":
            return {"running": self.running, "status": "running" if self.running else "paused"}
        if command == "query-colo-status":
            return {"mode": "secondary" if self.in_colo else "none", "last-mode": "secondary"}
        if command == "query-migrate":
            return {"status": self.incoming}
        if command == "query-yank":
            return [{"type": "chardev", "id": "qmp-agent"}] + (
                [{"type": "migration"}] if self.incoming != "completed" else []
            )
        if command == "stop":
            self.running = False
        elif command == "cont":
            self.running = True
        return {}

    async def wait_event(self, names: Any, *, timeout: float) -> Event:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise QmpTimeout("no event") from None


class ErroredSecondary(LoadingSecondary):
    """A secondary that left COLO by itself with an error before the agent acted (the primary died in
    the middle of a checkpoint): QEMU sent ``COLO_EXIT`` (``error``) but its incoming thread is parked
    until a failover request, so it is still a COLO secondary (migration ``colo``, its yank instance
    registered), and only ``x-colo-lost-heartbeat`` ends that (migration/colo.c, 7.2)."""

    def __init__(self) -> None:
        super().__init__(loading=False)
        self.running = True

    async def _finish_load_then_fail_over(self) -> None:
        await asyncio.sleep(0.01)
        self.in_colo = False  # no second COLO_EXIT: the thread sent its one already
        await asyncio.sleep(0.01)
        self.incoming = "completed"


def _disk_buffer(tmp_path: Path) -> DiskBuffer:
    image = tmp_path / "replica.img"
    image.write_bytes(bytes(1 << 20))
    return DiskBuffer.open(image, tmp_path / "state")


async def _serve(buffer: DiskBuffer, endpoint: str, refuse: dict[str, int] | None = None) -> asyncio.Server:
    """The disk server's control socket; ``refuse`` = how many times each verb is refused first."""
    from disk_buffer.server import make_fenced_control_dispatch

    real = make_fenced_control_dispatch(buffer)
    left = dict(refuse or {})

    async def dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
        if left.get(verb, 0) > 0:
            left[verb] -= 1
            raise ControlError(f"{verb} refused (test)", "io")
        return await real(verb, args)

    return await serve_control(endpoint, dispatch)


def test_a_checkpoint_still_loading_at_failover_is_committed(tmp_path: Path) -> None:
    """Sealed epoch N; the secondary is loading N when the agent fails it over.  QEMU finishes the load
    (memory at N) before it leaves COLO, so the disk must be committed at N, not rolled back to N-1."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        buffer = _disk_buffer(tmp_path)
        buffer.write(Export.REPLICA, 0, b"n" * 4096)
        epoch = buffer.seal()
        config = manifest_for(tmp_path)
        server = await _serve(buffer, config.disk_control)
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), epoch, "sealed"), 0.0)
        secondary = LoadingSecondary(loading=True)
        try:
            report = await fail_over(config, decider, secondary, Timeline())
            status = buffer.status()
        finally:
            server.close()
            await buffer.aclose()
        return report, status, secondary.commands

    report, status, commands = asyncio.run(scenario())
    assert report["disk"]["action"] == "commit", report
    assert status["committed"] == report["disk"]["epoch"] and status["failed_over"], status
    assert commands.index("x-colo-lost-heartbeat") < commands.index("stop")
    assert report["resumed"] and report["colo_exit_seen"]


def test_a_secondary_that_left_colo_with_an_error_is_still_failed_over(tmp_path: Path) -> None:
    """The watcher saw the secondary's COLO_EXIT (error) before the failover began.  The agent must still
    send x-colo-lost-heartbeat and wait for the incoming migration to end: skipping it left the survivor
    in migration state ``colo`` for good, and re-protection's ``migrate`` then failed with "duplicate
    yank instance" (2 of 3 re-protection tests in the suite of 2026-12-05)."""

    async def scenario() -> tuple[dict[str, Any], ErroredSecondary]:
        buffer = _disk_buffer(tmp_path)
        config = manifest_for(tmp_path)
        server = await _serve(buffer, config.disk_control)
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), 3, "committed"), 0.0)
        decider.secondary_event("COLO_EXIT", time.time())  # read by the watcher, before the failover
        secondary = ErroredSecondary()
        try:
            report = await fail_over(config, decider, secondary, Timeline())
        finally:
            server.close()
            await buffer.aclose()
        return report, secondary

    report, secondary = asyncio.run(scenario())
    assert "x-colo-lost-heartbeat" in secondary.commands, secondary.commands
    assert secondary.incoming == "completed" and report["incoming_migration_ended"], report
    # the VM is stopped only once QEMU's own resume after the failover is behind it
    assert secondary.commands.index("query-yank") < secondary.commands.index("stop"), secondary.commands
    assert report["resumed"] and secondary.running, report
    assert not [e for e in report["errors"] if "incoming" in e or "lost-heartbeat" in e], report["errors"]


def test_sealed_epochs_are_committed_oldest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sealed epochs (a commit of the first failed, the next checkpoint sealed again), the secondary
    loaded both: the server commits strictly in order, so the agent commits N-1 then N."""
    monkeypatch.setattr(agent_module, "DISK_RETRY_WINDOW", 0.0, raising=False)

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        buffer = _disk_buffer(tmp_path)
        endpoint = f"unix:{tmp_path / 'disk-ctl.sock'}"
        buffer.write(Export.REPLICA, 0, b"a" * 4096)
        first = buffer.seal()
        buffer.write(Export.REPLICA, 4096, b"b" * 4096)
        second = buffer.seal()
        server = await _serve(buffer, endpoint)
        decider = FailoverDecider()
        decider.message(Heartbeat(10.0, first, "sealed"), 0.0)
        decider.message(Heartbeat(11.0, second, "sealed"), 0.0)
        decider.secondary_event("RESUME", 11.5)  # loaded the second, so the first too
        try:
            _decision, errors = await _settle_disk(endpoint, decider, Timeline())
            status = buffer.status()
        finally:
            server.close()
            await buffer.aclose()
        return errors, status

    errors, status = asyncio.run(scenario())
    assert errors == []
    assert status["committed"] == 2 and status["sealed"] == [], status


def test_a_failed_disk_step_keeps_the_secondary_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No disk server answers: the disk is in an unknown state, so the secondary must not run (it was
    running as a COLO secondary: the agent stops it) and the report says so."""
    monkeypatch.setattr(agent_module, "DISK_RETRY_WINDOW", 0.6, raising=False)

    async def scenario() -> tuple[dict[str, Any], LoadingSecondary]:
        config = manifest_for(tmp_path)  # nothing listens on its disk_control
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), 3, "sealed"), 0.0)
        secondary = LoadingSecondary(loading=False)
        report = await fail_over(config, decider, secondary, Timeline())
        return report, secondary

    report, secondary = asyncio.run(scenario())
    assert not secondary.running and "cont" not in secondary.commands
    assert report["resumed"] is False and "disk step failed" in report["kept_paused"], report
    assert sum("disk decision failed" in step for step, _ in report["steps"]) >= 2  # it retried


def test_a_disk_step_that_fails_once_is_retried_and_the_secondary_resumes(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], LoadingSecondary]:
        buffer = _disk_buffer(tmp_path)
        config = manifest_for(tmp_path)
        server = await _serve(buffer, config.disk_control, refuse={"failover": 2})
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), 1, "committed"), 0.0)
        secondary = LoadingSecondary(loading=False)
        try:
            report = await fail_over(config, decider, secondary, Timeline())
            status = buffer.status()
        finally:
            server.close()
            await buffer.aclose()
        return report, status, secondary

    report, status, secondary = asyncio.run(scenario())
    assert status["failed_over"], status
    assert report["resumed"] and secondary.running, report


def test_the_agent_stands_down_when_the_daemon_runs_the_primary_alone() -> None:
    """The daemon declared the secondary lost and ends COLO on the primary, which makes the secondary
    leave COLO too: that COLO_EXIT, and the daemon's later death, must not make the agent fence the only
    live copy (the primary) for a stale secondary."""
    d = FailoverDecider(silence_limit=0.5)
    d.message(Heartbeat(1.0, 4, "committed"), 1.0)
    d.message(Heartbeat(1.1, 4, None, unprotected=True), 1.1)
    d.secondary_event("COLO_EXIT", 1.2)
    d.connection_closed(1.3)
    assert d.check(5.0) is None and d.stood_down


def test_status_says_loudly_that_the_secondary_was_kept_paused(tmp_path: Path) -> None:
    """The daemon is gone with the primary; `hybridft status` still tells the operator what the agent
    did, above all that it did NOT resume the secondary, and why."""
    import json

    from click.testing import CliRunner

    from controller.operator_cli import status_command

    manifest = manifest_for(tmp_path)
    manifest.write(tmp_path / "pair.json")
    report = {"reason": "primary lost (daemon)", "resumed": False, "kept_paused": "disk step failed: x"}
    manifest.failover_report.write_text(json.dumps(report))
    result = CliRunner().invoke(status_command, ["--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "SECONDARY KEPT PAUSED: disk step failed: x" in result.output


def test_failover_json_is_replaced_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """failover.json is what an operator reads after a crash: written to a temporary file, fsynced,
    renamed, and the directory fsynced (so is pair.json, through the same helper)."""
    import os

    from controller.agent import _write_report

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    config = manifest_for(tmp_path)
    _write_report(config, {"reason": "test"})
    config.write(tmp_path / "pair.json")
    assert synced == [
        str(tmp_path / "failover.json.tmp"),
        str(tmp_path),
        str(tmp_path / "pair.json.tmp"),
        str(tmp_path),
    ]
    assert (tmp_path / "failover.json").read_text().startswith("{")


def test_a_qmp_step_that_hangs_is_reported_as_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """``str(TimeoutError())`` is empty: the report said ``stop: `` for a stop that hung."""
    monkeypatch.setattr(agent_module, "QMP_STEP_TIMEOUT", 0.05)

    class Hanging:
        async def execute(self, command: str, arguments: Any = None, **args: Any) -> Any:
            await asyncio.sleep(10)

    errors: list[str] = []
    timeline = Timeline()
    assert asyncio.run(agent_module._qmp_step(Hanging(), timeline, errors, "stop")) is None
    assert errors == ["stop: timed out"]
    assert timeline.steps[-1][0] == "stop failed (timed out)"


class StockSecondary(LoadingSecondary):
    """QEMU without patch 0010: ``x-colo-lost-heartbeat`` takes no arguments."""

    def __init__(self) -> None:
        super().__init__(loading=False)
        self.asked: list[Any] = []

    async def execute(self, command: str, arguments: Any = None, **args: Any) -> Any:
        if command == "x-colo-lost-heartbeat":
            self.asked.append(arguments)
            if arguments:
                raise QmpCommandError(command, "GenericError", "Parameter 'keep-paused' is unexpected")
        return await super().execute(command, arguments, **args)


def test_the_agent_asks_qemu_to_keep_the_vm_paused_and_falls_back_on_a_stock_qemu(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], list[Any], list[str]]:
        buffer = _disk_buffer(tmp_path)
        config = manifest_for(tmp_path)
        server = await _serve(buffer, config.disk_control)
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), 3, "committed"), 0.0)
        secondary = StockSecondary()
        try:
            report = await fail_over(config, decider, secondary, Timeline())
        finally:
            server.close()
            await buffer.aclose()
        return report, secondary.asked, secondary.commands

    report, asked, commands = asyncio.run(scenario())
    assert asked == [{"keep-paused": True}, None]  # asked to keep it paused, then as stock QEMU takes it
    steps = [step for step, _ in report["steps"]]
    assert "x-colo-lost-heartbeat: QEMU cannot keep the VM paused (no patch 0010)" in steps, steps
    assert report["colo_exit_seen"] and report["resumed"], report
    assert commands.index("query-yank") < commands.index("stop")  # QEMU resumed it: the agent stops it
