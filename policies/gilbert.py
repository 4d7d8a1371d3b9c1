"""David Gilbert's COLO "hybrid mode", the baseline an adaptive policy has to beat.

Source: D. A. Gilbert, "COLO: hybrid mode" RFC on qemu-devel (August 2015) and its code in the ORBIT
project's QEMU tree (branch ``orbit-wp4-colo-mar16``, 2016), as recorded in qemu-colo-notes.md:

* after every COLO checkpoint, ``mean = 0.7 * mean + 0.3 * length`` where ``length`` is how long the
  guest ran since the previous checkpoint ended; the mean starts at 0;
* once at least 5 COLO checkpoints were counted since the mean was reset, a mean under
  ``colo-passive-limit`` (400 ms) means checkpoints come too often -- the outputs keep diverging --
  so the next checkpoints are *passive*: the secondary is idle and a checkpoint is taken every
  ``colo-passive-time`` (250 ms), i.e. MC with a passive secondary;
* after ``colo-passive-count`` (100) passive checkpoints the mean and the count are reset to 0 and
  COLO is tried again.

Why 0.7/0.3: Gilbert's comment calls it a guess that works, weighting the history so that one short
checkpoint does not flip the mode.  Note that a mean starting at 0 and fed a constant length ``x``
reaches ``x * (1 - 0.7**5) = 0.83 x`` after 5 checkpoints, so steady lengths under ~481 ms switch.

From windows instead of a checkpoint loop: the daemon samples rates, not events.  The number of
checkpoints between two windows is the integral of ``ckpt.per_s`` over the new samples
(:meth:`Window.integral`), split between COLO and MC by ``op.colo`` (the mode of each sample's
interval; when absent the window's current mode is taken for all its samples).  ``n`` COLO
checkpoints of mean length ``x`` (``ckpt.length_ms``) update the mean as ``n`` single updates would:
``mean = x + (mean - x) * 0.7**n`` (exact for integer ``n``, and continuous for the fractional
counts a sampled rate gives).  Without ``ckpt.length_ms`` the mean cannot move and the policy stays
in COLO, saying so.  Passive checkpoints are counted only once the window shows MC: a switch that the
guard holds or the daemon has not applied yet does not eat into the passive period, and the COLO
checkpoints of that delay do not feed the mean (the mean belongs to the COLO period that ended).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, Policy, param
from policies.window import Window

__all__ = ["Gilbert", "GilbertParams"]

#: tolerance on counts integrated from rates: 10 samples of 0.1 s at 10/s must count 10, not 9.999...
COUNT_EPS = 1e-6


@dataclass(frozen=True)
class GilbertParams:
    passive_limit_ms: float = param(
        400.0,
        "colo-passive-limit: a weighted mean COLO checkpoint length under this goes passive",
        min=0.0,
        max=3_600_000.0,
    )
    passive_count: int = param(
        100, "colo-passive-count: passive checkpoints before COLO is retried", min=1, max=1_000_000
    )
    passive_time_ms: int = param(
        250, "colo-passive-time: epoch of the passive (MC) checkpoints", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX
    )
    min_colo_checkpoints: int = param(
        5, "COLO checkpoints needed before the mean is trusted", min=1, max=1_000_000
    )
    history_weight: float = param(
        0.7, "weight of the old mean in each update (the new length gets 1 - it)", min=0.0, max=0.999
    )


class Gilbert(Policy[GilbertParams]):
    name = "gilbert"
    reads_shadow = False  # checkpoint lengths only
    description = (
        "Gilbert's COLO hybrid mode (qemu-devel RFC 2015): COLO, passive MC for 100 x 250 ms checkpoints "
        "when the weighted mean checkpoint length drops under 400 ms, then COLO again."
    )
    params_type = GilbertParams

    def reset(self) -> None:
        self.passive = False  # in the passive period (wanted or running)
        self.mean_ms = 0.0
        self.colo_count = 0.0  # COLO checkpoints fed into the mean since its reset
        self.passive_done = 0.0  # MC checkpoints seen since the passive period began
        self.last_t: float | None = None

    def _absorb(self, window: Window) -> None:
        """Feed the checkpoints of the samples newer than the last window into the state."""
        rates = window.series("ckpt.per_s")
        if rates is None or len(window) < 2:
            self.last_t = window.now
            return
        colo_share = window.series("op.colo")
        lengths = window.series("ckpt.length_ms")
        t = window.t
        fallback_share = 1.0 if window.mode is Mode.COLO else 0.0
        for k in range(1, len(window)):
            if self.last_t is not None and t[k] <= self.last_t:
                continue
            rate = float(rates[k])
            if rate != rate:  # NaN: no checkpoint figure for this interval
                continue
            count = rate * float(t[k] - t[k - 1])
            share = fallback_share
            if colo_share is not None and colo_share[k] == colo_share[k]:
                share = min(1.0, max(0.0, float(colo_share[k])))
            if self.passive:
                self.passive_done += count * (1.0 - share)
            else:
                colo = count * share
                length = None if lengths is None else float(lengths[k])
                if colo > 0 and length is not None and length == length:
                    keep = self.params.history_weight**colo
                    self.mean_ms = length + (self.mean_ms - length) * keep
                    self.colo_count += colo
        self.last_t = window.now

    def decide(self, window: Window) -> Decision:
        p = self.params
        self._absorb(window)
        passive_mc = (Mode.MC, p.passive_time_ms)
        if self.passive:
            if self.passive_done + COUNT_EPS >= p.passive_count:
                self.passive = False
                self.mean_ms = 0.0
                self.colo_count = 0.0
                return Decision(
                    Mode.COLO,
                    window.epoch_ms,
                    f"ckpt.per_s: {self.passive_done:.0f} passive checkpoints >= {p.passive_count}: "
                    "mean reset, retry colo",
                    "ckpt.per_s",
                )
            return Decision(
                *passive_mc,
                f"ckpt.per_s: passive {self.passive_done:.0f} of {p.passive_count} checkpoints",
                "ckpt.per_s",
                passive_secondary=True,
            )
        if self.colo_count + COUNT_EPS < p.min_colo_checkpoints:
            absent = "" if window.has("ckpt.length_ms") else " (ckpt.length_ms absent)"
            return Decision(
                Mode.COLO,
                window.epoch_ms,
                f"ckpt.per_s: {self.colo_count:.1f} of {p.min_colo_checkpoints} colo checkpoints{absent}",
                "ckpt.per_s",
            )
        if self.mean_ms < p.passive_limit_ms:
            self.passive = True
            self.passive_done = 0.0
            return Decision(
                *passive_mc,
                f"ckpt.length_ms mean={self.mean_ms:.1f} < {p.passive_limit_ms:g} after "
                f"{self.colo_count:.0f} colo checkpoints: passive mc for {p.passive_count} checkpoints",
                "ckpt.length_ms",
                passive_secondary=True,
            )
        return Decision(
            Mode.COLO,
            window.epoch_ms,
            f"ckpt.length_ms mean={self.mean_ms:.1f} >= {p.passive_limit_ms:g}",
            "ckpt.length_ms",
        )
