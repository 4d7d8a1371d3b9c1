"""COLO under TCG with the patched QEMU 7.2, proven on a real Linux guest (issue 4).

- RAM identity: the pair runs with the hold hook, so after every checkpoint both VMs are stopped at the
  same instant and their guest RAM files (``/dev/shm``) are compared page by page: they must be
  byte-identical every time, with the guest dirtying memory (memdirty) and an echo connection busy.
- 1 s interval: >= 200 checkpoints.
- 100 ms interval: a 10-minute run (``HYBRIDFT_SOAK_SECONDS``, default 600) that also checks the
  secondary's serial console for any oops/BUG/panic/virtio error, then kills the primary with SIGKILL,
  fails over, and requires the secondary to answer HTTP and echo within 1 s of the kill.
  The hold does not change what the soak proves: it only adds a moment in which both VMs are stopped
  after each checkpoint; between checkpoints the secondary runs exactly as without it (100 ms of guest
  time, fed the client's packets), so a stale page would still crash its kernel.

The two long scenarios run at the same time, each with its own pair, namespace and event loop in its
own thread: both mostly wait on guest timers, so together they take about as long as the soak alone
(~11 min instead of ~17). Each scenario's checks are collected separately and every failure names its
scenario. ``HYBRIDFT_SOAK_SECONDS`` and ``HYBRIDFT_RAM_CHECKPOINTS`` (default 200) shorten development
runs only; the defaults are the issue's bounds.

These tests always use TCG and the patched build (that is what the fixes are for), and fail -- never
skip -- when QEMU, the build or the guest is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybridft_common.cli import hybridft_command
from hybridft_common.stats import summarize
from mc_driver.accel import QemuChoice, choose_qemu
from mc_driver.guest.control import READY_LINE
from mc_driver.guest.expected import ECHO_PORT, HTTP_PORT, stream_bytes
from mc_driver.guest.image import GuestImage, build_guest
from mc_driver.guest.qemu_args import DEFAULT_GUEST_IP, guest_cmdline
from mc_driver.launch import PairFiles
from mc_driver.netns import NetNamespace
from mc_driver.qemu_pair import ColoPair, ColoPairConfig, primary_args, secondary_args, wait_for_line
from mc_driver.qmp import QmpCommandError, QmpSession
from mc_driver.traffic import EchoTraffic
from mc_driver.verify import VerifyReport, differing_pages, verify_checkpoints

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.netns]

GUEST_IP = DEFAULT_GUEST_IP.split("/")[0]
SOAK_SECONDS = float(os.environ.get("HYBRIDFT_SOAK_SECONDS", "600"))
# only for quicker development runs; the issue (and the default) is 200
RAM_CHECKPOINTS = int(os.environ.get("HYBRIDFT_RAM_CHECKPOINTS", "200"))
KERNEL_TROUBLE = re.compile(
    r"Oops|BUG[: ]|panic|Call Trace|WARNING:|general protection|list_del corruption|list_add corruption"
    r"|virtio.*(error|not a head)|segfault|soft lockup|hung_task|Unable to handle",
)
DIRTY_WORKLOAD = ("memdirty", "32", "64")  # 32 MiB/s over a 64 MiB working set


@pytest.fixture(scope="module")
def tcg_qemu() -> QemuChoice:
    return choose_qemu(build=True, force_accel="tcg")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


def _config(workdir: Path, image: GuestImage, qemu: QemuChoice, *, prefix: str) -> ColoPairConfig:
    return ColoPairConfig(
        workdir=workdir,
        image=image,
        qemu=qemu,
        hold_after_checkpoint=True,
        cmdline=guest_cmdline(run=[DIRTY_WORKLOAD], extra="loglevel=7"),
        primary_tap=f"{prefix}p0",
        secondary_tap=f"{prefix}s0",
    )


def _report_line(name: str, report: VerifyReport) -> str:
    summary = report.summary() | {"pause_ms": summarize(report.primary_pause_ms)}
    line = f"{name}: {json.dumps(summary)}"
    print(line)
    return line


def _describe_failures(report: VerifyReport) -> str:
    lines = []
    for verdict in report.differing[:5]:
        runs = "; ".join(f"{r.block}+0x{r.offset:x} x{r.pages}" for r in verdict.runs[:5])
        lines.append(f"checkpoint {verdict.number}: {verdict.differing_pages} pages differ: {runs}")
    return "\n".join(lines)


def _ram_identity_1s(workdir: Path, image: GuestImage, qemu: QemuChoice) -> tuple[VerifyReport, str]:
    """Scenario 1: ``RAM_CHECKPOINTS`` checkpoints at 1 s, RAM compared after each; returns the console."""

    async def run() -> tuple[VerifyReport, str]:
        report = VerifyReport(qemu.accel, str(qemu.binary), qemu.reason, 1000)
        with NetNamespace() as netns:
            async with await ColoPair.start(_config(workdir, image, qemu, prefix="v1"), netns) as pair:
                echo = EchoTraffic(netns, GUEST_IP, ECHO_PORT).start()
                try:
                    await verify_checkpoints(pair, report, count=RAM_CHECKPOINTS, interval_s=1.0)
                finally:
                    echo.stop()
                report.traffic_round_trips, report.traffic_errors = echo.round_trips, echo.errors
                return report, pair.console_text("secondary")

    return asyncio.run(run())


def _http_blob_head(n: int = 4096) -> bytes:
    """GET /blob over a fresh connection; returns the first ``n`` body bytes."""
    with socket.create_connection((GUEST_IP, HTTP_PORT), timeout=0.2) as sock:
        sock.settimeout(0.5)
        sock.sendall(f"GET /blob HTTP/1.0\r\nHost: {GUEST_IP}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"bad HTTP answer {head[:80]!r}")
    return body[:n]


def _echo_once() -> bytes:
    payload = os.urandom(64)
    with socket.create_connection((GUEST_IP, ECHO_PORT), timeout=0.2) as sock:
        sock.settimeout(0.5)
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("echo closed")
            got += chunk
    if got != payload:
        raise ConnectionError("echo bytes differ")
    return got


def _first_success(netns: NetNamespace, probe: object, since: float, limit: float) -> float:
    """Seconds from ``since`` until ``probe()`` first succeeds in the namespace (raise after ``limit``)."""
    last: Exception | None = None
    with netns.entered():
        while time.monotonic() - since < limit:
            try:
                probe()  # type: ignore[operator]
                return time.monotonic() - since
            except OSError as exc:
                last = exc
                time.sleep(0.02)
    raise AssertionError(f"no answer within {limit} s after the kill: {last!r}")


@dataclass
class SoakResult:
    report: VerifyReport
    console_before_failover: str
    secondary_alive_before_failover: bool
    failover: dict[str, object]


def _soak_100ms(workdir: Path, image: GuestImage, qemu: QemuChoice) -> SoakResult:
    """Scenario 2: ``SOAK_SECONDS`` at 100 ms, RAM compared after each checkpoint; then kill -9, failover."""
    blob_head = stream_bytes(4096)

    def check_blob() -> None:
        if _http_blob_head() != blob_head:
            raise ConnectionError("blob bytes differ")

    async def run() -> SoakResult:
        report = VerifyReport(qemu.accel, str(qemu.binary), qemu.reason, 100)
        with NetNamespace() as netns:
            async with await ColoPair.start(_config(workdir, image, qemu, prefix="v2"), netns) as pair:
                echo = EchoTraffic(netns, GUEST_IP, ECHO_PORT).start()
                try:
                    await verify_checkpoints(
                        pair, report, duration_s=SOAK_SECONDS, min_count=200, interval_s=0.1
                    )
                finally:
                    echo.stop()
                report.traffic_round_trips, report.traffic_errors = echo.round_trips, echo.errors
                console = pair.console_text("secondary")
                alive = pair.secondary_proc is not None and pair.secondary_proc.poll() is None
                if KERNEL_TROUBLE.search(console) or not alive:
                    return SoakResult(report, console, alive, {})

                # failover: kill -9 the primary, the secondary must serve HTTP and echo within 1 s
                killed = time.monotonic()
                failover = await pair.kill_primary_and_failover()
                http_s, echo_s = await asyncio.gather(
                    asyncio.to_thread(_first_success, netns, check_blob, killed, 5.0),
                    asyncio.to_thread(_first_success, netns, _echo_once, killed, 5.0),
                )
                after = pair.console_text("secondary")
                return SoakResult(report, console, alive, {
                    "failover_steps": failover.steps,
                    "colo_exit_seen": failover.colo_exit_seen,
                    "http_after_kill_s": round(http_s, 3),
                    "echo_after_kill_s": round(echo_s, 3),
                    "console_after_failover_trouble": bool(KERNEL_TROUBLE.search(after)),
                })  # fmt: skip

    return asyncio.run(run())


def _trouble_excerpt(console: str) -> str:
    trouble = KERNEL_TROUBLE.search(console)
    return "" if trouble is None else console[max(0, trouble.start() - 200) :][:2000]


# Both scenarios run at once (each its own pair, namespace and event loop, in its own thread): they
# mostly wait on guest timers, so together they take about as long as the soak alone.  Every check of
# each scenario is still made; failures name the scenario they belong to.
@pytest.mark.timeout(int(max(SOAK_SECONDS, 315 * RAM_CHECKPOINTS / 200)) + 1200)
def test_ram_identity_1s_and_soak_100ms_with_failover_concurrently(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="colo-scenario") as pool:
        ram_future = pool.submit(_ram_identity_1s, tmp_path / "ram-1s", image, tcg_qemu)
        soak_future = pool.submit(_soak_100ms, tmp_path / "soak-100ms", image, tcg_qemu)
        wait([ram_future, soak_future])
    problems: list[str] = []

    # scenario 1: RAM identity after RAM_CHECKPOINTS checkpoints at 1 s
    if (exc := ram_future.exception()) is not None:
        problems.append(f"ram-identity-1s raised: {exc!r}")
    else:
        report, console = ram_future.result()
        _report_line("ram-identity-1s", report)
        if report.checkpoints != RAM_CHECKPOINTS:
            problems.append(f"ram-identity-1s: {report.checkpoints} checkpoints, wanted {RAM_CHECKPOINTS}")
        if report.identical != report.checkpoints:
            problems.append(f"ram-identity-1s: RAM differs\n{_describe_failures(report)}")
        if report.traffic_errors:
            problems.append(f"ram-identity-1s: echo errors {report.traffic_errors[:5]}")
        if report.traffic_round_trips <= RAM_CHECKPOINTS:  # the echo connection really was busy
            problems.append(f"ram-identity-1s: only {report.traffic_round_trips} echo round trips")
        if trouble := _trouble_excerpt(console):
            problems.append(f"ram-identity-1s: secondary kernel trouble: ...{trouble}")

    # scenario 2: the 100 ms soak, then failover
    if (exc := soak_future.exception()) is not None:
        problems.append(f"soak-100ms raised: {exc!r}")
    else:
        soak = soak_future.result()
        _report_line("soak-100ms", soak.report)
        print(f"failover: {json.dumps(soak.failover)}")
        report = soak.report
        if report.elapsed_s < SOAK_SECONDS:
            problems.append(f"soak-100ms: ran {report.elapsed_s:.0f} s, wanted {SOAK_SECONDS:.0f} s")
        if report.checkpoints < 200:
            problems.append(f"soak-100ms: only {report.checkpoints} checkpoints")
        if report.identical != report.checkpoints:
            problems.append(f"soak-100ms: RAM differs\n{_describe_failures(report)}")
        if report.traffic_errors:
            problems.append(f"soak-100ms: echo errors {report.traffic_errors[:5]}")
        if trouble := _trouble_excerpt(soak.console_before_failover):
            problems.append(f"soak-100ms: secondary kernel trouble: ...{trouble}")
        if not soak.secondary_alive_before_failover:
            problems.append("soak-100ms: the secondary QEMU died during the soak")
        if soak.failover:  # only attempted when the soak itself was clean
            if soak.failover["console_after_failover_trouble"]:
                problems.append("soak-100ms: secondary kernel trouble after failover")
            for key in ("http_after_kill_s", "echo_after_kill_s"):
                if soak.failover[key] > 1.0:  # type: ignore[operator]
                    problems.append(f"soak-100ms: {key} = {soak.failover[key]} s, wanted <= 1 s")
    assert not problems, "\n".join(problems)


def test_verify_checkpoint_command_reports_identity(tmp_path: Path, tcg_qemu: QemuChoice) -> None:
    env = dict(os.environ, HYBRIDFT_ACCEL="tcg")
    proc = subprocess.run(
        hybridft_command("verify-checkpoint", "-n", "8", "--interval-ms", "100",
                         "--workdir", str(tmp_path / "w"), "--json"),
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    assert summary["checkpoints"] == 8 and summary["identical"] == 8
    assert summary["accel"] == "tcg" and summary["binary"] == str(tcg_qemu.binary)
    assert summary["traffic_round_trips"] > 0
    # and the readable table
    table = subprocess.run(
        hybridft_command("verify-checkpoint", "-n", "2", "--no-traffic", "--dirty-mib-s", "0"),
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "IDENTICAL at every checkpoint" in table.stdout


def test_checkpoints_fire_only_on_request_and_resume_both(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    """Without the hold: each parameter write fires exactly one checkpoint, none fire on their own."""

    async def run() -> tuple[list[float], int, int]:
        config = ColoPairConfig(workdir=tmp_path, image=image, qemu=tcg_qemu, compare="qemu",
                                primary_tap="v3p0", secondary_tap="v3s0")  # fmt: skip
        with NetNamespace() as netns:
            async with await ColoPair.start(config, netns) as pair:
                assert pair.primary is not None and pair.secondary is not None
                await asyncio.sleep(2.0)
                idle_stops = [e for e in pair.primary.events() if e.name == "STOP"]
                pauses = []
                for _ in range(10):
                    cp = await pair.checkpoint()
                    pauses.append(cp.primary.seconds)
                    assert cp.secondary.seconds > 0
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
                extra = [e for e in pair.primary.events() if e.name in ("STOP", "RESUME")]
                status = await pair.primary.execute("query-status")
                assert status["running"] is True
                return pauses, len(idle_stops), len(extra)

    pauses, idle_stops, extra = asyncio.run(run())
    assert idle_stops == 0
    assert extra == 0
    assert len(pauses) == 10 and all(0 < p < 5 for p in pauses)


@contextlib.asynccontextmanager
async def _bare_pair(
    tmp_path: Path, image: GuestImage, qemu: QemuChoice, taps: str
) -> AsyncIterator[tuple[QmpSession, QmpSession]]:
    """A COLO pair with no comparator, whose checkpoints are the test's own: (primary, secondary)."""
    config = ColoPairConfig(workdir=tmp_path, image=image, qemu=qemu, compare="none",
                            primary_tap=f"{taps}p0", secondary_tap=f"{taps}s0")  # fmt: skip
    with NetNamespace() as netns:
        async with await ColoPair.start(config, netns) as pair:
            assert pair.primary is not None and pair.secondary is not None
            yield pair.primary, pair.secondary


