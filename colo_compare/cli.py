"""``hybridft compare ...``: replay captures through the comparator, or serve a live QEMU pair."""

from __future__ import annotations

import click

from hybridft_common.cli import LazyGroup

_COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("colo_compare.replay:replay_command", "Compare PRIMARY.pcap with SECONDARY.pcap."),
    "demo": ("colo_compare.replay:demo_command", "Generate a capture pair and replay it (make demo)."),
    "serve": ("colo_compare.serve:serve_command", "The live comparator for a QEMU pair."),
}


@click.group(cls=LazyGroup, lazy=_COMMANDS)
def compare() -> None:
    """Compare the primary's and the secondary's network output."""
