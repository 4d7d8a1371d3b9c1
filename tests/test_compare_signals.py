"""The comparator's signals (colo_compare.signals) and the shadow comparison of MC epochs.

Shadow tests drive two MC cores side by side, shadow on and off, with the same operations and
require identical actions from both after every operation: the shadow may only count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_compare.core import CheckpointRequest, Comparator, Release
from colo_compare.packet import classify
from colo_compare.serve import CompareService
from colo_compare.signals import HOLD_SAMPLE, CompareStats, HoldSummary, HoldWindow, ReasonCounts
from colo_compare.transport import encode_frames
from hybridft_common.endpoints import parse_endpoint
from hybridft_common.vocabulary import Mode
from tests.helpers.frames import CLIENT6, VM6, arp_reply, stream_frames, tcp_frame, udp_frame
from tests.helpers.raw_frames import tcp4

DATA = bytes((i * 7 + i // 251) & 0xFF for i in range(20000))


def released(actions: list) -> list[bytes]:
    return [f for a in actions if isinstance(a, Release) for f in a.frames]


class Twin:
    """Two MC cores, shadow on and off, fed the same operations; every answer must be the same."""

    def __init__(self, mode: Mode = Mode.MC, **kw: object) -> None:
        self.on = Comparator(mode, shadow=True, **kw)  # type: ignore[arg-type]
        self.off = Comparator(mode, shadow=False, **kw)  # type: ignore[arg-type]
        self.out: list[bytes] = []

    def _both(self, name: str, *args: object) -> object:
        got = getattr(self.on, name)(*args)
        want = getattr(self.off, name)(*args)
        assert got == want, f"{name}: shadow on {got!r} != shadow off {want!r}"
        assert self.on.stats() == self.off.stats()
        assert self.on.flows() == self.off.flows()
        if isinstance(got, list):
            self.out += released(got)
        return got

    def primary(self, frames: list[bytes], now: float = 0.0) -> list:
        return self._both("feed_primary", frames, now)  # type: ignore[return-value]

    def secondary(self, frames: list[bytes], now: float = 0.0) -> list:
        return self._both("feed_secondary", frames, now)  # type: ignore[return-value]

    def poll(self, now: float) -> list:
        return self._both("poll", now)  # type: ignore[return-value]

    def seal(self) -> int:
        return self._both("seal")  # type: ignore[return-value]

    def commit(self, epoch: int) -> list:
        return self._both("commit", epoch)  # type: ignore[return-value]

    def checkpoint(self) -> list:
        return self.commit(self.seal())

    @property
    def shadow(self) -> ReasonCounts:
        return self.on.signals().shadow_divergences


# ------------------------------------------------------------------------------- shadow in MC


def test_shadow_counts_a_payload_divergence_and_the_early_releases_before_it() -> None:
    t = Twin()
    p = stream_frames(DATA[:5000], [1000], isn=10)
    other = bytearray(DATA[:5000])
    other[3210] ^= 0x40
    assert t.primary(p) == []  # MC: nothing leaves before the checkpoint, shadow or not
    t.secondary(stream_frames(bytes(other), [700], isn=20))
    sig = t.on.signals()
    assert sig.shadow and sig.shadow_divergences == ReasonCounts(payload=1)
    # COLO would have released the SYN and [0, 3000) and held the rest
    assert sig.shadow_early_frames == 4
    assert sig.shadow_early_bytes == sum(map(len, p[:4]))
    assert sig.shadow_held_bytes == sum(map(len, p[4:]))
    assert sig.divergences.total == 0  # nothing was requested for real
    assert released(t.checkpoint()) == p
    sig = t.on.signals()
    assert (sig.shadow_epochs, sig.shadow_epochs_diverged, sig.shadow_held_bytes) == (1, 1, 0)
    off = t.off.signals()
    assert not off.shadow and off.shadow_divergences.total == 0 and off.shadow_early_frames == 0


def test_shadow_counts_fin_rst_datagram_and_other_divergences() -> None:
    t = Twin()
    t.primary(stream_frames(DATA[:2000], [1000], isn=10, dport=40001))  # FIN at 2000
    t.secondary(stream_frames(DATA[:1500], [1000], isn=20, dport=40001))  # FIN at 1500
    rst = [*stream_frames(DATA[:1000], [1000], isn=10, fin=False, dport=40002),
           tcp_frame(10 + 1001, flags="R", ack=None, dport=40002)]  # fmt: skip
    t.primary(rst)
    t.secondary(stream_frames(DATA[:1000], [500], isn=20, dport=40002))  # FIN where the RST is
    t.primary([udp_frame(b"answer"), arp_reply()])
    t.secondary([udp_frame(b"ANSWER"), arp_reply(ip="10.0.0.9")])
    assert t.shadow == ReasonCounts(fin=1, rst=1, datagram=1, other=1)
    assert len(released(t.checkpoint())) == 4 + 3 + 2


def test_shadow_counts_timeouts_and_the_ack_rule_from_poll() -> None:
    t = Twin(compare_timeout=1.0)
    t.primary(stream_frames(DATA[:1000], [1000], isn=10, fin=False, dport=40001), 10.0)
    # verified, but the primary acknowledges client bytes the secondary has not
    t.primary([tcp_frame(10, flags="SA", ack=1, dport=40002), tcp_frame(11, b"abc", ack=99, dport=40002)],
              10.0)  # fmt: skip
    t.secondary([tcp_frame(20, flags="SA", ack=1, dport=40002), tcp_frame(21, b"abc", ack=50, dport=40002)],
                10.0)  # fmt: skip
    assert t.poll(10.5) == [] and t.shadow.total == 0
    assert t.poll(11.5) == []  # MC requests nothing, whatever the shadow saw
    assert t.shadow == ReasonCounts(timeout=1, ack=1)
    t.poll(12.0)
    assert t.shadow == ReasonCounts(timeout=1, ack=1)  # once per flow and epoch, as in COLO


def test_shadow_reanchors_at_each_checkpoint_like_colo() -> None:
    """The secondary, having loaded checkpoint N, continues in the primary's sequence space from the
    primary's sealed offset: no false divergence across MC epochs; a real one is found at its offset."""
    t = Twin()
    t.primary(stream_frames(DATA[:4000], [1000], isn=10, fin=False))
    t.secondary(stream_frames(DATA[:2500], [800], isn=900, fin=False))  # behind, own ISN
    n = t.seal()
    t.primary([tcp_frame(11 + 4000, DATA[4000:5000])])
    t.secondary([tcp_frame(11 + 4000, DATA[4000:4600])])  # fed after the seal: set aside
    t.commit(n)
    t.secondary([tcp_frame(11 + 4600, DATA[4600:5000])])
    sig = t.on.signals()
    assert sig.shadow_divergences.total == 0
    assert sig.shadow_early_frames == 3 + 1  # SYN + 2 verified segments before the seal, 1 after
    t.primary([tcp_frame(11 + 5000, b"AAAA")])
    t.secondary([tcp_frame(11 + 5000, b"AABA")])
    assert t.shadow == ReasonCounts(payload=1)
    t.checkpoint()
    assert len(t.out) == 5 + 1 + 1  # SYN + 4 segments, then the two later ones


