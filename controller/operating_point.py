"""The operating point: mode, epoch length, passive secondary and stop way, as one typed value.

Why one value: the four knobs decide together how an epoch is protected and what a checkpoint costs,
and every epoch must run under exactly one combination.  They used to have three owners and took
effect at different moments (mode and epoch length at a checkpoint boundary, the other two whenever
the ``mode`` verb set them).  Now :class:`~controller.epoch.EpochProtocol` owns the current point and
at most one pending one; a request (:class:`PointRequest`, any subset of the four) becomes the pending
point, and the protocol applies it at the next checkpoint boundary, so the change lands between two
epochs.  An operator's request and a policy's decision land in the same place; the ``source`` on a
request is kept on the applied :class:`PointChange` so the status can say who changed what.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, Mode, StopVia, check_epoch_ms


class PointSource(StrEnum):
    """Who asked for a change of the operating point."""

    OPERATOR = "operator"  # the `mode` verb (hybridft mode, benchmarks)
    POLICY = "policy"  # a policy's decision


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """How the pair runs during one epoch (docs/architecture.md, "the operating point")."""

    mode: Mode = Mode.MC
    epoch_ms: int = DEFAULT_EPOCH_MS
    passive_secondary: bool = False  # MC: stop the secondary again right after each checkpoint
    stop_via: StopVia = StopVia.QMP  # who stops the VMs for a checkpoint (controller.epoch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "stop_via", StopVia(self.stop_via))
        check_epoch_ms(self.epoch_ms)
        if not isinstance(self.passive_secondary, bool):
            raise ValueError(f"passive_secondary must be true or false, got {self.passive_secondary!r}")

    def changed_by(self, request: PointRequest) -> OperatingPoint:
        """This point with the fields ``request`` names replaced."""
        changes = {
            name: value
            for name in ("mode", "epoch_ms", "passive_secondary", "stop_via")
            if (value := getattr(request, name)) is not None
        }
        return dataclasses.replace(self, **changes)

    def switches_mode_from(self, other: OperatingPoint) -> bool:
        """Does running this point instead of ``other`` change the epochs themselves (mode or length)?

        That is what the comparator must be told before its seal, and what ``mode_switches`` counts;
        the stop way and a passive secondary change only how a checkpoint runs.
        """
        return (self.mode, self.epoch_ms) != (other.mode, other.epoch_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "epoch_ms": self.epoch_ms,
            "passive_secondary": self.passive_secondary,
            "stop_via": str(self.stop_via),
        }


@dataclass(frozen=True, slots=True)
class PointRequest:
    """A requested change: the fields that are not None replace the current point's."""

    mode: Mode | None = None
    epoch_ms: int | None = None
    passive_secondary: bool | None = None
    stop_via: StopVia | None = None
    source: PointSource = PointSource.OPERATOR


@dataclass(frozen=True, slots=True)
class PointChange:
    """A pending point that took effect: at the close of checkpoint ``epoch``, from ``before`` to
    ``after``, asked for by ``source``."""

    epoch: int
    before: OperatingPoint
    after: OperatingPoint
    source: PointSource

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "source": str(self.source),
        }
