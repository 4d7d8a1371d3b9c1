"""``hybridft bench qemu``: the COLO checkpoint pause (primary STOP -> RESUME) per QEMU binary.

Why: patches to QEMU's checkpoint path are judged by the pause the guest sees, so binaries (the
patched build against variants) are measured on the same guest without the hold hook.  Machines are
shared and noisy, so the binaries run in alternating rounds in the same run and are reported as
ratios to the first ("baseline") binary.  ``bench_pauses`` is callable directly.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import click

from hybridft_common.stats import ratio, summarize
from mc_driver.netns import NetNamespace
from mc_driver.qemu_pair import ColoPair, ColoPairConfig


def _pause_summary(values: list[float]) -> dict[str, float | int | None]:
    """p50/p99/max/n of pauses in milliseconds, to 0.01 ms (None when empty): the report's fields."""
    summary = summarize(values)
    return {"p50": summary["p50"], "p99": summary["p99"], "max": summary["max"], "n": summary["samples"]}


async def _pause_round(
    binary: Path, image: object, dirty: tuple[str, ...] | None, interval_s: float, count: int, workdir: Path
) -> list[float]:
    from mc_driver.accel import QemuChoice
    from mc_driver.guest import guest_cmdline
    from mc_driver.qemu_build import FIRMWARE_ARGS

    choice = QemuChoice(binary, "tcg", FIRMWARE_ARGS, "benchmark", patched=True)
    config = ColoPairConfig(
        workdir=workdir, image=image, qemu=choice, compare="none",  # type: ignore[arg-type]
        cmdline=guest_cmdline(run=[dirty] if dirty else [], services=[]),
        primary_tap="bqp0", secondary_tap="bqs0",
    )  # fmt: skip
    pauses: list[float] = []
    with NetNamespace() as netns:
        async with await ColoPair.start(config, netns) as pair:
            await asyncio.sleep(2.0)  # let the dirtier reach its steady rate
            for _ in range(count):
                await asyncio.sleep(interval_s)
                cp = await pair.checkpoint()
                if cp.primary.seconds is not None:
                    pauses.append(cp.primary.seconds * 1000)
    return pauses


def bench_pauses(
    binaries: dict[str, Path],
    *,
    rounds: int,
    count: int,
    interval_ms: float,
    dirty_mib_s: int,
    working_set_mib: int,
) -> dict[str, Any]:
    """Alternate the binaries for ``rounds`` rounds of ``count`` checkpoints each; p50/p99 per binary."""
    from mc_driver.guest import build_guest

    image = build_guest()
    dirty = ("memdirty", str(dirty_mib_s), str(working_set_mib)) if dirty_mib_s else None
    samples: dict[str, list[float]] = {label: [] for label in binaries}
    with tempfile.TemporaryDirectory(prefix="hft-bench-") as tmp:
        for r in range(rounds):
            for label, binary in binaries.items():
                workdir = Path(tmp) / f"{label}-{r}"
                samples[label] += asyncio.run(
                    _pause_round(binary, image, dirty, interval_ms / 1000, count, workdir)
                )
    stats = {label: _pause_summary(values) for label, values in samples.items()}
    baseline = next(iter(stats))
    base_p50 = stats[baseline]["p50"] or 0.0
    return {
        "interval_ms": interval_ms,
        "dirty_mib_s": dirty_mib_s,
        "working_set_mib": working_set_mib,
        "baseline": baseline,
        "results": {
            label: s | {"p50_ratio_to_baseline": ratio(s["p50"] or 0.0, base_p50)}
            for label, s in stats.items()
        },
    }


@click.command("qemu")
@click.option("--binary", "binaries", multiple=True, metavar="LABEL=PATH",
              help="QEMU binaries to compare; the first is the baseline (default: patched).")  # fmt: skip
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--checkpoints", type=click.IntRange(1), default=20, show_default=True)
@click.option("--interval-ms", type=click.FloatRange(1), default=500, show_default=True)
@click.option("--dirty-mib-s", type=click.IntRange(0), default=64, show_default=True)
@click.option("--working-set-mib", type=click.IntRange(1), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_pause_command(
    binaries: tuple[str, ...], rounds: int, checkpoints: int, interval_ms: float, dirty_mib_s: int,
    working_set_mib: int, as_json: bool,
) -> None:  # fmt: skip
    """COLO checkpoint pause (primary STOP->RESUME) per QEMU binary, as ratios to the first."""
    from mc_driver.qemu_build import patched_qemu

    chosen: dict[str, Path] = {}
    for item in binaries or (f"patched={patched_qemu()}",):
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise click.BadParameter(
                f"{item!r}: expected LABEL=PATH to an existing binary", param_hint="--binary"
            )
        chosen[label] = Path(path)
    result = bench_pauses(
        chosen, rounds=rounds, count=checkpoints, interval_ms=interval_ms, dirty_mib_s=dirty_mib_s,
        working_set_mib=working_set_mib,
    )  # fmt: skip
    click.echo(json.dumps(result) if as_json else render_table(result))


def render_table(result: dict[str, Any]) -> str:
    """The ``bench_pauses`` result as the command's table."""
    lines = [
        f"checkpoint pause, {result['interval_ms']:g} ms interval, "
        f"memdirty {result['dirty_mib_s']} MiB/s over {result['working_set_mib']} MiB",
        f"{'binary':<16}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'p50 ratio':>11}",
    ]
    for label, s in result["results"].items():
        lines.append(
            f"{label:<16}{s['n']:>5}{s['p50']!s:>10}{s['p99']!s:>10}{s['max']!s:>10}{s['p50_ratio_to_baseline']!s:>11}"
        )
    return "\n".join(lines)