def test_shadow_overflow_sheds_the_largest_flow_until_the_next_seal() -> None:
    t = Twin(queue_budget_bytes=20_000)
    small = stream_frames(DATA[:2000], [1000], isn=10, fin=False, dport=40002)
    t.primary(small)
    big_s = stream_frames(DATA, [1000], isn=10, fin=False, dport=40001)  # the secondary runs ahead
    t.secondary(big_s[:13])  # 12 KB buffered + 2 KB held: within the budget
    assert t.shadow.total == 0
    t.secondary(big_s[13:])  # 20 KB buffered: the shadow sheds its largest flow, asks nothing
    sig = t.on.signals()
    assert sig.shadow_divergences == ReasonCounts(shadow_overflow=1)
    assert sig.shadow_held_bytes == sum(map(len, small))
    # the shed flow is ignored for the rest of the epoch; the small one is still compared
    big_p = stream_frames(DATA[:5000], [1000], isn=10, fin=False, dport=40001)
    assert [a for a in t.primary(big_p) if isinstance(a, CheckpointRequest)] == []  # MC's queue: 7.5 KB
    t.secondary(stream_frames(DATA[:2000], [1000], isn=10, fin=False, dport=40002))
    sig = t.on.signals()
    assert sig.shadow_early_frames == len(small) and sig.shadow_held_bytes == 0
    assert released(t.checkpoint()) == small + big_p  # MC's output: untouched
    # after the seal the shed flow is compared again, anchored afresh
    more = [tcp_frame(11 + 5000, DATA[5000:6000], dport=40001)]
    t.primary(more)
    t.secondary(more)
    sig = t.on.signals()
    assert sig.shadow_early_frames == len(small) + 1 and sig.shadow_divergences.total == 1


