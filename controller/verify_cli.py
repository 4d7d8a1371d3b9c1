"""``hybridft verify``: prove that a running pair's secondary holds exactly the primary's RAM.

One request (``verify``) to the daemon of a pair started with ``pair up`` (or re-protected): the daemon
holds its next checkpoint on both sides (patch 0007), copies both VMs' RAM out while they are stopped
at it, compares it page by page, and resumes them.  What ``hybridft verify-checkpoint`` proves on a
test pair of its own, this checks on the pair that runs the guest, e.g. after ``pair reprotect``.
Exit status 0 if identical, 1 if any page differs or the check could not run, 2 if the daemon is
unreachable.  Like the other operator commands it imports only the ground floor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from controller.operator_cli import pair_options, request, resolve_control

VERIFY_TIMEOUT = 60.0


def format_verify(result: dict[str, Any]) -> str:
    head = (
        f"epoch {result.get('epoch')} ({result.get('mode')}, stop via {result.get('stop_via')}): "
        f"{result.get('mib')} MiB of RAM in {result.get('ranges')} ranges compared in "
        f"{result.get('seconds')} s"
    )
    if result.get("identical"):
        return f"{head}\nIDENTICAL: the secondary's RAM equals the primary's"
    lines = [head, f"DIFFERENT: {result.get('differing_pages')} of {result.get('pages')} pages differ"]
    for run in result.get("runs") or []:
        gpa = run.get("gpa")
        where = "not mapped" if gpa is None else f"GPA 0x{gpa:x}"
        lines.append(f"    {run['block']} +0x{run['offset']:x} ({where}), {run['pages']} pages")
    return "\n".join(lines)


@click.command("verify")
@pair_options
@click.option(
    "--timeout",
    type=click.FloatRange(1, 600),
    default=VERIFY_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the held checkpoint and the comparison.",
)
def verify_command(
    workdir: Path | None, config: Path | None, control: str | None, as_json: bool, timeout: float
) -> None:
    """Hold the next checkpoint, compare both VMs' RAM page by page, resume: identical or not."""
    endpoint = resolve_control(control, workdir, config)
    result = request(endpoint, "verify", timeout + 10.0, timeout=timeout)
    click.echo(json.dumps(result) if as_json else format_verify(result))
    if not result.get("identical"):
        raise SystemExit(1)
