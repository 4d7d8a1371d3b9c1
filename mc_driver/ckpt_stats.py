"""Per-checkpoint figures from the patched QEMU (patch 0006), parsed into typed records.

Why: the hybrid controller's policies decide on how much memory the guest dirties per checkpoint and how
long each checkpoint stops it, and stock QEMU 7.2 shows neither while COLO runs (``query-migrate`` says only
``{"status": "colo"}``).  Patch 0006 makes the primary emit ``X_COLO_CHECKPOINT_DONE`` after every checkpoint
(the RAM it sent, the device state's size, how long the VM ran and was stopped, as QEMU measured them), the
secondary ``X_COLO_CHECKPOINT_LOADED`` (the pages it flushed), and adds ``x-query-colo-checkpoint-stats`` (the
last checkpoint and the session's sums).

This module only turns that QMP data into frozen dataclasses (no I/O): the daemon feeds it what its QMP
session received.  A record that does not match the patch's schema -- a missing or extra member, a wrong
type, a negative count, figures that contradict each other -- raises :class:`CheckpointStatsError` naming
the event and the member, so a QEMU built from another patch revision is noticed at the first checkpoint
instead of feeding a policy wrong numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

DONE_EVENT = "X_COLO_CHECKPOINT_DONE"  # primary, after each checkpoint
LOADED_EVENT = "X_COLO_CHECKPOINT_LOADED"  # secondary, after each checkpoint it loaded
QUERY_COMMAND = "x-query-colo-checkpoint-stats"  # primary: last checkpoint and sums
GUEST_PAGE_BYTES = 4096  # TARGET_PAGE_SIZE of x86_64 guests


class CheckpointStatsError(ValueError):
    """QMP data that is not what patch 0006 emits; the message names the record and the member."""


def _uints(
    cls: type, what: str, data: Mapping[str, Any], also: frozenset[str] = frozenset()
) -> dict[str, int]:
    """The dataclass ``cls``'s int fields read from ``data`` (QMP's hyphenated names), all checked.

    ``data`` may hold no members but those and ``also``; a ``checkpoint`` number counts from 1.
    """
    if not isinstance(data, Mapping):
        raise CheckpointStatsError(f"{what}: data is {type(data).__name__}, not an object")
    names = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls) if f.type in ("int", int)}
    missing = sorted(set(names) - set(data))
    if missing:
        raise CheckpointStatsError(f"{what}: missing {', '.join(missing)} (a QEMU without patch 0006?)")
    extra = sorted(set(data) - set(names) - also)
    if extra:
        raise CheckpointStatsError(f"{what}: unknown members {', '.join(extra)} (another patch revision?)")
    values: dict[str, int] = {}
    for qmp_name, attr in names.items():
        value = data[qmp_name]
        # bool is an int in Python; JSON true is never a count
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointStatsError(f"{what}: {qmp_name} is {value!r}, not an integer")
        if value < 0:
            raise CheckpointStatsError(f"{what}: {qmp_name} is {value}, a negative count")
        values[attr] = value
    if values.get("checkpoint") == 0:
        raise CheckpointStatsError(f"{what}: checkpoint is 0; they count from 1")
    return values


@dataclass(frozen=True, slots=True)
class CheckpointStats:
    """One checkpoint on the primary (``X_COLO_CHECKPOINT_DONE``); times are QEMU's, in microseconds."""

    checkpoint: int  # number in this COLO session, from 1
    ram_pages: int  # pages sent = pages dirtied since the previous checkpoint (zero pages included)
    ram_zero_pages: int  # of those, zero pages (sent as a flag)
    ram_bytes: int  # RAM bytes on the migration stream (pages and headers)
    device_bytes: int  # device state size
    run_us: int  # the VM ran this long since the previous checkpoint: when ram_pages were dirtied
    pause_us: int  # the primary's VM was stopped this long
    ram_save_us: int  # the RAM stage (dirty sync + send), part of pause_us
    timestamp: float | None = None  # QEMU's emission time (epoch seconds), when parsed from an event

    @classmethod
    def from_data(cls, data: Mapping[str, Any], timestamp: float | None = None) -> Self:
        """Parse the event's ``data`` (or a query's ``last``); raises :class:`CheckpointStatsError`."""
        values = _uints(cls, DONE_EVENT, data)
        if values["ram_zero_pages"] > values["ram_pages"]:
            raise CheckpointStatsError(
                f"{DONE_EVENT}: ram-zero-pages {values['ram_zero_pages']} > ram-pages {values['ram_pages']}"
            )
        if values["ram_save_us"] > values["pause_us"]:
            raise CheckpointStatsError(
                f"{DONE_EVENT}: ram-save-us {values['ram_save_us']} > pause-us {values['pause_us']} "
                "(the RAM stage is part of the pause)"
            )
        return cls(**values, timestamp=timestamp)

    @classmethod
    def from_event(cls, name: str, data: Mapping[str, Any], timestamp: float | None = None) -> Self:
        """Parse one QMP event (``mc_driver.qmp.Event``'s name, data and timestamp)."""
        if name != DONE_EVENT:
            raise CheckpointStatsError(f"expected {DONE_EVENT}, got {name}")
        return cls.from_data(data, timestamp)

    @property
    def dirty_bytes(self) -> int:
        """Guest memory dirtied since the previous checkpoint (pages x page size; zero pages included)."""
        return self.ram_pages * GUEST_PAGE_BYTES

    @property
    def dirty_bytes_per_s(self) -> float:
        """Distinct memory dirtied per second of the run before this checkpoint (0.0 for a 0 µs run)."""
        return self.dirty_bytes / (self.run_us / 1e6) if self.run_us else 0.0

    @property
    def pause_s(self) -> float:
        return self.pause_us / 1e6


@dataclass(frozen=True, slots=True)
class SecondaryCheckpointStats:
    """One checkpoint the secondary loaded (``X_COLO_CHECKPOINT_LOADED``)."""

    checkpoint: int
    flushed_pages: int  # pages copied from the RAM cache: dirtied by the primary or by the secondary
    device_bytes: int
    pause_us: int  # the secondary's VM was stopped this long
    timestamp: float | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any], timestamp: float | None = None) -> Self:
        values = _uints(cls, LOADED_EVENT, data)
        return cls(**values, timestamp=timestamp)

    @classmethod
    def from_event(cls, name: str, data: Mapping[str, Any], timestamp: float | None = None) -> Self:
        if name != LOADED_EVENT:
            raise CheckpointStatsError(f"expected {LOADED_EVENT}, got {name}")
        return cls.from_data(data, timestamp)


@dataclass(frozen=True, slots=True)
class CheckpointStatsTotals:
    """``x-query-colo-checkpoint-stats``: the primary's session so far."""

    checkpoints: int
    ram_pages: int
    ram_bytes: int
    device_bytes: int
    pause_us: int
    last: CheckpointStats | None

    @classmethod
    def from_reply(cls, data: Mapping[str, Any]) -> Self:
        what = QUERY_COMMAND
        values = _uints(cls, what, data, also=frozenset({"last"}))
        raw_last = data.get("last")
        last = None if raw_last is None else CheckpointStats.from_data(raw_last)
        if (last is None) != (values["checkpoints"] == 0):
            count = values["checkpoints"]
            raise CheckpointStatsError(f"{what}: {count} checkpoints but last is {raw_last!r}")
        if last is not None and last.checkpoint != values["checkpoints"]:
            raise CheckpointStatsError(
                f"{what}: last is checkpoint {last.checkpoint} of {values['checkpoints']}"
            )
        return cls(**values, last=last)