def test_shadow_overflow_sheds_a_datagram_flow_too() -> None:
    t = Twin(queue_budget_bytes=2000)
    t.secondary([udp_frame(b"%03d" % i * 30) for i in range(30)])  # 2.7 KB of datagrams buffered
    assert t.shadow == ReasonCounts(shadow_overflow=1) and t.on.signals().shadow_held_bytes == 0
    t.primary([udp_frame(b"000" * 30)])  # held by MC; the shadow ignores the flow until the seal
    assert t.on.signals().shadow_early_frames == 0
    assert released(t.checkpoint()) == [udp_frame(b"000" * 30)]
    t.primary([udp_frame(b"next")])
    t.secondary([udp_frame(b"next")])
    assert t.on.signals().shadow_early_frames == 1 and t.shadow.total == 1


def test_shadow_follows_mode_switches_and_release_all() -> None:
    c = Comparator(Mode.COLO)
    assert not c.signals().shadow
    c.set_mode(Mode.MC)
    c.commit(c.seal())
    assert c.signals().shadow  # the first MC epoch starts a shadow
    p = stream_frames(DATA[:2000], [1000], isn=10, fin=False)
    bad = bytearray(DATA[:2000])
    bad[100] ^= 1
    c.feed_primary(p, 0.0)
    c.feed_secondary(stream_frames(bytes(bad), [1000], isn=10, fin=False), 0.0)
    c.set_mode(Mode.COLO)
    n = c.seal()
    sig = c.signals()
    assert not sig.shadow and sig.shadow_divergences == ReasonCounts(payload=1)  # counts outlive it
    assert (sig.shadow_epochs, sig.shadow_epochs_diverged) == (1, 1)
    assert released(c.commit(n)) == p
    c.set_mode(Mode.MC)
    c.seal()
    assert c.signals().shadow
    c.release_all()  # the secondary is lost: nothing left to compare with
    sig = c.signals()
    assert not sig.shadow and sig.shadow_divergences == ReasonCounts(payload=1)
    c.seal()  # a new protected MC epoch: a fresh shadow
    assert c.signals().shadow
    assert not Comparator(Mode.MC, shadow=False).signals().shadow


def test_set_shadow_takes_effect_at_the_next_seal() -> None:
    c = Comparator(Mode.MC)
    c.set_shadow(False)  # the secondary goes passive from the next checkpoint
    assert c.signals().shadow and c.shadow_enabled
    c.seal()
    assert not c.signals().shadow and not c.shadow_enabled
    c.feed_primary(stream_frames(DATA[:1000], [1000], isn=10), 0.0)
    c.feed_secondary(stream_frames(DATA[:1000], [1000], isn=10), 0.0)
    assert c.signals().shadow_early_frames == 0  # nobody compared them
    c.set_shadow(True)
    c.seal()
    assert c.signals().shadow and c.signals().shadow_epochs == 1
    c.feed_primary([tcp_frame(11 + 1000, b"more", ack=1000)], 0.0)
    c.feed_secondary([tcp_frame(11 + 1000, b"more", ack=1000)], 0.0)
    assert c.signals().shadow_early_frames == 1


def _coverage(c: Comparator) -> tuple[int, int]:
    sig = c.signals()
    return sig.shadow_compared_bytes, sig.shadow_sealed_bytes


