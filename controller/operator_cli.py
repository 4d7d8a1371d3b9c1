"""Operator commands for a running pair: ``hybridft mode``, ``hybridft status``, ``hybridft failover``.

Each is one request on the daemon's control socket (``hybridft_common.control``), found from
``--control`` or from the pair's ``pair.json`` (``--workdir DIR`` or ``--config DIR/pair.json``, read
as a ``hybridft_common.manifest.PairManifest``).  They import only the ground floor, so they start
fast and work while the pair is under load (``status --watch`` loads its live view,
:mod:`controller.watch`, only when asked).  A refused request prints the daemon's reason and exits
1; an unreachable daemon exits 2.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hybridft_common.cli import parse_param_options
from hybridft_common.control import ControlError, call
from hybridft_common.endpoints import parse_endpoint
from hybridft_common.manifest import ManifestError, PairManifest
from hybridft_common.reprotect_state import ReprotectRecord, ReprotectState, format_summary
from hybridft_common.settings import AUTO, PROTECTION_MODES
from hybridft_common.vocabulary import STOP_VIA_CHOICES, epoch_ms_range


def resolve_control(control: str | None, workdir: Path | None, config: Path | None) -> str:
    """The daemon's control endpoint from the options (one of them is needed)."""
    if control:
        try:
            parse_endpoint(control)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--control") from None
        return control
    path = config or (workdir / "pair.json" if workdir else None)
    if path is None:
        raise click.UsageError("say which pair: --workdir DIR, --config DIR/pair.json or --control ENDPOINT")
    try:
        return PairManifest.load(path).daemon_control
    except ManifestError as exc:
        hint = "" if path.exists() else " (is the pair up?)"
        raise click.ClickException(f"{exc}{hint}") from None


def request(endpoint: str, verb: str, io_timeout: float, **args: Any) -> dict[str, Any]:
    """One verb to the daemon; its errors end the command (exit 1: refused, 2: unreachable)."""
    try:
        return call(endpoint, verb, io_timeout=io_timeout, **args)
    except ControlError as exc:
        click.echo(f"error: {exc.message} ({exc.code})", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        click.echo(f"error: cannot reach the daemon at {endpoint}: {exc}", err=True)
        raise SystemExit(2) from None


def pair_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")(fn)
    fn = click.option("--control", default=None, help="The daemon's control socket (unix:PATH | tcp:H:P).")(
        fn
    )
    fn = click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The pair's pair.json.",
    )(fn)
    fn = click.option(
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="The pair's --workdir (holds pair.json).",
    )(fn)
    return fn


@click.command("mode")
@click.argument("mode", type=click.Choice(PROTECTION_MODES))
@click.option("--epoch-ms", type=epoch_ms_range(), default=None, help="MC epoch length.")
@click.option(
    "--policy", default=None, help="With auto: the policy that decides (default: the pair's, or cost-model)."
)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="With auto: a policy parameter.")
@click.option(
    "--stop-via",
    type=click.Choice(STOP_VIA_CHOICES),
    default=None,
    help="Who stops the VMs for a checkpoint: QEMU (patched build) or the daemon over QMP.",
)
@pair_options
def mode_command(
    mode: str,
    epoch_ms: int | None,
    policy: str | None,
    params: tuple[str, ...],
    stop_via: str | None,
    workdir: Path | None,
    config: Path | None,
    control: str | None,
    as_json: bool,
) -> None:
    """Force MC or COLO (from the next checkpoint, until `auto`), or hand control to a policy (auto)."""
    endpoint = resolve_control(control, workdir, config)
    if mode == AUTO:
        if epoch_ms is not None or stop_via is not None:
            raise click.UsageError("auto lets the policy choose: --epoch-ms and --stop-via go with mc|colo")
        auto_args: dict[str, Any] = {"mode": AUTO, "params": parse_param_options(params)}
        if policy is not None:
            auto_args["policy"] = policy
        result = request(endpoint, "mode", 10.0, **auto_args)
        click.echo(json.dumps(result) if as_json else f"auto: policy {result['policy']} decides")
        return
    if policy is not None or params:
        raise click.UsageError("--policy and --param go with auto")
    args: dict[str, Any] = {"mode": mode}
    if epoch_ms is not None:
        args["epoch_ms"] = epoch_ms
    if stop_via is not None:
        args["stop_via"] = stop_via
    result = request(endpoint, "mode", 10.0, **args)
    if as_json:
        click.echo(json.dumps(result))
    else:
        mode = result["pending_mode"] or result["mode"]
        click.echo(f"mode {mode} (epoch {result['epoch_ms']} ms) {result['applies']}")


