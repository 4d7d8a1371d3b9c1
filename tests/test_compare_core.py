"""Unit tests of the comparator core, one rule at a time, on scapy-built frames."""

from __future__ import annotations

import pytest

from colo_compare.core import CheckpointRequest, Comparator, DropSecondary, Release
from hybridft_common.vocabulary import Mode
from tests.helpers.frames import (
    CLIENT6,
    VM6,
    arp_reply,
    icmp_echo_reply,
    stream_frames,
    tcp_frame,
    udp_frame,
)

DATA = bytes((i * 7 + i // 251) & 0xFF for i in range(20000))


def released(actions: list) -> list[bytes]:
    return [f for a in actions if isinstance(a, Release) for f in a.frames]


def requests(actions: list) -> list[CheckpointRequest]:
    return [a for a in actions if isinstance(a, CheckpointRequest)]


def run(primary: list[bytes], secondary: list[bytes], comparator: Comparator | None = None):
    c = comparator or Comparator()
    acts = c.feed_primary(primary, 0.0) + c.feed_secondary(secondary, 0.0)
    return c, released(acts), requests(acts)


# ------------------------------------------------------------------------------------------ TCP


def test_same_bytes_different_packets_release_everything_in_order() -> None:
    p = stream_frames(DATA, [1448], isn=1000, ip_id=1, ttl=64, timestamps=True)
    s = stream_frames(DATA, [700, 300, 1448, 1], isn=4_000_000_000, ip_id=999, ttl=63)
    c, out, reqs = run(p, s)
    assert out == p
    assert reqs == []
    st = c.stats()
    assert st["held_frames"] == 0 and st["held_bytes"] == 0 and st["divergences"] == 0


def test_offloaded_zero_checksums_and_window_are_not_divergences() -> None:
    p = [tcp_frame(1000, flags="SA"), tcp_frame(1001, DATA[:500], zero_checksum=True, window=100)]
    s = [tcp_frame(77, flags="SA"), tcp_frame(78, DATA[:500], window=29200)]
    _c, out, reqs = run(p, s)
    assert out == p and reqs == []


def test_primary_ahead_is_held_until_the_secondary_catches_up() -> None:
    p = stream_frames(DATA[:4000], [1000], isn=10, fin=False)  # SYN + 4 segments
    s = stream_frames(DATA[:4000], [1500], isn=20, fin=False)  # SYN + 1500, 1500, 1000
    c = Comparator()
    assert released(c.feed_primary(p, 0.0)) == []
    out = released(c.feed_secondary(s[:2], 0.0))  # SYN + 1500 bytes
    assert out == p[:2]  # SYN + first 1000 bytes; the second segment ends at 2000 > 1500
    out = released(c.feed_secondary(s[2:], 0.0))
    assert out == p[2:]


def test_secondary_ahead_waits_for_the_primary() -> None:
    p = stream_frames(DATA[:3000], [1000], isn=10, fin=False)
    s = stream_frames(DATA[:3000], [3000], isn=20, fin=False)
    c = Comparator()
    assert released(c.feed_secondary(s, 0.0)) == []
    assert released(c.feed_primary(p[:2], 0.0)) == p[:2]
    assert released(c.feed_primary(p[2:], 0.0)) == p[2:]


def test_payload_divergence_reports_first_differing_offset_and_holds_the_rest() -> None:
    other = bytearray(DATA[:5000])
    other[3210] ^= 0x40
    p = stream_frames(DATA[:5000], [1000], isn=10)
    s = stream_frames(bytes(other), [700], isn=20)
    c, out, reqs = run(p, s)
    assert [(r.reason, r.proto, r.offset) for r in reqs] == [("payload", "tcp", 3210)]
    assert reqs[0].flow == "10.0.0.2:80->10.0.0.1:40001"
    assert out == p[:4]  # SYN + [0,1000) [1000,2000) [2000,3000)
    assert c.stats()["divergences"] == 1
    # one request per flow and epoch, even if more secondary data comes
    assert requests(c.feed_secondary([tcp_frame(20 + 5002, b"x")], 1.0)) == []


def test_out_of_order_duplicates_and_overlapping_retransmissions() -> None:
    p = stream_frames(DATA[:6000], [1000], isn=10)
    syn, *segs, fin = stream_frames(DATA[:6000], [1200], isn=500)
    base = 501
    overlap = tcp_frame(base + 600, DATA[600:2400])  # partly known, partly new
    reordered = [syn, segs[2], segs[0], segs[0], overlap, segs[4], segs[3], fin, segs[1], segs[3]]
    _c, out, reqs = run(p, reordered)
    assert reqs == [] and out == p


def test_primary_out_of_order_is_released_in_primary_order() -> None:
    syn, a, b, c_, fin = stream_frames(DATA[:3000], [1000], isn=10)
    p = [syn, b, a, c_, fin]
    s = stream_frames(DATA[:3000], [3000], isn=20)
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p


def test_fin_against_data_is_a_divergence_at_the_fin_offset() -> None:
    p = stream_frames(DATA[:2000], [1000], isn=10)  # FIN at 2000
    s = stream_frames(DATA[:2500], [1000], isn=20, fin=False)
    _c, out, reqs = run(p, s)
    assert [(r.reason, r.offset) for r in reqs] == [("fin", 2000)]
    assert out == p[:3]


def test_fin_at_different_offsets() -> None:
    p = stream_frames(DATA[:2000], [1000], isn=10)
    s = stream_frames(DATA[:1500], [1000], isn=20)
    _c, _out, reqs = run(p, s)
    assert [(r.reason, r.offset) for r in reqs] == [("fin", 1500)]


def test_fin_missing_on_secondary_is_merely_behind() -> None:
    p = stream_frames(DATA[:2000], [1000], isn=10)
    s = stream_frames(DATA[:2000], [1000], isn=20, fin=False)
    c, out, reqs = run(p, s)
    assert reqs == [] and out == p[:-1]
    assert released(c.feed_secondary([tcp_frame(20 + 2001, flags="FA")], 0.0)) == [p[-1]]


def test_rst_events() -> None:
    p = [*stream_frames(DATA[:1000], [1000], isn=10, fin=False), tcp_frame(10 + 1001, flags="R", ack=None)]
    same = [*stream_frames(DATA[:1000], [500], isn=20, fin=False), tcp_frame(20 + 1001, flags="RA")]
    _c, out, reqs = run(p, same)
    assert reqs == [] and out == p
    fin = stream_frames(DATA[:1000], [500], isn=20)
    _c, out, reqs = run(p, fin)
    assert [(r.reason, r.offset) for r in reqs] == [("rst", 1000)]
    assert out == p[:2]


def test_rst_after_fin_matches_when_both_send_it() -> None:
    p = [*stream_frames(DATA[:800], [400], isn=10), tcp_frame(10 + 802, flags="R", ack=None)]
    s = [*stream_frames(DATA[:800], [800], isn=20), tcp_frame(20 + 802, flags="R", ack=None)]
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p


def test_sequence_wrap_around() -> None:
    p = stream_frames(DATA, [1448], isn=0xFFFFFFFF - 3000)
    s = stream_frames(DATA, [999], isn=0xFFFFFFFF - 10)
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p
    bad = bytearray(DATA)
    bad[5000] ^= 1
    _c, _out, reqs = run(p, stream_frames(bytes(bad), [999], isn=0xFFFFFFFF - 10))
    assert [r.offset for r in reqs] == [5000]


def test_ipv6_streams() -> None:
    kw = {"src": VM6, "dst": CLIENT6}
    p = stream_frames(DATA[:5000], [1400], isn=5, **kw)
    s = stream_frames(DATA[:5000], [640], isn=9, **kw)
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p
    bad = bytearray(DATA[:5000])
    bad[4444] = 0
    _c, _out, reqs = run(p, stream_frames(bytes(bad), [640], isn=9, **kw))
    assert [(r.offset, r.flow) for r in reqs] == [(4444, "[fd00::2]:80->[fd00::1]:40001")]


def test_ack_rule_holds_primary_until_secondary_acknowledged_the_same_client_data() -> None:
    p = [tcp_frame(10, flags="SA", ack=5000), tcp_frame(11, DATA[:100], ack=5300)]
    s = [tcp_frame(20, flags="SA", ack=5000), tcp_frame(21, DATA[:100], ack=5100)]
    c = Comparator()
    c.feed_primary(p, 0.0)
    assert released(c.feed_secondary(s, 0.0)) == p[:1]
    # a pure ACK from the secondary catching up releases it; ACK numbers wrap like sequence numbers
    assert released(c.feed_secondary([tcp_frame(121, flags="A", ack=5300)], 0.0)) == p[1:]


def test_pure_acks_follow_the_ack_rule_and_per_flow_order() -> None:
    p = [tcp_frame(10, flags="SA", ack=1), tcp_frame(11, flags="A", ack=50), tcp_frame(11, b"hi", ack=60)]
    s = [tcp_frame(20, flags="SA", ack=1), tcp_frame(21, b"hi", ack=55)]
    c, out, reqs = run(p, s)
    assert out == p[:2] and reqs == []
    assert released(c.feed_secondary([tcp_frame(23, flags="A", ack=60)], 0.0)) == p[2:]


def test_ack_wrap_around() -> None:
    p = [tcp_frame(10, flags="SA", ack=0xFFFFFFF0), tcp_frame(11, b"x", ack=0x10)]
    s = [tcp_frame(20, flags="SA", ack=0xFFFFFFF0), tcp_frame(21, b"x", ack=0x20)]
    _c, out, _r = run(p, s)
    assert out == p


def test_per_flow_order_with_interleaved_flows() -> None:
    f1 = stream_frames(DATA[:3000], [1000], isn=10, dport=40001)
    f2 = stream_frames(DATA[3000:6000], [1000], isn=10, dport=40002)
    p = [x for pair in zip(f1, f2, strict=True) for x in pair]
    s2 = stream_frames(DATA[3000:6000], [3000], isn=77, dport=40002)
    s1 = stream_frames(DATA[:3000], [1500], isn=77, dport=40001)
    c, out, reqs = run(p, s2)
    assert out == f2 and reqs == []
    assert released(c.feed_secondary(s1, 0.0)) == f1


def test_timeout_and_ack_reasons_from_poll() -> None:
    c = Comparator(compare_timeout=1.0)
    c.feed_primary(stream_frames(DATA[:1000], [1000], isn=10, fin=False), 10.0)
    assert c.poll(10.5) == []
    reqs = requests(c.poll(11.5))
    assert [(r.reason, r.proto) for r in reqs] == [("timeout", "tcp")]
    assert c.poll(12.0) == []  # once per flow and epoch
    c2 = Comparator(compare_timeout=1.0)
    c2.feed_primary([tcp_frame(10, flags="SA", ack=1), tcp_frame(11, b"abc", ack=99)], 0.0)
    c2.feed_secondary([tcp_frame(20, flags="SA", ack=1), tcp_frame(21, b"abc", ack=50)], 0.0)
    assert [(r.reason, r.offset) for r in requests(c2.poll(5.0))] == [("ack", 3)]


def test_queue_budget_requests_a_checkpoint_and_drops_nothing() -> None:
    c = Comparator(queue_budget_bytes=10_000)
    p = stream_frames(DATA, [1448], isn=10, fin=False)
    acts = c.feed_primary(p, 0.0)
    assert [(r.reason, r.flow) for r in requests(acts)] == [("queue-full", None)]
    assert released(acts) == []
    n = c.seal()
    assert released(c.commit(n)) == p


def test_new_syn_on_a_finished_flow_starts_a_new_connection() -> None:
    p1 = stream_frames(DATA[:500], [500], isn=10)
    s1 = stream_frames(DATA[:500], [250], isn=20)
    c, out, _ = run(p1, s1)
    assert out == p1
    p2 = stream_frames(DATA[500:900], [400], isn=7777)
    s2 = stream_frames(DATA[500:900], [100], isn=8888)
    _c, out, reqs = run(p2, s2, c)
    assert out == p2 and reqs == []


def test_flow_seen_mid_stream_shares_the_first_anchor() -> None:
    # e.g. the flow opened during an MC epoch: both sides continue in the same sequence space
    p = [tcp_frame(5000, DATA[:1000]), tcp_frame(6000, DATA[1000:2000])]
    s = [tcp_frame(5000, DATA[:2000])]
    _c, out, reqs = run(p, s)
    assert out == p and reqs == []


# ------------------------------------------------------------------------------------ datagrams


def test_udp_datagram_sequence() -> None:
    p = [udp_frame(b"answer-%d" % i, ip_id=i) for i in range(5)]
    s = [udp_frame(b"answer-%d" % i, ip_id=100 + i, ttl=3, zero_checksum=True) for i in range(3)]
    c, out, reqs = run(p, s)
    assert out == p[:3] and reqs == []
    s_bad = [udp_frame(b"answer-3"), udp_frame(b"answer-X")]
    acts = c.feed_secondary(s_bad, 0.0)
    assert released(acts) == p[3:4]
    assert [(r.reason, r.proto, r.offset) for r in requests(acts)] == [("datagram", "udp", 4)]


def test_icmp_per_identifier_sequence_ignores_checksum_and_ip_id() -> None:
    p = [icmp_echo_reply(7, 1, ip_id=1), icmp_echo_reply(8, 1, ip_id=2), icmp_echo_reply(7, 2, ip_id=3)]
    s = [icmp_echo_reply(8, 1, ip_id=50), icmp_echo_reply(7, 1, ip_id=51), icmp_echo_reply(7, 2, ip_id=52)]
    _c, out, reqs = run(p, s)
    assert reqs == [] and sorted(out) == sorted(p)
    _c, out, reqs = run([icmp_echo_reply(7, 1, b"aaaa")], [icmp_echo_reply(7, 1, b"aaab")])
    assert out == [] and [(r.reason, r.proto, r.offset) for r in reqs] == [("datagram", "icmp", 0)]
    v6 = [icmp_echo_reply(3, 1, src=VM6, dst=CLIENT6)]
    _c, out, reqs = run(v6, [icmp_echo_reply(3, 1, src=VM6, dst=CLIENT6, ttl=1)])
    assert out == v6 and reqs == []


def test_arp_and_other_frames_compared_whole_minus_ipv4_id_and_checksum() -> None:
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    from tests.helpers.frames import CLIENT, CLIENT_MAC, VM, VM_MAC

    def gre(ip_id: int, body: bytes = b"tunnel") -> bytes:
        return bytes(Ether(src=VM_MAC, dst=CLIENT_MAC) / IP(src=VM, dst=CLIENT, proto=47, id=ip_id) / body)

    p = [arp_reply(), gre(1)]
    _c, out, reqs = run(p, [gre(999), arp_reply()])
    assert reqs == [] and sorted(out) == sorted(p)
    _c, out, reqs = run([gre(1)], [gre(1, b"tunnex")])
    assert out == [] and [(r.reason, r.proto) for r in reqs] == [("other", "other")]


# ------------------------------------------------------------------------------------ malformed


MALFORMED = [
    b"",
    b"\x00" * 5,
    bytes(13),
    bytes(12) + b"\x08\x00" + b"\x45",  # truncated IPv4
    bytes(12) + b"\x08\x00" + b"\x42" + bytes(40),  # IHL 2
    bytes(12) + b"\x08\x00" + b"\x45\x00\xff\xff" + bytes(16) + bytes(20),  # total length lies
    bytes(12) + b"\x86\xdd" + b"\x60" + bytes(3) + b"\x10\x00\x06\x40" + bytes(32),  # IPv6 length lies
]


def _bad_doff() -> bytes:
    f = bytearray(tcp_frame(1, b"abc"))
    f[46] = 0x20  # TCP data offset 2
    return bytes(f)


def _doff_beyond_payload() -> bytes:
    f = bytearray(tcp_frame(1, b"abc"))
    f[46] = 0xF0  # data offset 60 > what the IP payload holds
    return bytes(f)


def test_malformed_frames_are_counted_compared_whole_and_never_dropped() -> None:
    frames = [*MALFORMED, _bad_doff(), _doff_beyond_payload()]
    c = Comparator()
    acts = c.feed_primary(frames, 0.0)
    assert released(acts) == []
    assert c.stats()["malformed_primary"] == len(frames)
    out = released(c.feed_secondary(frames[:4], 0.0))
    assert out == frames[:4]
    # a different malformed frame at position 4 is a divergence; nothing is lost
    acts = c.feed_secondary([b"\x01" * 7], 0.0)
    assert [(r.reason, r.offset) for r in requests(acts)] == [("other", 4)]
    assert c.stats()["malformed_secondary"] == 5
    n = c.seal()
    assert released(c.commit(n)) == frames[4:]


def test_malformed_mixed_into_a_stream_does_not_disturb_it() -> None:
    p = stream_frames(DATA[:3000], [1000], isn=10)
    s = stream_frames(DATA[:3000], [1500], isn=20)
    bad = _bad_doff()
    c, out, reqs = run([*p[:2], bad, *p[2:]], [*s[:1], bad, *s[1:]])
    assert reqs == [] and [f for f in out if f != bad] == p and out.count(bad) == 1
    assert c.stats()["malformed_primary"] == 1 and c.stats()["malformed_secondary"] == 1


# ------------------------------------------------------------------------------------ MC mode


def test_mc_holds_everything_until_commit_and_discards_secondary() -> None:
    c = Comparator(Mode.MC)
    e1 = [b"anything", *stream_frames(DATA[:3000], [1000], isn=1)]
    assert c.feed_primary(e1, 0.0) == []
    assert c.feed_secondary([b"x", b"y"], 0.0) == [DropSecondary(2)]
    n1 = c.seal()
    e2 = [bytearray(b"next epoch frame")]
    c.feed_primary(e2, 0.0)
    n2 = c.seal()
    assert released(c.commit(n1)) == e1
    assert released(c.commit(n2)) == [b"next epoch frame"]
    with pytest.raises(ValueError, match="not a sealed, uncommitted epoch"):
        c.commit(n2)
    assert c.stats()["held_frames"] == 0 and c.stats()["held_bytes"] == 0


def test_a_commit_also_releases_older_epochs_whose_checkpoint_was_abandoned() -> None:
    """The daemon stopped between a seal and its commit: the next checkpoint covers that output too."""
    c = Comparator(Mode.MC)
    e1 = [b"sealed, then its checkpoint abandoned"]
    c.feed_primary(e1, 0.0)
    n1 = c.seal()
    e2 = [b"the next epoch"]
    c.feed_primary(e2, 0.0)
    n2 = c.seal()
    assert released(c.commit(n2)) == e1 + e2  # in order, each exactly once
    with pytest.raises(ValueError, match=r"not a sealed, uncommitted epoch \(the oldest is None\)"):
        c.commit(n1)
    assert c.stats()["held_frames"] == 0


def test_commit_of_unknown_epoch_raises() -> None:
    c = Comparator()
    with pytest.raises(ValueError):
        c.commit(1)
    n = c.seal()
    with pytest.raises(ValueError):
        c.commit(n + 1)
    assert c.commit(n) == []


# ------------------------------------------------------------------------------------ checkpoints


def test_colo_commit_releases_sealed_frames_and_reanchors_at_the_primary_offset() -> None:
    pdata = DATA[:4000]
    sdata = bytearray(pdata)
    sdata[1500] ^= 1
    p = stream_frames(pdata, [1000], isn=10, fin=False)
    s = stream_frames(bytes(sdata), [800], isn=900, fin=False)
    c, out, reqs = run(p, s)
    assert [r.offset for r in reqs] == [1500] and out == p[:2]
    n = c.seal()
    # after the seal the primary goes on; the secondary (having loaded the checkpoint) continues in
    # the primary's sequence space from the primary's sealed offset 4000
    p_after = [tcp_frame(10 + 1 + 4000, DATA[4000:5000])]
    assert released(c.feed_primary(p_after, 1.0)) == []
    s_after = [tcp_frame(10 + 1 + 4000, DATA[4000:4600]), tcp_frame(10 + 1 + 4600, DATA[4600:5000])]
    assert c.feed_secondary(s_after, 1.0) == []  # set aside until the commit
    acts = c.commit(n)
    assert released(acts) == p[2:] + p_after
    assert requests(acts) == []
    # and a divergence after the re-anchor is found at its stream offset
    acts = c.feed_primary([tcp_frame(10 + 1 + 5000, b"AAAA")], 2.0)
    acts += c.feed_secondary([tcp_frame(10 + 1 + 5000, b"AABA")], 2.0)
    assert [(r.reason, r.offset) for r in requests(acts)] == [("payload", 5002)]


def test_colo_commit_flows_opened_after_the_seal_start_fresh() -> None:
    c = Comparator()
    n = c.seal()
    p = stream_frames(DATA[:2000], [1000], isn=10, dport=41000)
    c.feed_primary(p, 0.0)
    s = stream_frames(DATA[:2000], [2000], isn=55555, dport=41000)
    c.feed_secondary(s, 0.0)
    assert released(c.commit(n)) == p


def test_colo_datagram_counts_reanchor_at_commit() -> None:
    c = Comparator()
    c.feed_primary([udp_frame(b"a"), udp_frame(b"b")], 0.0)
    c.feed_secondary([udp_frame(b"X")], 0.0)
    n = c.seal()
    assert released(c.commit(n)) == [udp_frame(b"a"), udp_frame(b"b")]
    _c, out, reqs = run([udp_frame(b"c")], [udp_frame(b"c")], c)
    assert out == [udp_frame(b"c")] and reqs == []


def test_mode_switch_takes_effect_at_the_next_seal() -> None:
    c = Comparator(Mode.COLO)
    c.set_mode(Mode.MC)
    assert c.mode is Mode.COLO
    p = stream_frames(DATA[:1000], [1000], isn=10, fin=False)
    c.feed_primary(p, 0.0)
    n1 = c.seal()
    assert c.mode is Mode.MC
    later = stream_frames(DATA[:1000], [1000], isn=10, syn=False)[0:1]
    c.feed_primary(later, 0.0)
    assert c.feed_secondary([b"s"], 0.0) == [DropSecondary(1)]
    assert released(c.commit(n1)) == p
    n2 = c.seal()
    assert released(c.commit(n2)) == later
    # back to COLO: a flow already open gets anchored mid-stream
    c.set_mode(Mode.COLO)
    n3 = c.seal()
    assert c.commit(n3) == []
    assert c.mode is Mode.COLO
    _c, out, reqs = run([tcp_frame(2000, b"hello")], [tcp_frame(2000, b"hel"), tcp_frame(2003, b"lo")], c)
    assert out == [tcp_frame(2000, b"hello")] and reqs == []


def test_release_all_releases_everything_in_order_and_passes_through() -> None:
    c = Comparator(Mode.MC)
    c.feed_primary([b"e1-a", b"e1-b"], 0.0)
    c.set_mode(Mode.COLO)
    c.seal()
    p = stream_frames(DATA[:2000], [1000], isn=10)
    c.feed_primary(p, 0.0)
    assert released(c.release_all()) == [b"e1-a", b"e1-b", *p]
    assert released(c.feed_primary([b"live"], 0.0)) == [b"live"]
    assert c.feed_secondary([b"s"], 0.0) == [DropSecondary(1)]
    assert c.stats()["held_bytes"] == 0


def test_feed_accepts_memoryviews_and_releases_copies() -> None:
    buf = bytearray(b"".join(stream_frames(DATA[:100], [100], isn=10, fin=False)))
    frames = stream_frames(DATA[:100], [100], isn=10, fin=False)
    views = []
    pos = 0
    mv = memoryview(buf)
    for f in frames:
        views.append(mv[pos : pos + len(f)])
        pos += len(f)
    c = Comparator()
    c.feed_primary(views, 0.0)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    out = released(c.feed_secondary(stream_frames(DATA[:100], [50], isn=5, fin=False), 0.0))
    assert out == frames
    # and the secondary's buffer too: it runs ahead here, so its bytes are stored
    sbuf = bytearray(b"".join(stream_frames(DATA[:300], [300], isn=5, fin=False)))
    sframes = stream_frames(DATA[:300], [300], isn=5, fin=False)
    c2 = Comparator()
    mv2 = memoryview(sbuf)
    c2.feed_secondary([mv2[: len(sframes[0])], mv2[len(sframes[0]) :]], 0.0)
    sbuf[:] = bytes(len(sbuf))
    pframes = stream_frames(DATA[:300], [100], isn=7, fin=False)
    acts = c2.feed_primary(pframes, 0.0)
    assert released(acts) == pframes and requests(acts) == []


def test_colo_to_mc_to_colo_with_overlapping_seals_starts_flows_afresh() -> None:
    c = Comparator(Mode.COLO)
    first = stream_frames(DATA[:2000], [1000], isn=10, fin=False)
    c.feed_primary(first, 0.0)
    c.set_mode(Mode.MC)
    n1 = c.seal()  # COLO epoch, its frames still held
    mc_frames = [tcp_frame(10 + 1 + 2000, DATA[2000:3000])]
    c.feed_primary(mc_frames, 0.0)  # MC: not parsed
    c.set_mode(Mode.COLO)
    n2 = c.seal()  # MC epoch
    assert c.stats()["held_frames"] == len(first) + len(mc_frames)
    later = [tcp_frame(10 + 1 + 3000, DATA[3000:4000])]
    c.feed_primary(later, 0.0)
    assert released(c.commit(n1)) == first
    assert released(c.commit(n2)) == mc_frames
    # the secondary, having loaded checkpoint n2, continues the same connection in the same space
    out = released(
        c.feed_secondary(
            [tcp_frame(10 + 1 + 3000, DATA[3000:3500]), tcp_frame(10 + 1 + 3500, DATA[3500:4000])], 1.0
        )
    )
    assert out == later
    assert c.stats()["held_frames"] == 0


def test_poll_forgets_finished_flows_and_agreed_datagram_flows() -> None:
    c = Comparator(compare_timeout=1.0)
    run(stream_frames(DATA[:100], [100], isn=1), stream_frames(DATA[:100], [50], isn=2), c)
    run([udp_frame(b"q")], [udp_frame(b"q")], c)
    assert c.stats()["tcp_flows"] == 1 and c.stats()["datagram_flows"] == 1
    c.poll(1.0)
    assert c.stats()["datagram_flows"] == 0
    c.poll(100.0)
    assert c.stats()["tcp_flows"] == 0
    _c, out, reqs = run(stream_frames(DATA[:10], [10], isn=9), stream_frames(DATA[:10], [5], isn=8), c)
    assert reqs == [] and len(out) == 3


def test_secondary_behind_qemu_filter_rewriter() -> None:
    # filter-rewriter: the secondary's SYN/ACK keeps its own ISN (900), every later ACK-flagged
    # segment is moved into the primary's sequence space (ISN 10)
    p = stream_frames(DATA[:3000], [1000], isn=10)
    s = [tcp_frame(900, flags="SA"), *stream_frames(DATA[:3000], [700], isn=10, syn=False)]
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p
    bad = bytearray(DATA[:3000])
    bad[2999] ^= 1
    s_bad = [tcp_frame(900, flags="SA"), *stream_frames(bytes(bad), [700], isn=10, syn=False)]
    _c, _out, reqs = run(p, s_bad)
    assert [r.offset for r in reqs] == [2999]


def test_frames_fed_while_a_seal_is_pending_are_compared_only_after_the_reanchor() -> None:
    c = Comparator()
    p = stream_frames(DATA[:3000], [1000], isn=10, fin=False)
    s_ahead = stream_frames(DATA[:5000], [1000], isn=20, fin=False)  # the secondary ran ahead
    c.feed_primary(p, 0.0)
    assert released(c.feed_secondary(s_ahead, 0.0)) == p
    n = c.seal()  # sealed at primary offset 3000
    p_after = [tcp_frame(11 + 3000, DATA[3000:4000]), tcp_frame(11 + 4000, DATA[4000:5000])]
    assert c.feed_primary(p_after, 1.0) == []  # must not be verified against the old secondary
    assert c.commit(n) == []
    # the secondary resumed from the checkpoint: same bytes again, in the primary's space
    out = released(c.feed_secondary([tcp_frame(11 + 3000, DATA[3000:5000])], 2.0))
    assert out == p_after
    st = c.stats()
    assert st["held_frames"] == 0 and st["secondary_buffered_bytes"] == 0


def test_ipv4_options_ipv6_extension_headers_and_ethernet_padding_are_transparent() -> None:
    from scapy.layers.inet import IP, TCP, IPOption_NOP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Ether

    def v4_opts(seq: int, payload: bytes, flags: str = "PA") -> bytes:
        return bytes(
            Ether()
            / IP(src="10.0.0.2", dst="10.0.0.1", options=[IPOption_NOP()] * 4)
            / TCP(sport=80, dport=40001, seq=seq, ack=1000, flags=flags)
            / payload
        )

    p = [v4_opts(10, b"", "SA"), v4_opts(11, DATA[:700]), v4_opts(711, DATA[700:1000])]
    s = [tcp_frame(50, flags="SA"), tcp_frame(51, DATA[:1000])]
    _c, out, reqs = run(p, s)
    assert reqs == [] and out == p

    def v6_hbh(seq: int, payload: bytes, flags: str = "PA") -> bytes:
        return bytes(
            Ether()
            / IPv6(src=VM6, dst=CLIENT6)
            / IPv6ExtHdrHopByHop()
            / TCP(sport=80, dport=40001, seq=seq, ack=1000, flags=flags)
            / payload
        )

    p6 = [v6_hbh(10, b"", "SA"), v6_hbh(11, DATA[:500])]
    s6 = stream_frames(DATA[:500], [250], isn=99, fin=False, src=VM6, dst=CLIENT6)
    _c, out, reqs = run(p6, s6)
    assert reqs == [] and out == p6

    ack_p = tcp_frame(11, flags="A") + b"\xde\xad\xbe\xef\x00\x00"  # padded to 60 bytes with junk
    ack_s = tcp_frame(21, flags="A") + bytes(6)
    _c, out, reqs = run([tcp_frame(10, flags="SA"), ack_p], [tcp_frame(20, flags="SA"), ack_s])
    assert reqs == [] and out == [tcp_frame(10, flags="SA"), ack_p]


def test_data_after_fin_is_ignored_and_vlan_frames_are_other() -> None:
    late = tcp_frame(10 + 102, b"late")  # invalid TCP: data after the FIN
    p = [*stream_frames(DATA[:100], [100], isn=10), late]
    s = stream_frames(DATA[:100], [50], isn=20)
    c, out, reqs = run(p, s)
    assert reqs == [] and out == p[:-1]  # never compared, so it waits for a checkpoint
    assert [r.reason for r in requests(c.poll(100.0))] == ["timeout"]
    assert released(c.commit(c.seal())) == [late]
    from scapy.layers.l2 import Dot1Q, Ether

    vlan = bytes(Ether() / Dot1Q(vlan=5) / (b"x" * 50))
    _c, out, reqs = run([vlan], [vlan])
    assert out == [vlan] and reqs == []
