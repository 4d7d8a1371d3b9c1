"""``hybridft guest build|run|start|stop|services``: thin click shells over the image and the control loop.

Why a module of its own: the seams below hold no CLI code, so importing one of them never imports click.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from mc_driver.guest.control import GuestControl
from mc_driver.guest.errors import GuestError
from mc_driver.guest.expected import SERVICE_PORTS
from mc_driver.guest.image import build_guest, prune_cache

F = TypeVar("F", bound=Callable[..., None])


def _control_options(command: F) -> F:
    """--control, --timeout and --json: every command that talks to a running guest."""
    command = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(command)
    command = click.option(
        "--timeout", default=30.0, show_default=True, help="Seconds to wait for the guest."
    )(command)
    return click.option(
        "--control",
        "--console",
        "control",
        required=True,
        help="The guest's control chardev (ttyS1): unix:PATH or tcp:HOST:PORT.",
    )(command)


@click.command("build")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also copy the result here.")
@click.option("--prune", is_flag=True, help="Remove other cached builds and kernel packages.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(out: Path | None, prune: bool, as_json: bool) -> None:
    """Build the guest (kernel + initramfs) from Debian packages, or reuse the cached build."""
    try:
        image = build_guest(out, log=not as_json)
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    if prune:
        for path in prune_cache(image):
            click.echo(f"removed {path}", err=True)
    if as_json:
        click.echo(json.dumps(image.to_json()))
    else:
        click.echo(f"kernel  {image.kernel}")
        click.echo(f"initrd  {image.initrd}")
        click.echo(f"append  {image.append}")
        click.echo(
            f"from    {image.kernel_package} {image.kernel_version}; modules {' '.join(image.modules)}"
        )


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("workload")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_control_options
def run_command(workload: str, args: tuple[str, ...], control: str, timeout: float, as_json: bool) -> None:
    """Start WORKLOAD [ARGS...] in the running guest, in the background.

    WORKLOAD is one of the guest's programs (memdirty MIB_PER_S WORKING_SET_MIB, cpuburn [SECONDS],
    diskwriter /dev/vda [--port P], echod, rrserver, ...) or any busybox applet. Its output goes to
    /tmp/WORKLOAD.PID.log in the guest.
    """
    try:
        with GuestControl(control, timeout=timeout) as ctl:
            pid = ctl.run(workload, *args)
    except (GuestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"workload": workload, "args": list(args), "pid": pid}))
    else:
        click.echo(f"started {workload} in the guest: pid {pid}, log /tmp/{workload}.{pid}.log")


_SERVICE = click.argument("service", type=click.Choice(list(SERVICE_PORTS)))


@click.command("start")
@_SERVICE
@_control_options
def start_command(service: str, control: str, timeout: float, as_json: bool) -> None:
    """Start SERVICE in the running guest; returns once it listens (a running service is left alone)."""
    try:
        with GuestControl(control, timeout=timeout) as ctl:
            pid = ctl.start_service(service)
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    port = SERVICE_PORTS[service]
    if as_json:
        click.echo(json.dumps({"service": service, "port": port, "pid": pid}))
    else:
        click.echo(f"{service} listens on port {port} in the guest: pid {pid}")


@click.command("stop")
@_SERVICE
@_control_options
def stop_command(service: str, control: str, timeout: float, as_json: bool) -> None:
    """Stop SERVICE in the running guest, open connections included; returns once its port refuses."""
    try:
        with GuestControl(control, timeout=timeout) as ctl:
            ctl.stop_service(service)
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    port = SERVICE_PORTS[service]
    if as_json:
        click.echo(json.dumps({"service": service, "port": port, "stopped": True}))
    else:
        click.echo(f"{service} stopped in the guest: port {port} refuses connections")


@click.command("services")
@_control_options
def services_command(control: str, timeout: float, as_json: bool) -> None:
    """List the guest's services: port, running or stopped, pid."""
    try:
        with GuestControl(control, timeout=timeout) as ctl:
            states = ctl.services()
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({s.name: {"port": s.port, "pid": s.pid} for s in states.values()}))
        return
    for s in states.values():
        click.echo(f"{s.name:10} {s.port:>5}  " + (f"running  pid {s.pid}" if s.running else "stopped"))
