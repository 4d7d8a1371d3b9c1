"""``hybridft bench ...``: each benchmark prints a table (or ``--json``) with its same-run baseline."""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup

_BENCHES: dict[str, tuple[str, str]] = {
    "compare": ("bench.compare:bench_compare", "Comparator throughput/latency vs a forward-only relay."),
    "disk": ("bench.disk:bench_disk", "NBD disk buffer vs qemu-nbd on the same image."),
    "qemu": ("bench.qemu:bench_pause_command", "Checkpoint pause: patched QEMU vs variants."),
    "pair": ("bench.pair:bench_pair", "Protected pair: checkpoint pause, throughput, failover."),
    "chaos": ("bench.chaos:bench_chaos", "Failover drill: kill -9 / SIGSTOP one process per fresh pair."),
    "phased": (
        "experiments.phased_bench:bench_phased",
        "Phased workload: static-mc, static-colo, cost-model, gilbert.",
    ),
    "reprotect": ("bench.reprotect:bench_reprotect", "Re-protection: time unprotected, pause, copy cost."),
}


@click.group(cls=LazyGroup, lazy=_BENCHES)
def bench() -> None:
    """Benchmarks; machines are noisy, so each reports ratios to a baseline measured in the same run."""
