"""Hypothesis properties of the comparator core.

* any stream under any two segmentations, reorderings and duplications -> no divergence, every
  primary frame released, in the primary's order;
* one byte changed at k -> a divergence exactly at k;
* fuzzed malformed frames -> no exception, nothing lost;
* any sequence of feeds, seals, commits, mode switches and release_all -> every primary frame is
  released exactly once, per-flow order kept, with the shadow comparison of MC epochs on or off;
  and the shadow changes no action at all and stays within the queue budget.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from colo_compare.core import CheckpointRequest, Comparator, Release
from colo_compare.packet import classify
from hybridft_common.vocabulary import Mode
from tests.helpers.raw_frames import ETH_VM_TO_CLIENT, tcp4


def side_frames(
    data: bytes, cuts: list[int], isn: int, order: list[int], dups: list[int], ip_id: int, fin: bool = True
) -> list[bytes]:
    """SYN first, then the segments (cut at ``cuts``) in ``order`` with ``dups`` re-sent, then FIN."""
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    segs = [(a, data[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    frames = [tcp4(isn, flags=0x12, ip_id=ip_id)]
    ordered = [segs[i % len(segs)] for i in order] if segs else []
    seen = {a for a, _ in ordered}
    ordered += [s for s in segs if s[0] not in seen]  # every segment at least once
    ordered += [segs[i % len(segs)] for i in dups] if segs else []
    for n, (a, chunk) in enumerate(ordered):
        frames.append(tcp4(isn + 1 + a, chunk, ip_id=ip_id + n + 1))
    if fin:
        frames.append(tcp4(isn + 1 + len(data), flags=0x11, ip_id=ip_id + 9999))
    return frames


def feed_interleaved(c: Comparator, p: list[bytes], s: list[bytes], batch: int) -> list:
    actions: list = []
    i = j = 0
    while i < len(p) or j < len(s):
        actions += c.feed_primary(p[i : i + batch], 0.0)
        i += batch
        actions += c.feed_secondary(s[j : j + batch + 1], 0.0)
        j += batch + 1
    return actions


def released(actions: list) -> list[bytes]:
    return [f for a in actions if isinstance(a, Release) for f in a.frames]


def requests(actions: list) -> list[CheckpointRequest]:
    return [a for a in actions if isinstance(a, CheckpointRequest)]


stream_data = st.binary(min_size=0, max_size=3000)
cuts = st.lists(st.integers(min_value=0, max_value=3000), max_size=12)
orders = st.lists(st.integers(min_value=0, max_value=30), max_size=12)
isns = st.integers(min_value=0, max_value=0xFFFFFFFF) | st.integers(
    min_value=0xFFFFF000, max_value=0xFFFFFFFF
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_data, cuts, cuts, orders, orders, orders, orders, isns, isns, st.integers(1, 8))
def test_any_two_packetisations_of_a_stream_match(
    data, cuts_p, cuts_s, order_p, order_s, dups_p, dups_s, isn_p, isn_s, batch
) -> None:
    # The filter-rewriter heuristic (core docstring) re-anchors a secondary whose first post-SYN
    # segment carries the primary's offset-0 sequence number.  When the secondary's own ISN puts one
    # of its out-of-order segments exactly there (probability ~len/2^32 with real ISNs) the heuristic
    # misreads it: that costs one checkpoint, never a byte (see the explicit test below).
    assume(not rewriter_alias(isn_p, isn_s, len(data)))
    p = side_frames(data, cuts_p, isn_p, order_p, dups_p, 1)
    s = side_frames(data, cuts_s, isn_s, order_s, dups_s, 5000)
    c = Comparator()
    actions = feed_interleaved(c, p, s, batch)
    assert requests(actions) == []
    assert released(actions) == p
    assert c.stats()["held_frames"] == 0


def rewriter_alias(isn_p: int, isn_s: int, length: int) -> bool:
    """Some secondary segment start (own ISN + 1 + k, 0 < k < length) equals the primary's ISN + 1."""
    return 0 < (isn_p - isn_s) % (1 << 32) < length