def test_shadow_coverage_counts_what_the_secondary_answered_before_the_seal() -> None:
    """The secondary lags: what it had not sent by the seal is never compared (the checkpoint gives it
    the primary's state, which already sent it); the shadow's next epoch starts at the sealed end."""
    t = Twin()
    t.primary(stream_frames(DATA[:1000], [500], isn=10, fin=False))
    t.secondary(stream_frames(DATA[:400], [400], isn=20, fin=False))
    assert _coverage(t.on) == (0, 0)  # counted at the seal, when the epoch's fate is known
    n = t.seal()
    assert _coverage(t.on) == (400, 1000)
    t.commit(n)
    t.primary([tcp_frame(11 + 1000, DATA[1000:1500])])
    t.secondary([tcp_frame(11 + 1000, DATA[1000:1500])])  # re-anchored at 1000: all compared
    t.checkpoint()
    assert _coverage(t.on) == (900, 1500)
    t.checkpoint()  # an epoch without new bytes adds nothing
    assert _coverage(t.on) == (900, 1500)
    assert _coverage(t.off) == (0, 0)


def test_shadow_coverage_counts_a_diverged_flows_bytes_as_compared() -> None:
    """After a divergence COLO would have checkpointed: the epoch's bytes of that flow are decided."""
    t = Twin()
    bad = bytearray(DATA[:3000])
    bad[100] ^= 1
    t.primary(stream_frames(DATA[:3000], [1000], isn=10, fin=False, dport=40001))
    t.secondary(stream_frames(bytes(bad[:200]), [200], isn=20, fin=False, dport=40001))
    t.primary(stream_frames(DATA[:2000], [1000], isn=10, fin=False, dport=40002))  # never answered
    t.checkpoint()
    assert _coverage(t.on) == (3000, 5000)


def test_shadow_coverage_outlives_the_shadow_and_stops_with_a_passive_secondary() -> None:
    c = Comparator(Mode.MC)
    c.feed_primary(stream_frames(DATA[:1000], [1000], isn=10, fin=False), 0.0)
    c.feed_secondary(stream_frames(DATA[:1000], [1000], isn=10, fin=False), 0.0)
    c.set_mode(Mode.COLO)
    c.commit(c.seal())  # the seal into COLO accounts the last shadowed epoch, then retires the shadow
    assert not c.signals().shadow and _coverage(c) == (1000, 1000)
    c.set_mode(Mode.MC)
    c.set_shadow(False)
    c.commit(c.seal())
    c.feed_primary([tcp_frame(11 + 1000, b"more", ack=1000)], 0.0)
    c.commit(c.seal())
    assert _coverage(c) == (1000, 1000)  # a passive secondary's epochs are not shadowed: not counted


def test_live_divergences_by_reason_in_colo() -> None:
    c = Comparator(queue_budget_bytes=10_000)
    other = bytearray(DATA[:3000])
    other[10] ^= 1
    c.feed_primary(stream_frames(DATA[:3000], [1000], isn=10, fin=False, dport=40001), 0.0)
    c.feed_secondary(stream_frames(bytes(other), [1000], isn=20, fin=False, dport=40001), 0.0)
    c.feed_primary(stream_frames(DATA, [1448], isn=10, fin=False, dport=40002), 0.0)
    sig = c.signals()
    assert sig.divergences == ReasonCounts(payload=1, queue_full=1)
    assert sig.shadow_divergences.total == 0 and not sig.shadow


# ------------------------------------------------------------------------------------ turns


def _turns(c: Comparator) -> tuple[int, int, int]:
    sig = c.signals()
    return sig.turns, sig.client_bytes_acked, sig.client_ack_advances


