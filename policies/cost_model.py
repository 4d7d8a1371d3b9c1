r"""The cost model: estimate what MC and COLO would each cost the guest and its clients, run the cheaper.

Whichever mode runs, the window carries enough to estimate both: in MC an active secondary is
shadow-compared, so ``div.per_s`` says how often COLO would have to checkpoint; in COLO the
checkpoint pauses and the dirty rate say what an MC epoch would cost.  The model is first order and
every constant is either measured on this kind of machine (qemu-colo-notes.md) or taken from the
papers that define the two modes; where the window measures a quantity directly, the measurement
replaces the constant.

Unit: seconds lost per second of wall time, summed over the guest (time it is stopped or starved of
CPU) and its clients (time each request/response turn waits longer than it would unreplicated), with
``latency_weight`` trading one for the other (1 by default: a client-second is a guest-second).

The checkpoint pause (both modes stop both VMs; ARCHITECTURE.md section 2)
    ``pause(d) = P0 + d / B`` for ``d`` bytes of RAM dirtied since the previous checkpoint: a fixed
    part (stop, device state, seal, resume) plus copying the dirty pages, as Remus (NSDI'08)
    decomposes its checkpoint.  ``P0 = 5 ms``: the idle checkpoint pause of the patched QEMU 7.2 is
    4-6 ms (qemu-colo-notes.md, "Corrections").  ``B = 1.2e9 bytes/s``: with the guest dirtying
    32 MiB/s and a checkpoint every 100 ms (3.36 MB per checkpoint) the pause p50 was 5.6-9.8 ms,
    i.e. (7.7 - 5.0) ms for 3.36 MB (same notes).  When the window measures ``ckpt.pause_p50_ms``
    (and ``calibrate`` is on), P0 is re-fitted to it at the current operating point:
    ``P0 = pause_measured - d_current / B`` -- the accelerator and stop way change the fixed part, the
    per-byte part is the copy.  ``d_current`` is the measured ``mem.ram_bytes_per_ckpt``, or in MC
    the dirty rate times the epoch; a COLO interval (up to the safety interval) is too long for the
    linear estimate below, so COLO without RAM figures keeps the prior.
    Dirty bytes grow linearly, ``d = r * interval``, with ``r`` = ``mem.dirty_bytes_per_s``, else
    ``mem.ram_bytes_per_ckpt * ckpt.per_s`` (or pages * 4096), capped at the guest's RAM
    (``mem.guest_bytes``) when known.  Linear is an upper bound (a working set saturates); an unknown
    rate counts as 0 and the reason says so.

MC at epoch E (``controller.epoch.CheckpointScheduler``: a checkpoint every E from the previous
start, but at least E/2 after the previous end)
    ``P = pause(r E)``, ``period = max(E, P + E/2)``, the guest runs ``period - P`` of each period;
    guest:   ``P / period`` stopped;
    clients: every response waits for the commit of the epoch it was produced in (Remus's output
    commit): produced uniformly during the run, it waits the rest of the run plus the pause,
    ``(period - P)/2 + P`` -- "about half an epoch" per turn -- times ``net.turns_per_s`` (T); a
    request that arrives while the guest is stopped (a fraction ``f = P/period`` of them) waits
    ``P/2`` more before the guest even sees it (both modes);
    CPU:     an active secondary runs the guest too (see CPU below); a passive one does not.
    In the regime ``P < E/2`` (period = E) the optimum is closed form: with ``a = r/B``,
    ``P = P0 + a E``, the cost is ``P0/E + a + T (E (1 + a + a^2)/2 + P0^2/(2E) + const)``, and
    ``d/dE = 0`` gives ``E* = sqrt((2 P0 + T P0^2) / (T (1 + a + a^2)))`` -- more turns or more
    dirtying, shorter epochs; a dearer pause, longer ones; no turns, the longest allowed.  Outside that regime
    the period rule changes the algebra, so the policy evaluates the exact cost on a geometric grid
    of epochs between ``min_epoch_ms`` and ``max_epoch_ms`` (within the vocabulary's limits) and
    takes the cheapest (a tie goes to the longer epoch).
COLO (COLO, SoCC'13: a checkpoint whenever the outputs diverge)
    Checkpoint requests arrive at ``delta = div.per_s + ckpt.per_s.disk-pressure + 1/safety`` (the
    daemon's safety interval, 10 s by default in ``CheckpointScheduler``).  After a checkpoint the
    guest runs until the next request, ``1/delta`` on average, dirtying ``r/delta`` bytes:
    ``P_c = pause(r / delta)``; checkpoints come every ``1/delta + P_c``;
    guest:   ``P_c / (1/delta + P_c)`` stopped (the rate saturates: the guest always runs a little);
    clients: each turn waits the comparator's hold (the secondary's lag: ``net.hold_p50_ms`` measured
    in COLO, remembered from the last *calm* COLO window, else a 1 ms prior: the compiled comparator's
    calm COLO hold p50 measured here, ``COLO_HOLD_PRIOR_S``).  A hold p50 speaks for COLO only
    if its span (the comparator's last 1 s) ran in COLO: right after MC -> COLO it still holds MC's
    releases (26.7 ms measured where the phase's COLO hold was 0.05 ms), so such samples are neither
    used nor remembered (:func:`hold_spans`).  Calm: divergences at most ``hold_calm_div_share``
    (0.1) of the turns in *every* sample of that span (its mean called the first second of a token
    phase calm while the hold rose from 0.08 to 37 ms).  While responses diverge, a frame's hold
    includes its wait for the divergence's checkpoint -- and for the checkpoints queued before it:
    COLO serialises them, which the per-divergence term below does not model and which is why
    static COLO served the token phases at a quarter of MC's rate.  Such a hold is not the
    secondary's lag, so it is remembered apart ("while diverging") and used, outside COLO, only
    while the divergences measured (or remembered) are above that share of the turns; a calm
    window's hold serves the rest.  Measured (tests/test_phased_auto.py,
    TCG, load 5-7): with every token answer diverging the COLO hold p50 was 358-892 ms against 2-5 ms
    for deterministic RPCs on the same pair; remembered, it priced COLO's RPC turns at that and kept
    the policy in MC through the next RPC phases, which static COLO served at 510-1110 requests/s
    against MC's 68-77.  Each divergent response waits for its checkpoint, ``P_c``, and one the
    comparator could only call by timeout (reasons ``timeout`` and ``ack``: the secondary sent nothing
    comparable) first waits
    ``compare_timeout_s`` (3 s, the pair's default ``compare_timeout_ms``); plus ``f P_c / 2`` per
    turn as in MC;
    CPU:     the secondary runs the guest.
    Running in COLO, the measured ``ckpt.per_s`` and pause replace the estimate.
    Note what this says: COLO with every response diverging is output-triggered checkpointing, and
    a divergent turn waits ``hold + P_c`` where MC makes it wait about half an epoch.  Divergence
    alone therefore does not make MC win; it wins when divergences outrun the checkpoints the guest
    can afford (many divergent flows, dear pauses), when the secondary lags (hold) or is starved of
    CPU, or when divergences are detected by timeout.
CPU (where CPU is short, e.g. 2-core hosts, the secondary's vCPU competes with the primary)
    Proportional sharing of ``n`` cores (``cpu.cores`` or ``host_cores``) between demands: the
    primary's ``D_p`` (``cpu.primary``), the secondary's (it executes the same guest: ``D_p``) and the
    rest of the host (``cpu.host * n - cpu.primary - cpu.secondary``).  The primary loses
    ``max(0, 1 - n / total demand)`` of its time.  Usage measured on a saturated host understates
    demand: then the primary is assumed to take its share of what the secondary would free,
    ``D_p = p + s * p / (p + rest)``, and the last primary figure seen with a passive secondary on an
    unsaturated host (within ``memory_s``) is a floor.  Without ``cpu.primary`` or a core count the
    CPU term is 0.

Shadow coverage (what the shadow's ``div.per_s`` is worth in MC)
    The shadow can only compare a response the secondary produced before the epoch's seal: the
    checkpoint then gives the secondary the primary's state, which has already answered, so the
    secondary never does.  ``div.shadow_coverage`` is the share of the primary's bytes it compared.
    Measured on a real pair under TCG (8 MiB/s dirtied, 4 RPC or 8 token clients): at 10 ms epochs
    (39-52 checkpoints/s, the guest running about 5 ms of each 20-25 ms) it compared 2.5 % of the
    RPC answers' bytes and 1.2 % of the token answers', at 20 ms 5.3 % and 0.5 %, at 50 ms 40 % and
    30 %; and it counted 4.9, 1.5 and 44 divergences/s where all 408, 313 and 148 answers/s diverged
    (tokens).  So a shadow count is a sample: the policy scales it by ``1 / coverage`` (4.9 / 0.012 =
    408/s), capped at one divergence per turn (COLO checkpoints at most once per answer) and never
    below the count itself (a stream diverges without turns).  A count of 0 needs evidence as well:
    at least ``min_compared_bytes_per_s`` (256) compared, ``div.shadow_compared_bytes_per_s``; in a
    token phase the shadow once compared 24 bytes/s without a divergence (coverage 0.2 %), where RPC
    phases at 10 ms gave it 1.7-3 KB/s -- remembered, that 0 would have sent the policy to COLO a
    second before the phase ended.  The shadow counts a divergence when the secondary's answer
    arrives but the epoch's bytes at its seal, up to an epoch later; when the two straddle a sample,
    the bytes alone said "compared, none diverged" (measured: 1348 bytes/s in one sample, its epoch's
    25 divergences/s in the sample before, just outside the 1 s average; the policy went to COLO
    0.5 s before a token phase ended).  So the divergences are averaged over one sample more than
    the coverage.  Taken at its word, 4.9/s made COLO look
    cheap in a phase static COLO served at 47 requests/s against MC's 393.  Below ``min_coverage``
    (0.2 %), or with no shadowed bytes at all (a passive secondary, whose ``div.per_s`` of 0 is no
    measurement; no traffic), the shadow is *blind*: its figure is ignored, the last measured rate is
    used while fresh (``memory_s``), else the rate is unknown and COLO is estimated without
    divergences, as after passive MC.  How blind depends on the load: in one run the shadow compared
    nothing at 10 ms through a whole RPC phase, and the policy stayed in MC on the token phase's
    remembered divergences.  So the daemon stretches one MC epoch a second to 100 ms when the
    secondary is active and a policy that reads the shadow decides
    (``controller.epoch.CheckpointScheduler``, shadow probes; ``[controller] shadow_probe_*``): the
    coverage and divergences then come from those epochs, a sample a second, and the policy
    itself never has to lengthen its epoch (a change the guard's dwell would hold for 5 s).  A
    window without the coverage signal at all (a comparator or a recorded trace from before it
    existed) takes the shadow's count at its word, as this policy did then, so old traces replay to
    the same decisions.

Choosing: the cheapest MC epoch with an active secondary, the same with a passive one (when
``allow_passive``: worth it only if it saves more than ``min_gain``, because a passive secondary
shadow-compares nothing), and COLO.  The other mode must be cheaper by ``switch_margin`` of the
current cost (and by ``min_gain``) before the policy asks for it; so must the cheapest MC point
before a running MC point's epoch or passive setting changes, because the guard counts that as a
switch too (dwell, budget): measured without this, the policy moved between 10, 11, 12 and 14 ms
and went passive for 0.009 s/s, and each change held the next mode switch for the 5 s dwell.  In
passive MC the divergence rate
is remembered from the last window that measured it; after ``memory_s`` it is unknown and COLO is
estimated without divergences -- optimistic, so a stale "COLO is bad" is re-tested by trying COLO,
as Gilbert's policy retries COLO after its passive period.

The reason names the term that decided (the largest difference between the two modes' costs) and its
signal; for ``div.per_s`` it also gives the break-even rate at which the two modes cost the same:
``"div.per_s=12 > 2.1 (cost colo 0.41 > mc 0.12 at 40 ms)"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, Policy, PolicyConfigError, param
from policies.window import Window

__all__ = [
    "CostModel",
    "CostModelParams",
    "Estimate",
    "Inputs",
    "ModeCost",
    "colo_cost",
    "epoch_grid",
    "hold_spans",
    "mc_cost",
]

T = TypeVar("T")

PAGE_SIZE = 4096
#: checkpoint pause's fixed part, s: idle pause 4-6 ms with the patched QEMU (qemu-colo-notes.md)
PAUSE_FIXED_S = 0.005
#: checkpoint copy rate, bytes/s: +2.7 ms p50 for 3.36 MB per checkpoint (qemu-colo-notes.md)
COPY_BYTES_PER_S = 1.2e9
#: COLO hold before one is measured: 1 ms, above the 90th percentile (0.72-0.74 ms) of the compiled
#: comparator's hold p50 in windows without divergences, static COLO, RPC phases, two runs of
#: tests/test_phased_auto.py (median 0.13-0.19 ms: the secondary often answers first); 5 ms before
#: (curl through a Python stand-in comparator) priced COLO's RPC turns 30x too dear and kept MC there
COLO_HOLD_PRIOR_S = 0.001
#: the daemon's COLO safety interval (controller.epoch.CheckpointScheduler's default), s
SAFETY_INTERVAL_S = 10.0
#: the comparator's timeout for a held frame (mc_driver.pair's default compare_timeout_ms), s
COMPARE_TIMEOUT_S = 3.0
#: the span the comparator's hold p50 summarises (colo_compare.signals.HOLD_WINDOW_S), s
HOLD_SPAN_S = 1.0
#: divergence reasons the comparator can only detect by a held frame's timeout (colo_compare.core)
TIMEOUT_REASONS = ("timeout", "ack")


@dataclass(frozen=True)
class CostModelParams:
    pause_fixed_ms: float = param(
        PAUSE_FIXED_S * 1000, "checkpoint pause fixed part, ms (prior)", min=0.0, max=60_000.0
    )
    copy_bytes_per_s: float = param(COPY_BYTES_PER_S, "checkpoint copy rate, bytes/s", min=1e3, max=1e13)
    colo_hold_ms: float = param(
        COLO_HOLD_PRIOR_S * 1000, "COLO hold before one is measured, ms", min=0.0, max=60_000.0
    )
    safety_interval_s: float = param(
        SAFETY_INTERVAL_S, "the daemon's COLO safety interval, s", min=0.001, max=86_400.0
    )
    compare_timeout_s: float = param(
        COMPARE_TIMEOUT_S, "the comparator's hold timeout, s", min=0.0, max=3600.0
    )
    hold_calm_div_share: float = param(
        0.1,
        "a COLO hold is remembered only while divergences are at most this share of turns",
        min=0.0,
        max=1e6,
    )
    latency_weight: float = param(1.0, "client-seconds per guest-second", min=0.0, max=1e6)
    min_epoch_ms: int = param(10, "shortest MC epoch considered", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX)
    max_epoch_ms: int = param(2000, "longest MC epoch considered", min=EPOCH_MS_MIN, max=EPOCH_MS_MAX)
    grid_steps: int = param(64, "epochs tried between min and max (geometric)", min=2, max=4096)
    switch_margin: float = param(0.2, "the other mode must be this fraction cheaper", min=0.0, max=0.99)
    min_gain: float = param(0.005, "and cheaper by at least this (s/s)", min=0.0, max=10.0)
    allow_passive: bool = param(True, "MC may stop the secondary when that saves CPU")
    host_cores: int = param(0, "host CPUs (0: the cpu.cores signal)", min=0, max=100_000)
    saturated_at: float = param(0.95, "cpu.host at which usage stops showing demand", min=0.0, max=1.0)
    memory_s: float = param(
        60.0, "how long a remembered divergence rate, hold or CPU figure is used", min=0.0, max=86_400.0
    )
    min_coverage: float = param(
        0.002,
        "in MC, the shadow's divergences count only when it compared at least this share of the bytes",
        min=0.0,
        max=1.0,
    )
    min_compared_bytes_per_s: float = param(
        256.0,
        "and its 0 only when it compared at least this many bytes/s",
        min=0.0,
        max=1e12,
    )
    # 1 s, measured: at 3 s the first decision for MC came 2.96 s after an RPC -> divergent phase change
    # (tests/test_phased_auto.py trace), the average still dominated by the RPC phase; the comparator's
    # hold is itself a 1 s figure, and the guard's hysteresis and the switch margin absorb the noise a
    # shorter average lets through
    average_s: float = param(1.0, "seconds each signal is averaged over", min=0.0, max=3600.0)
    calibrate: bool = param(True, "re-fit the pause's fixed part to ckpt.pause_p50_ms")

    def __post_init__(self) -> None:
        if self.min_epoch_ms > self.max_epoch_ms:
            raise PolicyConfigError(
                f"min_epoch_ms={self.min_epoch_ms} must not exceed max_epoch_ms={self.max_epoch_ms}",
                "min_epoch_ms",
                "<= max_epoch_ms",
            )


@dataclass(frozen=True)
class Inputs:
    """What the model read from a window (seconds, bytes, per second), and where each came from."""

    pause_fixed_s: float
    copy_bytes_per_s: float
    dirty_bytes_per_s: float
    dirty_source: str
    turns_per_s: float | None
    div_per_s: float | None
    div_source: str  # live | shadow, coverage C | remembered | unknown (", shadow blind")
    div_timeout_per_s: float  # the part of div_per_s detected by timeout (reasons timeout, ack)
    disk_ckpt_per_s: float
    safety_interval_s: float
    compare_timeout_s: float
    hold_s: float
    hold_source: str
    colo_ckpt_per_s: float | None = None  # measured, in COLO
    colo_pause_s: float | None = None  # measured, in COLO
    guest_bytes: float | None = None
    cpu_loss_running: float = 0.0
    cpu_loss_passive: float = 0.0
    cpu_host: float | None = None
    cpu_source: str = "unknown"


@dataclass(frozen=True)
class ModeCost:
    """One candidate: its point, its cost terms (s/s) and the checkpoint figures behind them."""

    mode: Mode
    epoch_ms: int
    passive: bool
    checkpoints: float  # guest time stopped by checkpoints
    latency: float  # client waiting, already times latency_weight
    cpu: float  # guest time lost to the secondary's CPU
    rate_per_s: float  # checkpoints per second
    pause_s: float
    hold_latency: float = 0.0  # COLO: the part of ``latency`` from the comparator's hold

    @property
    def total(self) -> float:
        return self.checkpoints + self.latency + self.cpu

    def describe(self) -> str:
        where = "colo"
        if self.mode is Mode.MC:
            where = f"mc {self.epoch_ms} ms" + (" passive" if self.passive else "")
        return (
            f"{where}: {self.total:.4f} = ckpt {self.checkpoints:.4f} + latency {self.latency:.4f} "
            f"+ cpu {self.cpu:.4f} ({self.rate_per_s:.3g}/s x {self.pause_s * 1000:.3g} ms)"
        )


@dataclass(frozen=True)
class Estimate:
    inputs: Inputs
    colo: ModeCost
    mc: ModeCost  # the MC candidate the policy would pick (active or passive)
    mc_active: ModeCost
    mc_passive: ModeCost | None


def epoch_grid(min_ms: int, max_ms: int, steps: int = 64) -> tuple[int, ...]:
    """Integer epochs from ``min_ms`` to ``max_ms``, geometrically spaced, both ends included."""
    if min_ms >= max_ms:
        return (min_ms,)
    ratio = (max_ms / min_ms) ** (1.0 / (steps - 1))
    epochs = {min(max_ms, max(min_ms, round(min_ms * ratio**i))) for i in range(steps)}
    return tuple(sorted(epochs | {max_ms}))


def _pause(inputs: Inputs, dirty_bytes: float) -> float:
    if inputs.guest_bytes is not None:
        dirty_bytes = min(dirty_bytes, inputs.guest_bytes)
    return inputs.pause_fixed_s + dirty_bytes / inputs.copy_bytes_per_s


def mc_cost(inputs: Inputs, epoch_ms: int, passive: bool, latency_weight: float = 1.0) -> ModeCost:
    """MC's cost at ``epoch_ms`` (module docstring, "MC at epoch E")."""
    epoch = epoch_ms / 1000.0
    pause = _pause(inputs, inputs.dirty_bytes_per_s * epoch)
    period = max(epoch, pause + epoch / 2)
    run = period - pause
    stopped = pause / period
    turns = inputs.turns_per_s or 0.0
    return ModeCost(
        Mode.MC,
        epoch_ms,
        passive,
        checkpoints=stopped,
        latency=latency_weight * turns * (run / 2 + pause + stopped * pause / 2),
        cpu=inputs.cpu_loss_passive if passive else inputs.cpu_loss_running,
        rate_per_s=1.0 / period,
        pause_s=pause,
    )


