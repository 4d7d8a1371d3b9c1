"""``hybridft policy``: the mode-selection policies, offline.

``list`` and ``replay`` need no pair (they live beside the policies, in ``policies/cli.py``); ``show``
asks a running daemon which policy is in charge, with its parameters and its recent decisions.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from controller.operator_cli import pair_options, request, resolve_control
from hybridft_common.cli import LazyGroup

_POLICY_COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("policies.cli:list_command", "The built-in and installed policies."),
    "replay": ("policies.cli:replay_command", "A policy's decisions on a recorded decision trace, offline."),
    "show": (
        "controller.policy_cli:show_command",
        "The policy in charge of a running pair, its last decisions.",
    ),
}


@click.group("policy", cls=LazyGroup, lazy=_POLICY_COMMANDS)
def policy() -> None:
    """Mode-selection policies: list them, show the one in charge, replay a recorded decision trace."""


@click.command("show")
@pair_options
def show_command(workdir: Path | None, config: Path | None, control: str | None, as_json: bool) -> None:
    """The policy in charge of a pair (or none: a forced mode), its parameters, its last decision."""
    endpoint = resolve_control(control, workdir, config)
    result = request(endpoint, "policy", 10.0)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    if not result.get("auto"):
        click.echo("no policy: the mode is forced (hybridft mode auto --policy NAME hands control to one)")
        return
    click.echo(f"policy     {result['name']}: {result.get('description') or ''}")
    for key, value in sorted((result.get("params") or {}).items()):
        click.echo(f"  {key:<24} {value}")
    last = result.get("last_decision") or {}
    click.echo(f"last       {last.get('mode')} {last.get('epoch_ms')} ms: {last.get('reason')}")
    verdict = result.get("last_verdict") or {}
    click.echo(f"guard      {verdict.get('kind')}: {verdict.get('why')}")
    click.echo(f"decisions  {result['decisions']}, failures {result['failures']}")
    if result.get("last_error"):
        click.echo(f"last error {result['last_error']}")