@pytest.mark.parametrize("mode", [Mode.COLO, Mode.MC])
def test_turns_on_a_request_response_flow(mode: Mode) -> None:
    c = Comparator(mode)
    c.feed_primary([tcp_frame(500, flags="SA", ack=1001)], 0.0)  # the client's SYN was ISN 1000
    assert _turns(c) == (0, 0, 0)
    # the client sent a 100-byte request; the guest answers in two segments
    c.feed_primary([tcp_frame(501, b"x" * 1000, ack=1101), tcp_frame(1501, b"y" * 500, ack=1101)], 0.0)
    assert _turns(c) == (1, 100, 1)
    # a 50-byte request acknowledged by a pure ACK first, then answered: one more turn
    c.feed_primary([tcp_frame(2001, flags="A", ack=1151)], 0.0)
    assert _turns(c) == (1, 150, 2)
    c.feed_primary([tcp_frame(2001, b"z" * 10, ack=1151)], 0.0)
    assert _turns(c) == (2, 150, 2)
    # an old ACK number (a reordered or retransmitted segment) moves nothing
    c.feed_primary([tcp_frame(1501, b"y" * 500, ack=1101)], 0.0)
    assert _turns(c) == (2, 150, 2)


def test_turns_the_same_in_one_batch_as_frame_by_frame() -> None:
    """The tracker skips frames that cannot change anything; a pure ACK that moves the ACK number
    followed by payload with that same number is not such a frame."""
    frames = [
        tcp_frame(500, flags="SA", ack=1001),
        tcp_frame(501, b"a" * 100, ack=1101),
        tcp_frame(601, b"b" * 100, ack=1101),
        tcp_frame(701, flags="A", ack=1201),
        tcp_frame(701, b"c" * 100, ack=1201),
        tcp_frame(801, b"d" * 100, ack=1201),
        udp_frame(b"between"),
        tcp_frame(901, flags="A", ack=1301),
        tcp_frame(901, flags="A", ack=1301),
        tcp_frame(901, b"e" * 100, ack=1301),
        tcp_frame(1001, b"f", ack=1401, dport=40009),  # another flow: a baseline
        tcp_frame(1002, b"f", ack=1501, dport=40009),
    ]
    whole, one_by_one = Comparator(), Comparator()
    whole.feed_primary(frames, 0.0)
    for frame in frames:
        one_by_one.feed_primary([frame], 0.0)
    assert _turns(whole) == _turns(one_by_one) == (4, 400, 4)


def test_turns_server_banner_bulk_download_and_mid_stream_flows() -> None:
    c = Comparator(Mode.MC, shadow=False)
    # a banner right after the handshake answers nothing
    c.feed_primary([tcp_frame(10, flags="SA", ack=7), tcp_frame(11, b"220 hello\r\n", ack=7)], 0.0)
    assert _turns(c) == (0, 0, 0)
    # a download: one request, many answer segments, one turn
    frames = stream_frames(DATA, [1448], isn=100, ack=5001, dport=40002, fin=False)
    c.feed_primary(frames[:1], 0.0)
    c.feed_primary([tcp_frame(101 + i * 1448, DATA[:1448], ack=5101, dport=40002) for i in range(10)], 0.0)
    assert _turns(c) == (1, 100, 1)
    # a flow first seen mid-stream (opened during another mode, or before we started): baseline only
    c.feed_primary([tcp_frame(99999, b"mid", ack=123456, dport=40003)], 0.0)
    assert _turns(c) == (1, 100, 1)
    # UDP tells nothing about the client
    c.feed_primary([udp_frame(b"dns")], 0.0)
    assert _turns(c) == (1, 100, 1)


def test_turns_wrap_around_fin_and_a_new_connection_on_the_same_ports() -> None:
    c = Comparator()
    c.feed_primary([tcp_frame(10, flags="SA", ack=0xFFFFFFF0), tcp_frame(11, b"a", ack=0x10)], 0.0)
    assert _turns(c) == (1, 0x20, 1)
    c.feed_primary([tcp_frame(12, flags="FA", ack=0x10)], 0.0)  # the guest is done with this flow
    # the 5-tuple reused: a new SYN/ACK is a new baseline, never a 2**31-byte "advance"
    c.feed_primary([tcp_frame(5000, flags="SA", ack=0x70000000), tcp_frame(5001, b"b", ack=0x70000005)], 0.0)
    assert _turns(c) == (2, 0x25, 2)


