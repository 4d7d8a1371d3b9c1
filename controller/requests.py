"""The daemon's control requests, checked and typed before the daemon acts on any of them.

Why apart from the daemon: a refused request must change nothing (the control protocol's contract),
and the surest way to keep that is to check every argument in a pure function that cannot touch the
daemon's state, then hand the daemon a typed request it need not check again.  The messages are what
operators see (``hybridft mode`` prints them), so they say what was wrong and what would be right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.operating_point import PointRequest, PointSource
from hybridft_common.control import ControlError
from hybridft_common.vocabulary import SEAL_HOOK_COMMAND, STOP_VIA_AUTO, Mode, StopVia, check_epoch_ms

CHECKPOINT_TIMEOUT_DEFAULT = 30.0
CHECKPOINT_TIMEOUT_MAX = 600.0


def resolve_stop_via(wanted: object, seal_hook: bool) -> StopVia:
    """``auto`` (``qemu`` where both QEMUs have the seal hook, else ``qmp``) or a stop way the QEMUs
    can do; ValueError says why not."""
    if wanted == STOP_VIA_AUTO:
        return StopVia.QEMU if seal_hook else StopVia.QMP
    try:
        via = StopVia(wanted)
    except ValueError:
        raise ValueError(f"stop_via must be 'auto', 'qemu' or 'qmp', not {wanted!r}") from None
    if via is StopVia.QEMU and not seal_hook:
        raise ValueError(
            f"stop_via 'qemu' needs QEMUs with {SEAL_HOOK_COMMAND} (hybridft's patched build,"
            " patch 0005); this pair's have none: use 'qmp' or 'auto'"
        )
    return via


def parse_mode_request(args: Mapping[str, Any], *, seal_hook: bool) -> PointRequest:
    """The ``mode`` verb's arguments (``mode``, optional ``epoch_ms``, ``passive_secondary``,
    ``stop_via``) as an operator's request; ControlError ``bad-args`` for the first bad one."""
    try:
        mode = Mode(args.get("mode"))
    except ValueError:
        raise ControlError(f"mode must be 'mc' or 'colo', not {args.get('mode')!r}", "bad-args") from None
    epoch_ms = args.get("epoch_ms")
    if epoch_ms is not None:
        try:
            check_epoch_ms(epoch_ms)
        except ValueError as exc:
            raise ControlError(str(exc), "bad-args") from None
    passive = args.get("passive_secondary")
    if passive is not None and not isinstance(passive, bool):
        raise ControlError(f"passive_secondary must be true or false, got {passive!r}", "bad-args")
    stop_via = None
    if args.get("stop_via") is not None:
        try:
            stop_via = resolve_stop_via(args["stop_via"], seal_hook)
        except ValueError as exc:
            raise ControlError(str(exc), "bad-args") from None
    return PointRequest(mode, epoch_ms, passive, stop_via, PointSource.OPERATOR)


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """The ``checkpoint`` verb: how long the caller waits for the checkpoint (seconds)."""

    timeout: float = CHECKPOINT_TIMEOUT_DEFAULT


def parse_checkpoint_request(args: Mapping[str, Any]) -> CheckpointRequest:
    timeout = args.get("timeout", CHECKPOINT_TIMEOUT_DEFAULT)
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not 0 < timeout <= CHECKPOINT_TIMEOUT_MAX
    ):
        raise ControlError(f"timeout must be seconds in (0, 600], got {timeout!r}", "bad-args")
    return CheckpointRequest(float(timeout))
