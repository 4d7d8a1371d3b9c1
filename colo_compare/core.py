"""The comparator's sans-I/O core: primary and secondary frames in, actions out.

Nothing here touches a socket or a clock: callers pass ``now`` and get back
:class:`Release` / :class:`CheckpointRequest` / :class:`DropSecondary` actions.  That is what lets
the same code serve live QEMU traffic (``compare serve``), replay captures (``compare replay``)
and run under hypothesis.

Why it compares streams, not packets
------------------------------------
Two VMs running the same code produce the same *application bytes* but not the same packets:
ISNs, segmentation (TSO, Nagle, timer-driven pushes), IP IDs, TTL, checksums (zero when offloaded),
TCP options and timestamps, window sizes and the timing of pure ACKs all differ.  So for TCP the
core keeps, per flow (5-tuple, VM -> client direction) and per side, the byte stream relative to
that side's own ISN (offset 0 = first byte after the SYN) and compares the two streams.

Rules (each one is tested)
--------------------------
TCP
  * Streams are reassembled: out-of-order segments wait, duplicates and the already-known part of a
    partly overlapping retransmission are ignored (first copy wins), sequence numbers are unwrapped
    (32-bit wrap-around) relative to the stream's current end.
  * SYN is an event at offset -1, FIN an event at its offset (it occupies one sequence number),
    RST an event at its offset (clamped to the side's end of data, +1 after a FIN).  Data after a
    FIN/RST is never compared: a primary frame carrying some waits for a checkpoint.  A FIN/RST
    at offset k that the other side does not have there while it has data (or the other event)
    there is a divergence at k.
  * QEMU's filter-rewriter on the secondary sends the secondary's SYN/ACK with its own ISN but
    moves every later ACK-flagged segment into the primary's sequence space.  The first segment
    after a SYN is always at offset 0, so when the secondary's first post-SYN segment carries the
    primary's offset-0 sequence number, that side is re-anchored there.  With or without a
    rewriter the comparison is the same.
  * A flow whose first frame is not a SYN (it opened before the comparator saw it, e.g. during an
    MC epoch) is anchored at the first sequence number seen, and both sides share that anchor:
    after any checkpoint the secondary's TCP state is the primary's (and QEMU's filter-rewriter
    maps secondary sequence numbers into the primary's space anyway).
  * Release (COLO): a primary frame covering stream offsets [a, b) (b counts its FIN/RST) is
    released once both streams are verified identical up to b, and its ACK number does not run
    ahead of the latest ACK number the secondary sent on the flow (serial arithmetic): the
    secondary must hold the client data the primary acknowledges.  ACK numbers are compared
    directly: they count the *client's* bytes, and the client is one peer.  Pure ACKs and window
    updates follow the same rule.  Frames leave in the primary's per-flow order.
  * A SYN with a new ISN on a flow that has finished (both sides closed, all released) starts a new
    connection; on a live flow it is treated like any other segment.
UDP
  Per flow (5-tuple) the i-th primary datagram is released when the i-th secondary datagram has the
  same payload; a different payload is a divergence at index i.
ICMP / ICMPv6
  Per (addresses, type, echo identifier) sequence, the message minus its checksum is compared the
  same way as UDP datagrams.
ARP and other frames
  Per (MACs, EtherType, IP protocol, addresses) sequence, compared whole with the IPv4
  identification and header checksum zeroed (see ``colo_compare.packet``).
Malformed frames
  A frame whose headers lie (see ``colo_compare.packet``) never raises: it is counted and compared
  whole, byte for byte, in one per-side "malformed" sequence.  A malformed primary frame is
  therefore released only if the secondary sent the very same bytes at the same position;
  otherwise it waits for a checkpoint like any other held frame.  It is never dropped.

Holding, budgets, checkpoints
-----------------------------
* A divergence yields ``CheckpointRequest(reason, proto, flow, offset)`` once per flow and epoch;
  the flow stops being compared until the checkpoint commits.  Reasons: ``payload``, ``fin``,
  ``rst``, ``datagram`` (UDP/ICMP), ``other`` (other/malformed frames), ``timeout`` (a held
  frame older than ``compare_timeout``), ``ack`` (a timeout whose frame is verified but
  its ACK runs ahead of the secondary's), ``queue-full`` (held primary frames plus buffered
  secondary bytes exceed ``queue_budget_bytes``).  Primary frames are never dropped: they wait.
* ``seal()`` closes epoch N: every primary frame held at that moment belongs to N and
  ``commit(N)`` releases exactly those, in order.  Both VMs are stopped and drained when the
  daemon seals (ARCHITECTURE.md section 2), so secondary frames fed between ``seal(N)`` and
  ``commit(N)`` are the secondary's output *after* it loaded checkpoint N: they are set aside
  and compared after the re-anchor.  While a sealed epoch is uncommitted nothing new is released.
* COLO commit re-anchors every flow known at the seal: the secondary's stream restarts at the
  primary's sealed end (same ISN, same ACK, same FIN/RST state, same datagram counts) and the old
  secondary bytes are dropped.  Flows opened after the seal start fresh.
* MC mode holds every primary frame until its epoch commits (releases never depend on parsing
  it); secondary frames are discarded for release purposes (``DropSecondary``).
* Shadow comparison in MC: unless ``shadow=False`` (a passive secondary, which sends nothing), a
  *shadow* runs beside each MC epoch: a COLO core of its own (``_Shadow``), fed the same primary
  and secondary frames, applying exactly the rules above (reassembly, divergences, ACK rule,
  timeouts, seal/commit re-anchoring), whose releases and checkpoint requests are only counted.
  So a policy learns what COLO would cost (requests by reason, frames and bytes COLO would have
  released early, what it would hold and for how long) without switching, and nothing the shadow
  does can reach MC's output: it holds references to the MC frames and never moves them.  Its
  memory (held + buffered secondary bytes, as COLO counts them) is bounded by the same
  ``queue_budget_bytes``: past it, the flows holding the most are dropped from the shadow
  (largest first, down to half the budget), each counted as a ``shadow-overflow``, and ignored
  until the next seal -- not the commit: the primary's frames after the seal are what a flow
  re-enters with, anchored where the secondary resumes.  A shadow starts with an MC epoch
  (fresh after COLO: flows already open are anchored as when first seen) and ends at the seal
  into COLO or at ``release_all``; ``set_shadow`` turns it on or off from the next seal.
  Coverage: at each seal the shadow counts the primary's TCP payload bytes of the epoch and those
  it compared (verified, or in a flow found diverged); a response the secondary had not produced by
  the seal is never compared, because the checkpoint gives it the primary's state, which has already
  sent it.  So a short epoch can leave the shadow blind, and the figures say how blind
  (``colo_compare.signals``, "Shadow coverage").
* ``set_mode`` takes effect at the next ``seal`` so every epoch has exactly one mode.
* ``release_all()`` (the secondary is lost) releases everything held and switches to pass-through
  (primary frames are released as they come) until the next ``seal()``, which starts a new,
  protected epoch in the current mode.

Signals
-------
``signals()`` returns :class:`~colo_compare.signals.CompareStats` (see that module for why each
figure is what it is): traffic each way, request/response turns (from the primary's ACK numbers,
tracked for every primary frame in every mode), checkpoint requests by reason, and the shadow's
figures.

Released frames are the very objects that were fed (``bytes`` are kept, other buffers are copied
once), so a shell can map them back to per-frame metadata such as virtio headers.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from colo_compare.packet import (
    KIND_ICMP,
    KIND_MALFORMED,
    KIND_TCP,
    KIND_UDP,
    classify,
    describe,
    flow_name,
    proto_of,
)
from colo_compare.signals import (
    HOLD_SAMPLE,
    SHADOW_OVERFLOW,
    CompareStats,
    HoldSummary,
    HoldWindow,
    ReasonCounts,
)
from hybridft_common.fastpath import available, speedups
from hybridft_common.vocabulary import Mode

__all__ = [
    "Action",
    "CheckpointRequest",
    "Comparator",
    "CompareStats",
    "DropSecondary",
    "FlowReport",
    "Mode",
    "Release",
]


@dataclass(frozen=True, slots=True)
class Release:
    """Forward these primary frames (raw Ethernet frames) to the client, in this order."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """The daemon must run a checkpoint (reason: see the module docstring)."""

    reason: str
    proto: str
    flow: str | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class DropSecondary:
    """Informational: this many secondary frames were consumed and dropped."""

    count: int


Action = Release | CheckpointRequest | DropSecondary


@dataclass(frozen=True, slots=True)
class FlowReport:
    """One flow's state, for replay reports and debugging (not used on the hot path)."""

    key: bytes | tuple
    proto: str
    primary_seen: bool
    secondary_seen: bool
    primary_units: int  # TCP: contiguous stream bytes; others: datagrams/frames
    secondary_units: int
    divergence: tuple[str, int] | None  # (reason, offset)
    primary_closed: bool  # TCP: FIN or RST seen
    secondary_closed: bool
    verified: int  # TCP: stream offset verified equal on both sides (-1: SYNs not both seen)

    def describe(self) -> dict[str, object]:
        return describe(self.key)


_ONLY_BYTES = {bytes}
_M = 0xFFFFFFFF
_H = 0x80000000
_SYN = 0x02
_FIN = 0x01
_RST = 0x04
_ACKF = 0x10
_EV_DATA = 1
_EV_FIN = 2
_EV_RST = 3

