"""``hybridft pair up|down``: start a protected VM pair in the background, and stop it (also after a crash).

A thin shell over :mod:`mc_driver.pair`: option parsing, the printed answer, and errors as messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, STOP_VIA_CHOICES, Mode, epoch_ms_range, mode_choice
from mc_driver.pair import PairConfig, PairError, down, up


def _workload(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, ...], ...]:
    runs = []
    for text in value:
        words = tuple(text.split(","))
        if not all(words) or any(any(c.isspace() for c in w) for w in words):
            raise click.BadParameter(f"{text!r}: PROG,ARG,... with no blanks and no empty words")
        runs.append(words)
    return tuple(runs)


@click.group("pair")
def pair() -> None:
    """Start or stop a protected VM pair (primary, secondary, comparator, disk server, daemon, agent)."""


@pair.command("up")
@click.option(
    "--workdir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for images, sockets, logs and pair.json.",
)
@click.option("--mode", type=mode_choice(), default="mc", show_default=True)
@click.option(
    "--epoch-ms", type=epoch_ms_range(), default=DEFAULT_EPOCH_MS, show_default=True, help="MC epoch length."
)
@click.option(
    "--accel",
    type=click.Choice(["kvm", "tcg"]),
    default=None,
    help="Force the accelerator (default: detect; see `hybridft qemu which`).",
)
@click.option(
    "--memory",
    "memory_mib",
    type=click.IntRange(min=64),
    default=256,
    show_default=True,
    help="Guest RAM in MiB.",
)
@click.option(
    "--disk-mib", type=click.IntRange(min=1), default=64, show_default=True, help="Guest disk size."
)
@click.option("--compare-timeout-ms", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--safety-interval-ms", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option(
    "--guest-run",
    "guest_run",
    multiple=True,
    callback=_workload,
    metavar="PROG,ARG,...",
    help="A workload the guest starts at boot (repeatable), e.g. diskwriter,/dev/vda.",
)
@click.option(
    "--passive-secondary",
    is_flag=True,
    help="MC: keep the secondary stopped between checkpoints (saves its CPU; resumed at failover).",
)
@click.option(
    "--stop-via",
    type=click.Choice(STOP_VIA_CHOICES),
    default="auto",
    show_default=True,
    help="Who stops the VMs for a checkpoint: QEMU itself, waiting for the daemon's seal (patched build,"
    " patch 0005), or the daemon over QMP (any QEMU); auto picks qemu when the build has it.",
)
@click.option(
    "--no-daemon",
    is_flag=True,
    help="Start everything but the daemon (COLO not started): for debugging the launcher.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line once the guest answers.")
def up_command(
    workdir: Path,
    mode: str,
    epoch_ms: int,
    accel: str | None,
    memory_mib: int,
    disk_mib: int,
    compare_timeout_ms: int,
    safety_interval_ms: int,
    guest_run: tuple[tuple[str, ...], ...],
    passive_secondary: bool,
    stop_via: str,
    no_daemon: bool,
    as_json: bool,
) -> None:
    """Start the pair in the background; return once the guest answers through the comparator."""
    config = PairConfig(
        workdir=workdir, mode=Mode(mode), epoch_ms=epoch_ms, accel=accel,  # type: ignore[arg-type]
        memory_mib=memory_mib, disk_mib=disk_mib, compare_timeout_ms=compare_timeout_ms,
        safety_interval_ms=safety_interval_ms, guest_run=guest_run, start_daemon=not no_daemon,
        passive_secondary=passive_secondary, stop_via=stop_via,
    )  # fmt: skip
    try:
        result = up(config)
    except PairError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"pair up in {result['config']}")
    for key in (
        "guest_ip",
        "client_netns",
        "primary_pid",
        "secondary_pid",
        "daemon_pid",
        "agent_pid",
        "disk_pid",
        "control",
    ):
        click.echo(f"  {key:<14} {result[key]}")
    click.echo(f"  clients: ip netns exec {result['client_netns']} curl http://{result['guest_ip']}/blob")


@pair.command("down")
@click.option("--workdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def down_command(workdir: Path, as_json: bool) -> None:
    """Stop every process of the pair, remove its namespace, taps and sockets (idempotent)."""
    result = down(workdir)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"stopped: {', '.join(result['stopped']) or 'nothing was running'}")
