"""``hybridft pair reprotect``: a new secondary for the survivor of a failover or of a lost secondary.

A thin shell over :mod:`mc_driver.reprotect`: options, the printed answer (``--json``: the fields of
``pair up --json`` for the new layout), errors as messages (exit 1; the survivor still serves and
``hybridft status`` shows the reason).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from hybridft_common.manifest import ManifestError, PairManifest
from hybridft_common.reprotect_state import AutoReprotect, Backoff, CaseError, ReprotectRecord
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


@click.command("watch")
@click.option("--workdir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["mc", "colo", "auto"]), default="mc", show_default=True)
@click.option("--first-delay", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Back-off after the first failed attempt (doubles up to --max-delay).")  # fmt: skip
@click.option("--max-delay", type=click.FloatRange(0), default=120.0, show_default=True)
@click.option("--poll", type=click.FloatRange(0.05), default=0.5, show_default=True)
def watch_command(workdir: Path, mode: str, first_delay: float, max_delay: float, poll: float) -> None:
    """Re-protect the pair by itself after every failover or lost secondary (started by
    ``pair up --auto-reprotect``; ``pair down`` stops it first)."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    watch(workdir.resolve(), mode, AutoReprotect(Backoff(first_delay, max_delay)), poll)


def watch(workdir: Path, mode: str, auto: AutoReprotect, poll: float) -> None:
    from hybridft_common.control import ControlError, call

    log = logging.getLogger("hybridft.reprotect")
    while True:
        time.sleep(poll)
        try:
            config = PairManifest.load(workdir / "pair.json")
        except ManifestError:
            continue
        try:
            state: str | None = str(call(config.daemon_control, "status", io_timeout=5).get("state"))
        except (ControlError, OSError):
            state = None
        record = ReprotectRecord.load(workdir)
        now = time.monotonic()
        failed_over = config.failover_report.exists()
        if not auto.due(now, failed_over=failed_over, daemon_state=state,
                        record_state=record.state if record else ""):  # fmt: skip
            continue
        log.warning("re-protecting (failed over: %s, daemon: %s)", failed_over, state)
        try:
            result = reprotect(workdir, mode)
        except (ReprotectError, CaseError) as exc:
            delay = auto.attempt_failed(time.monotonic())
            log.error("re-protection failed: %s; next attempt in %.1f s", exc, delay)
            continue
        auto.attempt_succeeded()
        log.warning("protected again: %s", json.dumps(result["reprotect"]["phases"]))