def test_turns_on_ipv6_and_across_mode_switches() -> None:
    kw = {"src": VM6, "dst": CLIENT6}
    c = Comparator(Mode.COLO)
    c.feed_primary([tcp_frame(10, flags="SA", ack=100, **kw)], 0.0)  # type: ignore[arg-type]
    c.set_mode(Mode.MC)
    c.seal()  # the comparator's COLO flow state is dropped here; the client tracker's is not
    c.feed_primary([tcp_frame(11, b"answer", ack=140, **kw)], 0.0)  # type: ignore[arg-type]
    assert _turns(c) == (1, 40, 1)


def _turns_by_the_rule(frames: list[bytes]) -> tuple[int, int, int]:
    """The turn rule (colo_compare.signals) written plainly, frame by frame, for comparison."""
    flows: dict[bytes, list[int]] = {}
    turns = acked = advances = 0
    for frame in frames:
        cls = classify(frame)
        if cls[0] != "tcp" or not cls[4] & 0x10:
            continue
        _kind, key, _seq, ack, flags, pstart, ip_end = cls
        if key not in flows or flags & 0x02:
            flows[key] = [ack, ack]
            continue
        state = flows[key]
        forward = (ack - state[0]) % (1 << 32)
        if 0 < forward < 1 << 31:
            acked += forward
            advances += 1
            state[0] = ack
        if ip_end > pstart and state[1] != state[0]:
            turns += 1
            state[1] = state[0]
        if flags & 0x05:
            del flows[key]
    return turns, acked, advances


_event = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 300), st.sampled_from([0, 0, 0, 1, 40, 0x7FFFFFF0])),
    st.tuples(st.just("ack"), st.sampled_from([0, 1, 40])),  # a pure ACK
    st.tuples(st.just("old"), st.integers(1, 300)),  # a retransmission with an older ACK number
    st.tuples(
        st.just("reorder"),
    ),  # the next data segment before this one
    st.tuples(
        st.just("fin"),
    ),
    st.tuples(st.just("syn"), st.integers(0, 0xFFFFFFFF)),  # a new connection on the same ports
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_event, max_size=25), min_size=1, max_size=3), st.data())
def test_turns_are_the_same_in_every_mode_and_batching(flows: list[list[tuple]], data: st.DataObject) -> None:
    """COLO (the core's own parse), MC with a shadow (the shadow's parse) and MC without (the
    tracker's own), in any batches, with seals and commits between them: the figures of the rule."""
    per_flow = []
    for f, events in enumerate(flows):
        seq, ack, out, swap = 1000 * f, data.draw(st.integers(0, 0xFFFFFFFF)), [], False
        out.append(tcp4(seq, flags=0x12, ack=ack, dport=40000 + f))
        seq += 1
        for event in events:
            kind = event[0]
            if kind == "data":
                ack = (ack + event[2]) & 0xFFFFFFFF
                out.append(tcp4(seq, b"d" * event[1], flags=0x18, ack=ack, dport=40000 + f))
                seq += event[1]
                if swap and len(out) >= 2:
                    out[-1], out[-2] = out[-2], out[-1]
                swap = False
            elif kind == "ack":
                ack = (ack + event[1]) & 0xFFFFFFFF
                out.append(tcp4(seq, flags=0x10, ack=ack, dport=40000 + f))
            elif kind == "old":
                old_ack = (ack - 50) & 0xFFFFFFFF
                out.append(tcp4(seq, b"o" * event[1], flags=0x18, ack=old_ack, dport=40000 + f))
            elif kind == "reorder":
                swap = True
            elif kind == "fin":
                out.append(tcp4(seq, flags=0x11, ack=ack, dport=40000 + f))
                seq += 1
            else:
                seq, ack = event[1], data.draw(st.integers(0, 0xFFFFFFFF))
                out.append(tcp4(seq, flags=0x12, ack=ack, dport=40000 + f))
                seq += 1
        per_flow.append(out)
    frames: list[bytes] = []
    queues = [list(q) for q in per_flow]
    while any(queues):
        nonempty = [q for q in queues if q]
        q = nonempty[data.draw(st.integers(0, len(nonempty) - 1))]
        take = data.draw(st.integers(1, 6))
        frames += q[:take]
        del q[:take]
    cores = [Comparator(Mode.COLO), Comparator(Mode.MC), Comparator(Mode.MC, shadow=False)]
    i = 0
    while i < len(frames):
        n = data.draw(st.integers(1, 16))
        checkpoint = data.draw(st.integers(0, 7)) == 0
        for c in cores:
            c.feed_primary(frames[i : i + n], 0.0)
            if checkpoint:
                c.commit(c.seal())
        i += n
    want = _turns_by_the_rule(frames)
    for c in cores:
        assert _turns(c) == want, c.mode


