"""What the daemon counts: every QEMU event against the checkpoints it started, and the checkpoints of
each mode over a recent window.

Events.  Why: the daemon must be the only one that stops the primary (QEMU's own checkpoint timer never
fires: ``x-checkpoint-delay`` stays huge).  A primary STOP the daemon did not cause -- QEMU firing a
checkpoint on its own, an operator's ``stop`` -- would pause the guest outside the protocol, so it is
counted as ``unrequested_stops``, which must stay 0.  Events reach the count two ways: a checkpoint
consumes its own STOP/RESUME events and reports how many it took; between checkpoints the daemon's
watcher takes whatever arrived.

Checkpoints per mode (:class:`CheckpointsByMode`).  Why: a checkpoint costs something different in each
mode (MC: one every epoch, pause grows with the dirty pages of an epoch; COLO: one per divergence), and an
operator comparing the two, or checking a policy's choice, wants each mode's figures apart, not a mix.
Rates are per second *spent in that mode* inside the window (a mode that ran 5 s of the last 60 s is
measured over those 5 s, not diluted over 60), so "MC: 20 checkpoints/s" means what it says whichever
mode runs now.  A checkpoint belongs to the mode it ran under (the one that switches the mode counts for
the old mode: it closes the old mode's last epoch).

Both are sans-I/O: fed names, numbers and times, no sessions, no clock of their own.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hybridft_common.stats import percentile

SIDES = ("primary", "secondary")
MODES = ("mc", "colo")
MODE_WINDOW_S = 60.0  # the recent window of checkpoints_by_mode
MODE_WINDOW_CHECKPOINTS = 16384  # bound on what the window keeps (1 ms epochs would fill it in 16 s)


class EventAccounting:
    def __init__(self) -> None:
        self.by_side: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
        self.checkpoints_started = 0

    def seen(self, side: str, names: Iterable[str]) -> None:
        """Events taken off ``side``'s session between checkpoints."""
        self.by_side[side].update(names)

    def checkpoint_started(self) -> int:
        """One more checkpoint fired by the daemon; returns its ordinal."""
        self.checkpoints_started += 1
        return self.checkpoints_started

    def checkpoint_completed(self, stop_events: tuple[int, int]) -> None:
        """A checkpoint took ``stop_events`` STOPs (primary, secondary) and one RESUME on each side."""
        for side, stops in zip(SIDES, stop_events, strict=True):
            self.by_side[side]["STOP"] += stops
            self.by_side[side]["RESUME"] += 1

    @property
    def primary_stops(self) -> int:
        return self.by_side["primary"]["STOP"]

    @property
    def unrequested_stops(self) -> int:
        """Primary STOPs beyond one per checkpoint the daemon started (must stay 0)."""
        return max(0, self.primary_stops - self.checkpoints_started)

    def as_dict(self) -> dict[str, Any]:
        return {side: dict(counter) for side, counter in self.by_side.items()}


@dataclass(frozen=True, slots=True)
class ModeCheckpoint:
    """One finished checkpoint as the per-mode window counts it."""

    ended: float  # monotonic seconds
    mode: str  # the mode it ran under
    reasons: Mapping[str, int]
    pause_s: float | None  # the primary's STOP -> RESUME, None when QEMU's timestamps were missing


class CheckpointsByMode:
    """Checkpoints per second by reason and pause p50/p99, per mode, over the last ``window_s`` seconds.

    Fed :meth:`mode_changed` whenever the pair's mode changes (and once at the start) and
    :meth:`checkpoint` for every finished checkpoint; :meth:`summary` reads the window ending at ``now``.
    Memory is bounded: at most ``capacity`` checkpoints are kept; past that the window shrinks to the
    oldest one kept (``window_s`` in the summary says what was covered).
    """

    def __init__(
        self,
        started: float,
        mode: str,
        *,
        window_s: float = MODE_WINDOW_S,
        capacity: int = MODE_WINDOW_CHECKPOINTS,
    ) -> None:
        if window_s <= 0 or capacity < 1:
            raise ValueError(f"window_s must be > 0 and capacity >= 1, got {window_s}, {capacity}")
        self.window_s = window_s
        self.started = started
        self._checkpoints: deque[ModeCheckpoint] = deque(maxlen=capacity)
        self._evicted_until = started  # the window cannot reach behind a checkpoint that was dropped
        self._modes: deque[tuple[float, str]] = deque([(started, mode)])  # (since, mode), oldest first

    def mode_changed(self, now: float, mode: str) -> None:
        if mode != self._modes[-1][1]:
            self._modes.append((now, mode))

    def checkpoint(self, now: float, mode: str, reasons: Mapping[str, int], pause_s: float | None) -> None:
        if len(self._checkpoints) == self._checkpoints.maxlen:
            self._evicted_until = self._checkpoints[0].ended
        self._checkpoints.append(ModeCheckpoint(now, mode, dict(reasons), pause_s))

    def _prune(self, since: float) -> None:
        while self._checkpoints and self._checkpoints[0].ended <= since:
            self._checkpoints.popleft()
        # keep the last mode change at or before ``since``: it says what ran at the window's start
        while len(self._modes) > 1 and self._modes[1][0] <= since:
            self._modes.popleft()

    def seconds_in_mode(self, since: float, now: float) -> dict[str, float]:
        """Seconds each mode ran in (since, now]."""
        spent = dict.fromkeys(MODES, 0.0)
        changes = list(self._modes)
        for index, (at, mode) in enumerate(changes):
            end = changes[index + 1][0] if index + 1 < len(changes) else now
            overlap = min(end, now) - max(at, since)
            if overlap > 0:
                spent[mode] = spent.get(mode, 0.0) + overlap
        return spent

    def summary(self, now: float) -> dict[str, dict[str, Any]]:
        """``{mode: {per_s, per_s_by_reason, pause_ms: {p50, p99, count}, seconds_in_mode, window_s}}``
        for every mode (rates are None for a mode that did not run in the window)."""
        since = max(now - self.window_s, self.started, self._evicted_until)
        self._prune(now - self.window_s)
        spent = self.seconds_in_mode(since, now)
        out: dict[str, dict[str, Any]] = {}
        for mode in sorted(set(MODES) | set(spent)):
            fresh = [c for c in self._checkpoints if c.mode == mode and since < c.ended <= now]
            by_reason: Counter[str] = Counter()
            for c in fresh:
                by_reason.update(c.reasons)
            seconds = spent.get(mode, 0.0)
            pauses = [c.pause_s * 1000 for c in fresh if c.pause_s is not None]
            p50, p99 = percentile(pauses, 0.5), percentile(pauses, 0.99)
            out[mode] = {
                "per_s": round(len(fresh) / seconds, 3) if seconds > 0 else None,
                "per_s_by_reason": {
                    reason: round(count / seconds, 3) for reason, count in sorted(by_reason.items())
                }
                if seconds > 0
                else {},
                "pause_ms": {
                    "p50": None if p50 is None else round(p50, 2),
                    "p99": None if p99 is None else round(p99, 2),
                    "count": len(pauses),
                },
                "seconds_in_mode": round(seconds, 3),
                "window_s": round(now - since, 3),
            }
        return out