def format_status(status: dict[str, Any]) -> str:
    cps = status["checkpoints"]
    pause = status["pause_ms"]
    last = status.get("last_checkpoint") or {}
    lines = [
        f"state            {status['state']}"
        + (f" ({status['state_reason']})" if status["state_reason"] else ""),
        f"mode             {status['mode']} epoch {status['epoch_ms']} ms"
        + (f" -> {status['pending_mode']} at the next checkpoint" if status.get("pending_mode") else ""),
        f"checkpoint stops via {status.get('stop_via')}"
        + (" (QEMU can wait for the seal)" if status.get("seal_hook") else " (stock QEMU: no seal hook)"),
        f"committed epoch  {status['last_committed_epoch']}",
        f"checkpoints      {cps['daemon_started']} started, {cps['committed']} committed, "
        f"{cps['rolled_back']} rolled back, {cps['failed']} failed, {cps['coalesced']} requests coalesced",
        f"by reason        {json.dumps(cps['by_reason'], sort_keys=True)}",
        f"primary STOPs    {status['primary_stop_events']} "
        f"({status['unrequested_stops']} not fired by the daemon)",
        f"pause            p50 {pause['p50']} ms, p99 {pause['p99']} ms over {pause['samples']}",
        f"divergences      {json.dumps(status['divergences'], sort_keys=True)}",
        f"last checkpoint  {json.dumps(last.get('steps_ms', {}))}",
    ]
    policy = status.get("policy") or {}
    if policy.get("auto"):
        last_decision = policy.get("last_decision") or {}
        lines.append(
            f"policy           {policy['name']} (auto): {last_decision.get('reason', 'no decision yet')}"
        )
        if policy.get("last_error"):
            lines.append(f"policy errors    {policy['failures']}: {policy['last_error']}")
    else:
        lines.append("policy           none (mode forced)")
    if status.get("loss_timeline"):
        lines.append(f"loss timeline    {json.dumps(status['loss_timeline'])}")
    return "\n".join(lines)


def format_failover(report: dict[str, Any]) -> str:
    """The agent's failover.json in one line: above all, whether the secondary was resumed."""
    if report.get("resumed") is False:
        head = f"failover         SECONDARY KEPT PAUSED: {report.get('kept_paused')}"
    elif report.get("resumed"):
        head = f"failover         done, the secondary runs (generation {report.get('generation')})"
    else:
        head = f"failover         incomplete: {report.get('crashed') or 'no outcome recorded'}"
    return f"{head}; trigger: {report.get('reason')}"


def _failover_report(workdir: Path | None, config: Path | None) -> dict[str, Any] | None:
    path = config or (workdir / "pair.json" if workdir else None)
    if path is None:
        return None
    try:
        report = json.loads(PairManifest.load(path).failover_report.read_text())
    except (ManifestError, OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


@click.command("status")
@click.option("--watch", "live", is_flag=True, help="A live view (rich), refreshed every --interval seconds.")
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="With --watch: seconds between refreshes.",
)
@click.option(
    "--count",
    type=click.IntRange(1),
    default=None,
    help="With --watch: stop after N refreshes (default: Ctrl-C).",
)
@pair_options
def status_command(
    live: bool,
    interval: float,
    count: int | None,
    workdir: Path | None,
    config: Path | None,
    control: str | None,
    as_json: bool,
) -> None:
    """Show the pair's state, mode, checkpoint counts and pauses (and the agent's failover, if any;
    --watch: live, until Ctrl-C)."""
    endpoint = resolve_control(control, workdir, config)
    if live:
        if as_json:
            raise click.UsageError("--watch is a view for people; --json prints one reply")
        from controller.watch import watch  # rich is loaded only for the live view

        def fetch() -> dict[str, Any]:
            return call(endpoint, "status", io_timeout=max(2.0, interval * 2))

        raise SystemExit(watch(fetch, endpoint, interval=interval, count=count))
    if count is not None or interval != 1.0:
        raise click.UsageError("--interval and --count go with --watch")
    pair_dir = workdir or (config.parent if config else None)
    record = ReprotectRecord.load(pair_dir) if pair_dir is not None else None
    if record is not None and (record.state == ReprotectState.RUNNING or not _reachable(endpoint)):
        # no daemon while a re-protection runs (or after one failed): the record is the status
        summary = record.summary(time.time())
        why = summary["reason"] or summary["phase"]
        result = {"state": "unprotected", "protected": False, "reprotect": summary,
                  "state_reason": f"reprotect {summary['state']}: {why}"}  # fmt: skip
        click.echo(json.dumps(result, sort_keys=True) if as_json else format_summary(summary))
        return
    report = _failover_report(workdir, config)
    try:
        result = call(endpoint, "status", io_timeout=10.0)
    except ControlError as exc:
        click.echo(f"error: {exc.message} ({exc.code})", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        if report is not None:  # the primary's side may be gone: the agent's word is what is left
            click.echo(json.dumps({"failover": report}) if as_json else format_failover(report))
        click.echo(f"error: cannot reach the daemon at {endpoint}: {exc}", err=True)
        raise SystemExit(2) from None
    if record is not None:
        result["reprotect"] = record.summary(time.time())
    if as_json:
        click.echo(json.dumps(result | ({"failover": report} if report else {}), sort_keys=True))
        return
    text = format_status(result)
    if report:
        text += "\n" + format_failover(report)
    if record is not None:
        text += "\n" + format_summary(result["reprotect"])
    click.echo(text)


def _reachable(endpoint: str) -> bool:
    try:
        call(endpoint, "status", io_timeout=5.0)
    except (ControlError, OSError):
        return False
    return True


@click.command("failover")
@pair_options
def failover_command(workdir: Path | None, config: Path | None, control: str | None, as_json: bool) -> None:
    """Planned failover: a last checkpoint, stop the primary, the agent takes over on the secondary."""
    endpoint = resolve_control(control, workdir, config)
    result = request(endpoint, "failover", 60.0)
    if as_json:
        click.echo(json.dumps(result))
    else:
        told = "the agent was told" if result.get("agent_told") else "WARNING: no agent connected"
        click.echo(f"failover after epoch {result['epoch']} in {result['seconds']} s; {told}")
