"""Differential test: the optimised comparator core against the last unoptimised one.

The batch-level hot path of ``colo_compare.core`` (runs of in-order segments compared and stored
once, held frames released in bulk) must not change behaviour.  The reference is the core as of
commit ``REFERENCE_COMMIT`` (before that work), loaded from git, so it cannot drift.  Both cores
get the same random operations (multi-flow TCP with different segmentations, reordering,
duplicates, changed bytes, FIN/RST, pure ACKs with moving ACK numbers, UDP, malformed frames,
random batch sizes, polls, seals, commits, mode switches, release_all) and must return identical
action sequences, statistics and per-flow reports after every operation.  The reference predates
the shadow comparison of MC epochs, so the same holds with the shadow on (the default) and off:
the shadow only counts.  Its memory stays within the queue budget after every operation.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_compare import core as fast_core
from tests.helpers.raw_frames import tcp4

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
def tcp_side(draw: st.DrawFn, data: bytes, dport: int, isn: int, ip_id: int) -> list[bytes]:
    """One side's frames of one flow: SYN (usually), segments in a drawn order with duplicates,
    pure ACKs, and FIN or RST (sometimes)."""
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
        p_flows.append(draw(tcp_side(data, 40001 + f, isn_p, 1)))
        s_flows.append(draw(tcp_side(bytes(sdata), 40001 + f, isn_s, 7000)))
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
