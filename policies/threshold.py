"""Thresholds with hysteresis bands: the simplest adaptive policy that is not Gilbert's.

The three signals and why each points where it does:

* ``div.per_s`` -- every divergence in COLO costs a checkpoint (COLO SoCC'13: checkpoints are
  triggered by output mismatch), so a high rate makes COLO a slow MC; MC does not care.  In MC with
  an active secondary the comparator shadow-compares, so the rate is known in both modes;
* ``mem.dirty_bytes_per_s`` -- each checkpoint copies the bytes dirtied since the last one, and in
  COLO the secondary dirties the same pages again and must have them restored from its RAM cache
  (COLO SoCC'13), so heavy dirtying makes COLO's checkpoints dearer than MC's.  The defaults keep
  COLO up to twice the heaviest dirtier measured fine in COLO here (32 MiB/s: checkpoint pause p50
  5.6-9.8 ms at 100 ms, qemu-colo-notes.md) and leave it above that;
* ``net.turns_per_s`` -- MC holds every response until the epoch commits, about half an epoch per
  request/response turn (Remus NSDI'08's output-commit latency), so many turns ask for short epochs
  and few turns let MC take long, cheap ones.  It picks the MC epoch, not the mode.

Hysteresis: MC is left for COLO only below the *low* thresholds, COLO is left for MC above the *high*
ones; in between the current mode stays (the current point comes from the window, so the policy
itself keeps no state and replays trivially).  Each signal is averaged over ``average_s`` seconds.

A signal that is absent is no evidence: COLO is left only on a measured crossing, and MC is left for
COLO only when ``div.per_s`` was measured (a passive secondary shadow-compares nothing); an absent
dirty rate does not block the switch.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, Policy, PolicyConfigError, param
from policies.window import Window

__all__ = ["Threshold", "ThresholdParams"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class ThresholdParams:
    div_high: float = param(2.0, "divergences/s above which COLO is left for MC", min=0.0, max=1e9)
    div_low: float = param(0.5, "divergences/s below which MC is left for COLO", min=0.0, max=1e9)
    dirty_high: float = param(64.0 * MIB, "dirty bytes/s above which COLO is left for MC", min=0.0, max=1e13)
    dirty_low: float = param(32.0 * MIB, "dirty bytes/s below which MC may go to COLO", min=0.0, max=1e13)
    turns_high: float = param(50.0, "turns/s above which MC uses the interactive epoch", min=0.0, max=1e9)
    turns_low: float = param(20.0, "turns/s below which MC uses the bulk epoch", min=0.0, max=1e9)
    interactive_epoch_ms: int = param(20, "MC epoch when turns are many", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX)
    bulk_epoch_ms: int = param(100, "MC epoch when turns are few", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX)
    average_s: float = param(3.0, "seconds each signal is averaged over", min=0.0, max=3600.0)
    passive_secondary: bool = param(False, "MC with a passive secondary (loses the shadow div.per_s)")

    def __post_init__(self) -> None:
        for low, high in (("div_low", "div_high"), ("dirty_low", "dirty_high"), ("turns_low", "turns_high")):
            if getattr(self, low) > getattr(self, high):
                raise PolicyConfigError(
                    f"{low}={getattr(self, low):g} must not exceed {high}={getattr(self, high):g}",
                    low,
                    f"<= {high}",
                )


class Threshold(Policy[ThresholdParams]):
    name = "threshold"
    description = (
        "COLO while divergences/s and dirty rate stay under their high thresholds, MC above; "
        "back to COLO under the low ones. MC's epoch from turns/s."
    )
    params_type = ThresholdParams

    def _epoch(self, window: Window, turns: float | None) -> tuple[int, str]:
        p = self.params
        if turns is None:
            return (window.epoch_ms if window.mode is Mode.MC else p.bulk_epoch_ms), "net.turns_per_s absent"
        if turns > p.turns_high:
            return p.interactive_epoch_ms, f"net.turns_per_s={turns:.3g} > {p.turns_high:g}"
        if turns < p.turns_low:
            return p.bulk_epoch_ms, f"net.turns_per_s={turns:.3g} < {p.turns_low:g}"
        # inside the band: keep MC's epoch when it is one of ours, else the bulk one
        keep = window.epoch_ms in (p.interactive_epoch_ms, p.bulk_epoch_ms) and window.mode is Mode.MC
        return (window.epoch_ms if keep else p.bulk_epoch_ms), f"net.turns_per_s={turns:.3g} in band"

    def decide(self, window: Window) -> Decision:
        p = self.params
        div = window.mean("div.per_s", p.average_s)
        dirty = window.mean("mem.dirty_bytes_per_s", p.average_s)
        turns = window.mean("net.turns_per_s", p.average_s)
        epoch, epoch_why = self._epoch(window, turns)

        def mc(reason: str, signal: str | None) -> Decision:
            return Decision(Mode.MC, epoch, f"{reason}; epoch: {epoch_why}", signal, p.passive_secondary)

        def colo(reason: str, signal: str | None) -> Decision:
            return Decision(Mode.COLO, window.epoch_ms, reason, signal)

        if window.mode is Mode.COLO:
            if div is not None and div > p.div_high:
                return mc(f"div.per_s={div:.3g} > {p.div_high:g}", "div.per_s")
            if dirty is not None and dirty > p.dirty_high:
                return mc(f"mem.dirty_bytes_per_s={dirty:.3g} > {p.dirty_high:.3g}", "mem.dirty_bytes_per_s")
            if div is None:
                return colo("div.per_s absent: keep colo", None)
            return colo(f"div.per_s={div:.3g} <= {p.div_high:g}", "div.per_s")
        if div is None:
            return mc("div.per_s absent: keep mc", None)
        if div >= p.div_low:
            return mc(f"div.per_s={div:.3g} >= {p.div_low:g}", "div.per_s")
        if dirty is not None and dirty >= p.dirty_low:
            return mc(f"mem.dirty_bytes_per_s={dirty:.3g} >= {p.dirty_low:.3g}", "mem.dirty_bytes_per_s")
        return colo(f"div.per_s={div:.3g} < {p.div_low:g}", "div.per_s")
