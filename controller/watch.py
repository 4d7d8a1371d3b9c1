"""``hybridft status --watch``: the pair's status as a live terminal view, refreshed every second.

Why this shape.  What an operator watches for is a change -- above all a mode switch a policy made --
so the view must show one as it happens, and it must never be what breaks: a daemon that is slower,
older (fewer status fields) or gone must still give a readable screen.  So the work splits in two:

* :func:`render_status` is pure: fed the same dict ``status --json`` prints, the previous refresh's
  dict and the wall-clock time, it returns a rich renderable.  Every field is optional (a daemon of
  an older release, or one still starting, simply shows less).  A switch is shown as a highlighted
  banner ``SWITCH mc → colo (policy: <reason>)`` when the mode differs from the previous refresh, and
  stays up for :data:`BANNER_S` seconds after the daemon applied it (``last_point_change.at``), so a
  switch between two refreshes is not missed either.
* :func:`watch` is the loop: one ``status`` request per refresh over the control socket, a
  ``rich.live.Live`` on a terminal (plain successive renders otherwise, e.g. into a log), and an
  unreachable daemon shown as such while it keeps trying.  It returns the exit status: 0 once any
  refresh reached the daemon, :data:`EXIT_UNREACHABLE` when every refresh failed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

BANNER_S = 5.0  # a switch stays on screen this long after the daemon applied it
SIGNAL_GROUPS = ("cpu", "mem", "disk", "net", "div", "ckpt", "op")  # the catalogue's prefixes, in order
SWITCHES_SHOWN = 5
EXIT_UNREACHABLE = 2  # as every operator command when the daemon cannot be reached


# ------------------------------------------------------------------------------ formatting
def _number(value: Any) -> str:
    """A figure as people read it: None/NaN as '-', 3 significant digits, big ones grouped."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value).lower()
    if not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _clock(at: Any) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "?"
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


def _dict(value: Any) -> dict[str, Any]:
    """A field that should be an object: anything else (missing, null, an older shape) reads as {}."""
    return value if isinstance(value, dict) else {}


def _rates(by_reason: Mapping[str, Any]) -> str:
    return ", ".join(f"{reason} {_number(rate)}/s" for reason, rate in sorted(by_reason.items())) or "-"


# ------------------------------------------------------------------------------ pieces
def switch_banner(status: Mapping[str, Any], previous: Mapping[str, Any] | None, now: float) -> Text | None:
    """``SWITCH before → after (who: why)`` while a mode switch is news, else None."""
    mode = status.get("mode")
    change = _dict(status.get("last_point_change"))
    before = _dict(change.get("before")).get("mode")
    after = _dict(change.get("after")).get("mode")
    at = change.get("at")
    recent = isinstance(at, int | float) and 0 <= now - at < BANNER_S and before != after
    changed = previous is not None and previous.get("mode") is not None and previous.get("mode") != mode
    if not (changed or recent):
        return None
    if changed and after != mode:  # the daemon's last change is not this one (an older daemon): say less
        before, after, change = previous.get("mode") if previous else None, mode, {}
    source = change.get("source")
    reason = change.get("reason")
    if source == "policy" and not reason:
        reason = _dict(_dict(status.get("policy")).get("last_decision")).get("reason")
    who = f"{source}: {reason}" if source and reason else (source or "cause unknown")
    return Text(f" SWITCH {before} → {after} ({who}) ", style="bold black on yellow")


def _why(status: Mapping[str, Any]) -> str:
    """Why the pair runs in its mode: who changed the point last, and the policy's reason."""
    change = _dict(status.get("last_point_change"))
    policy = _dict(status.get("policy"))
    if not change:
        return "as started"
    source = change.get("source", "?")
    reason = change.get("reason")
    if source == "policy" and not reason:
        reason = _dict(policy.get("last_decision")).get("reason")
    when = f" at {_clock(change['at'])}" if "at" in change else ""
    return f"{source}{when}" + (f": {reason}" if reason else "")


def _policy_line(policy: Mapping[str, Any]) -> Text:
    text = Text()
    if policy.get("auto"):
        text.append(f"{policy.get('name')} (auto)", style="bold cyan")
        last = _dict(policy.get("last_decision"))
        if last:
            text.append(
                f"  last: {last.get('mode')} {last.get('epoch_ms')} ms at {_clock(last.get('at'))}"
                f" -- {last.get('reason')}"
            )
        else:
            text.append("  no decision yet")
    else:
        text.append("none (mode forced)" if not policy.get("ended") else "none", style="dim")
    ended = _dict(policy.get("ended"))
    if ended:
        text.append(f"  {ended.get('policy')} stood down: {ended.get('why')}", style="yellow")
    if policy.get("last_error"):
        text.append(f"  errors {policy.get('failures')}: {policy['last_error']}", style="red")
    return text


