"""``hybridft disk ...``: the disk buffer server and its control client."""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup

_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("disk_buffer.server:serve_command", "Serve the `replica` and `view` NBD exports."),
    "ctl": ("disk_buffer.ctl:ctl_command", "seal | commit N | rollback | failover | status"),
}


@click.group(cls=LazyGroup, lazy=_COMMANDS)
def disk() -> None:
    """The shared disk buffer layer (secondary side of disk replication)."""
