"""The comparator's signals for the hybrid controller: one typed sample, and the hold-latency window.

The daemon samples the comparator every 250 ms (``stats`` on its control socket, the ``signals``
part of the reply) and hands the figures to a mode-selection policy (ARCHITECTURE.md section 6).
Why each figure is what it is:

* **Counters are cumulative** (frames, bytes, turns, divergences): the daemon differentiates two
  samples, so a sample it misses loses no event and the comparator needs no clock of its own.
* **Guest -> client** traffic is the primary's output (every frame the comparator is fed).
* **Client -> guest** traffic never reaches the comparator: QEMU's filter-mirror sends it straight
  from the primary's QEMU to the secondary's.  What the comparator does see are the ACK numbers
  the primary guest puts on its own TCP segments, and those count the client's bytes: every
  forward move of a flow's ACK number is client payload (plus SYN/FIN) the guest received.
  ``client_bytes_acked`` sums those moves; ``client_ack_advances`` counts the guest segments that
  moved it (at least one client segment each, so a lower bound on client segments).  UDP/ICMP
  input is invisible.
* **A turn** is client bytes followed by guest bytes on one flow: the request/response exchange
  that MC delays by up to an epoch (the guest's answer waits for the checkpoint) and COLO does not.
  Rule: a guest TCP segment carrying payload is a turn when its flow's ACK number moved forward
  since the previous guest payload segment of that flow (or since the flow was first seen: a
  server's banner after the handshake is not a turn, the answer to the first request is).  A
  flow where both sides stream at once counts a turn for each guest segment that acknowledges new
  client bytes: an upper bound there, exact for request/response.
* **Hold latency** (a primary frame's arrival -> its release) is measured by the shell, which
  owns the clock (the core releases MC epochs at ``commit``, which has no time); in MC the shadow
  measures what COLO's would have been (``shadow_hold``: arrival -> the feed that verified the
  frame; frames only a checkpoint would have released are not in it, so it is COLO's hold
  without divergences).  Both sample every ``HOLD_SAMPLE``-th frame of a batch; p50/p99 over the
  samples of the last ``window_s`` seconds of a bounded ring, so a 4 Hz reader sorts at most
  ``capacity`` numbers (in C) and an idle comparator reports no samples rather than stale figures.
* **Divergences by reason** count checkpoint requests (live, in COLO epochs) and the requests COLO
  *would* have made (shadow, in MC epochs, see ``colo_compare.core``): a policy can price COLO
  without switching.  The shadow count is a lower bound on COLO's checkpoints: after a divergence
  the shadow stops comparing that flow until the MC epoch's checkpoint, where COLO would have
  checkpointed at once and gone on comparing.
* **Shadow coverage**: a shadow count of 0 means "COLO would not diverge" only if the shadow compared
  something.  The secondary must produce a response before the MC epoch is sealed; the checkpoint
  then hands it the primary's state, in which the response has been sent, so a response the secondary
  had not produced by the seal is never compared (measured under TCG at 10 ms epochs: almost none
  are).  ``shadow_sealed_bytes`` counts the primary's TCP payload bytes of every sealed shadowed
  epoch and ``shadow_compared_bytes`` those the shadow verified or found diverged; their rates' ratio
  is the share of the primary's output the shadow's figures speak for (the daemon's
  ``div.shadow_coverage``).  Datagrams are not counted (compared one for one, rare in the workloads
  this is for).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any

from hybridft_common.stats import percentile
from hybridft_common.vocabulary import Mode

__all__ = [
    "HOLD_CAPACITY",
    "HOLD_SAMPLE",
    "HOLD_WINDOW_S",
    "REASONS",
    "SHADOW_OVERFLOW",
    "CompareStats",
    "HoldSummary",
    "HoldWindow",
    "ReasonCounts",
]

#: The reasons of ``CheckpointRequest`` (colo_compare.core's module docstring), in wire spelling.
REASONS: tuple[str, ...] = ("payload", "fin", "rst", "datagram", "other", "timeout", "ack", "queue-full")
#: Shadow only: a flow whose shadow state outgrew the queue budget and was dropped until the next
#: checkpoint (COLO would have asked for a ``queue-full`` checkpoint about there).
SHADOW_OVERFLOW = "shadow-overflow"
#: Hold latency: one sample per this many primary frames of a batch, the samples kept, and the
#: window the signals summarise (the daemon samples every 250 ms: a second is recent and has samples).
HOLD_SAMPLE = 16
HOLD_CAPACITY = 8192
HOLD_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class ReasonCounts:
    """Checkpoint requests per reason, cumulative (attribute names are the reasons, ``_`` for ``-``)."""

    payload: int = 0
    fin: int = 0
    rst: int = 0
    datagram: int = 0
    other: int = 0
    timeout: int = 0
    ack: int = 0
    queue_full: int = 0
    shadow_overflow: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> ReasonCounts:
        """From ``{reason: count}`` in wire spelling; a reason this version does not know is refused."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, int] = {}
        for reason, count in counts.items():
            name = reason.replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown checkpoint reason {reason!r}")
            kwargs[name] = int(count)
        return cls(**kwargs)

    def as_dict(self) -> dict[str, int]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class HoldSummary:
    """Hold latency over a window: sample count, nearest-rank p50/p99 and max in microseconds."""

    samples: int = 0
    p50_us: float | None = None
    p99_us: float | None = None
    max_us: float | None = None