def test_seal_hook_keeps_both_vms_stopped_until_sealed_and_yields_to_failover(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    """Patch 0005: x-colo-checkpoint stops both VMs (the secondary first) and says so; with
    x-colo-expect-seal the secondary applies nothing and neither VM runs until x-colo-sealed (which may
    also come before the state arrives); misuse is a clear QMP error; a failover while the load waits
    ends COLO at once, the secondary resuming only after its COLO_EXIT (so the agent rolls back)."""

    async def run() -> float:
        async with _bare_pair(tmp_path, image, tcg_qemu, "v4") as (p, s):
            with pytest.raises(QmpCommandError, match="no COLO checkpoint expects a seal"):
                await s.execute("x-colo-sealed")
            with pytest.raises(QmpCommandError, match="not a COLO Primary"):
                await s.execute("x-colo-checkpoint")
            with pytest.raises(QmpCommandError, match="not a COLO Secondary"):
                await p.execute("x-colo-expect-seal")
            for hold in (0.5, 0.5, 0.0):  # 0.0: sealed at once, usually before the state arrives
                p.discard_events()
                s.discard_events()
                await s.execute("x-colo-expect-seal")
                await s.execute("x-colo-expect-seal")  # idempotent
                await p.execute("x-colo-checkpoint")
                stopped = await p.wait_event("X_COLO_CHECKPOINT_STOPPED", timeout=10)
                p_stops, s_stops = p.take("STOP"), s.take("STOP")
                assert len(p_stops) == 1 and len(s_stops) == 1
                assert s_stops[0].timestamp <= p_stops[0].timestamp <= stopped.timestamp
                if hold:
                    await asyncio.sleep(hold)  # nothing runs on, however long the seal takes
                    for side in (p, s):
                        assert (await side.execute("query-status"))["running"] is False
                        assert not side.pending("RESUME")
                    with pytest.raises(QmpCommandError, match="not finished loading"):
                        await s.execute("x-colo-expect-seal")
                await s.execute("x-colo-sealed")
                s_resume = await s.wait_event("RESUME", timeout=10)
                p_resume = await p.wait_event("RESUME", timeout=10)
                assert s_resume.timestamp <= p_resume.timestamp  # the primary waits for the load
            # a failover (the primary is lost) while the secondary's load waits for its seal
            await s.execute("x-colo-expect-seal")
            await p.execute("x-colo-checkpoint")
            await p.wait_event("X_COLO_CHECKPOINT_STOPPED", timeout=10)
            await asyncio.sleep(0.5)  # the state is received; the load waits
            assert not s.pending("RESUME")
            started = time.monotonic()
            await s.execute("x-colo-lost-heartbeat")
            colo_exit = await s.wait_event("COLO_EXIT", timeout=5)
            resume = await s.wait_event("RESUME", timeout=5)
            took = time.monotonic() - started
            assert resume.timestamp >= colo_exit.timestamp  # not loaded: the agent rolls back
            assert (await s.execute("query-status"))["running"] is True
            with pytest.raises(QmpCommandError, match="no COLO checkpoint expects a seal"):
                await s.execute("x-colo-sealed")
            return took

    took = asyncio.run(run())
    assert took < 1.0, took  # the failover wakes the waiting load at once


def test_precopy_migration_under_tcg_leaves_identical_ram(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    """The dirty-bitmap fix on its own, without COLO: a plain live migration of a memory-dirtying guest.

    The destination is started with ``-S`` and the source ends in ``postmigrate``, so both are stopped when
    the migration completes and their RAM must be identical.  (Stock 7.2 under TCG leaves tens of pages
    stale here: TCG writes through TLB entries the word-wise bitmap sync never re-armed.)
    """

    async def run() -> tuple[int, str]:
        config = ColoPairConfig(
            workdir=tmp_path, image=image, qemu=tcg_qemu, compare="none",
            cmdline=guest_cmdline(run=[DIRTY_WORKLOAD], services=[]),
            primary_tap="v4p0", secondary_tap="v4s0",
        )  # fmt: skip
        paths = PairFiles(tmp_path, Path(f"/dev/shm/hybridft-{os.getpid()}-precopy"))
        paths.shm_dir.mkdir(parents=True, exist_ok=True)
        try:
            with NetNamespace() as netns:
                for side in ("primary", "secondary"):
                    paths.disk(side).write_bytes(bytes(1 << 20))
                netns.add_tap(config.primary_tap)
                netns.add_tap(config.secondary_tap)
                src = netns.popen(
                    primary_args(config, paths), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                dst = netns.popen([*secondary_args(config, paths), "-S"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
                source = await QmpSession.connect(paths.qmp("primary"), alive=lambda: src.poll() is None)
                dest = await QmpSession.connect(paths.qmp("secondary"), alive=lambda: dst.poll() is None)
                await wait_for_line(paths.console("primary"), READY_LINE, 120, (src, dst))
                await asyncio.sleep(2.0)  # memdirty at its steady rate
                await source.execute("migrate", uri=f"unix:{paths.migrate}")
                deadline = time.monotonic() + 120
                while (status := (await source.execute("query-migrate"))["status"]) not in (
                    "completed",
                    "failed",
                ):
                    assert time.monotonic() < deadline, "migration did not finish"
                    await asyncio.sleep(0.1)
                # the source reports "completed" when it has sent everything; the destination may
                # still be loading (status "inmigrate"): compare RAM only once it has finished
                deadline = time.monotonic() + 60
                while (dest_state := (await dest.execute("query-status"))["status"]) == "inmigrate":
                    assert time.monotonic() < deadline, "the destination never finished loading"
                    await asyncio.sleep(0.05)
                assert status == "completed" and dest_state == "paused"
                pages = differing_pages(paths.ram("primary"), paths.ram("secondary"))
                await source.close()
                await dest.close()
                return len(pages), status
        finally:
            shutil.rmtree(paths.shm_dir, ignore_errors=True)

    differing, status = asyncio.run(run())
    assert status == "completed"
    assert differing == 0, f"{differing} pages differ after a completed migration"


def test_a_failover_can_keep_the_secondary_paused_until_cont(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    """Patch 0010: ``x-colo-lost-heartbeat`` with ``keep-paused`` leaves the secondary paused once it
    left COLO (without it QEMU resumes it by itself: the test above), so that the agent decides its
    disk before it runs; ``cont`` resumes it.  Here the failover comes while the secondary's load
    waits for its seal -- the case in which its disk is rolled back."""

    async def run() -> tuple[dict[str, object], dict[str, object], list[str], dict[str, object]]:
        async with _bare_pair(tmp_path, image, tcg_qemu, "v6") as (p, s):
            s.discard_events()
            await s.execute("x-colo-expect-seal")
            await p.execute("x-colo-checkpoint")
            await p.wait_event("X_COLO_CHECKPOINT_STOPPED", timeout=10)
            await asyncio.sleep(0.5)  # the state is received; the load waits
            await s.execute("x-colo-lost-heartbeat", {"keep-paused": True})
            await s.wait_event("COLO_EXIT", timeout=5)
            deadline = time.monotonic() + 10
            while (migrate := await s.execute("query-migrate")).get("status") not in ("completed", None):
                assert time.monotonic() < deadline, migrate
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # QEMU's own resume would have come by now
            paused = await s.execute("query-status")
            colo = await s.execute("query-colo-status")
            events = [e.name for e in s.events()]
            await s.execute("cont")
            await s.wait_event("RESUME", timeout=5)
            return paused, colo, events, await s.execute("query-status")

    paused, colo, events, resumed = asyncio.run(run())
    assert paused["running"] is False and paused["status"] == "paused", paused
    assert colo["mode"] == "none", colo
    assert "RESUME" not in events, events
    assert resumed["running"] is True, resumed
