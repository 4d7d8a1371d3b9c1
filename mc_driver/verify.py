"""Prove a COLO checkpoint's fidelity: both VMs' RAM identical after it (``hybridft verify-checkpoint``).

Why this exists: "HTTP through the primary works" proves nothing about the secondary -- with a broken
dirty-bitmap sync every request still passed (mismatch -> checkpoint -> release) while the secondary's
kernel was dying on stale memory.  The only direct proof is to stop both VMs at the same checkpoint and
compare their memory.  QMP alone cannot do that (each checkpoint's own ``vm_start`` resumes the VMs), so the
patched QEMU has a hold hook (``X_COLO_CHECKPOINT_HELD``, see ``patches/0003-*``), and the pair keeps guest
RAM in ``/dev/shm`` files (``memory-backend-file,share=on``) that are compared directly with numpy: no
``pmemsave`` copies, ~0.1 s for 256 MiB.  The comparison itself is :mod:`mc_driver.ram_compare`, shared
with the daemon's ``verify`` verb (``hybridft verify``), which checks a running ``pair up`` pair instead.

A difference is reported as page runs inside the RAM block with the guest-physical addresses they are mapped
at (parsed from ``info mtree -f``), so a failure points at "pc.ram +0x1a3c000 (GPA 0x1a3c000), 3 pages"
rather than at "files differ".

The command boots its own pair (the accelerator and binary ``hybridft qemu which`` reports; the hold hook
needs the patched build), runs a memory-dirtying guest with optional echo traffic, and checks every
checkpoint.  Exit status 1 if any checkpoint differed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from hybridft_common.stats import percentile
from mc_driver.netns import NetNamespace
from mc_driver.qemu_pair import RAM_BACKEND_ID, ColoPair, ColoPairConfig
from mc_driver.ram_compare import (
    DiffRun,
    RamCompareError,
    differing_pages,
    page_runs,
    parse_flat_memory,
)
from mc_driver.traffic import EchoTraffic


class VerifyError(RamCompareError):
    """The verification could not run (not a difference: those are results)."""


@dataclass(frozen=True, slots=True)
class CheckpointVerdict:
    number: int
    identical: bool
    differing_pages: int
    runs: list[DiffRun]
    primary_pause_ms: float | None
    secondary_pause_ms: float | None
    compare_ms: float


@dataclass
class VerifyReport:
    accel: str
    binary: str
    reason: str
    interval_ms: float
    checkpoints: int = 0
    identical: int = 0
    differing: list[CheckpointVerdict] = field(default_factory=list)
    primary_pause_ms: list[float] = field(default_factory=list)
    compare_ms: list[float] = field(default_factory=list)
    traffic_round_trips: int = 0
    traffic_errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.checkpoints > 0 and not self.differing and not self.traffic_errors

    def summary(self) -> dict[str, object]:
        def pct(values: list[float], q: float) -> float | None:
            value = percentile(values, q / 100)  # nearest rank, as every figure of the project
            return None if value is None else round(value, 2)

        return {
            "ok": self.ok,
            "accel": self.accel,
            "binary": self.binary,
            "reason": self.reason,
            "interval_ms": self.interval_ms,
            "checkpoints": self.checkpoints,
            "identical": self.identical,
            "differing": [asdict(v) for v in self.differing[:20]],
            "primary_pause_ms_p50": pct(self.primary_pause_ms, 50),
            "primary_pause_ms_p99": pct(self.primary_pause_ms, 99),
            "compare_ms_p50": pct(self.compare_ms, 50),
            "traffic_round_trips": self.traffic_round_trips,
            "traffic_errors": self.traffic_errors[:10],
            "elapsed_s": round(self.elapsed_s, 1),
        }


async def verify_checkpoints(
    pair: ColoPair,
    report: VerifyReport,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    min_count: int = 0,
    interval_s: float,
) -> VerifyReport:
    """Fire checkpoints every ``interval_s`` of guest run time; compare RAM at each; record into ``report``.

    Stops after ``count`` checkpoints, or once ``duration_s`` seconds have passed and at least
    ``min_count`` checkpoints were checked.
    """
    if not pair.config.hold_after_checkpoint:
        raise VerifyError("RAM identity needs a pair started with hold_after_checkpoint=True")
    mappings = parse_flat_memory(await pair.sessions()[0].hmp("info mtree -f"))
    started = time.monotonic()
    primary_ram, secondary_ram = pair.paths.ram("primary"), pair.paths.ram("secondary")
    while True:
        if count is not None and report.checkpoints >= count:
            break
        if (
            duration_s is not None
            and time.monotonic() - started >= duration_s
            and report.checkpoints >= min_count
        ):
            break
        await asyncio.sleep(interval_s)  # the VMs run this long between checkpoints
        cp = await pair.checkpoint()
        t0 = time.monotonic()
        pages = await asyncio.to_thread(differing_pages, primary_ram, secondary_ram)
        compare_ms = (time.monotonic() - t0) * 1000
        await pair.release()
        p_ms = None if cp.primary.seconds is None else cp.primary.seconds * 1000
        s_ms = None if cp.secondary.seconds is None else cp.secondary.seconds * 1000
        verdict = CheckpointVerdict(
            cp.number, len(pages) == 0, len(pages), page_runs(pages, RAM_BACKEND_ID, mappings)[:50],
            p_ms, s_ms, round(compare_ms, 1),
        )  # fmt: skip
        report.checkpoints += 1
        report.compare_ms.append(compare_ms)
        if p_ms is not None:
            report.primary_pause_ms.append(p_ms)
        if verdict.identical:
            report.identical += 1
        else:
            report.differing.append(verdict)
    report.elapsed_s += time.monotonic() - started
    return report


def render_table(summary: dict[str, object]) -> str:
    rows = [
        ("result", "IDENTICAL at every checkpoint" if summary["ok"] else "FAILED"),
        ("accelerator", f"{summary['accel']} ({summary['reason']})"),
        ("binary", summary["binary"]),
        ("checkpoints", f"{summary['checkpoints']} every {summary['interval_ms']} ms"),
        ("identical", summary["identical"]),
        (
            "primary pause p50/p99 ms",
            f"{summary['primary_pause_ms_p50']} / {summary['primary_pause_ms_p99']}",
        ),
        ("RAM compare p50 ms", summary["compare_ms_p50"]),
        ("echo round trips", summary["traffic_round_trips"]),
        ("elapsed s", summary["elapsed_s"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for verdict in summary["differing"]:  # type: ignore[attr-defined]
        lines.append(f"checkpoint {verdict['number']}: {verdict['differing_pages']} pages differ")
        for run in verdict["runs"][:10]:
            lines.append("    " + DiffRun(**run).describe())
    for error in summary["traffic_errors"]:  # type: ignore[attr-defined]
        lines.append(f"traffic error: {error}")
    return "\n".join(lines)


async def _verify_main(
    checkpoints: int, interval_ms: float, dirty_mib_s: int, working_set_mib: int, memory_mib: int,
    traffic: bool, workdir: Path,
) -> VerifyReport:  # fmt: skip
    from mc_driver.accel import choose_qemu
    from mc_driver.guest.expected import ECHO_PORT
    from mc_driver.guest.image import build_guest
    from mc_driver.guest.qemu_args import DEFAULT_GUEST_IP, guest_cmdline

    choice = choose_qemu(build=True)
    if not choice.patched:
        raise VerifyError(
            f"the hold hook needs the patched QEMU, but {choice.reason}; "
            "set HYBRIDFT_ACCEL=tcg to verify with it"
        )
    image = build_guest()
    runs = [("memdirty", str(dirty_mib_s), str(working_set_mib))] if dirty_mib_s > 0 else []
    config = ColoPairConfig(
        workdir=workdir, image=image, qemu=choice, memory_mib=memory_mib, hold_after_checkpoint=True,
        cmdline=guest_cmdline(run=runs),
    )  # fmt: skip
    report = VerifyReport(choice.accel, str(choice.binary), choice.reason, interval_ms)
    with NetNamespace() as netns:
        async with await ColoPair.start(config, netns) as pair:
            echo = EchoTraffic(netns, DEFAULT_GUEST_IP.split("/")[0], ECHO_PORT).start() if traffic else None
            try:
                await verify_checkpoints(pair, report, count=checkpoints, interval_s=interval_ms / 1000)
            finally:
                if echo is not None:
                    echo.stop()
                    report.traffic_round_trips = echo.round_trips
                    report.traffic_errors = echo.errors
    return report


@click.command("verify-checkpoint")
@click.option("--checkpoints", "-n", type=click.IntRange(1), default=20, show_default=True)
@click.option("--interval-ms", type=click.FloatRange(1), default=100, show_default=True,
              help="Guest run time between checkpoints.")  # fmt: skip
@click.option("--dirty-mib-s", type=click.IntRange(0), default=32, show_default=True,
              help="memdirty rate in the guest (0: no dirtier).")  # fmt: skip
@click.option("--working-set-mib", type=click.IntRange(1), default=64, show_default=True)
@click.option("--memory-mib", type=click.IntRange(64), default=256, show_default=True)
@click.option("--traffic/--no-traffic", default=True, show_default=True, help="Keep an echo connection busy.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep sockets/logs here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_checkpoint_command(
    checkpoints: int, interval_ms: float, dirty_mib_s: int, working_set_mib: int, memory_mib: int,
    traffic: bool, workdir: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Boot a COLO pair, fire checkpoints, and prove both VMs' RAM is identical after each one.

    Differences are listed as page runs of the RAM block with their guest-physical addresses.
    Exit status 1 if any checkpoint differed or the echo traffic saw a wrong byte.
    """
    from mc_driver.accel import NoUsableQemu
    from mc_driver.qemu_pair import ColoPairError
    from mc_driver.qmp import QmpError

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hft-verify-")))
        try:
            report = asyncio.run(
                _verify_main(
                    checkpoints, interval_ms, dirty_mib_s, working_set_mib, memory_mib, traffic, workdir
                )
            )
        except (RamCompareError, NoUsableQemu, ColoPairError, QmpError) as exc:
            raise click.ClickException(str(exc)) from exc
    summary = report.summary()
    click.echo(json.dumps(summary) if as_json else render_table(summary))
    if not report.ok:
        raise SystemExit(1)