# ------------------------------------------------------------------------------ hold latency


def test_hold_window_percentiles_by_nearest_rank_over_the_window() -> None:
    w = HoldWindow(capacity=100, window_s=1.0)
    assert w.summary(0.0) == HoldSummary()
    for i, us in enumerate([500.0, 100.0, 400.0, 200.0, 300.0]):
        w.add(10.0 + i * 0.1, us)  # released at 10.0 .. 10.4
    # sorted 100 200 300 400 500: p50 = index int(5 * 0.5) = 2, p99 = index int(5 * 0.99) = 4
    assert w.summary(10.5) == HoldSummary(5, 300.0, 500.0, 500.0)
    # at 11.25 the window starts at 10.25: only 200 (10.3) and 300 (10.4) are recent
    assert w.summary(11.25) == HoldSummary(2, 300.0, 300.0, 300.0)
    assert w.summary(12.0) == HoldSummary()
    assert w.summary() == HoldSummary(5, 300.0, 500.0, 500.0)  # the whole ring, however old


def test_hold_window_is_bounded() -> None:
    w = HoldWindow(capacity=3, window_s=10.0)
    for i in range(10):
        w.add(float(i), float(i))
    assert len(w) == 3 and w.summary(9.0) == HoldSummary(3, 8.0, 9.0, 9.0)


def test_shadow_hold_latency_is_what_colo_would_have_held() -> None:
    """Arrival -> the feed that verified the frame, for the frames COLO would have released early."""
    t = Twin()
    p = stream_frames(DATA[:4000], [1000], isn=10, fin=False)  # SYN + 4 segments
    t.primary(p[:2], 0.6)  # one batch: only its first frame (the SYN) is sampled
    for k, at in ((2, 0.7), (3, 0.8), (4, 0.9)):
        t.primary([p[k]], at)
    t.secondary(stream_frames(DATA[:4000], [4000], isn=10, fin=False), 1.0)
    # holds 0.4 (SYN), 0.3, 0.2, 0.1 s: sorted, p50 = index 2, p99 = index 3
    hold = t.on.signals(1.05).shadow_hold
    assert hold.samples == 4 and hold.max_us == pytest.approx(400_000)
    assert hold.p50_us == pytest.approx(300_000) and hold.p99_us == pytest.approx(400_000)
    assert t.on.signals(2.5).shadow_hold == HoldSummary()  # released more than a second ago
    # a frame only the checkpoint releases has no COLO hold time: no sample
    t.primary([tcp_frame(11 + 4000, b"AAAA")], 3.0)
    t.secondary([tcp_frame(11 + 4000, b"AABA")], 3.1)
    t.checkpoint()
    assert t.on.signals().shadow_hold.samples == 4
    assert t.off.signals(1.05).shadow_hold == HoldSummary()