# Ethernet + IPv4 (IHL 5) + TCP fixed part, one unpack per frame: ethertype|version|IHL|TOS,
# total length, flags|fragment|TTL|protocol, addresses+ports (the flow key), seq, ack, offset|flags
_FAST4 = struct.Struct(">12xIH2xI2x12sIIH")
# Ethernet + IPv6 (no extension headers) + TCP: version/tc, payload length, next header,
# addresses+ports, seq, ack, off/flags
_FAST6 = struct.Struct(">14xB3xHBx36sIIH")
# TCP data offset|flags & 0xF007 of a run's segment: a valid header length, no SYN/FIN/RST
_PLAIN_OFFFLAGS = frozenset(off << 12 for off in range(5, 16))
_FRAME_OF = itemgetter(2)  # the frame of a held (end, ack, frame, arrival) entry
# Ethernet + IPv4 (IHL 5) + TCP, what the client tracker needs: as _FAST4 minus the sequence number
_KEY_ACK4 = struct.Struct(">26x12s4xI")  # the flow key and ACK number (at the IPv4/TCP fast offsets)
_ACK4 = struct.Struct(">12xIH2xI22xH")  # the rest of what the client tracker checks, as in _FAST4
if available is not None:  # bound whenever built: tests run both implementations
    _feed_runs = available.colo_feed_runs
    _colo_settle = available.colo_settle
    _releasable = available.releasable
_MAX_CLIENT_FLOWS = 1 << 16  # flows whose ACK baseline the client tracker keeps (then it forgets all)


def _bytes_total_python(frames: object) -> int:
    """The bytes in ``frames`` if it is a list of ``bytes`` objects (what the shell passes), else -1:
    the caller then converts.  ``_speedups.bytes_total`` is the same in one C loop: the two ``map``
    passes and the set, three times per batch, were a fifth of the core's instructions per frame on
    short bursts (callgrind, ``bench.compare_micro bursts``: 14,650 -> 11,664)."""
    if type(frames) is list and set(map(type, frames)) <= _ONLY_BYTES:
        return sum(map(len, frames))
    return -1


_bytes_total = _bytes_total_python if speedups is None else speedups.bytes_total


def frames_bytes(frames: list[bytes]) -> int:
    """The bytes in a batch of frames (the shell's counters): one C loop for a list of bytes."""
    n = _bytes_total(frames)
    return n if n >= 0 else sum(map(len, frames))


class _ClientTracker:
    """What the primary guest's ACK numbers say about the client -> guest direction.

    The rules (bytes acknowledged, ACK advances, turns) are colo_compare.signals' module docstring.
    Per TCP flow it keeps two numbers: the highest ACK number seen and the one the flow's last
    turn was counted at.  The first segment of a flow (or a SYN) only sets the baseline; a FIN or
    RST from the guest ends the flow (it sends no more payload).  One tracker per core, kept
    across mode switches and shared with the shadow, so the figures are the same in every mode.

    Where the core parses primary frames anyway (COLO, and MC's shadow) its loop calls ``one``
    itself, and only when a frame's ACK number differs from the flow's settled one (``one``'s
    return value): a frame with the settled ACK number changes nothing, and in a stream that is
    nearly every frame.  Elsewhere (MC without a shadow, pass-through) ``feed`` does the parsing,
    with the same shortcut.
    """

    __slots__ = ("acked_bytes", "advances", "flows", "turns")

    def __init__(self) -> None:
        self.flows: dict[bytes, list[int]] = {}  # key -> [highest ACK, ACK at the last turn]
        self.acked_bytes = 0
        self.advances = 0
        self.turns = 0

    def one(self, key: bytes, ack: int, flags: int, payload: bool) -> int:
        """One TCP frame of the primary (``flags``: its TCP flags, maybe with the data offset).

        Returns the flow's settled ACK number after it (another frame with that number would
        change nothing), or -1.
        """
        if not flags & _ACKF:
            return -1
        flows = self.flows
        st = flows.get(key)
        if st is None or flags & _SYN:
            if len(flows) >= _MAX_CLIENT_FLOWS:
                flows.clear()  # bounded memory: at most one turn per flow is missed
            flows[key] = [ack, ack]
            return ack
        hi = st[0]
        if ack != hi:
            d = (ack - hi) & _M
            if d < _H:
                self.acked_bytes += d
                self.advances += 1
                st[0] = hi = ack
        if payload and st[1] != hi:
            self.turns += 1
            st[1] = hi
        if flags & (_FIN | _RST):
            del flows[key]
            return -1
        return ack if ack == hi == st[1] else -1

    def feed(self, frames: Iterable[bytes]) -> None:
        """Primary frames the core does not parse itself."""
        key_ack = _KEY_ACK4.unpack_from
        unpack = _ACK4.unpack_from
        one = self.one
        # the previous TCP frame's key and settled ACK number: a frame with both and no SYN, FIN
        # or RST (byte 47: the IPv4/TCP flags) is skipped after one small unpack (a non-TCP frame
        # with those bytes there would be skipped anyway)
        skey: bytes | None = None
        sack = -1
        for frame in frames:
            if len(frame) < 54:
                continue
            key, ack = key_ack(frame)
            if ack == sack and key == skey and not frame[47] & 7:
                continue
            w1, tot, w2, offflags = unpack(frame)
            if w1 & 0xFFFFFF00 == 0x08004500:  # IPv4 without options
                if w2 & 0x3FFF00FF != 6:
                    continue  # not TCP, or a fragment
                payload = tot > 20 + ((offflags >> 10) & 0x3C)
            else:
                parsed = _tcp_ack_slow(frame)
                if parsed is None:
                    continue
                key, ack, offflags, payload = parsed
            sack = one(key, ack, offflags, payload)
            skey = key


def _tcp_ack_slow(frame: bytes) -> tuple[bytes, int, int, bool] | None:
    """(key, ack, flags, carries payload) of a TCP frame off the IPv4 fast path, else None."""
    ethertype = frame[12:14]
    if ethertype == b"\x86\xdd":
        if len(frame) >= 74:
            vtc, plen, nh, key, _seq, ack, offflags = _FAST6.unpack_from(frame)
            if vtc >> 4 == 6 and nh == 6 and offflags >= 0x5000:
                return key, ack, offflags, plen > ((offflags >> 10) & 0x3C)
            if nh in (17, 58):
                return None  # UDP, ICMPv6
    elif ethertype != b"\x08\x00" or frame[23] != 6:
        return None  # not IPv4/IPv6 (ARP...), or IPv4 but not TCP: spare the classifier
    cls = classify(frame)
    if cls[0] != KIND_TCP:
        return None
    _kind, key, _seq, ack, flags, pstart, ip_end = cls
    return key, ack, flags, ip_end > pstart


class _Side:
    """One side's reassembled byte stream of one TCP flow."""

    __slots__ = ("ack", "base", "chunks", "cur", "end", "fin", "nxt", "off", "ooo", "rst", "start", "syn")

    def __init__(self) -> None:
        self.base = -1  # absolute sequence number of stream offset 0; -1 = not anchored yet
        self.nxt = -1  # absolute seq of `end` while open and anchored (hot path), else -1
        self.end = 0  # stream offset one past the last contiguous data byte
        # Stored, not yet verified bytes [start, end) = cur[off:] + the chunks, in order.
        # Appends are O(1) (a payload slice onto the deque); the other side compares against
        # ``cur`` in place, and chunks are joined into ``cur`` only when it runs out.  So every
        # byte is copied a bounded number of times however far one side runs ahead (a bytearray
        # trimmed at the front would copy the whole lag on each growth).
        self.start = 0
        self.cur = b""
        self.off = 0
        self.chunks: deque[bytes] = deque()
        self.ooo: dict[int, bytes] = {}
        self.fin = -1  # stream offset of the FIN, -1 = none
        self.rst = -1  # stream offset (sequence space) of the RST, -1 = none
        self.syn = False
        self.ack = -1  # latest ACK number sent, -1 = none


class _TcpFlow:
    __slots__ = ("diverged", "done_at", "held", "key", "p", "released", "requested", "s", "v")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.p = _Side()
        self.s = _Side()
        self.v: int | None = None  # verified up to this sequence-space offset; None = no frame yet
        self.held: deque[tuple[int, int, bytes, float]] = deque()  # (end, ack|-1, frame, arrival)
        self.released = 0  # primary frames released so far (epoch accounting)
        self.diverged: tuple[str, int] | None = None
        self.requested = False  # a CheckpointRequest went out for this flow this epoch
        self.done_at: float | None = None


class _DgramFlow:
    __slots__ = ("diverged", "key", "p_count", "p_pending", "released", "requested", "s_count", "s_pending")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.p_pending: deque[tuple[bytes, bytes, float]] = deque()  # (frame, compared, arrival)
        self.s_pending: deque[bytes] = deque()
        self.p_count = 0  # primary datagrams seen
        self.s_count = 0  # secondary datagrams seen
        self.released = 0  # primary datagrams released (== index of p_pending[0])
        self.diverged: tuple[str, int] | None = None
        self.requested = False


