"""The one vocabulary of replication: modes, who stops the VMs for a checkpoint, epoch limits.

Every layer speaks it -- the comparator's epochs have a mode, the daemon's operating point has a mode
and a stop way, the CLIs and config files accept them -- so it is defined once, here, with the
limits an operator may ask for.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How an epoch is protected (ARCHITECTURE.md §3)."""

    MC = "mc"  # micro-checkpointing: all primary output held until the checkpoint that covers it commits
    COLO = "colo"  # both VMs run; output released as soon as the secondary produced the same bytes


class StopVia(StrEnum):
    """Who stops the two VMs for a checkpoint (``controller.epoch``'s module docstring has the detail)."""

    QMP = "qmp"  # the daemon, with QMP `stop`, then fires the checkpoint (any QEMU 7.2)
    QEMU = "qemu"  # QEMU's checkpoint itself; the secondary's load waits for `x-colo-sealed` (patch 0005)


#: What an operator may ask for: ``auto`` (qemu where both QEMUs have the seal hook) or a StopVia.
STOP_VIA_AUTO = "auto"
STOP_VIA_CHOICES: tuple[str, ...] = (STOP_VIA_AUTO, *(str(via) for via in StopVia))

MODE_CHOICES: tuple[str, ...] = tuple(str(mode) for mode in Mode)

#: MC epoch lengths an operator or a policy may choose, in milliseconds (inclusive).
EPOCH_MS_MIN = 1
EPOCH_MS_MAX = 600_000
DEFAULT_EPOCH_MS = 50

#: ``x-checkpoint-delay`` that keeps QEMU's own checkpoint timer from ever firing (the daemon fires
#: every checkpoint; each write of the parameter fires exactly one).
HUGE_CHECKPOINT_DELAY_MS = 200_000

#: The QMP command that tells a QEMU build with the seal hook (patch 0005) from one without.
SEAL_HOOK_COMMAND = "x-colo-expect-seal"
#: Patch 0007: hold the next checkpoint on this side (``verify``); its absence tells a build without it.
HOLD_HOOK_COMMAND = "x-colo-hold-next-checkpoint"
#: Patch 0003: a side left its VM stopped after a checkpoint (held) instead of resuming it.
HELD_EVENT = "X_COLO_CHECKPOINT_HELD"


def check_epoch_ms(value: object) -> int:
    """``value`` as an epoch length, or ValueError naming the allowed range."""
    if not isinstance(value, int) or isinstance(value, bool) or not EPOCH_MS_MIN <= value <= EPOCH_MS_MAX:
        raise ValueError(f"epoch_ms must be an integer {EPOCH_MS_MIN}..{EPOCH_MS_MAX}, got {value!r}")
    return value


def mode_choice() -> object:
    """The click parameter type for a mode argument/option (click imported only by CLIs that ask)."""
    import click

    return click.Choice(MODE_CHOICES)


def epoch_ms_range() -> object:
    """The click parameter type for an MC epoch length, with the allowed range in its message."""
    import click

    return click.IntRange(EPOCH_MS_MIN, EPOCH_MS_MAX)
