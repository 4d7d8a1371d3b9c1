"""Command-line pieces every package's CLI shares: the lazily loading click group, and how to run
``hybridft`` itself as a child process.

Each package keeps its sub-commands beside the code they drive and registers them in a
:class:`LazyGroup`, so ``hybridft disk ctl status`` does not pay for importing scapy or numpy.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

import click

#: The console script's entry point.  Services start each other as ``hybridft ...`` child processes;
#: naming the entry point as text keeps the import graph pointing down (only the CLI imports it).
ENTRY_POINT = "from controller.cli import main; main()"


def hybridft_command(*words: str) -> list[str]:
    """argv that runs ``hybridft WORDS...`` with this interpreter (no console script on PATH needed)."""
    return [sys.executable, "-c", ENTRY_POINT, *words]


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


def parse_param_options(values: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a mapping (the policy converts and validates the values)."""
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        params[key] = value.strip()
    return params