def colo_cost(
    inputs: Inputs, latency_weight: float = 1.0, *, div_per_s: float | None = None, measured: bool = True
) -> ModeCost:
    """COLO's cost (module docstring, "COLO"); ``div_per_s`` overrides the input's (break-even search).

    ``measured``: use the checkpoint rate and pause measured in COLO when the inputs have them.
    """
    div = inputs.div_per_s if div_per_s is None else div_per_s
    div = div or 0.0
    if measured and inputs.colo_ckpt_per_s is not None:
        rate = inputs.colo_ckpt_per_s
        if inputs.colo_pause_s is not None:
            pause = inputs.colo_pause_s
        else:
            pause = _pause(inputs, inputs.dirty_bytes_per_s / rate) if rate > 0 else inputs.pause_fixed_s
        stopped = min(1.0, rate * pause)
    else:
        requests = div + inputs.disk_ckpt_per_s + 1.0 / inputs.safety_interval_s
        run = 1.0 / requests
        pause = _pause(inputs, inputs.dirty_bytes_per_s * run)
        rate = 1.0 / (run + pause)
        stopped = pause * rate
    turns = inputs.turns_per_s or 0.0
    hold = turns * inputs.hold_s
    by_timeout = min(div, inputs.div_timeout_per_s)
    divergent = div * pause + by_timeout * inputs.compare_timeout_s + turns * stopped * pause / 2
    return ModeCost(
        Mode.COLO,
        0,
        False,
        checkpoints=stopped,
        latency=latency_weight * (hold + divergent),
        cpu=inputs.cpu_loss_running,
        rate_per_s=rate,
        pause_s=pause,
        hold_latency=latency_weight * hold,
    )


