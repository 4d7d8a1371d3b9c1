"""The ``hybridft`` command line.

Sub-commands live beside the code they drive (``colo_compare/cli.py``, ``disk_buffer/cli.py``, ...)
and are loaded lazily, so ``hybridft disk ctl status`` does not pay for importing scapy or numpy.
"""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup
from hybridft_common.eventloop import runtime_summary

# name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("colo_compare.cli:compare", "Compare VM outputs: replay captures, serve a QEMU pair."),
    "certs": ("hybridft_common.certs:certs", "TLS credentials for tcp: channels: a CA, host directories."),
    "disk": ("disk_buffer.cli:disk", "The disk buffer: NBD server for the replica and view, control."),
    "bench": ("bench.cli:bench", "Benchmarks (JSON and a table, each with its same-run baseline)."),
    "guest": ("mc_driver.cli:guest", "The protected guest: build it, run workloads in it."),
    "qemu": ("mc_driver.cli:qemu", "The QEMU build and accelerator choice."),
    "pair": ("mc_driver.pair_cli:pair", "Start or stop a protected VM pair on this machine."),
    "daemon": ("controller.daemon_cli:daemon_command", "The controller daemon (started by `pair up`)."),
    "agent": ("controller.agent:agent_command", "The secondary's failover agent (started by `pair up`)."),
    "mode": (
        "controller.operator_cli:mode_command",
        "Switch a running pair to MC or COLO at the next checkpoint.",
    ),
    "status": ("controller.operator_cli:status_command", "Show a running pair's status."),
    "failover": ("controller.operator_cli:failover_command", "Planned failover to the secondary."),
    "verify": (
        "controller.verify_cli:verify_command",
        "Compare a running pair's RAM at a held checkpoint (after re-protection, say).",
    ),
    "policy": ("controller.policy_cli:policy", "Mode-selection policies: list, replay a decision trace."),
    "experiment": ("experiments.cli:experiment", "Run workloads x modes on real pairs; report and plots."),
    "verify-checkpoint": ("mc_driver.verify:verify_checkpoint_command", "Prove a checkpoint's RAM identity."),
}


@click.group(cls=LazyGroup, lazy=_COMMANDS)
@click.version_option(package_name="hybridft", message=f"%(prog)s, version %(version)s\n{runtime_summary()}")
def main() -> None:
    """hybridft: fault tolerance for QEMU/KVM VMs, switching live between MC and COLO."""
