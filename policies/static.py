"""The two static policies: always MC, always COLO -- the baselines every adaptive policy must beat.

The experiments' oracle (ARCHITECTURE.md section 7) is "per phase, the best static mode, switching for
free", so each static mode is both a baseline and a building block of the oracle.  Neither reads a
signal: their decisions carry ``signal=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, NoParams, Policy, param
from policies.window import Window

__all__ = ["StaticColo", "StaticMC", "StaticMCParams"]


@dataclass(frozen=True)
class StaticMCParams:
    epoch_ms: int = param(DEFAULT_EPOCH_MS, "MC epoch length", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX)
    passive_secondary: bool = param(False, "stop the secondary after each checkpoint (saves its CPU)")


class StaticMC(Policy[StaticMCParams]):
    name = "static-mc"
    reads_shadow = False
    description = "Always MC with a fixed epoch (Remus-style micro-checkpointing)."
    params_type = StaticMCParams

    def decide(self, window: Window) -> Decision:
        p = self.params
        return Decision(
            Mode.MC,
            p.epoch_ms,
            f"static: mc {p.epoch_ms} ms" + (" passive" if p.passive_secondary else ""),
            None,
            p.passive_secondary,
        )


class StaticColo(Policy[NoParams]):
    name = "static-colo"
    reads_shadow = False
    description = "Always COLO (output released when both VMs agree)."

    def decide(self, window: Window) -> Decision:
        # the MC epoch stays what it is, ready for an operator's switch back to MC
        return Decision(Mode.COLO, window.epoch_ms, "static: colo", None)
