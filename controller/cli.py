"""The ``hybridft`` command line.

Sub-commands live beside the code they drive (``colo_compare/cli.py``, ``disk_buffer/cli.py``, ...)
and are loaded lazily, so ``hybridft disk ctl status`` does not pay for importing scapy or numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("colo_compare.cli:compare", "Compare VM outputs: replay captures, serve a QEMU pair."),
    "disk": ("disk_buffer.cli:disk", "The disk buffer: NBD server for the replica and view, control."),
    "bench": ("controller.bench:bench", "Benchmarks (JSON and a table, each with its same-run baseline)."),
    "guest": ("mc_driver.cli:guest", "The protected guest: build it, run workloads in it."),
    "qemu": ("mc_driver.cli:qemu", "The QEMU build and accelerator choice."),
    "pair": ("mc_driver.pair_cli:pair", "Start or stop a protected VM pair on this machine."),
    "daemon": ("controller.daemon:daemon_command", "The controller daemon (started by `pair up`)."),
    "agent": ("controller.agent:agent_command", "The secondary's failover agent (started by `pair up`)."),
    "mode": ("controller.ops:mode_command", "Switch a running pair to MC or COLO at the next checkpoint."),
    "status": ("controller.ops:status_command", "Show a running pair's status."),
    "failover": ("controller.ops:failover_command", "Planned failover to the secondary."),
    "verify-checkpoint": ("mc_driver.verify:verify_checkpoint_command", "Prove a checkpoint's RAM identity."),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when used."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            target, _help = self.lazy[cmd_name]
            module_name, attr = target.split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][1]) for name in sorted(self.lazy)]
        for name in super().list_commands(ctx):
            cmd = super().get_command(ctx, name)
            if cmd is not None and name not in self.lazy:
                rows.append((name, cmd.get_short_help_str()))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, lazy=_COMMANDS)
@click.version_option(package_name="hybridft")
def main() -> None:
    """hybridft: fault tolerance for QEMU/KVM VMs, switching live between MC and COLO."""
