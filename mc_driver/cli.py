"""``hybridft guest ...`` and ``hybridft qemu ...``: the guest image and the QEMU build/accelerator."""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup

_GUEST: dict[str, tuple[str, str]] = {
    "build": ("mc_driver.guest.cli:build_command", "Build the tiny guest from Debian packages (cached)."),
    "run": ("mc_driver.guest.cli:run_command", "Start a workload in the running primary guest."),
    "start": ("mc_driver.guest.cli:start_command", "Start one of the guest's services (e.g. tokend)."),
    "stop": ("mc_driver.guest.cli:stop_command", "Stop one of the guest's services and its connections."),
    "services": ("mc_driver.guest.cli:services_command", "List the guest's services and their state."),
}

_QEMU: dict[str, tuple[str, str]] = {
    "build": ("mc_driver.qemu_build:build_command", "Build the patched QEMU 7.2 (cached)."),
    "which": ("mc_driver.accel:which_command", "Which QEMU binary and accelerator would run, and why."),
}


@click.group(cls=LazyGroup, lazy=_GUEST)
def guest() -> None:
    """The protected guest: build it, run workloads in it, start and stop its services."""


@click.group(cls=LazyGroup, lazy=_QEMU)
def qemu() -> None:
    """The QEMU used for the pair: stock + KVM where KVM boots Linux, patched build + TCG elsewhere."""
