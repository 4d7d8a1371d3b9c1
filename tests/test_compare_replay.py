"""``hybridft compare replay`` / ``demo`` on pcaps the tests write with scapy's wrpcap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, wrpcap

from colo_compare.replay import demo_command, replay_command, replay_files
from tests.helpers.frames import (
    CLIENT6,
    VM6,
    icmp_echo_reply,
    stream_frames,
    tcp_frame,
    udp_frame,
)

PAGE = b"".join(b"%06d: some bytes of a web page\n" % i for i in range(600))


def write(path: Path, frames: list[bytes], t0: float = 1000.0) -> Path:
    wrpcap(str(path), [_with_time(Ether(f), t0 + i * 0.001) for i, f in enumerate(frames)])
    return path


def _with_time(pkt: Ether, t: float) -> Ether:
    pkt.time = t
    return pkt


def run_json(tmp_path: Path, primary: list[bytes], secondary: list[bytes]) -> tuple[int, dict]:
    p = write(tmp_path / "p.pcap", primary)
    s = write(tmp_path / "s.pcap", secondary, t0=1000.0005)
    result = CliRunner().invoke(replay_command, [str(p), str(s), "--json"])
    return result.exit_code, json.loads(result.output)


def test_match_with_ipv4_ipv6_wraparound_udp_icmp(tmp_path: Path) -> None:
    primary = (
        stream_frames(PAGE, [1448], isn=0xFFFFFFFF - 5000, timestamps=True)
        + stream_frames(PAGE[:5000], [1400], isn=1, src=VM6, dst=CLIENT6, sport=22, dport=50000)
        + [udp_frame(b"answer %d" % i, ip_id=i) for i in range(3)]
        + [icmp_echo_reply(9, i) for i in range(3)]
    )
    secondary = (
        stream_frames(PAGE, [2896, 700], isn=0xFFFFFFF0, ip_id=4000)
        + stream_frames(PAGE[:5000], [512], isn=0xFFFFFF00, src=VM6, dst=CLIENT6, sport=22, dport=50000)
        + [udp_frame(b"answer %d" % i, ip_id=100 + i) for i in range(3)]
        + [icmp_echo_reply(9, i, ip_id=77) for i in range(3)]
    )
    code, out = run_json(tmp_path, primary, secondary)
    assert code == 0
    assert set(out) == {"verdict", "divergences", "flows"}
    assert out["verdict"] == "match" and out["divergences"] == []
    tcp = {(f["src"], f["sport"]): f for f in out["flows"] if f["proto"] == "tcp"}
    assert tcp[("10.0.0.2", 80)]["primary"] == len(PAGE) == tcp[("10.0.0.2", 80)]["secondary"]
    assert tcp[("fd00::2", 22)]["status"] == "match"
    assert {f["proto"] for f in out["flows"]} == {"tcp", "udp", "icmp"}


def test_divergence_json_is_exact(tmp_path: Path) -> None:
    changed = bytearray(PAGE)
    changed[12345] = ord("!")
    primary = stream_frames(PAGE, [1448], isn=0xFFFFFFFF - 100)  # wraps inside the stream
    secondary = stream_frames(bytes(changed), [1000], isn=42)
    code, out = run_json(tmp_path, primary, secondary)
    assert code == 1
    assert out["verdict"] == "diverged"
    assert out["divergences"] == [
        {
            "proto": "tcp",
            "src": "10.0.0.2",
            "sport": 80,
            "dst": "10.0.0.1",
            "dport": 40001,
            "offset": 12345,
            "reason": "payload",
        }
    ]


def test_ipv6_divergence(tmp_path: Path) -> None:
    kw = {"src": VM6, "dst": CLIENT6, "sport": 443, "dport": 51000}
    changed = bytearray(PAGE[:3000])
    changed[0] = 0
    code, out = run_json(
        tmp_path,
        stream_frames(PAGE[:3000], [1440], isn=5, **kw),
        stream_frames(bytes(changed), [700], isn=6, **kw),
    )
    assert code == 1
    assert out["divergences"] == [
        {
            "proto": "tcp",
            "src": "fd00::2",
            "sport": 443,
            "dst": "fd00::1",
            "dport": 51000,
            "offset": 0,
            "reason": "payload",
        }
    ]


def test_fin_rst_offsets_and_merely_behind(tmp_path: Path) -> None:
    p = (
        stream_frames(PAGE[:3000], [1000], isn=1, dport=1)  # FIN at 3000 vs data -> fin at 3000
        + stream_frames(PAGE[:3000], [1000], isn=1, dport=2, fin=False)  # secondary merely behind
        + stream_frames(PAGE[:3000], [1000], isn=1, dport=3, fin=False)
        + [tcp_frame(1 + 3001, flags="R", ack=None, dport=3)]  # RST vs FIN at 3000
    )
    s = (
        stream_frames(PAGE[:3500], [900], isn=9, dport=1, fin=False)
        + stream_frames(PAGE[:2000], [900], isn=9, dport=2, fin=False)
        + stream_frames(PAGE[:3000], [900], isn=9, dport=3)
    )
    code, out = run_json(tmp_path, p, s)
    assert code == 1
    got = sorted((d["dport"], d["offset"], d["reason"]) for d in out["divergences"])
    assert got == [(1, 3000, "fin"), (3, 3000, "rst")]
    behind = next(f for f in out["flows"] if f["dport"] == 2)
    assert behind["status"] == "secondary behind"


def test_datagram_index_and_one_sided_flows(tmp_path: Path) -> None:
    p = [udp_frame(b"a"), udp_frame(b"b"), udp_frame(b"c"), udp_frame(b"only", dport=7)]
    s = [udp_frame(b"a"), udp_frame(b"B"), udp_frame(b"c"), *stream_frames(b"hi", [2], isn=3)]
    code, out = run_json(tmp_path, p, s)
    assert code == 1
    got = sorted((d["proto"], d["dport"], d["offset"], d["reason"]) for d in out["divergences"])
    assert got == [
        ("tcp", 40001, 0, "only-secondary"),
        ("udp", 7, 0, "only-primary"),
        ("udp", 40002, 1, "datagram"),
    ]


def test_table_output_and_exit_status(tmp_path: Path) -> None:
    p = write(tmp_path / "p.pcap", stream_frames(PAGE[:2000], [1000], isn=1))
    s = write(tmp_path / "s.pcap", stream_frames(PAGE[:2000], [700], isn=2))
    result = CliRunner().invoke(replay_command, [str(p), str(s)])
    assert result.exit_code == 0
    assert "verdict: MATCH" in result.output
    assert "10.0.0.2:80->10.0.0.1:40001" in result.output and "2000 bytes" in result.output


def test_pcapng_is_read_too(tmp_path: Path) -> None:
    frames = stream_frames(PAGE[:2000], [1000], isn=1)
    ng = tmp_path / "p.pcapng"
    with PcapNgWriter(str(ng)) as w:
        for f in frames:
            w.write(Ether(f))
    s = write(tmp_path / "s.pcap", stream_frames(PAGE[:2000], [300], isn=2))
    assert replay_files(ng, s).verdict == "match"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a pcap"),
        (b"hello world, definitely not a capture", "not a pcap"),
        (bytes.fromhex("d4c3b2a1020004000000000000000000ffff0000" + "65000000"), "link type 101"),
        (bytes.fromhex("d4c3b2a1020004000000000000000000ffff0000" + "01000000") + bytes(10), "truncated"),
        (
            bytes.fromhex("d4c3b2a1020004000000000000000000ffff0000" + "01000000")
            + bytes.fromhex("00000000000000000010000000100000")
            + b"short",
            "claims 4096 bytes",
        ),
        (
            bytes.fromhex("d4c3b2a1020004000000000000000000ffff0000" + "01000000")
            + bytes.fromhex("00000000000000000e000000dc050000")
            + bytes(14),
            "snap length",
        ),
    ],
)
def test_bad_captures_get_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(content)
    good = write(tmp_path / "good.pcap", [udp_frame(b"x")])
    result = CliRunner().invoke(replay_command, [str(bad), str(good)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(replay_command, [str(tmp_path / "nope.pcap"), str(good)])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_malformed_frames_in_a_capture_are_reported_not_fatal(tmp_path: Path) -> None:
    p = [b"\x00" * 20, *stream_frames(PAGE[:100], [100], isn=1)]
    s = [b"\x00" * 20, *stream_frames(PAGE[:100], [50], isn=1)]
    code, out = run_json(tmp_path, p, s)
    assert code == 0 and out["verdict"] == "match"


def test_demo_finds_exactly_the_planted_divergence(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo_command, ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "DIVERGED (1 divergence)" in result.output
    assert "01:02:03" in result.output and "01:02:04" in result.output
    assert "self-check" in result.output
    # the installed console script, as a user runs it
    code = subprocess.run(
        [
            str(Path(sys.executable).parent / "hybridft"),
            "compare",
            "replay",
            str(tmp_path / "PRIMARY.pcap"),
            str(tmp_path / "SECONDARY.pcap"),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert code.returncode == 1, code.stderr
    out = json.loads(code.stdout)
    assert [(d["dport"], d["reason"]) for d in out["divergences"]] == [(40002, "payload")]


def test_fuzzed_capture_files_give_frames_or_a_clear_error(tmp_path: Path) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from colo_compare.pcap import PcapError, read_frames

    header = bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.sampled_from([b"", header, b"\x0a\x0d\x0d\x0a"]))
    def check(tail: bytes, head: bytes) -> None:
        path = tmp_path / "fuzz.pcap"
        path.write_bytes(head + tail)
        try:
            frames = read_frames(path)
        except PcapError as exc:
            assert str(path) in str(exc)
            return
        from colo_compare.replay import replay_frames

        replay_frames(frames, frames)  # never raises either

    check()


def test_a_missing_syn_on_one_side_is_reported_at_offset_zero(tmp_path: Path) -> None:
    p = stream_frames(PAGE[:2000], [1000], isn=100)
    s = stream_frames(PAGE[:2000], [1000], isn=100, syn=False)
    code, out = run_json(tmp_path, p, s)
    assert code == 1
    assert [(d["offset"], d["reason"]) for d in out["divergences"]] == [(0, "syn")]