class HoldWindow:
    """The latest hold-latency samples in a bounded ring, summarised over a recent time window.

    Sans-I/O: callers pass the times, which must not decrease (a monotonic clock).  ``add`` is
    O(1).  ``summary`` finds the window's first sample by bisection and sorts at most
    ``capacity`` numbers, all in C (a copy and a sort: well under a millisecond for 8192), so a
    4 Hz reader costs the same however busy the comparator is.
    """

    def __init__(self, capacity: int = HOLD_CAPACITY, window_s: float = HOLD_WINDOW_S) -> None:
        if capacity < 1 or window_s <= 0:
            raise ValueError("HoldWindow needs capacity >= 1 and window_s > 0")
        self.window_s = window_s
        self._at: deque[float] = deque(maxlen=capacity)  # release times, not decreasing
        self._us: deque[float] = deque(maxlen=capacity)  # the matching holds, in microseconds

    def add(self, at: float, hold_us: float) -> None:
        self._at.append(at)
        self._us.append(hold_us)

    def __len__(self) -> int:
        return len(self._us)

    def summary(self, now: float | None = None) -> HoldSummary:
        """The samples released in the last ``window_s`` seconds before ``now`` (``None``: every
        sample in the ring, however old)."""
        first = 0 if now is None else bisect_left(self._at, now - self.window_s)
        values = list(islice(self._us, first, None))
        if not values:
            return HoldSummary()
        values.sort()
        return HoldSummary(len(values), percentile(values, 0.5), percentile(values, 0.99), values[-1])


#: CompareStats fields a reply may leave out (the shell's holds; coverage, new in this version)
_OPTIONAL = frozenset({"hold", "shadow_hold", "shadow_sealed_bytes", "shadow_compared_bytes"})


@dataclass(frozen=True, slots=True)
class CompareStats:
    """One sample of the comparator's signals (module docstring); counters are cumulative.

    Sent as the ``signals`` part of the ``stats`` control verb's reply: ``as_dict()`` on the
    comparator's side, ``CompareStats.from_dict(reply["signals"])`` on the daemon's.
    """

    mode: Mode  # the open epoch's mode
    epoch: int  # the open epoch
    shadow: bool  # the open epoch is MC and the secondary's output is being shadow-compared
    guest_frames: int  # primary frames in (guest -> client)
    guest_bytes: int
    secondary_frames: int  # secondary frames in
    secondary_bytes: int
    client_bytes_acked: int  # client -> guest TCP bytes, from the primary's ACK numbers
    client_ack_advances: int  # primary segments that moved their flow's ACK number forward
    turns: int  # request/response turns (module docstring)
    released_frames: int
    released_bytes: int
    held_bytes: int  # primary bytes held now
    checkpoints: int  # epochs committed
    divergences: ReasonCounts  # checkpoint requests in COLO epochs, by reason
    shadow_divergences: ReasonCounts  # requests COLO would have made in MC epochs, plus overflows
    shadow_early_frames: int  # primary frames COLO would have released before their checkpoint
    shadow_early_bytes: int
    shadow_held_bytes: int  # what COLO would be holding now (0 when not shadowing)
    shadow_epochs: int  # MC epochs sealed while shadow-comparing
    shadow_epochs_diverged: int  # ... of which COLO would have requested at least one checkpoint
    hold: HoldSummary = HoldSummary()  # filled in by the shell (it owns the clock)
    shadow_hold: HoldSummary = HoldSummary()  # what COLO's hold would be (the shadow's early releases)
    # coverage: primary TCP payload bytes of sealed shadowed epochs, and those the shadow compared
    shadow_sealed_bytes: int = 0
    shadow_compared_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ReasonCounts):
                value = value.as_dict()
            elif isinstance(value, HoldSummary):
                value = {h.name: getattr(value, h.name) for h in fields(value)}
            elif isinstance(value, Mode):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompareStats:
        """The inverse of ``as_dict``; a missing or mistyped field raises ValueError."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in _OPTIONAL:
                    continue
                raise ValueError(f"CompareStats: missing field {f.name!r}")
            value = data[f.name]
            if f.name == "mode":
                value = Mode(value)
            elif f.name in ("divergences", "shadow_divergences"):
                if not isinstance(value, Mapping):
                    raise ValueError(f"CompareStats: {f.name} must be a mapping, got {value!r}")
                value = ReasonCounts.from_counts(value)
            elif f.name in ("hold", "shadow_hold"):
                if not isinstance(value, Mapping):
                    raise ValueError(f"CompareStats: {f.name} must be a mapping, got {value!r}")
                value = HoldSummary(**value)
            elif f.name == "shadow":
                if not isinstance(value, bool):
                    raise ValueError(f"CompareStats: shadow must be a boolean, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"CompareStats: {f.name} must be an integer, got {value!r}")
            kwargs[f.name] = value
        return cls(**kwargs)
