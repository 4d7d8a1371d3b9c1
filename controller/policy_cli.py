"""``hybridft policy``: the mode-selection policies, offline.

``list`` and ``replay`` need no pair (they live beside the policies, in ``policies/cli.py``); the group is
here, on the top floor, because commands that talk to a running daemon join it.
"""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup

_POLICY_COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("policies.cli:list_command", "The built-in and installed policies."),
    "replay": ("policies.cli:replay_command", "A policy's decisions on a recorded decision trace, offline."),
}


@click.group("policy", cls=LazyGroup, lazy=_POLICY_COMMANDS)
def policy() -> None:
    """Mode-selection policies: list them, replay a recorded decision trace."""
