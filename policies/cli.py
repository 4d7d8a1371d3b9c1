"""``hybridft policy list|replay``, and the text ``hybridft policy show`` prints.

``show`` asks a running daemon for its policy and recent decisions, so it lives with the daemon's
CLI (controller/, a higher floor); :func:`format_policy` is the formatting it shares with these
commands, kept here beside the policies it describes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import click

from hybridft_common.cli import parse_param_options
from policies.base import Decision, Failure, PolicyError, PolicyLike, param_infos
from policies.registry import list_policies, load_policy
from policies.trace import TraceRecord, load_trace, replay, replay_guarded

__all__ = ["format_policy", "list_command", "replay_command"]


def _outcome_text(outcome: Decision | Failure) -> str:
    if isinstance(outcome, Failure):
        return f"FAILED {outcome.error}"
    return f"{outcome.point.describe()}: {outcome.reason}"


def format_policy(policy: PolicyLike, recent: Sequence[TraceRecord | Decision] = ()) -> str:
    """A policy, its parameters (value, allowed, help) and its recent decisions, for people."""
    lines = [f"policy {policy.name}: {policy.description}"]
    values = {}
    params = getattr(policy, "params", None)
    infos = []
    try:
        infos = param_infos(type(params)) if params is not None else []
    except TypeError:  # a third-party policy whose params are no dataclass
        infos = []
    for info in infos:
        values[info.name] = getattr(params, info.name)
    if infos:
        lines.append("parameters:")
        width = max(len(info.name) for info in infos)
        for info in infos:
            default = "" if values[info.name] == info.default else f" (default {info.default!r})"
            lines.append(
                f"  {info.name:<{width}}  {values[info.name]!r}{default}  [{info.allowed}]  {info.help}"
            )
    if recent:
        lines.append("recent decisions:")
        for item in recent:
            if isinstance(item, TraceRecord):
                lines.append(
                    f"  t={item.window.now:.3f}  {_outcome_text(item.outcome)}  -> {item.verdict.kind}: "
                    f"{item.verdict.why}"
                )
            else:
                lines.append(f"  {_outcome_text(item)}")
    return "\n".join(lines)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {name, description, origin, error}.")
def list_command(as_json: bool) -> None:
    """List the policies: built-ins and those other packages register (entry points)."""
    infos = list_policies()
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
        return
    width = max(len(info.name) for info in infos)
    for info in infos:
        text = f"BROKEN: {info.error}" if info.error else info.description
        origin = "" if info.origin == "builtin" else f"  [{info.origin}]"
        click.echo(f"{info.name:<{width}}  {text}{origin}")


@dataclass(frozen=True)
class _Row:
    seq: int
    t: float
    recorded: Decision | Failure
    replayed: Decision | Failure
    verdict: str | None

    @property
    def same(self) -> bool:
        return self.recorded == self.replayed


def _json_outcome(outcome: Decision | Failure) -> dict[str, object]:
    return outcome.to_json() if isinstance(outcome, Decision) else {"error": outcome.error}


@click.command("replay")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--policy",
    "policy_name",
    default=None,
    help="Policy to replay with (default: the one that wrote the trace, with its parameters).",
)
@click.option("--param", "param_items", multiple=True, metavar="KEY=VALUE", help="A policy parameter.")
@click.option("--guarded", is_flag=True, help="Also run a fresh guard (default settings) over the outcomes.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per decision.")
@click.option("--check", is_flag=True, help="Exit 1 if any replayed outcome differs from the recorded one.")
def replay_command(
    trace: str,
    policy_name: str | None,
    param_items: tuple[str, ...],
    guarded: bool,
    as_json: bool,
    check: bool,
) -> None:
    """Replay a decision trace through a policy: what would it have decided on the same windows?"""
    try:
        records = load_trace(trace)
    except (OSError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not records:
        raise click.ClickException(f"{trace}: no decisions")
    params: dict[str, object] = {}
    if policy_name is None:
        policy_name = records[0].policy
        params.update(records[0].params)
    params.update(parse_param_options(param_items))
    try:
        policy = load_policy(policy_name, params)
    except PolicyError as exc:
        raise click.ClickException(exc.message) from exc
    if guarded:
        pairs = replay_guarded(records, policy)
        outcomes = [outcome for outcome, _ in pairs]
        verdicts: list[str | None] = [f"{v.kind}: {v.why}" for _, v in pairs]
    else:
        outcomes = replay(records, policy)
        verdicts = [None] * len(outcomes)
    rows = [
        _Row(record.seq, record.window.now, record.outcome, outcome, verdict)
        for record, outcome, verdict in zip(records, outcomes, verdicts, strict=True)
    ]
    differ = sum(not row.same for row in rows)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "seq": row.seq,
                        "t": row.t,
                        "same": row.same,
                        "recorded": _json_outcome(row.recorded),
                        "replayed": _json_outcome(row.replayed),
                        "verdict": row.verdict,
                    }
                    for row in rows
                ],
                indent=2,
            )
        )
    else:
        for row in rows:
            mark = "==" if row.same else "!="
            click.echo(f"{row.seq:>6} t={row.t:.3f} {mark} {_outcome_text(row.replayed)}")
            if not row.same:
                click.echo(f"{'':>6}   recorded: {_outcome_text(row.recorded)}")
            if row.verdict:
                click.echo(f"{'':>6}   guard: {row.verdict}")
        click.echo(
            f"{len(rows)} decisions replayed with {policy.name}: {len(rows) - differ} as recorded, "
            f"{differ} differ",
            err=True,
        )
    if check and differ:
        sys.exit(1)
