"""``hybridft daemon``: the command line of :mod:`controller.daemon` (started by ``hybridft pair up``).

Why apart from the daemon: the daemon is an object tests and benchmarks drive in-process; what is
only the process's concern -- reading pair.json and the overrides, logging, the scheduling priority,
the ready line ``pair up`` waits for, the exit on SIGTERM -- lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import click

from controller.daemon import Daemon, run_daemon
from controller.daemon_config import CONTROLLER_KEYS, DaemonConfig, DaemonError
from hybridft_common import eventloop
from hybridft_common.cli import parse_param_options
from hybridft_common.control import ControlError
from hybridft_common.settings import ControllerSettings
from hybridft_common.vocabulary import Mode, epoch_ms_range, mode_choice
from mc_driver.qmp import QmpError

DAEMON_NICE = -10

#: the [controller] settings the daemon takes as flags: (flag, DaemonConfig field, settings key)
CONTROLLER_FLAGS = tuple((f"--{key.replace('_', '-')}", name, key) for name, key in CONTROLLER_KEYS.items())


def _controller_type(key: str) -> click.ParamType:
    """The flag's click type, with the range the settings schema allows (one source for both)."""
    spec = next(f for f in dataclasses.fields(ControllerSettings) if f.name == key)
    lo, hi = spec.metadata["lo"], spec.metadata["hi"]
    if "int" in str(spec.type):
        return click.IntRange(int(lo), int(hi))
    return click.FloatRange(float(lo), float(hi))


def controller_options(command: Callable[..., None]) -> Callable[..., None]:
    """One option per [controller] setting (``--min-dwell-s``...), each ranged like the settings file."""
    defaults = ControllerSettings()
    for flag, _name, key in reversed(CONTROLLER_FLAGS):
        spec = next(f for f in dataclasses.fields(ControllerSettings) if f.name == key)
        help_text = f"[controller] {key}: {spec.metadata['help']} [{getattr(defaults, key)}]."
        command = click.option(flag, key, type=_controller_type(key), default=None, help=help_text)(command)
    return command


@click.command("daemon")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="pair.json written by `hybridft pair up`.",
)
@click.option("--mode", type=mode_choice(), default=None, help="Override pair.json's mode.")
@click.option("--epoch-ms", type=epoch_ms_range(), default=None, help="Override pair.json's epoch_ms.")
@click.option(
    "--passive-secondary/--active-secondary",
    default=None,
    help="MC: stop the secondary right after each checkpoint (saves its CPU).",
)
@click.option(
    "--policy", default=None, help="Start in auto: this policy picks the mode (hybridft policy list)."
)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A parameter of --policy.")
@controller_options
@click.option("--no-start", is_flag=True, help="The pair is already in COLO: do not migrate.")
@click.option(
    "--metrics-port", type=click.IntRange(1, 65535), default=None, help="Serve /metrics on 127.0.0.1."
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def daemon_command(
    config_path: Path,
    mode: str | None,
    epoch_ms: int | None,
    passive_secondary: bool | None,
    policy: str | None,
    params: tuple[str, ...],
    no_start: bool,
    metrics_port: int | None,
    log_level: str,
    **controller: float | None,
) -> None:
    """Run the epoch protocol for the pair in CONFIG (foreground; SIGTERM stops it)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = DaemonConfig.from_pair_json(config_path)
    except DaemonError as exc:
        raise click.ClickException(str(exc)) from None
    if mode is not None:
        config.mode = Mode(mode)
    if epoch_ms is not None:
        config.epoch_ms = epoch_ms
    if passive_secondary is not None:
        config.passive_secondary = passive_secondary
    if policy is not None:
        config.policy, config.policy_params = policy, dict(parse_param_options(params))
    elif params:
        raise click.UsageError("--param goes with --policy")
    for _flag, name, key in CONTROLLER_FLAGS:
        if controller.get(key) is not None:
            setattr(config, name, controller[key])
    config.start_colo = not no_start
    config.metrics_port = metrics_port
    with contextlib.suppress(OSError):
        # heartbeats and checkpoint steps are latency-critical and cheap: ahead of the CPU-bound QEMUs
        os.setpriority(os.PRIO_PROCESS, 0, DAEMON_NICE)

    def ready(daemon: Daemon) -> None:
        print(
            json.dumps({"ready": True, "control": config.control, "mode": str(daemon.protocol.point.mode)}),
            flush=True,
        )

    try:
        eventloop.run(run_daemon(config, ready), "daemon")
    except (DaemonError, QmpError, ControlError, OSError) as exc:
        raise click.ClickException(f"daemon: {exc}") from None