def _best_mc(inputs: Inputs, grid: tuple[int, ...], passive: bool, weight: float) -> ModeCost:
    best: ModeCost | None = None
    for epoch_ms in grid:
        cost = mc_cost(inputs, epoch_ms, passive, weight)
        if best is None or cost.total <= best.total:  # a tie goes to the longer epoch
            best = cost
    assert best is not None
    return best


def hold_spans(window: Window, calm_div_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``window``: whether the comparator's hold p50 at that sample speaks for COLO (its
    span, the last ``HOLD_SPAN_S``, ran in COLO only) and for the secondary's lag (calm: in every
    sample of the span, divergences at most ``calm_div_share`` of the turns).

    Every sample of the span, not their mean: at an RPC -> token change the span's mean divergence
    rate was 0.05 of its turns (the RPC turns of the span's first half) while the hold p50 had gone
    from 0.05 to 37 ms on checkpoint waits; remembered, it priced the next RPC phase's COLO turns at
    37 ms and kept the policy in MC (tests/test_phased_auto.py trace).  ``op.colo`` is the mode at
    each sample, so a sample's interval ran in COLO if it and the sample before show COLO; a window
    without ``op.colo`` ran in its mode throughout.  A divergence rate or turn count not measured at a
    sample is no evidence of calm; a window without ``div.per_s`` at all has no divergences to see.
    """
    t = window.t
    n = t.size
    mode = window.series("op.colo")
    colo = np.full(n, window.mode is Mode.COLO) if mode is None else mode >= 1.0
    div = window.series("div.per_s")
    turns = window.series("net.turns_per_s")
    if div is None:
        quiet = np.ones(n, dtype=bool)
    else:
        quiet = div <= calm_div_share * (turns if turns is not None else np.zeros(n))
    pure = np.zeros(n, dtype=bool)
    calm = np.zeros(n, dtype=bool)
    for k in range(n):
        first = max(0, int(np.searchsorted(t, t[k] - HOLD_SPAN_S, side="left")) - 1)
        pure[k] = bool(colo[first : k + 1].all())
        calm[k] = bool(quiet[first : k + 1].all())
    return pure, calm


def _fmt(value: float | None) -> str:
    return "absent" if value is None else f"{value:.3g}"


class CostModel(Policy[CostModelParams]):
    name = "cost-model"
    description = (
        "Estimates from the current window what MC and COLO would each cost (checkpoint pauses, output "
        "latency, the secondary's CPU) and runs the cheaper, with MC's epoch chosen to minimise its cost."
    )
    params_type = CostModelParams

    def reset(self) -> None:
        # (t, (all, by timeout) per s, their share of the turns or None)
        self._div: tuple[float, tuple[float, float, float | None]] | None = None
        self._hold: tuple[float, float] | None = None  # (t, s) last calm COLO hold measured
        self._busy_hold: tuple[float, float] | None = None  # (t, s) last COLO hold while diverging
        self._alone: tuple[float, float] | None = None  # (t, cores) primary with a passive secondary
        self._grid = epoch_grid(self.params.min_epoch_ms, self.params.max_epoch_ms, self.params.grid_steps)

    def _fresh(self, memory: tuple[float, T] | None, now: float) -> T | None:
        if memory is None or now - memory[0] > self.params.memory_s:
            return None
        return memory[1]

    def measured_div(self, window: Window) -> tuple[float, float, str] | None:
        """(divergences/s COLO has or would have, the part by timeout, source) the window measured, or
        None when it measured nothing (module docstring, "Shadow coverage")."""
        p = self.params
        div = window.mean("div.per_s", p.average_s)
        if div is None:
            return None
        by_timeout = sum(window.mean(f"div.per_s.{r}", p.average_s) or 0.0 for r in TIMEOUT_REASONS)
        if window.mode is Mode.COLO:
            return div, by_timeout, "live"
        if window.passive_secondary:
            return None  # a passive secondary sends nothing: the shadow's 0 is no measurement
        if not window.has("div.shadow_coverage"):
            # a source (or a recorded trace) from before coverage was measured: take the shadow at its word
            return div, by_timeout, "shadow"
        coverage = window.mean("div.shadow_coverage", p.average_s)
        if coverage is None or coverage < p.min_coverage:
            return None  # blind: the secondary answered (almost) nothing before the seals
        compared = window.mean("div.shadow_compared_bytes_per_s", p.average_s)
        # the shadow counts a divergence when the secondary's answer arrives and the epoch's bytes at
        # its seal, up to an epoch later: that can be the next sample, so the divergences that go with
        # the span's seals reach one sample further back (module docstring)
        if window.t.size >= 2:
            lookback = p.average_s + float(window.t[-1] - window.t[-2])
            div = window.mean("div.per_s", lookback) or 0.0
            by_timeout = sum(window.mean(f"div.per_s.{r}", lookback) or 0.0 for r in TIMEOUT_REASONS)
        if div <= 0 and compared is not None and compared < p.min_compared_bytes_per_s:
            return None  # "no divergence" in a few bytes is no evidence (module docstring)
        # the compared bytes are a sample of the output: scale up, but COLO diverges at most once per
        # response the guest sends (per turn), and never less often than the shadow saw
        turns = window.mean("net.turns_per_s", p.average_s)
        ceiling = max(div, turns) if turns is not None else math.inf
        scale = 1.0 / coverage
        return (
            min(div * scale, ceiling),
            min(by_timeout * scale, ceiling),
            f"shadow, coverage {coverage:.2g}",
        )

    def observe(self, window: Window) -> None:
        """Remember what the window measured that another mode will not show (state fed by windows)."""
        p = self.params
        now = window.now
        measured = self.measured_div(window)
        if measured is not None:
            self._div = (now, (measured[0], measured[1], self._share(window, measured[0])))
        if window.mode is Mode.COLO:
            # the secondary's lag, not checkpoint waits nor MC's holds (module docstring)
            holds = window.series("net.hold_p50_ms")
            pure, calm = hold_spans(window, p.hold_calm_div_share)
            if holds is not None and pure[-1] and not math.isnan(holds[-1]):
                if calm[-1]:
                    self._hold = (now, float(holds[-1]) / 1000.0)
                else:
                    self._busy_hold = (now, float(holds[-1]) / 1000.0)
        elif window.passive_secondary:
            primary = window.mean("cpu.primary", p.average_s)
            host = window.mean("cpu.host", p.average_s)
            if primary is not None and host is not None and host < p.saturated_at:
                self._alone = (now, primary)

    def _cpu(self, window: Window) -> tuple[float, float, float | None, str]:
        p = self.params
        cores = float(p.host_cores) if p.host_cores > 0 else window.latest("cpu.cores")
        primary = window.mean("cpu.primary", p.average_s)
        if not cores or primary is None:
            return 0.0, 0.0, None, "cpu.cores or cpu.primary absent"
        secondary = window.mean("cpu.secondary", p.average_s) or 0.0
        host = window.mean("cpu.host", p.average_s)
        busy = host * cores if host is not None else primary + secondary
        rest = max(0.0, busy - primary - secondary)
        running = window.mode is Mode.COLO or not window.passive_secondary
        saturated = busy >= p.saturated_at * cores
        demand = primary
        if saturated and running and primary + rest > 0:
            demand = primary + secondary * primary / (primary + rest)
        alone = self._fresh(self._alone, window.now)
        if alone is not None:
            demand = max(demand, alone)
        loss_running = max(0.0, 1.0 - cores / (2 * demand + rest)) if demand + rest > 0 else 0.0
        loss_passive = max(0.0, 1.0 - cores / (demand + rest)) if demand + rest > 0 else 0.0
        return loss_running, loss_passive, busy / cores, "cpu.host"

    def _share(self, window: Window, div: float) -> float | None:
        """``div`` as a share of the window's turns (None without turns)."""
        turns = window.mean("net.turns_per_s", self.params.average_s)
        return div / turns if turns else None

    def _live_hold(self, window: Window) -> float | None:
        """COLO's hold p50 (ms) averaged over the samples of the last ``average_s`` whose hold span ran
        in COLO only: in the first second after a switch the comparator's span still holds MC's
        releases, an epoch's wait each (26.7 ms measured right after MC -> COLO, where the RPC phase's
        COLO hold was 0.05 ms)."""
        holds = window.series("net.hold_p50_ms")
        if holds is None:
            return None
        pure, _calm = hold_spans(window, self.params.hold_calm_div_share)
        recent = (window.t >= window.now - self.params.average_s) & pure & ~np.isnan(holds)
        return float(holds[recent].mean()) if recent.any() else None

    def inputs(self, window: Window) -> Inputs:
        """The model's inputs from ``window`` and what :meth:`observe` remembered."""
        p = self.params
        avg = p.average_s
        copy = p.copy_bytes_per_s
        ckpt_rate = window.mean("ckpt.per_s", avg)
        ram_bytes = window.mean("mem.ram_bytes_per_ckpt", avg)
        if ram_bytes is None:
            pages = window.mean("mem.ram_pages_per_ckpt", avg)
            ram_bytes = None if pages is None else pages * PAGE_SIZE
        dirty = window.mean("mem.dirty_bytes_per_s", avg)
        dirty_source = "mem.dirty_bytes_per_s"
        if dirty is None and ram_bytes is not None and ckpt_rate is not None:
            dirty, dirty_source = ram_bytes * ckpt_rate, "mem.ram_bytes_per_ckpt"
        if dirty is None:
            dirty, dirty_source = 0.0, "dirty rate unknown"

        pause_fixed = p.pause_fixed_ms / 1000.0
        measured_pause = window.mean("ckpt.pause_p50_ms", avg)
        measured_pause = None if measured_pause is None else measured_pause / 1000.0
        current_bytes = ram_bytes
        if current_bytes is None and window.mode is Mode.MC:
            current_bytes = dirty * window.epoch_ms / 1000.0
        if p.calibrate and measured_pause is not None and current_bytes is not None:
            pause_fixed = min(measured_pause, max(0.0, measured_pause - current_bytes / copy))

        measured = self.measured_div(window)
        div: float | None
        share: float | None = None
        if measured is not None:
            div, div_timeout, div_source = measured
            share = self._share(window, div)
        else:
            remembered = self._fresh(self._div, window.now)
            div, div_timeout, share = (None, 0.0, None) if remembered is None else remembered
            div_source = "remembered" if div is not None else "unknown"
            if window.mode is Mode.MC and not window.passive_secondary and window.has("div.per_s"):
                div_source += ", shadow blind"

        hold_s, hold_source = p.colo_hold_ms / 1000.0, "prior"
        remembered_hold = self._fresh(self._hold, window.now)
        busy_hold = self._fresh(self._busy_hold, window.now)
        live_hold = self._live_hold(window) if window.mode is Mode.COLO else None
        if live_hold is not None:
            hold_s, hold_source = live_hold / 1000.0, "net.hold_p50_ms"
        elif busy_hold is not None and share is not None and share > p.hold_calm_div_share:
            # the responses diverge as they did when COLO last held this long (module docstring)
            hold_s, hold_source = busy_hold, "remembered while diverging"
        elif remembered_hold is not None:
            hold_s, hold_source = remembered_hold, "remembered"

        loss_running, loss_passive, host, cpu_source = self._cpu(window)
        return Inputs(
            pause_fixed_s=pause_fixed,
            copy_bytes_per_s=copy,
            dirty_bytes_per_s=dirty,
            dirty_source=dirty_source,
            turns_per_s=window.mean("net.turns_per_s", avg),
            div_per_s=div,
            div_source=div_source,
            div_timeout_per_s=div_timeout,
            disk_ckpt_per_s=window.mean("ckpt.per_s.disk-pressure", avg) or 0.0,
            safety_interval_s=p.safety_interval_s,
            compare_timeout_s=p.compare_timeout_s,
            hold_s=hold_s,
            hold_source=hold_source,
            guest_bytes=window.latest("mem.guest_bytes"),
            colo_ckpt_per_s=ckpt_rate if window.mode is Mode.COLO else None,
            colo_pause_s=measured_pause if window.mode is Mode.COLO else None,
            cpu_loss_running=loss_running,
            cpu_loss_passive=loss_passive,
            cpu_host=host,
            cpu_source=cpu_source,
        )

    def estimate(self, window: Window) -> Estimate:
        """Both modes' costs for ``window`` (no state changes: ``show`` may call it freely)."""
        p = self.params
        inputs = self.inputs(window)
        colo = colo_cost(inputs, p.latency_weight)
        active = _best_mc(inputs, self._grid, False, p.latency_weight)
        passive = _best_mc(inputs, self._grid, True, p.latency_weight) if p.allow_passive else None
        mc = active
        if passive is not None:
            gain = active.total - passive.total
            already = window.mode is Mode.MC and window.passive_secondary
            if gain > p.min_gain or (already and gain > 0):
                mc = passive
        if window.mode is Mode.MC:
            # changing the running MC point is a switch too (the guard's dwell and budget count it):
            # only for the same margin a mode switch needs (module docstring, "Choosing")
            running = mc_cost(inputs, window.epoch_ms, window.passive_secondary, p.latency_weight)
            if running.total - mc.total <= max(p.switch_margin * running.total, p.min_gain):
                mc = running
        return Estimate(inputs, replace(colo, epoch_ms=window.epoch_ms), mc, active, passive)

    def _break_even_div(self, inputs: Inputs, target: float) -> float | None:
        """The divergence rate at which the modelled COLO costs ``target`` (None: no such rate)."""
        weight = self.params.latency_weight

        def cost(div: float) -> float:
            return colo_cost(inputs, weight, div_per_s=div, measured=False).total

        low, high = 0.0, 1e6
        if cost(low) >= target or cost(high) <= target:
            return None
        for _ in range(100):
            mid = (low + high) / 2
            if cost(mid) < target:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def _driver(self, est: Estimate, winner: ModeCost, loser: ModeCost) -> tuple[str, str]:
        """(signal, its text) of the cost term that separates the two modes the most."""
        inputs = est.inputs
        diffs = {
            "checkpoints": loser.checkpoints - winner.checkpoints,
            "latency": loser.latency - winner.latency,
            "cpu": loser.cpu - winner.cpu,
        }
        term = max(diffs, key=lambda k: diffs[k])  # dict order breaks ties deterministically
        if term == "cpu":
            if inputs.cpu_host is None:
                return "cpu.primary", f"cpu: {inputs.cpu_source}"
            return "cpu.host", f"cpu.host={inputs.cpu_host:.3g} (colo cpu loss {est.colo.cpu:.3g})"
        if term == "latency" and winner.mode is Mode.COLO:
            return "net.turns_per_s", f"net.turns_per_s={_fmt(inputs.turns_per_s)}"
        if term == "latency" and est.colo.hold_latency > est.colo.latency - est.colo.hold_latency:
            text = f"net.hold_p50_ms={inputs.hold_s * 1000:.3g}"
            if inputs.hold_source != "net.hold_p50_ms":
                text += f" ({inputs.hold_source})"
            return "net.hold_p50_ms", text
        div_text = f"div.per_s={_fmt(inputs.div_per_s)}"
        if inputs.div_per_s is None or inputs.div_source != "live":
            div_text += f" ({inputs.div_source})"
        if inputs.div_timeout_per_s > 0:
            div_text += f" ({inputs.div_timeout_per_s:.3g}/s by timeout)"
        even = self._break_even_div(inputs, est.mc.total)
        if even is not None and inputs.div_per_s is not None:
            div_text += f" {'>' if inputs.div_per_s > even else '<='} {even:.3g}"
        return "div.per_s", div_text

    def decide(self, window: Window) -> Decision:
        p = self.params
        self.observe(window)
        est = self.estimate(window)
        colo, mc = est.colo, est.mc
        if window.mode is Mode.COLO:
            go_mc = mc.total < colo.total - max(p.switch_margin * colo.total, p.min_gain)
            choose_mc = go_mc
        else:
            go_colo = colo.total < mc.total - max(p.switch_margin * mc.total, p.min_gain)
            choose_mc = not go_colo
        winner, loser = (mc, colo) if choose_mc else (colo, mc)
        signal, text = self._driver(est, winner, loser)
        relation = ">" if colo.total > mc.total else "<="
        costs = f"cost colo {colo.total:.3g} {relation} mc {mc.total:.3g} at {mc.epoch_ms} ms"
        if mc.passive:
            costs += " passive"
        if winner.total > loser.total:
            costs += ", within the switch margin"
        if inputs_note := self._note(est.inputs):
            costs += f"; {inputs_note}"
        reason = f"{text} ({costs})"
        if choose_mc:
            return Decision(Mode.MC, mc.epoch_ms, reason, signal, mc.passive)
        return Decision(Mode.COLO, window.epoch_ms, reason, signal)

    @staticmethod
    def _note(inputs: Inputs) -> str:
        missing = []
        if inputs.dirty_source == "dirty rate unknown":
            missing.append("dirty rate unknown")
        if inputs.turns_per_s is None:
            missing.append("net.turns_per_s absent")
        return ", ".join(missing)
