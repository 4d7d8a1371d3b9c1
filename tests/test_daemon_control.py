"""The daemon's control API and the operator CLI (status, mode, failover) over a real control socket,
plus pair.json errors.  No QEMU: the daemon object serves its control verbs before any pair exists
(state "starting"), which is exactly what an operator may hit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.daemon import Daemon
from controller.daemon_config import DaemonConfig, DaemonError
from controller.operator_cli import failover_command, mode_command, status_command
from controller.pair_state import PairState
from controller.requests import resolve_stop_via
from hybridft_common.control import ControlError, call, serve_control
from hybridft_common.vocabulary import Mode, StopVia
from mc_driver.qmp import Event
from tests.test_manifest import manifest_for


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Daemon]]:
    endpoint = f"unix:{tmp_path / 'daemon.ctl'}"
    daemon = Daemon(DaemonConfig(primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control=endpoint))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        server = await serve_control(endpoint, daemon.dispatch)
        ready.set()
        await stop.wait()
        server.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    manifest_for(tmp_path, daemon_control=endpoint).write(tmp_path / "pair.json")
    yield endpoint, daemon
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def test_status_text_and_json(served: tuple[str, Daemon], tmp_path: Path) -> None:
    endpoint, _ = served
    runner = CliRunner()
    text = runner.invoke(status_command, ["--workdir", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "state            starting" in text.output and "not fired by the daemon" in text.output
    as_json = runner.invoke(status_command, ["--control", endpoint, "--json"])
    status = json.loads(as_json.output)
    assert status["mode"] == "mc" and status["unrequested_stops"] == 0 and status["protected"] is False


def test_mode_is_pending_until_a_checkpoint(served: tuple[str, Daemon], tmp_path: Path) -> None:
    endpoint, daemon = served
    result = CliRunner().invoke(
        mode_command, ["colo", "--epoch-ms", "200", "--config", str(tmp_path / "pair.json")]
    )
    assert result.exit_code == 0, result.output
    assert result.output == "mode colo (epoch 200 ms) at the next checkpoint\n"
    status = call(endpoint, "status")
    assert status["mode"] == "mc" and status["pending_mode"] == "colo"
    assert status["pending"] == {
        "mode": "colo",
        "epoch_ms": 200,
        "passive_secondary": False,
        "stop_via": "qmp",
        "source": "operator",
    }
    assert daemon.protocol.pending is not None and daemon.protocol.pending.mode is Mode.COLO
    assert daemon.scheduler.pending["mode-switch"] == 1


def test_refused_requests_are_clear_and_change_nothing(served: tuple[str, Daemon]) -> None:
    endpoint, daemon = served
    for verb, args, code in (
        ("mode", {"mode": "fast"}, "bad-args"),
        ("mode", {"mode": "mc", "epoch_ms": 0}, "bad-args"),
        ("mode", {"mode": "mc", "passive_secondary": "yes"}, "bad-args"),
        ("mode", {"mode": "mc", "stop_via": "magic"}, "bad-args"),
        ("mode", {"mode": "mc", "stop_via": "qemu"}, "bad-args"),  # this daemon saw no seal hook
        ("checkpoint", {}, "not-protected"),
        ("checkpoint", {"timeout": -1}, "bad-args"),
        ("failover", {}, "not-protected"),
        ("reboot", {}, "bad-verb"),
    ):
        with pytest.raises(ControlError) as info:
            call(endpoint, verb, **args)
        assert info.value.code == code, (verb, args, info.value.message)
    assert daemon.protocol.pending is None and not daemon.scheduler.pending
    assert daemon.protocol.point.stop_via is StopVia.QMP
    with pytest.raises(ControlError, match="needs QEMUs with x-colo-expect-seal"):
        call(endpoint, "mode", mode="mc", stop_via="qemu")
    failover = CliRunner().invoke(failover_command, ["--control", endpoint])
    assert failover.exit_code == 1 and "nothing to fail over to" in failover.output
    unreachable = CliRunner().invoke(status_command, ["--control", "unix:/nonexistent/daemon.ctl"])
    assert unreachable.exit_code == 2 and "cannot reach the daemon" in unreachable.output
    assert CliRunner().invoke(status_command, []).exit_code == 2  # no pair named: usage error


def test_stop_via_is_chosen_by_what_the_primary_offers_and_switchable(served: tuple[str, Daemon]) -> None:
    endpoint, daemon = served
    assert resolve_stop_via("auto", daemon.seal_hook) is StopVia.QMP  # stock QEMU: no seal hook
    daemon.seal_hook = True  # what _resolve_stop_via finds on the patched build
    assert resolve_stop_via("auto", daemon.seal_hook) is StopVia.QEMU
    reply = call(endpoint, "mode", mode="mc", stop_via="qemu")
    assert reply["applies"] == "at the next checkpoint" and reply["pending"]["stop_via"] == "qemu"
    # like every part of the operating point it waits for a checkpoint boundary (one is asked for)
    status = call(endpoint, "status")
    assert status["stop_via"] == "qmp" and status["pending"]["stop_via"] == "qemu"
    assert daemon.protocol.pending is not None and daemon.protocol.pending.stop_via is StopVia.QEMU
    assert daemon.scheduler.pending["mode-switch"] == 1
    result = CliRunner().invoke(mode_command, ["mc", "--stop-via", "qmp", "--control", endpoint])
    assert result.exit_code == 0, result.output
    assert result.output == "mode mc (epoch 50 ms) now (already so)\n"  # the request is withdrawn
    assert daemon.protocol.pending is None and daemon.protocol.point.stop_via is StopVia.QMP
    text = CliRunner().invoke(status_command, ["--control", endpoint]).output
    assert "checkpoint stops via qmp (QEMU can wait for the seal)" in text
    with pytest.raises(ValueError, match="must be 'auto', 'qemu' or 'qmp'"):
        resolve_stop_via("fast", daemon.seal_hook)


def test_metrics_exposition(served: tuple[str, Daemon]) -> None:
    endpoint, daemon = served
    daemon.metrics.pause.labels(mode="colo").observe(0.05)
    text = call(endpoint, "metrics")["text"]
    assert 'hybridft_checkpoint_pause_seconds_count{mode="colo"} 1.0' in text
    assert 'hybridft_mode{mode="mc"} 1.0' in text


def test_pair_json_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="cannot read"):
        DaemonConfig.from_pair_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(DaemonError, match="is not valid JSON"):
        DaemonConfig.from_pair_json(bad)
    bad.write_text(json.dumps({"workdir": str(tmp_path), "qmp": {"primary": {"daemon": "unix:/p"}}}))
    with pytest.raises(DaemonError, match="has no 'netns'"):
        DaemonConfig.from_pair_json(bad)
    manifest = manifest_for(tmp_path)
    monitors = dataclasses.replace(manifest.qmp.primary, daemon="tcp:h:1")
    dataclasses.replace(manifest, qmp=dataclasses.replace(manifest.qmp, primary=monitors)).write(bad)
    with pytest.raises(DaemonError, match="unix:PATH"):
        DaemonConfig.from_pair_json(bad)
    good = tmp_path / "pair.json"
    manifest = dataclasses.replace(
        manifest, mode=Mode.COLO, epoch_ms=30, pids=dataclasses.replace(manifest.pids, primary=5)
    )
    manifest.write(good)
    config = DaemonConfig.from_pair_json(good)
    assert config.primary_qmp == str(tmp_path / "primary-daemon.qmp")
    assert (config.mode, config.epoch_ms) == (Mode.COLO, 30)
    assert config.primary_pid == 5 and config.secondary_pid is None
    assert config.migrate_uri == f"unix:{tmp_path / 'migrate.sock'}"
    assert config.stop_via == "auto" and config.heartbeat == manifest.heartbeat
    dataclasses.replace(manifest, stop_via="qmp").write(good)
    assert DaemonConfig.from_pair_json(good).stop_via == "qmp"


def test_close_ends_the_loops_even_when_their_cancellation_is_lost(tmp_path: Path) -> None:
    """Python 3.11's asyncio.wait_for drops a cancellation that lands in the same loop iteration as
    what it awaited, and every checkpoint step is a wait_for: close() must not depend on the cancel
    (it waited its full 10 s bound, then logged the epoch loop as stuck, in 3 of 5 test runs)."""

    class LostCancel(asyncio.Task):  # type: ignore[type-arg]
        """The first cancellation is lost, as wait_for can lose it; later ones work."""

        lost = False

        def cancel(self, msg: object = None) -> bool:
            if not self.lost:
                self.lost = True
                return False
            return super().cancel(msg)

    async def scenario() -> tuple[bool, float]:
        control = f"unix:{tmp_path / 'daemon.ctl'}"
        config = DaemonConfig(primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control=control)
        daemon = Daemon(config)
        loop = LostCancel(daemon._epoch_loop(), loop=asyncio.get_running_loop())
        daemon._tasks = [loop]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await daemon.close()
        return loop.done(), time.monotonic() - started

    ended, took = asyncio.run(scenario())
    assert ended and took < 1.0


class FakeSession:
    """What the daemon needs of a QMP session here: queued events and recorded commands."""

    def __init__(self, name: str, events: list[Event]) -> None:
        self.name = name
        self.queued = events
        self.commands: list[str] = []
        self.connected = True

    def events(self) -> list[Event]:
        taken, self.queued = self.queued, []
        return taken

    async def execute(self, command: str, arguments: object = None, **kwargs: object) -> dict[str, object]:
        self.commands.append(command)
        return {"running": True} if command == "query-status" else {"mode": "none", "last-mode": "none"}


def test_a_colo_exit_seen_as_a_checkpoint_starts_ends_replication_instead(tmp_path: Path) -> None:
    """The pair broke between checkpoints and the next checkpoint is the first to look: its COLO_EXIT
    was counted as part of that checkpoint and ignored, and the fire then waited its whole timeout
    for a RESUME that a QEMU out of COLO never sends (found with 50 ms MC epochs)."""

    async def scenario() -> tuple[Daemon, FakeSession]:
        config = DaemonConfig(
            primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control=f"unix:{tmp_path / 'd.ctl'}"
        )
        daemon = Daemon(config)
        colo_exit = Event("COLO_EXIT", {"mode": "primary", "reason": "error"}, time.time(), time.time())
        primary = FakeSession("primary", [colo_exit])
        daemon.attach(primary, FakeSession("secondary", []))  # type: ignore[arg-type]
        daemon.state = PairState.PROTECTED
        waiter = asyncio.ensure_future(daemon.request_checkpoint("operator", timeout=5))
        await asyncio.sleep(0)  # the request is registered
        with pytest.raises(ControlError, match="COLO ended before this checkpoint could start"):
            await daemon.checkpoint({"timer": 1})
        with pytest.raises(ControlError, match="COLO ended"):
            await waiter  # a caller waiting for a checkpoint hears it at once
        await asyncio.gather(*daemon._tasks)  # the replication-ended handling it scheduled
        return daemon, primary

    daemon, primary = asyncio.run(scenario())
    assert daemon.accounting.checkpoints_started == 0 and daemon.state is PairState.UNPROTECTED
    assert "x-colo-lost-heartbeat" in primary.commands and "migrate-set-parameters" not in primary.commands


def test_close_lets_a_checkpoint_in_flight_finish(tmp_path: Path) -> None:
    """Cancelled half-way (after the seal, say) a checkpoint leaves sealed epochs behind, or the VMs
    stopped; a daemon that is asked to stop finishes the one in flight and starts no other."""

    async def scenario() -> list[str]:
        config = DaemonConfig(
            primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control=f"unix:{tmp_path / 'd.ctl'}"
        )
        daemon = Daemon(config)
        daemon.state = PairState.PROTECTED
        log: list[str] = []

        async def slow_checkpoint(reasons: object) -> None:
            log.append("started")
            await asyncio.sleep(0.5)
            log.append("finished")

        daemon.checkpoint = slow_checkpoint  # type: ignore[assignment,method-assign]
        daemon._tasks = [asyncio.create_task(daemon._epoch_loop(), name="epochs")]
        daemon.scheduler.request("operator")
        daemon._wake.set()
        await asyncio.sleep(0.1)
        daemon.scheduler.request("operator")  # another one due: it must not start
        await daemon.close()
        return log

    assert asyncio.run(scenario()) == ["started", "finished"]