def test_rewriter_alias_costs_a_checkpoint_never_a_byte() -> None:
    """Found by hypothesis in a clean-clone run: primary ISN 3, secondary ISN 0, the secondary's
    segment at its offset 3 (= sequence 4 = the primary's offset 0) arrives first."""
    data = b"\x00\x00\x00\x00"
    p = side_frames(data, [], 3, [], [], 1)
    s = side_frames(data, [438], 0, [1], [], 5000)
    c = Comparator()
    actions = feed_interleaved(c, p, s, 1)
    assert [r.reason for r in requests(actions)] == ["fin"]  # a false divergence: one checkpoint
    epoch = c.seal()
    actions += c.commit(epoch)
    assert released(actions) == p  # every primary frame released exactly once, in order
    assert c.stats()["held_frames"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(min_size=1, max_size=3000),
    st.data(),
    cuts,
    cuts,
    orders,
    orders,
    isns,
    isns,
    st.integers(1, 8),
    st.booleans(),
)
def test_one_changed_byte_is_found_exactly(
    data, draw, cuts_p, cuts_s, order_p, order_s, isn_p, isn_s, batch, primary_changed
) -> None:
    assume(not rewriter_alias(isn_p, isn_s, len(data)))  # see the packetisation property
    k = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
    other = bytearray(data)
    other[k] ^= draw.draw(st.integers(min_value=1, max_value=255))
    pdata, sdata = (bytes(other), data) if primary_changed else (data, bytes(other))
    p = side_frames(pdata, cuts_p, isn_p, order_p, [], 1)
    s = side_frames(sdata, cuts_s, isn_s, order_s, [], 5000)
    c = Comparator()
    actions = feed_interleaved(c, p, s, batch)
    reqs = requests(actions)
    assert [(r.reason, r.offset) for r in reqs] == [("payload", k)]
    # nothing covering byte k was released, and everything held is released by the checkpoint
    out = released(actions)
    n = c.seal()
    out += released(c.commit(n))
    assert sorted(out) == sorted(p) and len(out) == len(p)


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=120),
        st.integers(0, len(base)).map(lambda n: base[:n]),
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)).map(
            lambda t: base[: t[0]] + bytes([t[1]]) + base[t[0] + 1 :]
        ),
        st.tuples(st.integers(14, 60), st.binary(min_size=1, max_size=4)).map(
            lambda t: base[: t[0]] + t[1] + base[t[0] + len(t[1]) :]
        ),
    )


_BASES = [
    tcp4(100, b"hello world", ip_id=7),
    bytes.fromhex("525400abcdef52540012345686dd6000000000140640")
    + bytes(32)
    + struct.pack(">HHIIBBHHH", 80, 4000, 1, 1, 0x50, 0x18, 1, 0, 0),
    bytes.fromhex("525400abcdef5254001234560800450000240001000040110000")
    + bytes(8)
    + struct.pack(">HHHH", 53, 99, 16, 0)
    + b"answer!!",
    bytes.fromhex("525400abcdef5254001234560800450000200001000040010000")
    + bytes(8)
    + b"\x00\x00\x00\x00\x12\x34\x00\x01"
    + b"ping",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_BASES).flatmap(_mutations), max_size=20),
    st.lists(st.sampled_from(_BASES).flatmap(_mutations), max_size=20),
    st.sampled_from([Mode.COLO, Mode.MC]),
)
def test_fuzzed_frames_never_raise_and_nothing_is_lost(p, s, mode) -> None:
    for frame in p + s:
        classify(frame)
    c = Comparator(mode, compare_timeout=0.5)
    out = released(c.feed_primary(p, 0.0))
    out += released(c.feed_secondary(s, 0.1))
    c.poll(5.0)
    c.stats()
    c.flows()
    n = c.seal()
    out += released(c.commit(n))
    assert sorted(out) == sorted(p)


# a random schedule of operations: every primary frame released exactly once, in per-flow order

