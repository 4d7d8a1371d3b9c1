"""Differential tests: the optimised comparator core against the last unoptimised one, and the
compiled fast path (``hybridft_common._speedups``) against the Python reference it replaces.

The batch-level hot path of ``colo_compare.core`` (runs of in-order segments compared and stored
once, held frames released in bulk) must not change behaviour.  The reference is the core as of
commit ``REFERENCE_COMMIT`` (before that work), loaded from git, so it cannot drift.  Both cores
get the same random operations (multi-flow TCP with different segmentations, reordering,
duplicates, changed bytes, FIN/RST, pure ACKs with moving ACK numbers, UDP, malformed frames,
random batch sizes, polls, seals, commits, mode switches, release_all) and must return identical
action sequences, statistics and per-flow reports after every operation.  The reference predates
the shadow comparison of MC epochs, so the same holds with the shadow on (the default) and off:
the shadow only counts.  Its memory stays within the queue budget after every operation.

The compiled fast path (issue 14) is held to the Python code in the same process, on the same
inputs, whatever ``HYBRIDFT_PURE_PYTHON`` says: the comparator's loops (the workload above plus
frames with fuzzed header bytes), the net-filter record decoder and encoder (random records,
random chunking, garbage), and the NBD request decoder (random requests, oversized writes, bad
magics, random chunking).  Results, errors and the decoders' state must be identical.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_compare import core as fast_core
from colo_compare import transport
from disk_buffer import nbd
from hybridft_common import fastpath
from tests.helpers.raw_frames import tcp4, tcp6

REFERENCE_COMMIT = "796c967d1528581c411645c96bd7fd2af575a57f"
_REPO = Path(__file__).resolve().parent.parent


def _load_reference() -> ModuleType:
    try:
        src = subprocess.run(
            ["git", "-C", str(_REPO), "show", f"{REFERENCE_COMMIT}:colo_compare/core.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise AssertionError(
            f"the differential test needs the git history (reference core at {REFERENCE_COMMIT}): {exc}"
        ) from exc
    spec = importlib.util.spec_from_loader("colo_compare_reference_core", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(src, f"<reference core {REFERENCE_COMMIT[:8]}>", "exec"), module.__dict__)
    return module


ref_core = _load_reference()


def udp4(dport: int, payload: bytes) -> bytes:
    ip_len = 28 + len(payload)
    return (bytes.fromhex("525400abcdef5254001234560800") + bytes([0x45, 0]) + ip_len.to_bytes(2, "big")
            + bytes.fromhex("0001000040110000") + bytes([10, 0, 0, 2, 10, 0, 0, 1])
            + (53).to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
            + b"\0\0" + payload)  # fmt: skip


@st.composite
def tcp_side(
    draw: st.DrawFn, data: bytes, dport: int, isn: int, ip_id: int, tcp4: Callable[..., bytes] = tcp4
) -> list[bytes]:
    """One side's frames of one flow: SYN (usually), segments in a drawn order with duplicates,
    pure ACKs, and FIN or RST (sometimes).  ``tcp4`` builds the frames (``tcp6``: over IPv6)."""
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=10))
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    segs = [(a, data[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    in_order = list(range(len(segs)))
    order = draw(st.permutations(in_order)) if draw(st.integers(0, 3)) == 0 else in_order
    dups = draw(st.lists(st.integers(0, 30), max_size=3)) if segs else []
    acks = [1, 1, 1, 500, 0x7FFFFFF0, 5]
    frames = []
    if draw(st.integers(0, 5)):
        frames.append(tcp4(isn, flags=0x12, ip_id=ip_id, dport=dport))
    picks = [segs[i] for i in order] + [segs[i % len(segs)] for i in dups]
    for n, (a, chunk) in enumerate(picks):
        flags = 0x18 if draw(st.integers(0, 7)) else 0x08  # sometimes no ACK flag
        ack = acks[draw(st.integers(0, len(acks) - 1))]
        frames.append(tcp4(isn + 1 + a, chunk, flags=flags, ack=ack, ip_id=ip_id + n, dport=dport))
        if draw(st.integers(0, 9)) == 0:  # a pure ACK
            frames.append(tcp4(isn + 1 + a + len(chunk), flags=0x10, ack=ack + 3, dport=dport))
    end = draw(st.sampled_from(["fin", "fin", "rst", "none"]))
    if end == "fin":
        frames.append(tcp4(isn + 1 + len(data), flags=0x11, ip_id=ip_id + 999, dport=dport))
    elif end == "rst":
        frames.append(tcp4(isn + 1 + len(data), flags=0x14, ip_id=ip_id + 999, dport=dport))
    return frames


@st.composite
def workload(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[tuple]]:
    """(primary frames, secondary frames, operations)."""
    p_flows, s_flows = [], []
    for f in range(draw(st.integers(1, 3))):
        data = draw(st.binary(max_size=2000))
        sdata = bytearray(data)
        if data and draw(st.booleans()):
            k = draw(st.integers(0, len(data) - 1))
            sdata[k] ^= draw(st.integers(1, 255))
        isn_p = draw(st.integers(0, 0xFFFFFFFF))
        isn_s = isn_p if draw(st.booleans()) else draw(st.integers(0, 0xFFFFFFFF))
        build = tcp6 if draw(st.integers(0, 3)) == 0 else tcp4  # IPv6 takes the Python path
        p_flows.append(draw(tcp_side(data, 40001 + f, isn_p, 1, build)))
        s_flows.append(draw(tcp_side(bytes(sdata), 40001 + f, isn_s, 7000, build)))
    # datagrams and malformed frames
    for flows in (p_flows, s_flows):
        extra = []
        for _ in range(draw(st.integers(0, 3))):
            extra.append(udp4(5000, draw(st.binary(max_size=30))))
        if draw(st.integers(0, 3)) == 0:
            extra.append(draw(st.binary(max_size=60)))
        flows.append(extra)

    def interleave(flows: list[list[bytes]]) -> list[bytes]:
        queues = [list(f) for f in flows if f]
        out: list[bytes] = []
        while queues:
            q = queues[draw(st.integers(0, len(queues) - 1))]
            take = draw(st.integers(1, 20))
            out += q[:take]
            del q[:take]
            queues = [q for q in queues if q]
        return out

    p, s = interleave(p_flows), interleave(s_flows)
    op = st.one_of(
        st.tuples(st.just("p"), st.integers(1, 40)),
        st.tuples(st.just("s"), st.integers(1, 40)),
        st.tuples(st.just("poll"), st.floats(0, 10)),
        st.tuples(st.just("seal")),
        st.tuples(st.just("commit")),
        st.tuples(st.just("mode"), st.sampled_from(["colo", "mc"])),
        st.tuples(st.just("release_all")),
    )
    feed = st.tuples(st.sampled_from(["p", "s"]), st.integers(1, 64))
    ops = draw(st.lists(st.one_of(op, feed), max_size=40))
    ops = [o for o in ops if o[0] != "release_all" or draw(st.integers(0, 4)) == 0]
    ops += [("p", 10_000), ("s", 10_000), ("seal",), ("commit",)]
    return p, s, ops


def _norm(actions: list) -> list[tuple]:
    out: list[tuple] = []
    for a in actions:
        name = type(a).__name__
        if name == "Release":
            out.append(("release", tuple(a.frames)))
        elif name == "CheckpointRequest":
            out.append(("request", a.reason, a.proto, a.flow, a.offset))
        else:
            out.append((name, a.count))
    return out


def _flows(c: object) -> list[tuple]:
    return [tuple(getattr(r, f) for f in r.__slots__) for r in c.flows()]  # type: ignore[attr-defined]


def _apply(
    c: object, op: tuple, frames: dict[str, list[bytes]], pos: dict[str, int], sealed: list[int], t: float
) -> list[tuple]:
    kind = op[0]
    if kind in ("p", "s"):
        batch = frames[kind][pos[kind] : pos[kind] + op[1]]
        pos[kind] += op[1]
        feed = c.feed_primary if kind == "p" else c.feed_secondary  # type: ignore[attr-defined]
        return _norm(feed(list(batch), t))
    if kind == "poll":
        return _norm(c.poll(t + op[1]))  # type: ignore[attr-defined]
    if kind == "seal":
        sealed.append(c.seal())  # type: ignore[attr-defined]
        return [("sealed", sealed[-1])]
    if kind == "commit":
        if not sealed:
            return []
        try:
            return _norm(c.commit(sealed.pop(0)))  # type: ignore[attr-defined]
        except ValueError as exc:  # e.g. release_all already released that epoch
            return [("error", str(exc))]
    if kind == "mode":
        c.set_mode(op[1])  # type: ignore[attr-defined]
        return []
    sealed.clear()
    return _norm(c.release_all())  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(workload(), st.sampled_from(["colo", "mc"]), st.integers(1 << 10, 64 << 20))
def test_fast_core_matches_reference(work: tuple, mode: str, budget: int) -> None:
    p, s, ops = work
    frames = {"p": p, "s": s}
    fast = fast_core.Comparator(fast_core.Mode(mode), compare_timeout=2.0, queue_budget_bytes=budget)
    quiet = fast_core.Comparator(fast_core.Mode(mode), compare_timeout=2.0, queue_budget_bytes=budget,
                                 shadow=False)  # fmt: skip
    ref = ref_core.Comparator(ref_core.Mode(mode), compare_timeout=2.0, queue_budget_bytes=budget)
    pos_f, pos_q, pos_r = {"p": 0, "s": 0}, {"p": 0, "s": 0}, {"p": 0, "s": 0}
    sealed_f: list[int] = []
    sealed_q: list[int] = []
    sealed_r: list[int] = []
    for i, op in enumerate(ops):
        got = _apply(fast, op, frames, pos_f, sealed_f, float(i))
        without_shadow = _apply(quiet, op, frames, pos_q, sealed_q, float(i))
        want = _apply(ref, op, frames, pos_r, sealed_r, float(i))
        assert got == want, f"operation {i} {op}"
        assert without_shadow == want, f"operation {i} {op}, shadow off"
        assert fast.stats() == quiet.stats() == ref.stats(), f"stats after operation {i} {op}"
        assert _flows(fast) == _flows(quiet) == _flows(ref), f"flows after operation {i} {op}"
        shadow = fast._shadow
        assert (shadow is not None) == (fast.mode is fast_core.Mode.MC and not fast.stats()["passthrough"])
        if shadow is not None:
            assert shadow._held_bytes >= 0 and shadow._sec_bytes >= 0
            assert shadow._held_bytes + shadow._sec_bytes <= budget, f"shadow memory after operation {i} {op}"
        sig = fast.signals()
        assert sig.shadow_divergences.total >= 0 and sig.shadow_early_frames >= 0
        assert not quiet.signals().shadow and quiet.signals().shadow_divergences.total == 0


def test_reference_is_the_unoptimised_core() -> None:
    """The reference really is another implementation (guards against comparing a module with itself)."""
    assert ref_core.Comparator is not fast_core.Comparator
    assert not hasattr(ref_core.Comparator, "_flush_primary_run")
    assert hasattr(fast_core.Comparator, "_flush_primary_run")


# ------------------------------------------------------------------------------------------------
# the compiled fast path against the Python reference
# ------------------------------------------------------------------------------------------------


def _require_compiled() -> None:
    assert fastpath.available is not None, (
        "the compiled fast path is not built (hybridft_common._speedups): run `pip install -e .`"
    )


_CORE_LOOPS = ("_feed_colo_primary", "_feed_colo_secondary", "_advance_tcp", "_settle")


@contextlib.contextmanager
def core_loops(kind: str) -> Iterator[None]:
    """Run the comparator (and its shadow, a subclass) with the ``python`` or ``compiled`` loops."""
    cls = fast_core.Comparator
    saved = {name: cls.__dict__[name] for name in _CORE_LOOPS}
    for name in _CORE_LOOPS:
        setattr(cls, name, cls.__dict__[f"{name}_{kind}"])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)


# The header fields the fast scan tests, each with values near its boundaries (uniform bytes
# would almost never hit "data offset 4" or "IHL 6"): (offset, width, values of the new field).
def _near(width: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, (1 << 8 * width) - 1), st.sampled_from([0, 1, (1 << 8 * width) - 1]))


_HEADER_FIELDS: list[tuple[int, int, st.SearchStrategy[int]]] = [
    (12, 2, st.sampled_from([0x0800, 0x86DD, 0x0806, 0x0801])),  # EtherType
    (14, 1, st.sampled_from([0x45, 0x44, 0x46, 0x4F, 0x55, 0x65])),  # version / IHL
    (16, 2, _near(2)),  # IP total length (deltas below)
    (20, 2, st.sampled_from([0x0000, 0x4000, 0x2000, 0x0001, 0x1FFF])),  # fragment flags / offset
    (23, 1, st.sampled_from([6, 17, 1, 0, 58])),  # protocol
    (26, 4, _near(4)),  # source address (the flow key)
    (36, 2, _near(2)),  # destination port (the flow key)
    (38, 4, _near(4)),  # sequence number (deltas below)
    (42, 4, _near(4)),  # ACK number
    (46, 1, st.sampled_from([0x00, 0x40, 0x4F, 0x50, 0x51, 0x60, 0xF0, 0xFF])),  # data offset (+NS bit)
    (47, 1, st.sampled_from([0x10, 0x18, 0x08, 0x11, 0x12, 0x14, 0x00, 0xFF])),  # TCP flags
]


@st.composite
def fuzzed_workload(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[tuple]]:
    """The workload above with some frames' header bytes overwritten (lengths, offsets, flags,
    sequence numbers, addresses, truncation): frames the fast scan must reject exactly as the
    Python loop does."""
    if draw(st.booleans()):
        p, s, ops = draw(workload())
    else:  # long in-order runs on both sides: the frames the compiled scan consumes
        data = draw(st.binary(min_size=200, max_size=3000))
        p, s = [], []
        for frames, size, isn in ((p, draw(st.integers(1, 100)), 1000), (s, draw(st.integers(1, 100)), 1000)):
            frames.append(tcp4(isn, flags=0x12))
            for a in range(0, len(data), size):
                ack = draw(st.sampled_from([1, 1, 9, 1 + (1 << 31)]))  # the last: exactly half the space away
                frames.append(tcp4(isn + 1 + a, data[a : a + size], ack=ack))
        ops = [(side, draw(st.integers(1, 64))) for _ in range(draw(st.integers(1, 12))) for side in "ps"]
        ops += [("p", 10_000), ("s", 10_000), ("seal",), ("commit",)]

    def mutate(frames: list[bytes]) -> list[bytes]:
        out = []
        for frame in frames:
            if len(frame) >= 54 and draw(st.integers(0, 3)) == 0:
                b = bytearray(frame)
                for _ in range(draw(st.integers(1, 3))):
                    at, width, values = draw(st.sampled_from(_HEADER_FIELDS))
                    old = int.from_bytes(b[at : at + width], "big")
                    value = draw(st.one_of(values, st.integers(-64, 64).map(lambda d, o=old: o + d)))
                    b[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, "big")
                if draw(st.integers(0, 5)) == 0:
                    del b[draw(st.integers(0, len(b))) :]
                frame = bytes(b)
            out.append(frame)
        return out

    return mutate(p), mutate(s), ops


def _core_matches(work: tuple, mode: str, budget: int) -> None:
    p, s, ops = work
    frames = {"p": p, "s": s}
    with core_loops("compiled"):
        fast = fast_core.Comparator(fast_core.Mode(mode), compare_timeout=2.0, queue_budget_bytes=budget)
    with core_loops("python"):
        pure = fast_core.Comparator(fast_core.Mode(mode), compare_timeout=2.0, queue_budget_bytes=budget)
    pos_f, pos_p = {"p": 0, "s": 0}, {"p": 0, "s": 0}
    sealed_f: list[int] = []
    sealed_p: list[int] = []
    for i, op in enumerate(ops):
        with core_loops("compiled"):
            got = _apply(fast, op, frames, pos_f, sealed_f, float(i))
        with core_loops("python"):
            want = _apply(pure, op, frames, pos_p, sealed_p, float(i))
        assert got == want, f"operation {i} {op}"
        assert fast.stats() == pure.stats(), f"stats after operation {i} {op}"
        assert _flows(fast) == _flows(pure), f"flows after operation {i} {op}"
        assert fast.signals().as_dict() == pure.signals().as_dict(), f"signals after operation {i} {op}"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(workload(), st.sampled_from(["colo", "mc"]), st.integers(1 << 10, 64 << 20))
def test_compiled_core_matches_python(work: tuple, mode: str, budget: int) -> None:
    _require_compiled()
    _core_matches(work, mode, budget)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])  # fmt: skip
@given(fuzzed_workload(), st.sampled_from(["colo", "mc"]), st.integers(1 << 10, 64 << 20))
def test_compiled_core_matches_python_on_fuzzed_frames(work: tuple, mode: str, budget: int) -> None:
    _require_compiled()
    _core_matches(work, mode, budget)


def test_core_loops_really_differ() -> None:
    """The swap selects two implementations (guards against comparing the compiled loop with itself)."""
    _require_compiled()
    cls = fast_core.Comparator
    assert cls.__dict__["_feed_colo_primary_compiled"] is not cls.__dict__["_feed_colo_primary_python"]
    with core_loops("python"):
        assert cls._feed_colo_primary is cls.__dict__["_feed_colo_primary_python"]
    with core_loops("compiled"):
        assert cls._feed_colo_primary is cls.__dict__["_feed_colo_primary_compiled"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.binary(max_size=64).map(bytearray),
            st.binary(max_size=64).map(memoryview),
            st.just("not a frame"),
        ),
        max_size=12,
    ),
    st.sampled_from([list, tuple]),
)
def test_compiled_bytes_total_matches_python(frames: list, container: type) -> None:
    """``bytes_total`` (the core's per-batch byte count) against ``_bytes_total_python``: the total
    for a list of bytes, -1 for a tuple or anything that is not exactly bytes."""
    _require_compiled()
    compiled = fastpath.available
    assert compiled is not None
    batch = container(frames)
    want = fast_core._bytes_total_python(batch)
    assert compiled.bytes_total(batch) == want
    exact = container is list and all(type(f) is bytes for f in frames)
    assert want == (sum(map(len, frames)) if exact else -1)


_TRACKER_FRAME = st.tuples(
    st.sampled_from([b"flow-a", b"flow-b", b"flow-c"]),
    st.one_of(st.sampled_from([0, 1, 1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF)),
    st.sets(st.sampled_from([0x01, 0x02, 0x04, 0x10, 0x50])).map(sum),  # FIN SYN RST ACK, data offset
    st.booleans(),
)


def _tracker_state(t: fast_core._ClientTracker) -> tuple:
    return ({k: list(v) for k, v in t.flows.items()}, t.acked_bytes, t.advances, t.turns)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TRACKER_FRAME, max_size=60), st.lists(st.integers(0, 2000), max_size=60))
def test_compiled_client_tracker_matches_python(frames: list[tuple], deltas: list[int]) -> None:
    """``client_track_one`` (what the compiled runs call) against ``_ClientTracker.one``: the same
    settled ACK number after every frame and the same flows and counters.  ``deltas`` turn some
    frames into small forward steps of the previous ACK number, the common case."""
    _require_compiled()
    compiled = fastpath.available
    assert compiled is not None
    pure, fast = fast_core._ClientTracker(), fast_core._ClientTracker()
    last: dict[bytes, int] = {}
    for n, (key, ack, flags, payload) in enumerate(frames):
        if n < len(deltas) and key in last and deltas[n] % 3:
            ack = (last[key] + deltas[n]) & 0xFFFFFFFF
        last[key] = ack
        want = pure.one(key, ack, flags, payload)
        assert compiled.client_track_one(fast, key, ack, flags, payload) == want, (n, key, ack, flags)
        assert _tracker_state(fast) == _tracker_state(pure), n


def test_compiled_client_tracker_forgets_every_flow_at_the_cap() -> None:
    """Both bound the tracker the same way: at the cap, a new flow clears the others first."""
    _require_compiled()
    compiled = fastpath.available
    assert compiled is not None
    assert compiled.client_max_flows == fast_core._MAX_CLIENT_FLOWS
    for run in ("python", "compiled"):
        t = fast_core._ClientTracker()
        t.flows = {i.to_bytes(4, "big"): [5, 5] for i in range(fast_core._MAX_CLIENT_FLOWS)}
        if run == "python":
            assert t.one(b"new", 7, 0x10, True) == 7
        else:
            assert compiled.client_track_one(t, b"new", 7, 0x10, True) == 7
        assert t.flows == {b"new": [7, 7]}, run


def test_compiled_client_tracker_refuses_a_malformed_entry() -> None:
    _require_compiled()
    compiled = fastpath.available
    assert compiled is not None
    t = fast_core._ClientTracker()
    t.flows[b"k"] = (1, 1)  # type: ignore[assignment]
    with pytest.raises(TypeError, match="list of two ACK numbers"):
        compiled.client_track_one(t, b"k", 2, 0x10, True)
    t.flows = []  # type: ignore[assignment]
    with pytest.raises(TypeError, match="flows must be a dict"):
        compiled.client_track_one(t, b"k", 2, 0x10, True)


@pytest.mark.parametrize("loops", ["python", "compiled"])
@pytest.mark.parametrize("ahead", ["secondary", "primary"])
def test_a_run_verified_in_place_up_to_every_byte_offset(loops: str, ahead: str) -> None:
    """One side is ahead by k bytes (every k across a three-segment run, so k falls on, just before
    and just after each segment boundary); the other side's run is compared in place up to k and
    the rest stored.  Everything must verify and be released; a byte changed right after k must be
    found there.  (What is stored past k is joined from the run's segments: an off-by-one there
    corrupts exactly these bytes.)"""
    if loops == "compiled":
        _require_compiled()
    data = bytes(range(1, 17))  # 16 bytes: a run of 5 + 7 + 4
    cuts = [(0, 5), (5, 12), (12, 16)]
    for k in range(1, len(data)):
        for flip in (False, True):
            behind = bytearray(data)
            if flip and k < len(data):
                behind[k] ^= 0xFF
            with core_loops(loops):
                core = fast_core.Comparator(fast_core.Mode.COLO)
                lead_feed = core.feed_secondary if ahead == "secondary" else core.feed_primary
                lag_feed = core.feed_primary if ahead == "secondary" else core.feed_secondary
                lead_syn, lag_syn = tcp4(999, flags=0x12), tcp4(999, flags=0x12)
                lead_feed([lead_syn], 0.0)
                lag_feed([lag_syn], 0.0)
                lead_feed([tcp4(1000, data[:k])], 0.0)
                lag_feed([tcp4(1000 + a, bytes(behind[a:b])) for a, b in cuts], 0.0)
                actions = lead_feed([tcp4(1000 + k, data[k:])], 0.0)
                stats = core.stats()
            released = sum(len(a.frames) for a in actions if type(a).__name__ == "Release")
            if flip:
                assert stats["divergences"] == 1, (k, ahead)
                assert [r.divergence for r in core.flows()] == [("payload", k)], (k, ahead)
            else:
                assert stats["divergences"] == 0, (k, ahead)
                primary_frames = 4 if ahead == "secondary" else 3  # the SYN and the data segments
                assert stats["released_frames"] == stats["primary_frames"] == primary_frames
                assert stats["secondary_buffered_bytes"] == 0, (k, ahead, stats)
                assert released >= 1 or ahead == "secondary", (k, ahead)


@pytest.mark.parametrize("loops", ["python", "compiled"])
def test_a_run_verified_against_a_partly_consumed_side(loops: str) -> None:
    """The side ahead has a joined, partly verified buffer plus one more pending segment when the
    other side's next run needs bytes past both: the two must be joined in order (leftover first)."""
    if loops == "compiled":
        _require_compiled()
    data = bytes(range(1, 25))
    for a in range(2, 24):
        for b in range(1, a):
            with core_loops(loops):
                core = fast_core.Comparator(fast_core.Mode.COLO)
                core.feed_secondary([tcp4(999, flags=0x12)], 0.0)
                core.feed_primary([tcp4(999, flags=0x12)], 0.0)
                core.feed_secondary([tcp4(1000, data[:a])], 0.0)
                core.feed_primary([tcp4(1000, data[:b])], 0.0)  # verifies [0, b) of the joined [0, a)
                core.feed_secondary([tcp4(1000 + a, data[a:])], 0.0)  # one more pending segment
                mid = (b + len(data)) // 2
                core.feed_primary([tcp4(1000 + b, data[b:mid]), tcp4(1000 + mid, data[mid:])], 0.0)
                stats = core.stats()
            assert stats["divergences"] == 0, (a, b)
            assert stats["released_frames"] == stats["primary_frames"] == 4, (a, b, stats)
            assert stats["secondary_buffered_bytes"] == 0, (a, b)


@pytest.mark.parametrize("loops", ["python", "compiled"])
def test_a_commit_releases_exactly_the_frames_a_settle_left_held(loops: str) -> None:
    """A settle releases several verified frames of a flow at once and keeps the unverified rest;
    a checkpoint then releases the rest.  The per-flow count of released frames decides how many
    the commit lets go, so it must be exact."""
    if loops == "compiled":
        _require_compiled()
    data = bytes(range(1, 101))
    for verified in range(1, 10):
        with core_loops(loops):
            core = fast_core.Comparator(fast_core.Mode.COLO)
            core.feed_primary([tcp4(999, flags=0x12)], 0.0)
            core.feed_secondary([tcp4(999, flags=0x12)], 0.0)
            core.feed_primary([tcp4(1000 + 10 * i, data[10 * i : 10 * i + 10]) for i in range(10)], 0.0)
            core.feed_secondary([tcp4(1000, data[: 10 * verified])], 0.0)
            assert core.stats()["released_frames"] == 1 + verified
            epoch = core.seal()
            actions = core.commit(epoch)
            stats = core.stats()
        released = sum(len(a.frames) for a in actions if type(a).__name__ == "Release")
        assert released == 10 - verified, verified
        assert stats["released_frames"] == stats["primary_frames"] == 11, (verified, stats)


# -- net-filter framing -------------------------------------------------------------------------


@st.composite
def record_stream(draw: st.DrawFn, vnet: bool) -> bytes:
    """Well-formed records, sometimes followed by garbage or a lying length."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        frame = draw(st.binary(max_size=300))
        if vnet:
            header = draw(st.binary(max_size=20))
            out += struct.pack(">II", len(header) + len(frame), len(header)) + header + frame
        else:
            out += struct.pack(">I", len(frame)) + frame
    tail = draw(st.sampled_from(["none", "none", "garbage", "huge", "bad-vnet", "partial"]))
    if tail == "garbage":
        out += draw(st.binary(max_size=40))
    elif tail == "huge":
        out += struct.pack(">II", draw(st.integers(2000, 0xFFFFFFFF)), 0)
    elif tail == "bad-vnet":
        length = draw(st.integers(0, 100))
        out += struct.pack(">II", length, draw(st.integers(length + 1, 0xFFFFFFFF))) + bytes(length)
    elif tail == "partial":
        out += struct.pack(">II", 50, 0)[: draw(st.integers(1, 8))]
    return bytes(out)


def _decode_all(dec: transport.FrameDecoder, data: bytes, cuts: list[int]) -> list[tuple]:
    """Feed ``data`` in chunks; one entry per feed: frames, headers, error, state."""
    seen: list[tuple] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        try:
            frames = dec.feed(data[a:b])
            result: tuple = ("ok", frames, list(dec.vnet_headers))
        except transport.FramingError as exc:
            result = ("error", type(exc).__name__, str(exc))
        seen.append((result, str(dec.error), dec.pending, dec.frames_decoded, dec.bytes_decoded))
        if dec.error is not None:
            break
    return seen


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data())
def test_compiled_decoder_matches_python(vnet: bool, data: st.DataObject) -> None:
    _require_compiled()
    stream = data.draw(record_stream(vnet))
    cuts = data.draw(st.lists(st.integers(0, 1 << 16), max_size=8))
    max_record = data.draw(st.sampled_from([transport.MAX_RECORD, 1000, 64]))
    read_size = data.draw(st.sampled_from([256 << 10, 128, 16]))
    runs = []
    for kind in ("python", "compiled"):
        dec = transport.FrameDecoder(vnet, max_record=max_record, read_size=read_size)
        dec._parse = getattr(dec, f"_parse_{kind}")  # type: ignore[method-assign]
        runs.append(_decode_all(dec, stream, cuts))
    assert runs[0] == runs[1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=200), max_size=20),
    st.booleans(),
    st.sampled_from(["bytes", "bytearray", "memoryview"]),
    st.data(),
)
def test_compiled_encoder_matches_python(
    frames: list[bytes], vnet: bool, kind: str, data: st.DataObject
) -> None:
    _require_compiled()
    wrap = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind]
    given_frames = [wrap(f) for f in frames]
    headers = [data.draw(st.binary(max_size=12)) for _ in frames] if vnet else None
    want = transport.encode_frames_python(given_frames, headers)
    assert transport.encode_frames_compiled(given_frames, headers) == want
    # and what the encoder writes, the decoder reads back
    dec = transport.FrameDecoder(vnet)
    assert dec.feed(want) == frames
    if vnet:
        assert dec.vnet_headers == headers
        bad = [*headers, b""]  # type: ignore[misc]
        with contextlib.suppress(ValueError):
            transport.encode_frames_python(given_frames, bad)
            raise AssertionError("the reference accepted one header too many")
        with contextlib.suppress(ValueError):
            transport.encode_frames_compiled(given_frames, bad)
            raise AssertionError("the compiled encoder accepted one header too many")


# -- NBD request decoder ------------------------------------------------------------------------


@st.composite
def nbd_stream(draw: st.DrawFn) -> bytes:
    out = bytearray()
    for _ in range(draw(st.integers(0, 10))):
        command = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 4, 6, 7, 99]))
        flags = draw(st.sampled_from([0, 0, nbd.CMD_FLAG_FUA, 0xFFFF]))
        cookie = draw(st.integers(0, (1 << 64) - 1))
        offset = draw(st.integers(0, (1 << 64) - 1))
        length = draw(st.integers(0, 3000)) if command == 1 else draw(st.integers(0, 0xFFFFFFFF))
        out += nbd.encode_request(command, cookie, offset, length, flags)
        if command == 1:
            out += draw(st.binary(min_size=length, max_size=length)) if length <= 3000 else b""
    if draw(st.integers(0, 4)) == 0:
        out += struct.pack(">I", draw(st.integers(0, 0xFFFFFFFF))) + bytes(24)  # a bad magic (mostly)
    if draw(st.integers(0, 3)) == 0:
        out += nbd.encode_request(1, 7, 0, 100)[: draw(st.integers(1, 28))]
    return bytes(out)


def _parse_all(parser: nbd.RequestParser, data: bytes, cuts: list[int]) -> list[tuple]:
    seen: list[tuple] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        parser.feed(data[a:b])
        while True:
            try:
                request = parser.next_request()
            except nbd.TransmissionError as exc:
                seen.append(("error", str(exc)))
                return seen
            state = (parser.buffered, parser._need, parser._discard, parser._start, parser._end)
            seen.append(("request", request, type(request).__name__, state))
            if request is None:
                break
    return seen


@settings(max_examples=300, deadline=None)
@given(
    nbd_stream(), st.lists(st.integers(0, 1 << 16), max_size=8), st.sampled_from([nbd.MAX_PAYLOAD, 1024, 0])
)
def test_compiled_nbd_parser_matches_python(data: bytes, cuts: list[int], max_payload: int) -> None:
    _require_compiled()
    runs = []
    for kind in ("python", "compiled"):
        parser = nbd.RequestParser(max_payload=max_payload, initial_size=64)
        parser.next_request = getattr(parser, f"next_request_{kind}")  # type: ignore[method-assign]
        runs.append(_parse_all(parser, data, cuts))
    assert runs[0] == runs[1]
    assert all(type(r[1]) in (nbd.Request, type(None)) for r in runs[1] if r[0] == "request")


# -- NBD fast path: runs of plain writes ----------------------------------------------------------


@st.composite
def nbd_write_stream(draw: st.DrawFn) -> bytes:
    """Mostly writes near the start of a small export (runs of plain writes), with the requests that
    must end a run mixed in: other commands, flags, misaligned, empty, oversized, out of range."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["plain"] * 6 + ["read", "fua", "misaligned", "empty", "big", "far"]))
        cookie = draw(st.integers(0, (1 << 64) - 1))
        offset = draw(st.integers(0, 15)) * 512
        length = draw(st.integers(1, 4)) * 512
        command, flags = nbd.CMD_WRITE, 0
        if kind == "read":
            command = nbd.CMD_READ
        elif kind == "fua":
            flags = nbd.CMD_FLAG_FUA
        elif kind == "misaligned":
            offset += 1
        elif kind == "empty":
            length = 0
        elif kind == "big":
            length = 5000
        elif kind == "far":
            offset = draw(st.sampled_from([8192, 8192 - 512, (1 << 64) - 512]))
        out += nbd.encode_request(command, cookie, offset, length, flags)
        if command == nbd.CMD_WRITE:
            out += draw(st.binary(min_size=length, max_size=length))
    if draw(st.integers(0, 3)) == 0:
        out += nbd.encode_request(1, 7, 0, 512)[: draw(st.integers(1, 28))]
    return bytes(out)


def _serve_all(
    parser: nbd.RequestParser, data: bytes, cuts: list[int], limits: tuple[int, ...]
) -> list[tuple]:
    """What the server's loop does: a batch of plain writes when the head is one, else one request."""
    size, min_block, max_count, max_bytes, min_count = limits
    seen: list[tuple] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        parser.feed(data[a:b])
        while True:
            batch = parser.take_writes(size, min_block, max_count, max_bytes, min_count)
            if batch is not None:
                seen.append(("batch", *batch, parser._start, parser._end, parser._need))
                continue
            try:
                request = parser.next_request()
            except nbd.TransmissionError as exc:
                seen.append(("error", str(exc)))
                return seen
            seen.append(("request", request, parser._start, parser._end, parser._need))
            if request is None:
                break
    return seen


_WRITE_LIMITS = st.tuples(
    st.sampled_from([8192, 1 << 30]),
    st.sampled_from([1, 512]),
    st.integers(1, 5),
    st.integers(1, 3000),
    st.integers(1, 3),
)


@settings(max_examples=300, deadline=None)
@given(nbd_write_stream(), st.lists(st.integers(0, 1 << 15), max_size=6), _WRITE_LIMITS)
def test_compiled_write_batches_match_python(data: bytes, cuts: list[int], limits: tuple[int, ...]) -> None:
    _require_compiled()
    runs = []
    for kind in ("python", "compiled"):
        parser = nbd.RequestParser(max_payload=4096, initial_size=64)
        parser.take_writes = getattr(parser, f"take_writes_{kind}")  # type: ignore[method-assign]
        parser.next_request = getattr(parser, f"next_request_{kind}")  # type: ignore[method-assign]
        runs.append(_serve_all(parser, data, cuts, limits))
    assert runs[0] == runs[1]


def _answers(seen: list[tuple], limits: tuple[int, ...]) -> list[tuple]:
    """Each request's outcome, batch or not: (cookie, "write", offset, payload) or (cookie, error)."""
    size, min_block = limits[0], limits[1]
    out: list[tuple] = []
    for entry in seen:
        if entry[0] == "batch":
            offsets, payloads, replies = entry[1:4]
            assert len(replies) == 16 * len(offsets)
            for i, (offset, payload) in enumerate(zip(offsets, payloads, strict=True)):
                error, cookie = nbd.decode_simple_reply(replies[16 * i : 16 * i + 16])
                assert error == 0
                out.append((cookie, "write", offset, payload))
        elif entry[0] == "request" and entry[1] is not None:
            r = entry[1]
            error = nbd.check_request(r, size, min_block, 4096)
            if r.command == nbd.CMD_WRITE and not error and not r.flags:
                out.append((r.cookie, "write", r.offset, r.payload))
            else:
                out.append((r.cookie, r.command, r.flags, error))
        elif entry[0] == "error":
            out.append(entry)
    return out


@pytest.mark.parametrize("kind", ["python", "compiled"])
@settings(max_examples=300, deadline=None)
@given(nbd_write_stream(), st.lists(st.integers(0, 1 << 15), max_size=6), _WRITE_LIMITS)
def test_write_batches_answer_each_request_as_one_by_one_does(
    kind: str, data: bytes, cuts: list[int], limits: tuple[int, ...]
) -> None:
    """The fast path only regroups: every request gets the outcome the per-request path gives it."""
    if kind == "compiled":
        _require_compiled()
    parser = nbd.RequestParser(max_payload=4096, initial_size=64)
    parser.take_writes = getattr(parser, f"take_writes_{kind}")  # type: ignore[method-assign]
    batched = _serve_all(parser, data, cuts, limits)
    alone = _parse_all(nbd.RequestParser(max_payload=4096, initial_size=64), data, cuts)
    assert _answers(batched, limits) == _answers(alone, limits)