def _signal_table(signals: Mapping[str, Any]) -> Table:
    table = Table(title="signals", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column("group", style="bold")
    table.add_column("values", overflow="fold")
    groups: dict[str, list[str]] = {}
    for name in sorted(signals):
        prefix, _, rest = name.partition(".")
        group = prefix if prefix in SIGNAL_GROUPS and rest else "other"
        value = signals[name]
        if "bytes_per_s" in name:
            shown = _bytes(value) + "/s"
        elif "bytes" in name:
            shown = _bytes(value)
        else:
            shown = _number(value)
        groups.setdefault(group, []).append(f"{rest if group != 'other' else name} {shown}")
    for group in (*SIGNAL_GROUPS, "other"):
        if group in groups:
            table.add_row(f"{group}.", "  ".join(groups[group]))
    if not groups:
        table.add_row("", Text("none sampled yet", style="dim"))
    return table


def _by_mode_table(status: Mapping[str, Any]) -> Table:
    table = Table(title="checkpoints by mode", title_justify="left", box=None, pad_edge=False)
    for column in ("mode", "per s", "by reason (per s)", "pause p50", "p99", "n", "in mode"):
        table.add_column(column)
    by_mode = _dict(status.get("checkpoints_by_mode"))
    if by_mode:
        order = {"mc": 0, "colo": 1}
        for mode, figures in sorted(by_mode.items(), key=lambda item: (order.get(item[0], 2), item[0])):
            figures = _dict(figures)
            pause = _dict(figures.get("pause_ms"))
            table.add_row(
                Text(mode, style="bold" if mode == status.get("mode") else ""),
                _number(figures.get("per_s")),
                _rates(_dict(figures.get("per_s_by_reason"))),
                f"{_number(pause.get('p50'))} ms",
                f"{_number(pause.get('p99'))} ms",
                _number(pause.get("count")),
                f"{_number(figures.get('seconds_in_mode'))} of {_number(figures.get('window_s'))} s",
            )
    else:  # an older daemon: the all-modes figures only
        pause = _dict(status.get("pause_ms"))
        table.add_row(
            "all",
            "-",
            ", ".join(
                f"{reason} {_number(n)}"
                for reason, n in sorted(_dict(_dict(status.get("checkpoints")).get("by_reason")).items())
            )
            or "-",
            f"{_number(pause.get('p50'))} ms",
            f"{_number(pause.get('p99'))} ms",
            _number(pause.get("samples")),
            "",
        )
    return table


def _switches(changes: Iterable[Any]) -> list[str]:
    lines = []
    for change in [c for c in changes if isinstance(c, dict)][-SWITCHES_SHOWN:]:
        before, after = _dict(change.get("before")), _dict(change.get("after"))
        lines.append(
            f"{_clock(change.get('at'))} epoch {change.get('epoch')}: {before.get('mode')} "
            f"{before.get('epoch_ms')} ms → {after.get('mode')} {after.get('epoch_ms')} ms "
            f"({change.get('source', '?')}{': ' + str(change['reason']) if change.get('reason') else ''})"
        )
    return lines


# ------------------------------------------------------------------------------ the view
def render_status(
    status: Mapping[str, Any], previous: Mapping[str, Any] | None, now: float
) -> RenderableType:
    """The whole view of one ``status`` reply (see the module docstring); ``now`` is wall-clock time."""
    state = str(status.get("state", "?"))
    mode = status.get("mode", "?")
    signals = _dict(status.get("signals"))
    protected = status.get("protected")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    state_text = Text(state, style="green" if protected else "bold red")
    if status.get("state_reason"):
        state_text.append(f" ({status['state_reason']})")
    summary.add_row("state", state_text)
    mode_text = Text(f"{mode}", style="bold magenta")
    mode_text.append(f"  epoch {_number(status.get('epoch_ms'))} ms")
    if status.get("pending_mode"):
        mode_text.append(f"  -> {status['pending_mode']} at the next checkpoint", style="yellow")
    mode_text.append(f"  why: {_why(status)}")
    summary.add_row("mode", mode_text)
    summary.add_row("policy", _policy_line(_dict(status.get("policy"))))
    summary.add_row("epoch", f"last committed {_number(status.get('last_committed_epoch'))}")
    checkpoints = _dict(status.get("checkpoints"))
    if checkpoints:
        summary.add_row(
            "checkpoints",
            f"{_number(checkpoints.get('committed'))} committed, {_number(checkpoints.get('rolled_back'))} "
            f"rolled back, {_number(checkpoints.get('failed'))} failed, "
            f"{_number(checkpoints.get('mode_switches'))} switches",
        )
    pause = _dict(status.get("pause_ms"))
    summary.add_row(
        "pause",
        f"p50 {_number(pause.get('p50'))} ms, p99 {_number(pause.get('p99'))} ms "
        f"(last {_number(pause.get('samples'))} checkpoints, all modes)",
    )
    divergence_kind = "live" if mode == "colo" else "shadow"
    coverage = signals.get("div.shadow_coverage")
    if mode != "colo" and isinstance(coverage, int | float) and not isinstance(coverage, bool):
        # how much of the primary's output the shadow could compare: a 0 from a blind shadow means nothing
        divergence_kind = f"shadow, {coverage * 100:.1f} % compared"
    summary.add_row(
        "output",
        f"held {_bytes(signals.get('net.held_bytes'))}, divergences {_number(signals.get('div.per_s'))}/s "
        f"({divergence_kind}), turns {_number(signals.get('net.turns_per_s'))}/s",
    )
    summary.add_row(
        "disk",
        f"backlog {_bytes(signals.get('disk.writeout_backlog_bytes'))}, "
        f"speculation {_bytes(signals.get('disk.speculation_bytes'))}",
    )
    heartbeat = _dict(status.get("heartbeat"))
    if heartbeat:
        summary.add_row(
            "heartbeat",
            f"{'connected' if heartbeat.get('connected') else 'NOT connected'}, "
            f"{_number(heartbeat.get('sent'))} sent, largest gap {_number(heartbeat.get('max_gap_ms'))} ms",
        )
    if status.get("unrequested_stops"):
        summary.add_row("QEMU", Text(f"{status['unrequested_stops']} stops not fired by the daemon", "red"))
    parts: list[RenderableType] = []
    banner = switch_banner(status, previous, now)
    if banner is not None:
        parts.append(banner)
    parts += [summary, _by_mode_table(status), _signal_table(signals)]
    switches = _switches(status.get("point_changes") or [])
    if switches:
        parts.append(Text("last switches\n", style="bold") + Text("\n".join(switches)))
    title = f"hybridft pair -- {datetime.fromtimestamp(now).strftime('%H:%M:%S')}"
    return Panel(Group(*parts), title=title, title_align="left", border_style="green" if protected else "red")


def render_unreachable(
    endpoint: str, error: str, failures: int, last: Mapping[str, Any] | None
) -> RenderableType:
    """The daemon did not answer: say so (and what it said last), the watch keeps trying."""
    text = Text(f"cannot reach the daemon at {endpoint}: {error}\n", style="bold red")
    text.append(f"{failures} refresh(es) in a row failed; still trying (Ctrl-C to stop)")
    if last is not None:
        text.append(f"\nlast seen: state {last.get('state')}, mode {last.get('mode')}", style="dim")
    return Panel(text, title="hybridft pair -- unreachable", title_align="left", border_style="red")


# ------------------------------------------------------------------------------ the loop
def watch(
    fetch: Callable[[], Mapping[str, Any]],
    endpoint: str,
    *,
    interval: float = 1.0,
    count: int | None = None,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Refresh every ``interval`` s, ``count`` times (None: until Ctrl-C); returns the exit status.

    ``fetch`` returns one status reply or raises (OSError, or anything the control client raises).
    """
    console = console or Console()
    previous: Mapping[str, Any] | None = None
    reached = False
    failures = 0
    refreshes = 0

    def one() -> RenderableType:
        nonlocal previous, reached, failures
        try:
            status = fetch()
        except Exception as exc:  # unreachable, refused, a reply cut: shown, and tried again next time
            failures += 1
            return render_unreachable(endpoint, str(exc) or type(exc).__name__, failures, previous)
        failures = 0
        reached = True
        view = render_status(status, previous, time.time())
        previous = status
        return view

    live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while count is None or refreshes < count:
            if refreshes:
                sleep(interval)
            view = one()
            refreshes += 1
            if live is not None:
                live.update(view, refresh=True)
            else:  # not a terminal: successive renders (a log keeps every one)
                console.print(view)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return 0 if reached else EXIT_UNREACHABLE
