"""Every QEMU event the daemon saw, counted against the checkpoints it started.

Why: the daemon must be the only one that stops the primary (QEMU's own checkpoint timer never
fires: ``x-checkpoint-delay`` stays huge).  A primary STOP the daemon did not cause -- QEMU firing a
checkpoint on its own, an operator's ``stop`` -- would pause the guest outside the protocol, so it is
counted as ``unrequested_stops``, which must stay 0.  Events reach the count two ways: a checkpoint
consumes its own STOP/RESUME events and reports how many it took; between checkpoints the daemon's
watcher takes whatever arrived.  Sans-I/O: fed names and numbers, no sessions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

SIDES = ("primary", "secondary")


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
