"""``hybridft pair reprotect``: a new secondary for the survivor of a failover or of a lost secondary.

A thin shell over :mod:`mc_driver.reprotect`: options, the printed answer (``--json``: the fields of
``pair up --json`` for the new layout), errors as messages (exit 1; the survivor still serves and
``hybridft status`` shows the reason).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hybridft_common.reprotect_state import CaseError
from mc_driver.reprotect import ReprotectError, reprotect


@click.command("reprotect")
@click.option("--workdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["mc", "colo", "auto"]),
    default="mc",
    show_default=True,
    help="The mode the re-protected pair runs in (auto: the default policy decides).",
)
@click.option("--answer-timeout", type=click.FloatRange(1), default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line once the pair is protected.")
def reprotect_command(workdir: Path, mode: str, answer_timeout: float, as_json: bool) -> None:
    """Start a new secondary (own namespace and disk server), copy the disk while the guest runs,
    migrate, and hand the pair to a new daemon and agent."""
    if not (workdir / "pair.json").exists():
        raise click.ClickException(f"no pair.json in {workdir}: is the pair up?")

    def show(phase: str) -> None:
        if not as_json:
            click.echo(f"  {phase}", err=True)

    try:
        result = reprotect(workdir, mode, answer_timeout=answer_timeout, on_phase=show)
    except (ReprotectError, CaseError) as exc:
        raise click.ClickException(f"reprotect failed: {exc}") from None
    if as_json:
        click.echo(json.dumps(result))
        return
    summary = result["reprotect"]
    click.echo(
        f"protected again (generation {summary['generation']}), unprotected for "
        f"{summary['unprotected_seconds']} s; secondary pid {result['secondary_pid']} "
        f"in {result['secondary_netns']}"
    )
