"""``hybridft pair up|down``: start a protected VM pair in the background, and stop it (also after a crash).

A thin shell over :mod:`mc_driver.pair`: option parsing, the printed answer, and errors as messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hybridft_common.settings import (
    AUTO,
    DAEMON_CONTROLLER_KEYS,
    PROTECTION_MODES,
    Settings,
    SettingsError,
    load_settings,
)
from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, STOP_VIA_CHOICES, Mode, epoch_ms_range
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
@click.option(
    "--config",
    "settings_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A TOML settings file (README: 'One settings file'); the flags below override it.",
)
@click.option("--mode", type=click.Choice(PROTECTION_MODES), default=None, help="mc | colo | auto [mc].")
@click.option(
    "--epoch-ms", type=epoch_ms_range(), default=None, help=f"MC epoch length [{DEFAULT_EPOCH_MS}]."
)
@click.option("--policy", default=None, help="Start in auto with this policy (hybridft policy list).")
@click.option(
    "--accel",
    type=click.Choice(["kvm", "tcg"]),
    default=None,
    help="Force the accelerator (default: detect; see `hybridft qemu which`).",
)
@click.option(
    "--memory", "memory_mib", type=click.IntRange(min=64), default=None, help="Guest RAM in MiB [256]."
)
@click.option("--disk-mib", type=click.IntRange(min=1), default=None, help="Guest disk size [64].")
@click.option("--compare-timeout-ms", type=click.IntRange(min=1), default=None, help="[3000]")
@click.option("--safety-interval-ms", type=click.IntRange(min=1), default=None, help="[10000]")
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
    default=None,
    help="MC: keep the secondary stopped between checkpoints (saves its CPU; resumed at failover).",
)
@click.option(
    "--stop-via",
    type=click.Choice(STOP_VIA_CHOICES),
    default=None,
    help="Who stops the VMs for a checkpoint: QEMU itself, waiting for the daemon's seal (patched build,"
    " patch 0005), or the daemon over QMP (any QEMU); auto (the default) picks qemu when the build has it.",
)
@click.option(
    "--tcp-host",
    default=None,
    help="The two-host layout: every channel between the hosts on tcp at this address, mutual TLS.",
)
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False),
    default=None,
    help="TLS credentials directory for the tcp channels (`hybridft certs init` / `issue`).",
)
@click.option(
    "--no-daemon",
    is_flag=True,
    help="Start everything but the daemon (COLO not started): for debugging the launcher.",
)
@click.option(
    "--auto-reprotect",
    is_flag=True,
    default=None,
    help="Re-protect by itself after a failover or a lost secondary (with back-off; `pair watch`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line once the guest answers.")
def up_command(
    workdir: Path,
    settings_path: Path | None,
    mode: str | None,
    epoch_ms: int | None,
    policy: str | None,
    accel: str | None,
    memory_mib: int | None,
    disk_mib: int | None,
    compare_timeout_ms: int | None,
    safety_interval_ms: int | None,
    guest_run: tuple[tuple[str, ...], ...],
    passive_secondary: bool | None,
    stop_via: str | None,
    tcp_host: str | None,
    tls_creds: str | None,
    no_daemon: bool,
    auto_reprotect: bool | None,
    as_json: bool,
) -> None:
    """Start the pair in the background; return once the guest answers through the comparator."""
    try:
        settings = load_settings(settings_path)
        settings = settings.with_overrides(
            "pair",
            accel=accel,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            compare_timeout_ms=compare_timeout_ms,
            safety_interval_ms=safety_interval_ms,
            passive_secondary=passive_secondary,
            stop_via=stop_via,
            guest_run=guest_run or None,
            tcp_host=tcp_host,
            tls_creds=tls_creds,
            auto_reprotect=auto_reprotect,
        )
        if policy is not None and mode is None:
            mode = AUTO  # naming a policy means handing it control
        settings = settings.with_overrides("protection", mode=mode, epoch_ms=epoch_ms, policy=policy)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    config = pair_config(workdir, settings, start_daemon=not no_daemon)
    try:
        result = up(config)
    except PairError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"pair up in {result['config']}")
    qemu = result["qemu"]
    click.echo(f"  {'qemu':<14} {qemu['binary']} ({qemu['accel']}): {qemu['reason']}")
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


def pair_config(workdir: Path, settings: Settings, *, start_daemon: bool = True) -> PairConfig:
    """What ``pair up`` starts, from validated settings.  ``auto`` starts in MC (the policy's first
    decision moves it); the policy and the ``[controller]`` settings travel to the daemon as its flags."""
    pair_settings, protection = settings.pair, settings.protection
    daemon_args: list[str] = []
    for key in DAEMON_CONTROLLER_KEYS:  # each [controller] setting the daemon takes, as its flag
        daemon_args += [f"--{key.replace('_', '-')}", str(getattr(settings.controller, key))]
    if protection.mode == AUTO:
        daemon_args += ["--policy", protection.policy]
        for key, value in sorted(settings.policy_params.items()):
            daemon_args += ["--param", f"{key}={value}"]
    return PairConfig(
        workdir=workdir,
        mode=Mode.MC if protection.mode == AUTO else Mode(protection.mode),
        epoch_ms=protection.epoch_ms,
        accel=pair_settings.accel,
        memory_mib=pair_settings.memory_mib,
        disk_mib=pair_settings.disk_mib,
        compare_timeout_ms=pair_settings.compare_timeout_ms,
        safety_interval_ms=pair_settings.safety_interval_ms,
        guest_run=pair_settings.guest_run,
        start_daemon=start_daemon,
        passive_secondary=pair_settings.passive_secondary,
        stop_via=pair_settings.stop_via,
        daemon_args=tuple(daemon_args),
        tcp_host=pair_settings.tcp_host,
        tls_creds=Path(pair_settings.tls_creds) if pair_settings.tls_creds else None,
        auto_reprotect=pair_settings.auto_reprotect,
        reprotect_mode=protection.mode,
    )


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


def _add_reprotect() -> None:
    from mc_driver.reprotect_cli import reprotect_command, watch_command

    pair.add_command(reprotect_command)
    pair.add_command(watch_command)


_add_reprotect()