_op = st.one_of(
    st.tuples(st.just("p"), st.integers(0, 2), st.integers(1, 4)),  # primary: flow, segments
    st.tuples(st.just("s"), st.integers(0, 2), st.integers(1, 4)),  # secondary catches up
    st.tuples(st.just("u"), st.integers(0, 1), st.integers(1, 3)),  # udp datagrams
    st.just(("seal",)),
    st.just(("commit",)),
    st.tuples(st.just("mode"), st.sampled_from([Mode.COLO, Mode.MC])),
    st.tuples(st.just("shadow"), st.booleans()),  # a passive secondary from the next seal, or not
    st.just(("poll",)),
    st.just(("release_all",)),
)


def run_schedule(c: Comparator, ops: list[tuple]) -> tuple[list[list], dict[int, list[bytes]]]:
    """Apply a schedule of ``_op`` operations; returns the actions of each and the primary frames fed
    per flow (TCP flows 0-2, UDP flows 10-11).  The secondary's TCP flows use their own ISNs."""
    fed: dict[int, list[bytes]] = {}
    per_op: list[list] = []
    p_off = [0, 0, 0]
    s_off = [0, 0, 0]
    sent = [False, False, False]
    pending: list[int] = []
    t = 0.0
    ip_id = 0
    for op in ops:
        t += 0.3
        kind = op[0]
        acts: list = []
        if kind == "p":
            flow, nseg = op[1], op[2]
            frames = []
            if not sent[flow]:
                ip_id += 1
                frames.append(tcp4(1000 * flow, flags=0x12, ip_id=ip_id, dport=40000 + flow))
                sent[flow] = True
            for _ in range(nseg):
                ip_id += 1
                seq = 1000 * flow + 1 + p_off[flow]
                frames.append(tcp4(seq, b"x" * 100, ip_id=ip_id, dport=40000 + flow))
                p_off[flow] += 100
            fed.setdefault(flow, []).extend(frames)
            acts = c.feed_primary(frames, t)
        elif kind == "s":
            flow, nseg = op[1], op[2]
            frames = [tcp4(77 + flow, flags=0x12, dport=40000 + flow)] if s_off[flow] == 0 else []
            for _ in range(nseg):
                frames.append(tcp4(77 + flow + 1 + s_off[flow], b"x" * 100, dport=40000 + flow))
                s_off[flow] += 100
            acts = c.feed_secondary(frames, t)
        elif kind == "u":
            flow, n = op[1], op[2]
            frames = []
            for _ in range(n):
                ip_id += 1
                udp = struct.pack(">HHHH", 53, 5000 + flow, 8 + 4, 0) + b"dns!"
                ip = struct.pack(
                    ">BBHHHBBH4s4s",
                    0x45,
                    0,
                    20 + len(udp),
                    ip_id,
                    0,
                    64,
                    17,
                    0,
                    bytes([10, 0, 0, 2]),
                    bytes([10, 0, 0, 1]),
                )
                frames.append(ETH_VM_TO_CLIENT + ip + udp)
            fed.setdefault(10 + flow, []).extend(frames)
            acts = c.feed_primary(frames, t)
        elif kind == "seal":
            pending.append(c.seal())
        elif kind == "commit":
            if pending:
                acts = c.commit(pending.pop(0))
        elif kind == "mode":
            c.set_mode(op[1])
        elif kind == "shadow":
            c.set_shadow(op[1])
        elif kind == "poll":
            acts = c.poll(t)
        else:
            acts = c.release_all()
            pending.clear()
        per_op.append(acts)
    per_op.append(c.release_all())
    return per_op, fed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=40), st.sampled_from([Mode.COLO, Mode.MC]), st.booleans())
def test_every_primary_frame_is_released_exactly_once_in_flow_order(ops, mode, shadow) -> None:
    c = Comparator(mode, compare_timeout=1.0, shadow=shadow)
    per_op, fed = run_schedule(c, ops)
    out = [f for acts in per_op for f in released(acts)]
    all_fed = [f for frames in fed.values() for f in frames]
    assert sorted(out) == sorted(all_fed) and len(out) == len(all_fed)
    for frames in fed.values():
        positions = [out.index(f) for f in frames]
        assert positions == sorted(positions)
    assert c.stats()["held_bytes"] == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=40), st.sampled_from([Mode.COLO, Mode.MC]), st.integers(200, 4000))