def test_service_hold_latency_from_arrival_to_release() -> None:
    """In process, on a fake clock: MC holds each frame from its arrival to the commit."""
    now = [100.0]
    ep = parse_endpoint("unix:/nonexistent/never-bound.sock")
    svc = CompareService(Comparator(Mode.MC), primary_in=ep, secondary_in=ep, out=ep, control=ep,
                         clock=lambda: now[0])  # fmt: skip
    arrivals = [100.0, 100.1, 100.2, 100.3]
    for i, at in enumerate(arrivals):
        now[0] = at
        # one batch of HOLD_SAMPLE + 1 frames: the first and the last are sampled
        batch = [tcp_frame(1000 * i + k, b"x", dport=40001 + i) for k in range(HOLD_SAMPLE + 1)]
        svc._on_primary(batch, [b""] * len(batch))
    now[0] = 100.5

    async def checkpoint() -> None:
        epoch = (await svc.dispatch("seal", {}))["epoch"]
        await svc.dispatch("commit", {"epoch": epoch})

    asyncio.run(checkpoint())
    # holds: 0.5 s x2, 0.4 s x2, 0.3 s x2, 0.2 s x2 -> sorted, p50 = index 4 (0.4 s), p99 = index 7
    now[0] = 100.6
    hold = svc.signals().hold  # type: ignore[union-attr]
    assert hold.samples == 8
    assert hold.p50_us == pytest.approx(400_000) and hold.p99_us == pytest.approx(500_000)
    sig = CompareStats.from_dict(asyncio.run(svc.dispatch("stats", {}))["signals"])
    assert sig.hold == hold and sig.held_bytes == 0 and sig.checkpoints == 1
    now[0] = 101.6  # released 1.1 s ago: out of the signals' window, still in the transport summary
    assert svc.signals().hold == HoldSummary()  # type: ignore[union-attr]
    assert svc.stats()["transport"]["hold_us"]["samples"] == 8


# -------------------------------------------------------------------------------- the record


def test_compare_stats_round_trip_and_refusals() -> None:
    c = Comparator(Mode.MC)
    c.feed_primary(stream_frames(DATA[:3000], [1000], isn=10), 0.0)
    c.feed_secondary(stream_frames(DATA[:3000], [700], isn=10), 0.0)
    sig = dataclasses.replace(c.signals(), hold=HoldSummary(3, 1.5, 2.5, 2.5))
    wire = sig.as_dict()
    assert wire["mode"] == "mc" and wire["shadow_divergences"]["shadow-overflow"] == 0
    assert CompareStats.from_dict(wire) == sig
    older = {k: v for k, v in wire.items() if k not in ("shadow_sealed_bytes", "shadow_compared_bytes")}
    blank = dataclasses.replace(sig, shadow_sealed_bytes=0, shadow_compared_bytes=0)
    assert CompareStats.from_dict(older) == blank  # a comparator from before coverage was counted
    with pytest.raises(ValueError, match="missing field 'turns'"):
        CompareStats.from_dict({k: v for k, v in wire.items() if k != "turns"})
    with pytest.raises(ValueError, match="unknown checkpoint reason"):
        CompareStats.from_dict({**wire, "divergences": {"gremlins": 1}})
    with pytest.raises(ValueError, match="guest_bytes must be an integer"):
        CompareStats.from_dict({**wire, "guest_bytes": "many"})
    assert ReasonCounts.from_counts({"queue-full": 2, "payload": 1}).total == 3


def test_a_primary_read_takes_what_the_secondary_already_sent_first() -> None:
    """COLO: when the primary's frames arrive, the secondary's socket is read first, so frames whose
    match is already there leave in the same wakeup instead of waiting for the loop to come round to
    the secondary (at 50 % load that wait was most of the comparator's hold time)."""

    async def body() -> int:
        ep = parse_endpoint("unix:/nonexistent/never-bound.sock")
        svc = CompareService(Comparator(Mode.COLO), primary_in=ep, secondary_in=ep, out=ep, control=ep)
        pairs = {role: socket.socketpair() for role in ("primary", "secondary")}
        try:
            for role, (_, theirs) in pairs.items():
                theirs.setblocking(False)
                svc._attach_input(role, theirs)
            data = bytes(range(256)) * 20
            primary = stream_frames(data, [1448], isn=1000, fin=False)
            pairs["secondary"][0].sendall(
                encode_frames(stream_frames(data, [512, 1000], isn=777, fin=False, ip_id=9, ttl=63))
            )
            pairs["primary"][0].sendall(encode_frames(primary))
            reader = svc.readers["primary"]
            assert reader is not None
            reader._on_readable()  # the primary's wakeup, before the loop ever ran the secondary's
            assert svc.counters.secondary_frames > 0
            return svc.counters.released_frames - len(primary)
        finally:
            for ours, theirs in pairs.values():
                ours.close()
                theirs.close()

    assert asyncio.run(body()) == 0