class _Sealed:
    __slots__ = ("aside_bytes", "dgram", "epoch", "frames", "mode", "set_aside", "tcp")

    def __init__(self, epoch: int, mode: Mode) -> None:
        self.epoch = epoch
        self.mode = mode
        self.frames: list[bytes] = []  # MC
        # COLO: per flow (flow, sealed frame count, primary state to re-anchor at)
        self.tcp: list[tuple[_TcpFlow, int, int, int, int, int, bool, int]] = []
        self.dgram: list[tuple[_DgramFlow, int, int]] = []
        self.set_aside: list[bytes] = []  # secondary frames fed after this seal
        self.aside_bytes = 0


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    lo, hi = 0, min(len(a), len(b))
    # binary search for the first index where the prefixes differ
    while lo < hi:
        mid = (lo + hi) // 2
        if a[lo : mid + 1] == b[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Comparator:
    """See the module docstring.  Not thread-safe; one instance per VM pair."""

    def __init__(
        self,
        mode: Mode = Mode.COLO,
        *,
        compare_timeout: float = 3.0,
        queue_budget_bytes: int = 64 << 20,
        shadow: bool = True,
    ) -> None:
        self._mode = Mode(mode)  # mode of the open epoch
        self._next_mode = self._mode
        self.compare_timeout = compare_timeout
        self.queue_budget_bytes = queue_budget_bytes
        self._epoch = 1
        self._passthrough = False
        self._pending: deque[_Sealed] = deque()
        self._mc_frames: list[bytes] = []
        self._tcp: dict[bytes, _TcpFlow] = {}
        self._dgram: dict[tuple, _DgramFlow] = {}
        self._held_bytes = 0  # bytes of held primary frames (all modes)
        self._sec_bytes = 0  # secondary bytes buffered for comparison
        self._queue_full_requested = False
        # counters
        self._p_frames = self._p_bytes = self._s_frames = self._s_bytes = 0
        self._out_frames = self._out_bytes = 0
        self._dropped_secondary = 0
        self._divergences = 0
        self._malformed_p = self._malformed_s = 0
        self._requests = 0
        self._timeouts = 0
        self._checkpoints = 0
        self._reasons: dict[str, int] = {}  # checkpoint requests by reason
        self._client = _ClientTracker()
        # shadow comparison of MC epochs (module docstring)
        self._shadow_on = shadow  # for the open epoch
        self._next_shadow_on = shadow  # from the next seal on
        self._shadow: _Shadow | None = None
        self._retired = _ShadowTotals()  # what shadows already ended counted
        self._shadow_epochs = self._shadow_epochs_diverged = 0
        if shadow and self._mode is Mode.MC:
            self._start_shadow()

    # ------------------------------------------------------------------ public API

    @property
    def mode(self) -> Mode:
        """The mode of the open epoch (``set_mode`` shows here after the next ``seal``)."""
        return self._mode

    @property
    def epoch(self) -> int:
        """The number of the open (not yet sealed) epoch."""
        return self._epoch

    @property
    def secondary_buffered_bytes(self) -> int:
        """Secondary bytes kept for comparison, including those set aside behind a pending seal."""
        pending = self._pending  # empty but for the moments a seal waits: skip the generator then
        return self._sec_bytes + sum(sealed.aside_bytes for sealed in pending) if pending else self._sec_bytes

    def set_mode(self, mode: Mode) -> None:
        self._next_mode = Mode(mode)

    @property
    def shadow_enabled(self) -> bool:
        """Whether MC epochs are shadow-compared (``set_shadow`` shows here after the next seal)."""
        return self._shadow_on

    def set_shadow(self, enabled: bool) -> None:
        """Shadow-compare MC epochs from the next ``seal`` on, like ``set_mode``: off for a passive
        secondary (stopped after each checkpoint, it sends nothing, and a shadow would only see
        timeouts)."""
        self._next_shadow_on = bool(enabled)

    def feed_primary(self, frames: Sequence[bytes | memoryview], now: float) -> list[Action]:
        """Feed a batch of primary frames (arrival order); returns the actions they cause."""
        nframes = len(frames)
        if not nframes:
            return []
        nbytes = _bytes_total(frames)
        if nbytes < 0:
            frames = [f if type(f) is bytes else bytes(f) for f in frames]
            nbytes = sum(map(len, frames))
        self._p_frames += nframes
        self._p_bytes += nbytes
        if self._passthrough:
            self._client.feed(frames)
            self._out_frames += nframes
            self._out_bytes += nbytes
            return [Release(list(frames))]
        if self._mode is Mode.MC:
            self._mc_frames.extend(frames)
            self._held_bytes += nbytes
            if self._shadow is not None:
                # it only counts (its actions go nowhere); its parsing feeds the client tracker
                self._shadow.feed_primary(frames, now)
            else:
                self._client.feed(frames)
            if self._held_bytes + self._sec_bytes > self.queue_budget_bytes:
                return self._queue_full()
            return []
        self._held_bytes += nbytes
        actions: list[Action] = []
        touched = self._feed_colo_primary(frames, now)
        if not self._pending:
            self._settle(touched, actions)
        if self._held_bytes + self._sec_bytes > self.queue_budget_bytes:
            actions.extend(self._queue_full())
        return actions

    def feed_secondary(self, frames: Sequence[bytes | memoryview], now: float) -> list[Action]:
        """Feed a batch of secondary frames; they are compared (COLO) or dropped (MC)."""
        nframes = len(frames)
        if not nframes:
            return []
        nbytes = _bytes_total(frames)
        all_bytes = nbytes >= 0
        if not all_bytes:
            nbytes = sum(map(len, frames))
        self._s_frames += nframes
        self._s_bytes += nbytes
        if self._passthrough or self._mode is Mode.MC:
            self._dropped_secondary += nframes
            if self._shadow is not None:  # never set while passing through
                self._shadow.feed_secondary(frames, now)
            return [DropSecondary(nframes)]
        if not all_bytes:
            # stored payload slices must not alias a buffer the caller reuses
            frames = [f if type(f) is bytes else bytes(f) for f in frames]
        if self._pending:
            self._pending[-1].set_aside.extend(frames)
            self._pending[-1].aside_bytes += nbytes
            return []
        actions: list[Action] = []
        touched = self._feed_colo_secondary(frames, now)
        self._settle(touched, actions)
        self._dropped_secondary += nframes
        actions.append(DropSecondary(nframes))
        if self._held_bytes + self._sec_bytes > self.queue_budget_bytes:
            actions.extend(self._queue_full())
        return actions

    def poll(self, now: float) -> list[Action]:
        """Hold timeouts: a primary frame held longer than ``compare_timeout`` asks for a checkpoint."""
        if self._passthrough or self._pending or self._mode is Mode.MC:
            if self._shadow is not None:
                self._shadow.poll(now)  # the timeouts COLO would have had
            return []
        limit = now - self.compare_timeout
        actions: list[Action] = []
        stale: list[bytes] = []
        for flow in self._tcp.values():
            held = flow.held
            if held:
                if held[0][3] < limit and not flow.requested:
                    end = held[0][0]
                    v = flow.v if flow.v is not None else 0
                    reason = "ack" if end <= v and flow.diverged is None else "timeout"
                    self._timeouts += 1
                    actions.append(self._request(flow, reason, "tcp", max(v, 0)))
            elif flow.done_at is None:
                if self._flow_finished(flow):
                    flow.done_at = now
            elif now - flow.done_at > max(30.0, 10 * self.compare_timeout):
                # closed on both sides and verified long ago: forget it (late retransmissions of
                # a forgotten flow would anchor a new one and at worst cost a checkpoint)
                stale.append(flow.key)
        for key in stale:
            del self._tcp[key]
        idle: list[tuple] = []
        for dflow in self._dgram.values():
            pend = dflow.p_pending
            if pend:
                if pend[0][2] < limit and not dflow.requested:
                    self._timeouts += 1
                    actions.append(self._request(dflow, "timeout", proto_of(dflow.key), dflow.released))
            elif not dflow.s_pending and dflow.diverged is None:
                idle.append(dflow.key)  # both sides agree on every datagram: nothing to remember
        for key in idle:
            del self._dgram[key]
        return actions

    def seal(self) -> int:
        """Close the open epoch N and return N; the frames held now belong to it."""
        n = self._epoch
        sealed = _Sealed(n, self._mode)
        if self._passthrough:
            self._passthrough = False
        elif self._mode is Mode.MC:
            sealed.frames = self._mc_frames
            self._mc_frames = []
        else:
            for flow in self._tcp.values():
                p = flow.p
                sealed.tcp.append(
                    (flow, flow.released + len(flow.held), p.base, p.end, p.fin, p.rst, p.syn, p.ack)
                )
            for dflow in self._dgram.values():
                sealed.dgram.append((dflow, dflow.released + len(dflow.p_pending), dflow.p_count))
            if self._next_mode is Mode.MC:
                # MC does not parse: these flows would go stale.  Their held frames stay reachable
                # through the snapshot until the commit; a later COLO epoch starts from scratch.
                self._tcp = {}
                self._dgram = {}
                self._sec_bytes = 0
        self._pending.append(sealed)
        self._epoch += 1
        self._mode = self._next_mode
        self._shadow_on = self._next_shadow_on
        shadow = self._shadow
        if shadow is not None:  # the epoch just sealed was MC, shadow-compared
            shadow.seal()
            self._shadow_epochs += 1
            if shadow.requests_this_epoch():
                self._shadow_epochs_diverged += 1
            if self._mode is Mode.MC and self._shadow_on:
                shadow.new_epoch()
            else:
                self._retire_shadow()
        elif self._shadow_on and self._mode is Mode.MC:
            self._start_shadow()
        return n

    def commit(self, epoch: int) -> list[Action]:
        """Release the frames sealed into ``epoch``; in COLO re-anchor every stream.

        Older sealed epochs still uncommitted are committed first, in order: a checkpoint covers
        everything the primary did before it, so their output is covered too.  One is left behind
        only when its checkpoint was abandoned after the seal (the daemon stopped, or restarted,
        in the middle of it); holding it for ever would stall those connections.
        """
        if not any(sealed.epoch == epoch for sealed in self._pending):
            oldest = self._pending[0].epoch if self._pending else None
            raise ValueError(f"commit({epoch}): not a sealed, uncommitted epoch (the oldest is {oldest})")
        actions: list[Action] = []
        while self._pending[0].epoch != epoch:
            actions += self._commit_oldest()
        actions += self._commit_oldest()
        if self._shadow is not None:
            self._shadow.commit_through(epoch)
        return actions

    def _commit_oldest(self) -> list[Action]:
        sealed = self._pending.popleft()
        self._checkpoints += 1
        out = self._release_sealed(sealed)
        actions: list[Action] = []
        if out:
            self._count_out(out)
            actions.append(Release(out))
        if self._pending:
            # a later seal is still outstanding: its re-anchor supersedes this one
            dropped = len(sealed.set_aside)
            if dropped:
                self._dropped_secondary += dropped
                actions.append(DropSecondary(dropped))
            return actions
        self._queue_full_requested = False
        if self._mode is Mode.MC:
            # the open epoch is MC (its flow state was dropped at the seal)
            dropped = len(sealed.set_aside)
            if dropped:
                self._dropped_secondary += dropped
                actions.append(DropSecondary(dropped))
            return actions
        if sealed.mode is Mode.COLO:
            self._reanchor(sealed)
        if sealed.set_aside:
            self._feed_colo_secondary(sealed.set_aside, 0.0)
        self._settle(list(self._tcp.values()) + list(self._dgram.values()), actions)
        return actions

    def release_all(self) -> list[Action]:
        """The secondary is lost: release everything held, in order, and stop comparing."""
        self._retire_shadow()
        out: list[bytes] = []
        while self._pending:
            out.extend(self._release_sealed(self._pending.popleft()))
        # COLO flows hold frames of every pending COLO epoch and of the open one, in order
        for flow in self._tcp.values():
            out.extend(item[2] for item in flow.held)
            flow.released += len(flow.held)
        for dflow in self._dgram.values():
            out.extend(item[0] for item in dflow.p_pending)
        out.extend(self._mc_frames)
        self._mc_frames = []
        self._reset_colo_state()
        self._held_bytes = 0
        self._passthrough = True
        if not out:
            return []
        self._count_out(out)
        return [Release(out)]

    def stats(self) -> dict[str, int | float | str]:
        held_frames = len(self._mc_frames) + sum(len(s.frames) for s in self._pending)
        held_frames += sum(len(f.held) for f in self._tcp.values())
        held_frames += sum(len(f.p_pending) for f in self._dgram.values())
        for sealed in self._pending:
            # frames of a COLO epoch whose flows were set aside by a switch to MC
            held_frames += sum(c - f.released for f, c, *_ in sealed.tcp if self._tcp.get(f.key) is not f)
            held_frames += sum(c - f.released for f, c, _ in sealed.dgram if self._dgram.get(f.key) is not f)
        return {
            "mode": str(self._mode),
            "next_mode": str(self._next_mode),
            "epoch": self._epoch,
            "pending_epochs": len(self._pending),
            "passthrough": int(self._passthrough),
            "primary_frames": self._p_frames,
            "primary_bytes": self._p_bytes,
            "secondary_frames": self._s_frames,
            "secondary_bytes": self._s_bytes,
            "released_frames": self._out_frames,
            "released_bytes": self._out_bytes,
            "dropped_secondary_frames": self._dropped_secondary,
            "held_frames": held_frames,
            "held_bytes": self._held_bytes,
            "secondary_buffered_bytes": self._sec_bytes,
            "tcp_flows": len(self._tcp),
            "datagram_flows": len(self._dgram),
            "divergences": self._divergences,
            "timeouts": self._timeouts,
            "checkpoint_requests": self._requests,
            "checkpoints": self._checkpoints,
            "malformed_primary": self._malformed_p,
            "malformed_secondary": self._malformed_s,
        }

    def signals(self, now: float | None = None) -> CompareStats:
        """The controller's signals (colo_compare.signals); O(reasons) plus one bounded sort.

        ``now`` (the clock the feeds are given) ends the shadow's hold window (None: every sample
        kept).  The live hold latency is left empty: the shell, which sees releases leave, fills it.
        """
        shadow = self._shadow
        totals = self._retired if shadow is None else self._retired.plus(shadow)
        client = self._client
        return CompareStats(
            mode=self._mode,
            epoch=self._epoch,
            shadow=shadow is not None,
            guest_frames=self._p_frames,
            guest_bytes=self._p_bytes,
            secondary_frames=self._s_frames,
            secondary_bytes=self._s_bytes,
            client_bytes_acked=client.acked_bytes,
            client_ack_advances=client.advances,
            turns=client.turns,
            released_frames=self._out_frames,
            released_bytes=self._out_bytes,
            held_bytes=self._held_bytes,
            checkpoints=self._checkpoints,
            divergences=ReasonCounts.from_counts(self._reasons),
            shadow_divergences=ReasonCounts.from_counts(totals.reasons),
            shadow_early_frames=totals.early_frames,
            shadow_early_bytes=totals.early_bytes,
            shadow_held_bytes=shadow.held_bytes() if shadow is not None else 0,
            shadow_epochs=self._shadow_epochs,
            shadow_epochs_diverged=self._shadow_epochs_diverged,
            shadow_hold=shadow.hold.summary(now) if shadow is not None else HoldSummary(),
            shadow_sealed_bytes=totals.sealed_bytes,
            shadow_compared_bytes=totals.compared_bytes,
        )

    def flows(self) -> list[FlowReport]:
        """Every flow the core knows, with per-side progress and the first divergence if any."""
        reports: list[FlowReport] = []
        for flow in self._tcp.values():
            p, s = flow.p, flow.s
            reports.append(
                FlowReport(
                    flow.key,
                    "tcp",
                    p.base >= 0,
                    s.base >= 0,
                    p.end,
                    s.end,
                    flow.diverged,
                    p.fin >= 0 or p.rst >= 0,
                    s.fin >= 0 or s.rst >= 0,
                    flow.v if flow.v is not None else -1,
                )
            )
        for dflow in self._dgram.values():
            reports.append(
                FlowReport(
                    dflow.key,
                    proto_of(dflow.key),
                    dflow.p_count > 0,
                    dflow.s_count > 0,
                    dflow.p_count,
                    dflow.s_count,
                    dflow.diverged,
                    False,
                    False,
                    0,
                )
            )
        return reports

    def stream_bytes(self, key: bytes | tuple, offset: int, length: int) -> tuple[bytes, bytes]:
        """What each side still holds at ``offset`` of a flow (TCP: stream bytes; others: the
        compared form of datagram ``offset``) - for human-readable divergence reports.  Bytes the
        core already discarded (verified and trimmed) come back empty."""
        if isinstance(key, bytes):
            flow = self._tcp.get(key)
            if flow is None:
                return b"", b""

            def grab(side: _Side) -> bytes:
                stored = side.cur[side.off :] + b"".join(side.chunks)
                lo = max(offset - side.start, 0)
                return stored[lo : max(offset + length - side.start, 0)]

            return grab(flow.p), grab(flow.s)
        dflow = self._dgram.get(key)
        if dflow is None:
            return b"", b""
        i = offset - dflow.released
        pp = dflow.p_pending[i][1] if 0 <= i < len(dflow.p_pending) else b""
        sp = dflow.s_pending[i] if 0 <= i < len(dflow.s_pending) else b""
        return pp[:length], sp[:length]

    # ------------------------------------------------------------------ shadow

    def _start_shadow(self) -> None:
        """A fresh shadow for the open MC epoch, numbering its epochs as this core does."""
        self._shadow = _Shadow(self._epoch, self.compare_timeout, self.queue_budget_bytes, self._client)

    def _retire_shadow(self) -> None:
        """End the shadow (the open epoch is not MC, or the secondary is lost); keep its counts."""
        if self._shadow is not None:
            self._retired = self._retired.plus(self._shadow)
            self._shadow = None

    # ------------------------------------------------------------------ COLO internals

    def _release_sealed(self, sealed: _Sealed) -> list[bytes]:
        """Take exactly the frames sealed into this epoch out of their queues, in order."""
        if sealed.mode is Mode.MC:
            out = sealed.frames
            self._held_bytes -= sum(map(len, out))
            return out
        out = []
        for flow, count, *_ in sealed.tcp:
            held = flow.held
            k = count - flow.released
            for _ in range(min(k, len(held))):
                frame = held.popleft()[2]
                self._held_bytes -= len(frame)
                out.append(frame)
            flow.released += k
        for dflow, count, _pc in sealed.dgram:
            pend = dflow.p_pending
            k = count - dflow.released
            for _ in range(min(k, len(pend))):
                frame = pend.popleft()[0]
                self._held_bytes -= len(frame)
                out.append(frame)
            dflow.released += k
        return out

    # The hot path, deliberately duplicated (one loop per side) rather than sharing one loop full
    # of ``if primary`` tests: every statement per frame counts here.
    #
    # Batch level: consecutive in-order IPv4/TCP segments of one flow (no SYN/FIN/RST) form a
    # *run*.  Per frame of a run the loop only parses the header, slices the payload and (primary)
    # queues the frame; the run's payloads are then compared against the other side and stored
    # once (``_flush_*_run``).  If the run does not match as a whole it is redone segment by
    # segment with the per-segment rule, so the state (verified offset, stored bytes) is exactly
    # what feeding the segments one at a time gives.  Everything off that path goes through
    # ``_classify_slow`` and ``_tcp_segment``.

    def _feed_colo_primary_python(self, frames: Iterable[bytes], now: float) -> list[object]:
        """Parse primary frames into their flows and held queues; returns the flows touched."""
        touched: dict[object, None] = {}
        tcp = self._tcp
        fast4 = _FAST4.unpack_from
        # while a sealed epoch is uncommitted the secondary's stored bytes are pre-checkpoint:
        # nothing may be verified against them (the commit re-anchors, then compares)
        comparing = not self._pending
        # the open run: its flow, key, next sequence number, stream offsets, payloads, last ACK
        rflow: _TcpFlow | None = None
        rkey: bytes | None = None
        rnxt = -1
        rbegin = rend = 0
        parts: list[bytes] = []
        rack = -1
        held_append = None
        track = self._client.one
        cack = -1  # the open run's flow's settled ACK number (client tracker), -1: none
        for frame in frames:
            n = len(frame)
            if n >= 54:
                w1, tot, w2, key, seq, ack, offflags = fast4(frame)
                ip_end = 14 + tot
                pstart = 34 + ((offflags >> 10) & 0x3C)
                if (
                    seq == rnxt and key == rkey and offflags & 0xF007 in _PLAIN_OFFFLAGS
                    and w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and pstart <= ip_end <= n
                ):  # fmt: skip
                    # continues the open run
                    plen = ip_end - pstart
                    if plen:
                        parts.append(frame[pstart:ip_end])
                        rend += plen
                        rnxt = (seq + plen) & 0xFFFFFFFF
                    if offflags & 0x10:
                        rack = ack
                        if ack != cack:
                            cack = track(key, ack, offflags, plen > 0)
                        held_append((rend, ack, frame, now))  # type: ignore[misc]
                    else:
                        held_append((rend, -1, frame, now))  # type: ignore[misc]
                    continue
                fast = (
                    w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and offflags >= 0x5000
                    and pstart <= ip_end <= n
                )  # fmt: skip
            else:
                fast = False
            if rflow is not None:
                self._flush_primary_run(rflow, rbegin, rend, rnxt, parts, rack, comparing)
                rflow = rkey = None
                rnxt = -1
            if not fast:
                parsed = self._classify_slow(frame, now, True)
                if type(parsed) is not tuple:
                    touched[parsed] = None
                    continue
                key, seq, ack, offflags, pstart, ip_end = parsed
            flow = tcp.get(key)
            if flow is None:
                flow = tcp[key] = _TcpFlow(key)
            side = flow.p
            touched[flow] = None
            plen = ip_end - pstart
            if seq == side.nxt and not offflags & 7:
                # in order, no SYN/FIN/RST: open a run
                rflow, rkey = flow, key
                rbegin = rend = side.end
                rnxt = seq
                parts = []
                if plen:
                    parts.append(frame[pstart:ip_end])
                    rend += plen
                    rnxt = (seq + plen) & 0xFFFFFFFF
                held_append = flow.held.append
                if offflags & 0x10:
                    rack = ack
                    cack = track(key, ack, offflags, plen > 0)
                    held_append((rend, ack, frame, now))
                else:
                    rack = cack = -1
                    held_append((rend, -1, frame, now))
                continue
            end = self._tcp_segment(flow, side, True, seq, offflags & 0x3F, frame, pstart, plen)
            flow = tcp[key]  # a SYN may have started a new incarnation
            touched[flow] = None
            if offflags & 0x10:
                flow.p.ack = ack
                track(key, ack, offflags, plen > 0)
                flow.held.append((end, ack, frame, now))
            else:
                flow.held.append((end, -1, frame, now))
        if rflow is not None:
            self._flush_primary_run(rflow, rbegin, rend, rnxt, parts, rack, comparing)
        return list(touched)

    def _feed_colo_primary_compiled(self, frames: Iterable[bytes], now: float) -> list[object]:
        """:meth:`_feed_colo_primary_python` with its in-order runs of IPv4/TCP frames in C, whole
        (``_speedups.colo_feed_runs``: start, continue, then :meth:`_flush_primary_run`, so a
        burst of short runs on many flows costs no Python per run).  It stops at each frame that
        starts no run there (another protocol, a new flow, out of order, SYN/FIN/RST); that one
        frame goes through :meth:`_one_primary_frame`, then the C loop goes on.  The client
        tracker's :meth:`_ClientTracker.one` runs in C too (``client_track_one``), on the tracker."""
        if type(frames) is not list:
            frames = list(frames)
        touched: dict[object, None] = {}
        tcp = self._tcp
        comparing = not self._pending
        track = self._client
        segments = self._primary_segments
        i = 0
        nframes = len(frames)
        while True:
            i, delta = _feed_runs(frames, i, tcp, touched, True, comparing, now, track, _ensure, segments)
            if delta:
                self._sec_bytes += delta
            if i >= nframes:
                return list(touched)
            self._one_primary_frame(frames[i], now, touched, comparing)
            i += 1

    def _file_one(self, frame: bytes, now: float, primary: bool, touched: dict[object, None]) -> tuple | None:
        """Parse a frame outside a C run and file its flow in ``touched`` (creating a TCP flow if
        new): ``(flow, key, seq, ack, offflags, pstart, plen)`` of a TCP frame, ``None`` for
        anything else (queued in its datagram flow by :meth:`_classify_slow`)."""
        n = len(frame)
        if n >= 54:
            w1, tot, w2, key, seq, ack, offflags = _FAST4.unpack_from(frame)
            ip_end = 14 + tot
            pstart = 34 + ((offflags >> 10) & 0x3C)
            fast = (
                w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and offflags >= 0x5000
                and pstart <= ip_end <= n
            )  # fmt: skip
        else:
            fast = False
        if not fast:
            parsed = self._classify_slow(frame, now, primary)
            if type(parsed) is not tuple:
                touched[parsed] = None
                return None
            key, seq, ack, offflags, pstart, ip_end = parsed
        tcp = self._tcp
        flow = tcp.get(key)
        if flow is None:
            flow = tcp[key] = _TcpFlow(key)
        touched[flow] = None
        return flow, key, seq, ack, offflags, pstart, ip_end - pstart

    def _one_primary_frame(
        self, frame: bytes, now: float, touched: dict[object, None], comparing: bool
    ) -> None:
        """The reference loop's body for one primary frame outside a C run.  A run it starts (in
        order, so an IPv6 one: nothing else continues it in the reference either) is stored at
        once, where the reference stores it at the next frame; nothing in between touches it."""
        filed = self._file_one(frame, now, True, touched)
        if filed is None:
            return
        flow, key, seq, ack, offflags, pstart, plen = filed
        ip_end = pstart + plen
        tcp = self._tcp
        side = flow.p
        if seq == side.nxt and not offflags & 7:
            begin = side.end
            held_ack = ack if offflags & 0x10 else -1
            if held_ack >= 0:
                self._client.one(key, ack, offflags, plen > 0)
            flow.held.append((begin + plen, held_ack, frame, now))
            parts = [frame[pstart:ip_end]] if plen else []
            self._flush_primary_run(flow, begin, begin + plen, (seq + plen) & _M, parts, held_ack, comparing)
            return
        end = self._tcp_segment(flow, side, True, seq, offflags & 0x3F, frame, pstart, plen)
        flow = tcp[key]
        touched[flow] = None
        if offflags & 0x10:
            flow.p.ack = ack
            self._client.one(key, ack, offflags, plen > 0)
            flow.held.append((end, ack, frame, now))
        else:
            flow.held.append((end, -1, frame, now))

    def _flush_primary_run(
        self, flow: _TcpFlow, begin: int, end: int, nxt: int, parts: list[bytes], ack: int, comparing: bool
    ) -> None:
        """Store (and, where the secondary is ahead, verify) a run of in-order primary payloads
        covering stream offsets [begin, end)."""
        side = flow.p
        if ack >= 0:
            side.ack = ack
        if end == begin:
            return
        other = flow.s
        oe = other.end
        if oe > begin and flow.v == begin and flow.diverged is None and comparing:
            # catching up and verified so far: compare the new bytes in place with the
            # secondary's; store only what runs past them
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            size = end - begin
            k = oe - begin if oe - begin < size else size
            if other.start + len(other.cur) - other.off < begin + k:
                _ensure(other, begin + k)
            with memoryview(data) as view:
                same = other.cur.startswith(view[:k], other.off)
            if same:
                other.off += k
                other.start = side.start = flow.v = begin + k
                self._sec_bytes -= k
                if k < size:
                    side.chunks.append(data[k:])
            else:
                self._primary_segments(flow, begin, parts)
        else:
            side.chunks.extend(parts)
        side.end = end
        side.nxt = nxt

    def _primary_segments(self, flow: _TcpFlow, e: int, parts: list[bytes]) -> None:
        """The per-segment rule for in-order primary payloads from stream offset ``e``: verify
        each against the secondary while everything before it is verified."""
        side, other = flow.p, flow.s
        for part in parts:
            plen = len(part)
            oe = other.end
            if oe > e and flow.v == e and flow.diverged is None:
                k = oe - e if oe - e < plen else plen
                if other.start + len(other.cur) - other.off < e + k:
                    _ensure(other, e + k)
                if other.cur.startswith(part if k == plen else part[:k], other.off):
                    other.off += k
                    other.start = side.start = flow.v = e + k
                    self._sec_bytes -= k
                    if k < plen:
                        side.chunks.append(part[k:])
                else:
                    side.chunks.append(part)  # _settle pinpoints it
            else:
                side.chunks.append(part)
            e += plen

    def _feed_colo_secondary_python(self, frames: Iterable[bytes], now: float) -> list[object]:
        """Parse secondary frames into their flows' streams; returns the flows touched."""
        touched: dict[object, None] = {}
        tcp = self._tcp
        fast4 = _FAST4.unpack_from
        rflow: _TcpFlow | None = None
        rkey: bytes | None = None
        rnxt = -1
        rbegin = rend = 0
        parts: list[bytes] = []
        rack = -1
        for frame in frames:
            n = len(frame)
            if n >= 54:
                w1, tot, w2, key, seq, ack, offflags = fast4(frame)
                ip_end = 14 + tot
                pstart = 34 + ((offflags >> 10) & 0x3C)
                if (
                    seq == rnxt and key == rkey and offflags & 0xF007 in _PLAIN_OFFFLAGS
                    and w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and pstart <= ip_end <= n
                ):  # fmt: skip
                    plen = ip_end - pstart
                    if plen:
                        parts.append(frame[pstart:ip_end])
                        rend += plen
                        rnxt = (seq + plen) & 0xFFFFFFFF
                    if offflags & 0x10:
                        rack = ack
                    continue
                fast = (
                    w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and offflags >= 0x5000
                    and pstart <= ip_end <= n
                )  # fmt: skip
            else:
                fast = False
            if rflow is not None:
                self._flush_secondary_run(rflow, rbegin, rend, rnxt, parts, rack)
                rflow = rkey = None
                rnxt = -1
            if not fast:
                parsed = self._classify_slow(frame, now, False)
                if type(parsed) is not tuple:
                    touched[parsed] = None
                    continue
                key, seq, ack, offflags, pstart, ip_end = parsed
            flow = tcp.get(key)
            if flow is None:
                flow = tcp[key] = _TcpFlow(key)
            side = flow.s
            touched[flow] = None
            plen = ip_end - pstart
            if seq == side.nxt and not offflags & 7:
                rflow, rkey = flow, key
                rbegin = rend = side.end
                rnxt = seq
                parts = []
                if plen:
                    parts.append(frame[pstart:ip_end])
                    rend += plen
                    rnxt = (seq + plen) & 0xFFFFFFFF
                rack = ack if offflags & 0x10 else -1
                continue
            self._tcp_segment(flow, side, False, seq, offflags & 0x3F, frame, pstart, plen)
            flow = tcp[key]
            touched[flow] = None
            if offflags & 0x10:
                flow.s.ack = ack
        if rflow is not None:
            self._flush_secondary_run(rflow, rbegin, rend, rnxt, parts, rack)
        return list(touched)

    def _feed_colo_secondary_compiled(self, frames: Iterable[bytes], now: float) -> list[object]:
        """:meth:`_feed_colo_secondary_python` with its in-order IPv4/TCP runs in C, whole (see
        :meth:`_feed_colo_primary_compiled`)."""
        if type(frames) is not list:
            frames = list(frames)
        touched: dict[object, None] = {}
        tcp = self._tcp
        segments = self._secondary_segments
        i = 0
        nframes = len(frames)
        while True:
            i, delta = _feed_runs(frames, i, tcp, touched, False, True, now, None, _ensure, segments)
            if delta:
                self._sec_bytes += delta
            if i >= nframes:
                return list(touched)
            self._one_secondary_frame(frames[i], now, touched)
            i += 1

    def _one_secondary_frame(self, frame: bytes, now: float, touched: dict[object, None]) -> None:
        """:meth:`_one_primary_frame` for the secondary."""
        filed = self._file_one(frame, now, False, touched)
        if filed is None:
            return
        flow, key, seq, ack, offflags, pstart, plen = filed
        ip_end = pstart + plen
        tcp = self._tcp
        side = flow.s
        if seq == side.nxt and not offflags & 7:
            begin = side.end
            parts = [frame[pstart:ip_end]] if plen else []
            self._flush_secondary_run(
                flow, begin, begin + plen, (seq + plen) & _M, parts, ack if offflags & 0x10 else -1
            )
            return
        self._tcp_segment(flow, side, False, seq, offflags & 0x3F, frame, pstart, plen)
        flow = tcp[key]
        touched[flow] = None
        if offflags & 0x10:
            flow.s.ack = ack

    def _flush_secondary_run(
        self, flow: _TcpFlow, begin: int, end: int, nxt: int, parts: list[bytes], ack: int
    ) -> None:
        """Verify a run of in-order secondary payloads [begin, end) against the primary's stored
        bytes as far as those go; store the rest."""
        side = flow.s
        if ack >= 0:
            side.ack = ack
        if end == begin:
            return
        other = flow.p
        oe = other.end
        size = end - begin
        if oe > begin and flow.v == begin and flow.diverged is None:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            k = oe - begin if oe - begin < size else size
            if other.start + len(other.cur) - other.off < begin + k:
                _ensure(other, begin + k)
            with memoryview(data) as view:
                same = other.cur.startswith(view[:k], other.off)
            if same:
                other.off += k
                other.start = side.start = flow.v = begin + k
                if k < size:
                    side.chunks.append(data[k:])
                    self._sec_bytes += size - k
            else:
                self._secondary_segments(flow, begin, parts)
        else:
            side.chunks.extend(parts)
            self._sec_bytes += size
        side.end = end
        side.nxt = nxt

    def _secondary_segments(self, flow: _TcpFlow, e: int, parts: list[bytes]) -> None:
        """The per-segment rule for in-order secondary payloads (see ``_primary_segments``)."""
        side, other = flow.s, flow.p
        stored = 0
        for part in parts:
            plen = len(part)
            oe = other.end
            if oe > e and flow.v == e and flow.diverged is None:
                k = oe - e if oe - e < plen else plen
                if other.start + len(other.cur) - other.off < e + k:
                    _ensure(other, e + k)
                if other.cur.startswith(part if k == plen else part[:k], other.off):
                    other.off += k
                    other.start = side.start = flow.v = e + k
                    if k < plen:
                        side.chunks.append(part[k:])
                        stored += plen - k
                else:
                    side.chunks.append(part)
                    stored += plen
            else:
                side.chunks.append(part)
                stored += plen
            e += plen
        self._sec_bytes += stored

    def _classify_slow(self, frame: bytes, now: float, primary: bool) -> tuple | _DgramFlow:
        """Frames off the IPv4/TCP fast path: IPv6/TCP (parsed here), everything else classified
        and, if not TCP, queued in its datagram flow (returned)."""
        n = len(frame)
        if n >= 74 and frame[12] == 0x86 and frame[13] == 0xDD:
            vtc, plen, nh, key, seq, ack, offflags = _FAST6.unpack_from(frame)
            ip_end = 54 + plen
            pstart = 54 + ((offflags >> 10) & 0x3C)
            if vtc >> 4 == 6 and nh == 6 and offflags >= 0x5000 and pstart <= ip_end <= n:
                return key, seq, ack, offflags, pstart, ip_end
        cls = classify(frame)
        if cls[0] != KIND_TCP:
            return self._feed_dgram(cls, frame, now, primary)
        _kind, key, seq, ack, flags, pstart, ip_end = cls
        return key, seq, ack, flags | 0x5000, pstart, ip_end

    def _tcp_segment(
        self,
        flow: _TcpFlow,
        side: _Side,
        primary: bool,
        seq: int,
        flags: int,
        frame: bytes,
        pstart: int,
        plen: int,
    ) -> int:
        """The general TCP path: anchoring, SYN/FIN/RST, out-of-order and overlapping data.

        Returns the sequence-space stream offset one past this frame (its release point).
        """
        syn = flags & _SYN
        if syn and side.base >= 0 and (seq + 1) & _M != side.base and self._flow_finished(flow):
            # a new connection on a finished 5-tuple
            flow = self._tcp[flow.key] = _TcpFlow(flow.key)
            side = flow.p if primary else flow.s
        if side.base < 0:
            other = flow.s if primary else flow.p
            if syn:
                side.base = (seq + 1) & _M
                side.syn = True
            elif other.base >= 0:
                side.base = other.base
            else:
                side.base = seq
            if flow.v is None:
                flow.v = -1 if syn else 0
            side.end = side.start = 0
            side.nxt = side.base
        elif (
            not primary
            and not syn
            and side.syn
            and side.end == 0
            and not side.ooo
            and seq != side.base
            and seq == flow.p.base
            and flags & _ACKF
        ):
            # QEMU's filter-rewriter: the secondary's SYN/ACK leaves with its own ISN, everything
            # after it (ACK set) is moved into the primary's sequence space.  The first segment
            # after a SYN is always at offset 0, so it tells which space this side is in.
            side.base = side.nxt = seq
        if syn and (seq + 1) & _M == side.base:
            side.syn = True
            off = -1
            data_off = 0
        else:
            off = side.end + ((((seq - side.base - side.end) & _M) + _H) & _M) - _H
            data_off = off
        closed_at = side.fin if side.fin >= 0 else side.rst
        if plen and data_off + plen > side.end:
            lo, hi = data_off, data_off + plen
            if closed_at >= 0 and hi > closed_at:
                hi = closed_at
            if lo < hi:
                if lo <= side.end:
                    tail = frame[pstart + side.end - lo : pstart + hi - lo]
                    side.chunks.append(tail)
                    side.end = hi
                    if not primary:
                        self._sec_bytes += len(tail)
                    if side.ooo:
                        self._merge_ooo(side, primary)
                else:
                    seg = frame[pstart : pstart + hi - lo]
                    prev = side.ooo.get(lo)
                    if prev is None or len(prev) < len(seg):
                        side.ooo[lo] = seg
                        if not primary:
                            self._sec_bytes += len(seg) - (len(prev) if prev else 0)
        end = data_off + plen
        if flags & _FIN:
            if side.fin < 0 and side.rst < 0:
                side.fin = data_off + plen
            end += 1
        if flags & _RST:
            if side.rst < 0:
                floor = side.fin + 1 if side.fin >= 0 else side.end
                side.rst = max(off, floor) if side.ooo == {} else off
            end = max(end, side.rst) + 1
        # the hot path only handles in-order data on an open stream with nothing out of order
        if side.fin >= 0 or side.rst >= 0 or side.ooo:
            side.nxt = -1
        else:
            side.nxt = (side.base + side.end) & _M
        return end

    def _merge_ooo(self, side: _Side, primary: bool) -> None:
        ooo = side.ooo
        for lo in sorted(ooo):
            if lo > side.end:
                break
            seg = ooo.pop(lo)
            if not primary:
                self._sec_bytes -= len(seg)
            hi = lo + len(seg)
            if hi > side.end:
                tail = seg[side.end - lo :]
                side.chunks.append(tail)
                side.end = hi
                if not primary:
                    self._sec_bytes += len(tail)

    @staticmethod
    def _flow_finished(flow: _TcpFlow) -> bool:
        p, s = flow.p, flow.s
        return (
            not flow.held
            and (p.fin >= 0 or p.rst >= 0)
            and (s.fin >= 0 or s.rst >= 0)
            and flow.v is not None
            and flow.v > max(p.end, s.end)
        )

    def _feed_dgram(self, cls: tuple, frame: bytes, now: float, primary: bool) -> _DgramFlow:
        kind, key, compared = cls[0], cls[1], cls[2]
        if kind == KIND_MALFORMED:
            if primary:
                self._malformed_p += 1
            else:
                self._malformed_s += 1
        dflow = self._dgram.get(key)
        if dflow is None:
            dflow = self._dgram[key] = _DgramFlow(key)
        if primary:
            dflow.p_pending.append((frame, compared, now))
            dflow.p_count += 1
        else:
            dflow.s_pending.append(compared)
            dflow.s_count += 1
            self._sec_bytes += len(compared)
        return dflow

    def _settle_python(self, flows: Iterable[object], actions: list[Action]) -> None:
        """Compare what is comparable in these flows, release what is verified."""
        out: list[bytes] = []
        for flow in flows:
            if type(flow) is _TcpFlow:
                self._advance_tcp(flow, out, actions)
            else:
                self._advance_dgram(flow, out, actions)  # type: ignore[arg-type]
        self._release(out, actions)

    def _settle_compiled(self, flows: Iterable[object], actions: list[Action]) -> None:
        """:meth:`_settle_python` with its loop in C (``_speedups.colo_settle``): a TCP flow with
        nothing left to compare (the usual case after a run was verified in place) has its held
        frames released there; the others go through :meth:`_advance_tcp` as before."""
        out: list[bytes] = []
        _colo_settle(
            flows if type(flows) is list else list(flows), out, actions, _TcpFlow, self._advance_tcp,
            self._advance_dgram,
        )  # fmt: skip
        self._release(out, actions)

    def _release(self, out: list[bytes], actions: list[Action]) -> None:
        if out:
            # held bytes are accounted here once per batch, not per flow or frame
            nbytes = frames_bytes(out)
            self._held_bytes -= nbytes
            self._out_frames += len(out)
            self._out_bytes += nbytes
            actions.append(Release(out))

    def _advance_tcp_python(self, flow: _TcpFlow, out: list[bytes], actions: list[Action]) -> None:
        v = flow.v
        if v is None:
            return
        s = flow.s
        if flow.diverged is None:
            v = self._verify_tcp(flow, v, actions)
            flow.v = v
        # release the verified prefix of the held frames, in order, under the ACK rule
        held = flow.held
        if held:
            sack = s.ack
            popleft = held.popleft
            n = 0
            okack = -2  # an ACK number already known not to run ahead (consecutive frames share it)
            for item in held:
                if item[0] > v:
                    break
                ack = item[1]
                if ack != okack:
                    if ack >= 0 and (sack < 0 or ((sack - ack) & 0xFFFFFFFF) >= 0x80000000):
                        break
                    okack = ack
                n += 1
            if n:
                if n == len(held):
                    out.extend(map(_FRAME_OF, held))
                    held.clear()
                else:
                    append = out.append
                    for _ in range(n):
                        append(popleft()[2])
                flow.released += n

    def _advance_tcp_compiled(self, flow: _TcpFlow, out: list[bytes], actions: list[Action]) -> None:
        """:meth:`_advance_tcp_python` with the release count in C (``_speedups.releasable``)."""
        v = flow.v
        if v is None:
            return
        if flow.diverged is None:
            v = self._verify_tcp(flow, v, actions)
            flow.v = v
        held = flow.held
        if held:
            n = _releasable(held, v, flow.s.ack)
            if n:
                if n == len(held):
                    out.extend(map(_FRAME_OF, held))
                    held.clear()
                else:
                    popleft = held.popleft
                    append = out.append
                    for _ in range(n):
                        append(popleft()[2])
                flow.released += n

    # HYBRIDFT_PURE_PYTHON=1 or no extension: the reference loops
    if speedups is None:
        _feed_colo_primary = _feed_colo_primary_python
        _feed_colo_secondary = _feed_colo_secondary_python
        _advance_tcp = _advance_tcp_python
        _settle = _settle_python
    else:
        _feed_colo_primary = _feed_colo_primary_compiled
        _feed_colo_secondary = _feed_colo_secondary_compiled
        _advance_tcp = _advance_tcp_compiled
        _settle = _settle_compiled

    def _verify_tcp(self, flow: _TcpFlow, v: int, actions: list[Action]) -> int:
        """Advance the verified offset as far as both streams agree; flag a divergence."""
        p, s = flow.p, flow.s
        if v < 0:
            if not (p.syn and s.syn):
                return v
            v = 0
        pe, se = p.end, s.end
        common = pe if pe < se else se
        if common > v:
            k = self._consume_common(p, s, v, common)
            if k < common:
                self._diverge(flow, "payload", "tcp", k, actions)
                return k
            v = common
        # FIN / RST events at v
        while True:
            pk = _event(p, v)
            sk = _event(s, v)
            if not pk or not sk:
                return v
            if pk != sk:
                self._diverge(flow, "rst" if _EV_RST in (pk, sk) else "fin", "tcp", v, actions)
                return v
            v += 1

    def _consume_common(self, p: _Side, s: _Side, v: int, common: int) -> int:
        """Compare both sides' stored bytes over [v, common) and drop them if they agree.

        Returns ``common``, or the offset of the first differing byte (then nothing is dropped).
        Both sides' stored bytes start at ``v``.
        """
        n = common - v
        _ensure(p, common)
        _ensure(s, common)
        with memoryview(s.cur) as sview:
            same = p.cur.startswith(sview[s.off : s.off + n], p.off)
        if same:
            p.off += n
            s.off += n
            p.start = s.start = common
            self._sec_bytes -= n
            return common
        return v + _first_difference(p.cur[p.off : p.off + n], s.cur[s.off : s.off + n])

    def _advance_dgram(self, dflow: _DgramFlow, out: list[bytes], actions: list[Action]) -> None:
        if dflow.diverged is not None:
            return
        pp, sp = dflow.p_pending, dflow.s_pending
        while pp and sp:
            frame, compared, _t = pp[0]
            other = sp[0]
            if compared != other:
                reason = "datagram" if dflow.key[0] in (KIND_UDP, KIND_ICMP) else "other"
                self._diverge(dflow, reason, proto_of(dflow.key), dflow.released, actions)
                return
            pp.popleft()
            sp.popleft()
            self._sec_bytes -= len(other)
            out.append(frame)  # its bytes leave _held_bytes in _settle
            dflow.released += 1

    def _diverge(
        self, flow: _TcpFlow | _DgramFlow, reason: str, proto: str, offset: int, actions: list[Action]
    ) -> None:
        flow.diverged = (reason, offset)
        self._divergences += 1
        if not flow.requested:
            actions.append(self._request(flow, reason, proto, offset))

    def _request(
        self, flow: _TcpFlow | _DgramFlow, reason: str, proto: str, offset: int | None
    ) -> CheckpointRequest:
        flow.requested = True
        self._requests += 1
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        return CheckpointRequest(reason, proto, flow_name(flow.key), offset)

    def _queue_full(self) -> list[Action]:
        if self._queue_full_requested:
            return []
        self._queue_full_requested = True
        self._requests += 1
        self._reasons["queue-full"] = self._reasons.get("queue-full", 0) + 1
        return [CheckpointRequest("queue-full", "other", None, None)]

    def _reanchor(self, sealed: _Sealed) -> None:
        """After a COLO checkpoint the secondary *is* the primary as of the seal."""
        sealed_flows = set()
        for flow, _count, base, end, fin, rst, syn, ack in sealed.tcp:
            sealed_flows.add(flow)
            if self._tcp.get(flow.key) is not flow:
                continue
            s = _Side()
            if base >= 0:
                s.base = base
                s.end = s.start = end
                _drop_until(flow.p, end)
                s.fin, s.rst, s.syn, s.ack = fin, rst, syn, ack
                s.nxt = (base + end) & _M if fin < 0 and rst < 0 else -1
                v = end
                if fin >= 0 and fin == end:
                    v += 1
                if rst >= 0 and rst == v:
                    v += 1
                flow.v = v
            else:
                flow.v = None if flow.p.base < 0 else (-1 if flow.p.syn else 0)
            self._sec_bytes -= _stored(flow.s)
            flow.s = s
            flow.diverged = None
            flow.requested = False
            # the primary's bytes before the new anchor are no longer needed
        for flow in self._tcp.values():
            flow.requested = False
            if flow not in sealed_flows:
                # opened after the seal: the secondary opens it itself, fresh
                self._sec_bytes -= _stored(flow.s)
                flow.s = _Side()
                flow.diverged = None
                if flow.p.base >= 0 and not flow.p.syn:
                    flow.v = 0
        for dflow, _count, p_count in sealed.dgram:
            self._sec_bytes -= sum(map(len, dflow.s_pending))
            dflow.s_pending.clear()
            dflow.s_count = p_count
            dflow.diverged = None
            dflow.requested = False
        for dflow in self._dgram.values():
            dflow.requested = False
        self._sec_bytes = max(self._sec_bytes, 0)

    def _reset_colo_state(self) -> None:
        self._tcp.clear()
        self._dgram.clear()
        self._sec_bytes = 0

    def _count_out(self, out: list[bytes]) -> None:
        self._out_frames += len(out)
        self._out_bytes += sum(map(len, out))


@dataclass(frozen=True, slots=True)
class _ShadowTotals:
    """What shadows counted: would-be requests by reason (with overflows), early releases, coverage."""

    reasons: dict[str, int] = field(default_factory=dict)
    early_frames: int = 0
    early_bytes: int = 0
    sealed_bytes: int = 0
    compared_bytes: int = 0

    def plus(self, shadow: _Shadow) -> _ShadowTotals:
        reasons = dict(self.reasons)
        for reason, count in shadow._reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
        if shadow.overflows:
            reasons[SHADOW_OVERFLOW] = reasons.get(SHADOW_OVERFLOW, 0) + shadow.overflows
        return _ShadowTotals(
            reasons,
            self.early_frames + shadow._out_frames,
            self.early_bytes + shadow._out_bytes,
            self.sealed_bytes + shadow.sealed_bytes,
            self.compared_bytes + shadow.compared_bytes,
        )


class _Shadow(Comparator):
    """The COLO core run beside an MC epoch (module docstring, MC mode).

    It is a Comparator in COLO mode whose outputs are counted, never acted on: ``_out_frames`` /
    ``_out_bytes`` count only what ``_settle`` released (COLO's early releases: a checkpoint's
    releases are not counted, see ``_count_out``), ``_reasons`` the requests COLO would have made.
    Its epochs carry the numbers of the core it shadows.  A full queue sheds flows instead of
    asking for a checkpoint; a shed flow's frames are filtered out until the next seal.
    """

    def __init__(
        self, epoch: int, compare_timeout: float, queue_budget_bytes: int, client: _ClientTracker
    ) -> None:
        super().__init__(
            Mode.COLO, compare_timeout=compare_timeout, queue_budget_bytes=queue_budget_bytes, shadow=False
        )
        self._epoch = epoch
        self._client = client  # the shadowed core's: this core's parsing feeds it
        self._shed: set[bytes | tuple] = set()
        self.overflows = 0
        self._counted_at_seal = 0
        # COLO's would-be hold latency: every HOLD_SAMPLE-th primary frame, id -> (frame, arrival)
        self.hold = HoldWindow()
        self._hold_pending: dict[int, tuple[bytes, float]] = {}
        # coverage (see seal): per TCP flow the stream offset its primary bytes are accounted up to
        self._accounted: dict[bytes, tuple[_TcpFlow, int]] = {}
        self.sealed_bytes = 0  # primary TCP payload bytes of the shadowed epochs sealed so far
        self.compared_bytes = 0  # ... of which the shadow learned COLO's fate (verified or diverged)

    def seal(self) -> int:
        """Seal as COLO does, first accounting the primary's bytes of the epoch for coverage.

        A primary byte is *compared* when the shadow verified it against the secondary's or found the
        flow diverged at or before it (COLO would have checkpointed: its fate is known).  The rest the
        secondary had not produced by the seal; the checkpoint then gives the secondary the primary's
        state, which has already sent them, so the secondary never will, and the shadow learns nothing
        of them (the re-anchor skips them).  That is what a short MC epoch does to the shadow: see
        ``CompareStats.shadow_sealed_bytes``.
        """
        accounted = self._accounted
        kept: dict[bytes, tuple[_TcpFlow, int]] = {}
        sealed = compared = 0
        for key, flow in self._tcp.items():
            p = flow.p
            if p.base < 0:
                continue
            end = p.end
            previous = accounted.get(key)
            start = previous[1] if previous is not None and previous[0] is flow else 0
            kept[key] = (flow, end)
            new = end - start
            if new <= 0:
                continue
            sealed += new
            if flow.diverged is not None:
                compared += new
            elif flow.v is not None and flow.v > start:
                compared += min(flow.v, end) - start
        self._accounted = kept
        self.sealed_bytes += sealed
        self.compared_bytes += compared
        return super().seal()

    def feed_primary(self, frames: Sequence[bytes | memoryview], now: float) -> list[Action]:
        """The shadowed core's frames (``bytes``: it converted them), hold samples taken."""
        if self._shed:
            kept: list[bytes | memoryview] = []
            for frame in frames:
                if _flow_key(frame) in self._shed:
                    self._client.feed((bytes(frame),))  # not compared, still counted
                else:
                    kept.append(frame)
            frames = kept
        pending = self._hold_pending
        if len(pending) > 1 << 16:  # frames a shed or a commit took never leave by _settle: bound it
            pending.clear()
        for frame in frames[::HOLD_SAMPLE]:
            pending[id(frame)] = (frame, now)  # type: ignore[assignment]
        return self._sample_holds(super().feed_primary(frames, now), now)

    def feed_secondary(self, frames: Sequence[bytes | memoryview], now: float) -> list[Action]:
        if self._shed:
            frames = [f for f in frames if _flow_key(f) not in self._shed]
        return self._sample_holds(super().feed_secondary(frames, now), now)

    def _sample_holds(self, actions: list[Action], now: float) -> list[Action]:
        """Hold samples of the frames COLO would have released now (the entry keeps a sampled frame
        alive, so an id found among released frames is that very frame)."""
        pending = self._hold_pending
        if pending:
            for action in actions:
                if type(action) is Release:
                    for fid in pending.keys() & set(map(id, action.frames)):
                        self.hold.add(now, (now - pending.pop(fid)[1]) * 1e6)
        return actions

    def requests_this_epoch(self) -> int:
        """Requests and overflows counted since the previous ``new_epoch``."""
        return self._requests + self.overflows - self._counted_at_seal

    def new_epoch(self) -> None:
        """Called after ``seal``: shed flows come back (anchored afresh after the re-anchor)."""
        self._counted_at_seal = self._requests + self.overflows
        self._shed.clear()

    def commit_through(self, epoch: int) -> None:
        """Commit the newest sealed epoch not after ``epoch`` (and so every older one)."""
        last = None
        for sealed in self._pending:
            if sealed.epoch > epoch:
                break
            last = sealed.epoch
        if last is not None:
            pending = self._hold_pending
            for action in self.commit(last):
                if type(action) is Release and pending:  # released at the commit: no hold time
                    for fid in pending.keys() & set(map(id, action.frames)):
                        del pending[fid]
            # frames set aside during the seal were just fed: the budget holds after every call
            if self._held_bytes + self._sec_bytes > self.queue_budget_bytes:
                self._shed_flows()

    def held_bytes(self) -> int:
        return self._held_bytes

    def _count_out(self, out: list[bytes]) -> None:
        pass  # released by a checkpoint: COLO would not have released these early

    def _queue_full(self) -> list[Action]:
        self._shed_flows()
        return []

    def _shed_flows(self) -> None:
        """Drop the flows holding the most until the shadow holds at most half its budget."""
        sizes: list[tuple[int, bytes | tuple]] = []
        for key, flow in self._tcp.items():
            sizes.append((sum(len(item[2]) for item in flow.held) + _stored(flow.s), key))
        for dkey, dflow in self._dgram.items():
            held = sum(len(item[0]) for item in dflow.p_pending)
            sizes.append((held + sum(map(len, dflow.s_pending)), dkey))
        sizes.sort(key=itemgetter(0), reverse=True)
        target = self.queue_budget_bytes // 2
        for _size, key in sizes:
            if self._held_bytes + self._sec_bytes <= target:
                break
            if type(key) is bytes:
                flow = self._tcp.pop(key)
                for item in flow.held:
                    self._hold_pending.pop(id(item[2]), None)
                self._held_bytes -= sum(len(item[2]) for item in flow.held)
                self._sec_bytes -= _stored(flow.s)
                # a sealed epoch may still name this flow: it finds nothing left to release
                flow.held.clear()
                flow.p, flow.s = _Side(), _Side()
            else:
                dflow = self._dgram.pop(key)
                for item in dflow.p_pending:
                    self._hold_pending.pop(id(item[0]), None)
                self._held_bytes -= sum(len(item[0]) for item in dflow.p_pending)
                self._sec_bytes -= sum(map(len, dflow.s_pending))
                dflow.p_pending.clear()
                dflow.s_pending.clear()
            self._shed.add(key)
            self.overflows += 1
        self._sec_bytes = max(self._sec_bytes, 0)


def _flow_key(frame: bytes | memoryview) -> bytes | tuple:
    """The key the core files this frame under (the shadow's filter for shed flows)."""
    n = len(frame)
    if n >= 54:
        w1, tot, w2, key, _seq, _ack, offflags = _FAST4.unpack_from(frame)
        ip_end = 14 + tot
        pstart = 34 + ((offflags >> 10) & 0x3C)
        if (
            w1 & 0xFFFFFF00 == 0x08004500 and w2 & 0x3FFF00FF == 6 and offflags >= 0x5000
            and pstart <= ip_end <= n
        ):  # fmt: skip
            return key
    return classify(bytes(frame))[1]


def _event(side: _Side, v: int) -> int:
    """What this side has at sequence-space offset ``v`` once data is verified up to ``v``."""
    if side.end > v:
        return _EV_DATA
    if side.fin == v and side.end == v:
        return _EV_FIN
    if side.rst == v and side.end <= v:
        return _EV_RST
    return 0


def _stored(side: _Side) -> int:
    """Bytes a side holds (contiguous and out of order)."""
    return side.end - side.start + sum(map(len, side.ooo.values()))


def _drop_until(side: _Side, offset: int) -> None:
    """Forget a side's stored bytes below ``offset`` (after a re-anchor)."""
    if side.start >= offset:
        return
    _ensure(side, min(offset, side.end))
    side.off += min(offset, side.end) - side.start
    side.start = offset


def _ensure(side: _Side, upto: int) -> None:
    """Make ``side.cur`` cover stream offsets [start, upto) by joining *all* pending chunks.

    Joining everything (not just enough) means the next join happens only once ``cur`` is used
    up, so each stored byte is joined once and the leftover copied with it is short.
    """
    if side.start + len(side.cur) - side.off >= upto:
        return
    chunks = side.chunks
    if side.off < len(side.cur):
        chunks.appendleft(side.cur[side.off :])
    side.cur = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    side.off = 0
    chunks.clear()
