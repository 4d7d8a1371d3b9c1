"""``hybridft disk ctl``: drive a running disk server over its control socket.

Why a separate module: it imports nothing but the control client, so the agent's failover path
(`disk ctl failover`) starts fast.  A refused request prints the server's message and exits non-zero;
the server guarantees a refused request changed nothing.
"""

from __future__ import annotations

import json
from typing import Any

import click

from hybridft_common.control import ControlError, call
from hybridft_common.endpoints import parse_endpoint

VERBS = ("seal", "commit", "rollback", "failover", "status")


def _format(result: dict[str, Any]) -> str:
    width = max((len(key) for key in result), default=0)
    lines = []
    for key, value in result.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


@click.command("ctl")
@click.option("--control", required=True, help="The server's control socket: unix:PATH or tcp:HOST:PORT.")
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="TLS credentials directory for a tcp: address (see `hybridft certs`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for a reply.")
@click.argument("verb", type=click.Choice(VERBS))
@click.argument("epoch", required=False, type=int)
def ctl_command(
    control: str, tls_creds: str | None, as_json: bool, timeout: float, verb: str, epoch: int | None
) -> None:
    """seal | commit N | rollback | failover | status"""
    try:
        endpoint = parse_endpoint(control, tls_creds)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--control") from None
    args: dict[str, Any] = {}
    if verb == "commit":
        if epoch is None:
            raise click.UsageError("commit needs the epoch number: disk ctl commit N")
        args["epoch"] = epoch
    elif epoch is not None:
        raise click.UsageError(f"{verb} takes no epoch argument")
    try:
        result = call(endpoint, verb, io_timeout=timeout, **args)
    except ControlError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": exc.message, "code": exc.code}))
        click.echo(f"error: {exc.message} ({exc.code})", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        click.echo(f"error: cannot reach the disk server at {endpoint}: {exc}", err=True)
        raise SystemExit(2) from None
    click.echo(json.dumps(result, sort_keys=True) if as_json else _format(result))
