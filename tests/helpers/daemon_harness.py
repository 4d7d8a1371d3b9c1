"""The daemon against a real COLO pair: the pair, its services and the daemon as pytest fixtures.

A pytest plugin (``tests/conftest.py`` registers it), so every module that needs a pair requests
``harness`` / ``daemon`` and gets its *own* module-scoped pair (test_daemon_qemu.py, and
test_daemon_takeover.py, whose takeover ends the pair's protection).  A module using ``harness``
must define the ``stop_via`` fixture: which way of stopping the VMs its pair uses is the module's
choice (test_daemon_qemu.py runs every test for both).

One pair per module: two QEMUs from :class:`mc_driver.qemu_pair.ColoPair` with ``compare="none"``
plus the external comparator's wiring (filter-mirror, redirectors, rewriter) to a real
``hybridft compare serve`` process, and a real ``hybridft disk serve`` process whose epochs the
daemon seals/commits/rolls back.  The daemon runs in the harness's event loop on its own QMP
monitors; the ColoPair's monitors observe the same QEMU events independently.

The controller and QEMU-side imports are made inside the fixtures: this module is loaded for every
test run, and most runs (the fast lane, one unit-test file) never build a pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from hybridft_common.cli import hybridft_command
from hybridft_common.vocabulary import Mode, StopVia
from tests.helpers.disk_server import start_disk_serve

if TYPE_CHECKING:
    from controller.daemon import Daemon
    from controller.daemon_config import DaemonConfig
    from mc_driver.accel import QemuChoice
    from mc_driver.netns import NetNamespace
    from mc_driver.qemu_pair import ColoPair

T = TypeVar("T")


def external_compare_args(work: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """QEMU filter wiring to an external comparator listening in ``work`` (see compare serve)."""
    primary = (
        "-chardev", f"socket,id=mirror0,path={work / 'mirror.sock'},server=on,wait=off",
        "-chardev", f"socket,id=cmp_out,path={work / 'cmp-out.sock'},reconnect=1",
        "-chardev", f"socket,id=cmp_pri,path={work / 'cmp-pri.sock'},reconnect=1",
        "-object", "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
        "-object", "filter-redirector,id=rin,netdev=hn0,queue=rx,indev=cmp_out",
        "-object", "filter-redirector,id=rout,netdev=hn0,queue=rx,outdev=cmp_pri",
    )  # fmt: skip
    secondary = (
        "-chardev", f"socket,id=red0,path={work / 'mirror.sock'},reconnect=1",
        "-chardev", f"socket,id=red1,path={work / 'cmp-sec.sock'},reconnect=1",
        "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
        "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
        "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all",
    )  # fmt: skip
    return primary, secondary


def start_service(cmd: list[str], log: Path, ready_prefix: bytes) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready_prefix):
        proc.kill()
        pytest.fail(f"{cmd[3:5]} did not start: {line!r}\n{log.read_text()}")
    return proc


class LoopThread:
    """One event loop for the whole module: qemu.qmp connections belong to the loop they were made on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Harness:
    work: Path
    netns: NetNamespace
    pair: ColoPair
    compare_ctl: str
    disk_ctl: str
    services: list[subprocess.Popen[Any]]
    loop: LoopThread
    stop_via: StopVia

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return self.loop.run(coro, timeout)


@pytest.fixture(scope="module")
def tcg_qemu() -> QemuChoice:
    from mc_driver.accel import choose_qemu

    return choose_qemu(build=True, force_accel="tcg")


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, tcg_qemu: QemuChoice, stop_via: StopVia
) -> Iterator[Harness]:
    from mc_driver.guest.image import build_guest
    from mc_driver.guest.qemu_args import guest_cmdline
    from mc_driver.netns import NetNamespace
    from mc_driver.qemu_pair import ColoPair, ColoPairConfig

    work = tmp_path_factory.mktemp("daemon")
    image = build_guest()
    cli = [*hybridft_command()]
    compare_ctl, disk_ctl = f"unix:{work / 'compare.ctl'}", f"unix:{work / 'disk.ctl'}"
    replica = work / "replica.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(replica), "16M"], check=True)
    compare_cmd = [*cli, "compare", "serve", "--mode", "mc", "--control", compare_ctl,
                   "--primary-in", f"unix:{work / 'cmp-pri.sock'}",
                   "--secondary-in", f"unix:{work / 'cmp-sec.sock'}",
                   "--out", f"unix:{work / 'cmp-out.sock'}"]  # fmt: skip
    services: list[subprocess.Popen[Any]] = [start_service(compare_cmd, work / "compare.log", b"ready")]
    disk, _ready = start_disk_serve(replica, work / "disk-state", nbd=f"unix:{work / 'nbd.sock'}",
                                    control=disk_ctl, stderr=work / "disk.log")  # fmt: skip
    services.append(disk)
    primary_extra, secondary_extra = external_compare_args(work)
    config = ColoPairConfig(
        workdir=work,
        image=image,
        qemu=tcg_qemu,
        compare="none",
        cmdline=guest_cmdline(services=["echod"]),
        primary_tap="dqp0",
        secondary_tap="dqs0",
        extra_primary_args=primary_extra,
        extra_secondary_args=secondary_extra,
    )
    loop = LoopThread()
    try:
        with NetNamespace() as netns:
            pair = loop.run(ColoPair.start(config, netns), timeout=300)
            try:
                yield Harness(work, netns, pair, compare_ctl, disk_ctl, services, loop, stop_via)
            finally:
                loop.run(pair.close())
    finally:
        loop.stop()
        for proc in services:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


def daemon_config(h: Harness, **overrides: object) -> DaemonConfig:
    from controller.daemon_config import DaemonConfig

    pair = h.pair
    assert pair.primary_proc is not None and pair.secondary_proc is not None
    config = DaemonConfig(
        primary_qmp=str(pair.paths.qmp_aux("primary")),
        secondary_qmp=str(pair.paths.qmp_aux("secondary")),
        control=f"unix:{h.work / 'daemon.ctl'}",
        compare_control=h.compare_ctl,
        disk_control=h.disk_ctl,
        mode=Mode.MC,
        epoch_ms=60_000,  # effectively manual: the tests ask for checkpoints
        primary_pid=pair.primary_proc.pid,
        secondary_pid=pair.secondary_proc.pid,
        start_colo=False,
        checkpoint_timeout=15.0,
        stop_via=str(h.stop_via),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@contextlib.contextmanager
def running_daemon(harness: Harness, **overrides: object) -> Iterator[Daemon]:
    """A started daemon on the harness's pair (``daemon_config`` with ``overrides``), closed afterwards."""
    from controller.daemon import Daemon

    d = Daemon(daemon_config(harness, **overrides))
    harness.run(d.start())
    try:
        yield d
    finally:

        async def close() -> None:
            await d.close()
            for session in (d.primary, d.secondary):
                if session is not None:
                    await session.close()

        harness.run(close())


@pytest.fixture
def daemon(harness: Harness) -> Iterator[Daemon]:
    with running_daemon(harness) as d:
        yield d