def test_shadow_changes_no_action_and_stays_within_the_budget(ops, mode, budget) -> None:
    """Shadow on or off, every operation returns the same actions (so the same releases, in the same
    order); the shadow's held plus buffered bytes never exceed the queue budget."""
    on = Comparator(mode, compare_timeout=1.0, queue_budget_bytes=budget)
    off = Comparator(mode, compare_timeout=1.0, queue_budget_bytes=budget, shadow=False)
    budget_kept: list[bool] = []
    per_op_on, _fed = run_schedule(_Watch(on, budget_kept), ops)  # type: ignore[arg-type]
    per_op_off, _fed = run_schedule(off, ops)
    assert per_op_on == per_op_off
    assert all(budget_kept), "the shadow went over the queue budget"
    assert on.stats() == off.stats()


class _Watch:
    """Forwards to a Comparator and records, after every call, whether its shadow is within budget."""

    def __init__(self, core: Comparator, log: list[bool]) -> None:
        self.core = core
        self.log = log

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        attr = getattr(self.core, name)
        if not callable(attr):
            return attr

        def call(*args):  # type: ignore[no-untyped-def]
            result = attr(*args)
            shadow = self.core._shadow
            if shadow is not None:
                used = shadow._held_bytes + shadow._sec_bytes
                self.log.append(0 <= used <= self.core.queue_budget_bytes)
            return result

        return call


# a secondary that follows the checkpoint protocol never causes a false divergence

_proto_op = st.one_of(
    st.tuples(st.just("p"), st.integers(1, 5000)),
    st.tuples(st.just("s"), st.integers(1, 5000)),
    st.just(("seal",)),
    st.just(("commit",)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_proto_op, max_size=30), isns, isns, st.sampled_from([700, 1000, 1448]))
def test_checkpoints_reanchor_without_false_divergences(ops, isn_p, isn_s, s_seg) -> None:
    data = bytes((i * 13 + i // 977) & 0xFF for i in range(60000))
    c = Comparator()
    ip_id = 0

    def frames(isn: int, lo: int, hi: int, seg: int) -> list[bytes]:
        nonlocal ip_id
        out = []
        for a in range(lo, hi, seg):
            ip_id += 1
            out.append(tcp4(isn + 1 + a, data[a : min(a + seg, hi)], ip_id=ip_id))
        return out

    fed: list[bytes] = [tcp4(isn_p, flags=0x12)]
    actions = c.feed_primary(fed[:], 0.0) + c.feed_secondary([tcp4(isn_s, flags=0x12)], 0.0)
    p_pos = s_pos = 0
    s_isn = isn_s
    pending: int | None = None
    for op in ops:
        if op[0] == "p":
            hi = min(p_pos + op[1], len(data))
            new = frames(isn_p, p_pos, hi, 1000)
            fed += new
            actions += c.feed_primary(new, 0.0)
            p_pos = hi
        elif op[0] == "s":
            hi = min(s_pos + op[1], len(data))
            actions += c.feed_secondary(frames(s_isn, s_pos, hi, s_seg), 0.0)
            s_pos = max(s_pos, hi)
        elif op[0] == "seal" and pending is None:
            pending = c.seal()
            # the secondary loads the checkpoint: it continues from the primary's sealed position,
            # in the primary's sequence space
            s_pos, s_isn = p_pos, isn_p
        elif op[0] == "commit" and pending is not None:
            actions += c.commit(pending)
            pending = None
    if pending is not None:
        actions += c.commit(pending)
    actions += c.feed_secondary(frames(s_isn, s_pos, p_pos, s_seg), 0.0) if s_pos < p_pos else []
    assert requests(actions) == []
    assert released(actions) == fed
