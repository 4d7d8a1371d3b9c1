"""``hybridft compare serve`` as a real process, driven over real sockets like QEMU and the daemon."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.frames import Look, payload_bytes, stream
from colo_compare.serve import ROLES
from colo_compare.signals import CompareStats, ReasonCounts
from colo_compare.transport import FrameDecoder, encode_frame, encode_frames
from hybridft_common.cli import hybridft_command
from hybridft_common.control import ControlError, call, decode_reply, encode_request
from tests.helpers.frames import stream_frames, tcp_frame
from tests.helpers.tls import free_port, make_creds, tls_connect

DATA = bytes(range(256)) * 40  # 10240 application bytes


class Served:
    """A running comparator (or relay) plus client sockets playing QEMU's chardevs."""

    def __init__(self, tmp: Path, *extra: str, relay: bool = False, vnet: bool = False) -> None:
        self.addr = {r: f"unix:{tmp / (r + '.sock')}" for r in ("primary", "secondary", "out", "control")}
        cmd = [sys.executable, "-m", "colo_compare.relay"] if relay else [
            *hybridft_command(), "compare", "serve"]  # fmt: skip
        cmd += ["--primary-in", self.addr["primary"], "--secondary-in", self.addr["secondary"],
                "--out", self.addr["out"], "--control", self.addr["control"], *extra]  # fmt: skip
        if vnet:
            cmd.append("--vnet-hdr")
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log, "wb"))  # noqa: SIM115
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", f"serve did not start: {line!r}\n{self.log.read_text()}"
        self.vnet = vnet
        self.conns = {r: self.connect(r) for r in ("primary", "secondary", "out")}
        self.decoder = FrameDecoder(vnet)

    def connect(self, role: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.addr[role][5:])
        return s

    def send(self, role: str, frames: list[bytes]) -> None:
        self.conns[role].sendall(encode_frames(frames, [b""] * len(frames) if self.vnet else None))

    def ctl(self, verb: str, **args: object) -> dict:
        # not hybridft_common.control.call(): its own ``timeout`` keyword would swallow next-request's
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.addr["control"][5:])
            sock.sendall(encode_request(verb, args))
            return decode_reply(sock.makefile("rb").readline())

    def released(self, count: int, timeout: float = 5.0) -> list[bytes]:
        out = self.conns["out"]
        out.settimeout(timeout)
        frames: list[bytes] = []
        while len(frames) < count:
            try:
                data = out.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"only {len(frames)} of {count} frames released") from None
            assert data, "serve closed the out connection"
            frames += self.decoder.feed(data)
        return frames

    def nothing_released(self, wait: float = 0.2) -> bool:
        out = self.conns["out"]
        out.settimeout(wait)
        try:
            return out.recv(1 << 16) == b"x"  # any data at all means something was released
        except TimeoutError:
            return True

    def wait_stats(self, pred: object, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.ctl("stats")
            if pred(stats):  # type: ignore[operator]
                return stats
            assert time.monotonic() < deadline, f"condition never held: {stats}"
            time.sleep(0.02)

    def close(self) -> None:
        for s in self.conns.values():
            s.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def served(tmp: Path, *extra: str, relay: bool = False, vnet: bool = False) -> Iterator[Served]:
    s = Served(tmp, *extra, relay=relay, vnet=vnet)
    try:
        yield s
    finally:
        s.close()
        assert s.proc.returncode == 0, s.log.read_text()


def test_mc_mode_holds_until_commit_and_releases_exactly_the_sealed_epoch(tmp_path: Path) -> None:
    with served(tmp_path, "--mode", "mc") as s:
        epoch1 = stream_frames(DATA, [1448], isn=5000)
        s.send("primary", epoch1)
        s.send("secondary", stream_frames(DATA, [700], isn=9))  # shadow-compared, released on nothing
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == len(epoch1))
        assert s.nothing_released()
        assert s.ctl("seal") == {"epoch": 1, "requests_cleared": 0}
        epoch2 = [tcp_frame(1, b"later", sport=81)]
        s.send("primary", epoch2)  # belongs to epoch 2
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == len(epoch1) + 1)
        assert s.ctl("commit", epoch=1)["released_frames"] == len(epoch1)
        assert s.released(len(epoch1)) == epoch1
        assert s.nothing_released()
        hold = s.ctl("stats")["transport"]["hold_us"]
        assert hold["samples"] >= 1 and 0 < hold["p50"] <= hold["p99"] <= hold["max"]
        with pytest.raises(ControlError, match="commit"):
            s.ctl("commit", epoch=7)
        assert s.ctl("seal")["epoch"] == 2
        s.ctl("commit", epoch=2)
        assert s.released(1) == epoch2


def _request_response(data: bytes, sizes: list[int]) -> list[bytes]:
    """The guest's SYN/ACK to a client whose SYN was sequence 1000, then its answer to a 100-byte
    request (ACK 1101): one request/response turn."""
    return [tcp_frame(5000, flags="SA", ack=1001),
            *stream_frames(data, sizes, isn=5000, ack=1101, syn=False, fin=False)]  # fmt: skip


@pytest.mark.parametrize("shadow", [True, False])
def test_stats_signals_in_mc_with_and_without_the_shadow(tmp_path: Path, shadow: bool) -> None:
    primary = _request_response(DATA[:5000], [1000])
    bad = bytearray(DATA[:5000])
    bad[3210] ^= 1
    secondary = _request_response(bytes(bad), [700])  # the primary's ISN: as after a checkpoint
    with served(tmp_path, "--mode", "mc", *([] if shadow else ["--no-shadow"])) as s:
        s.send("primary", primary)
        s.send("secondary", secondary)
        stats = s.wait_stats(lambda st: st["signals"]["guest_frames"] == len(primary)
                             and st["signals"]["secondary_frames"] == len(secondary))  # fmt: skip
        sig = CompareStats.from_dict(stats["signals"])
        assert sig.mode == "mc" and sig.epoch == 1 and sig.shadow is shadow
        assert sig.guest_bytes == sum(map(len, primary))
        assert sig.secondary_bytes == sum(map(len, secondary))
        assert (sig.turns, sig.client_bytes_acked, sig.client_ack_advances) == (1, 100, 1)
        assert sig.held_bytes == sig.guest_bytes and sig.released_frames == 0 and sig.hold.samples == 0
        assert sig.divergences.total == 0
        if shadow:  # COLO would have released the SYN/ACK and [0, 3000), then asked for a checkpoint
            assert sig.shadow_divergences == ReasonCounts(payload=1)
            assert (sig.shadow_early_frames, sig.shadow_early_bytes) == (4, sum(map(len, primary[:4])))
            assert sig.shadow_held_bytes == sum(map(len, primary[4:]))
        else:
            assert sig.shadow_divergences == ReasonCounts()
            assert (sig.shadow_early_frames, sig.shadow_held_bytes) == (0, 0)
        assert s.nothing_released()
        assert s.ctl("next-request", timeout=0) == {"request": None}  # the shadow asks for nothing
        time.sleep(0.2)
        s.ctl("commit", epoch=s.ctl("seal")["epoch"])
        assert s.released(len(primary)) == primary
        reply = s.ctl("stats", signals_only=True)
        assert list(reply) == ["signals"]
        sig = CompareStats.from_dict(reply["signals"])
        assert (sig.checkpoints, sig.held_bytes, sig.released_frames) == (1, 0, len(primary))
        assert sig.hold.samples >= 1 and 200_000 <= sig.hold.p50_us <= sig.hold.p99_us  # type: ignore[operator]
        assert (sig.shadow_epochs, sig.shadow_epochs_diverged) == ((1, 1) if shadow else (0, 0))


def test_stats_signals_count_live_divergences_in_colo(tmp_path: Path) -> None:
    primary = _request_response(DATA[:5000], [1000])
    bad = bytearray(DATA[:5000])
    bad[3210] ^= 1
    with served(tmp_path, "--mode", "colo") as s:
        s.send("primary", primary)
        s.send("secondary", _request_response(bytes(bad), [700]))
        assert s.released(4) == primary[:4]
        assert s.ctl("next-request", timeout=5)["request"]["reason"] == "payload"
        sig = CompareStats.from_dict(s.ctl("stats")["signals"])
        assert sig.mode == "colo" and not sig.shadow and sig.turns == 1
        assert sig.divergences == ReasonCounts(payload=1) and sig.shadow_divergences == ReasonCounts()
        assert sig.released_frames == 4 and sig.held_bytes == sum(map(len, primary[4:]))
        assert sig.hold.samples >= 1


def test_relay_has_no_signals(tmp_path: Path) -> None:
    with served(tmp_path, relay=True) as s:
        assert s.ctl("stats")["signals"] is None
        with pytest.raises(ControlError, match="no shadow"):
            s.ctl("mode", mode="mc", shadow=True)


def test_colo_releases_matching_streams_and_reports_a_divergence(tmp_path: Path) -> None:
    with served(tmp_path, "--mode", "colo") as s:
        primary = stream_frames(DATA, [1448], isn=1000, fin=False)
        s.send("primary", primary)
        s.send("secondary", stream_frames(DATA, [512, 1000], isn=777777, fin=False, ip_id=999, ttl=63))
        assert s.released(len(primary)) == primary
        assert s.ctl("next-request", timeout=0) == {"request": None}

        # a different byte at stream offset len(DATA)+10 on a second flow
        bad = bytearray(DATA)
        bad[10] ^= 0xFF
        flow2 = stream_frames(DATA, [1448], isn=50, sport=8080, fin=False)
        s.send("primary", flow2)
        s.send("secondary", stream_frames(bytes(bad), [1448], isn=60, sport=8080, fin=False))
        t0 = time.monotonic()
        reply = s.ctl("next-request", timeout=5)
        assert time.monotonic() - t0 < 2
        req = reply["request"]
        assert req["reason"] == "payload" and req["proto"] == "tcp" and req["offset"] == 10
        assert req["flow"] == "10.0.0.2:8080->10.0.0.1:40001"
        assert reply["epoch"] == 1

        # the checkpoint: seal, commit -> the held frames of the diverged flow go out
        sealed = s.ctl("seal")
        assert sealed["epoch"] == 1
        assert s.ctl("commit", epoch=1)["released_frames"] > 0
        # everything of the diverged flow went out (what matched before, the rest at the commit)
        assert s.released(len(flow2)) == flow2
        stats = s.ctl("stats")
        assert stats["core"]["divergences"] == 1
        assert stats["transport"]["framing_errors"] == {}


def test_next_request_long_poll_wakes_on_a_timeout_request(tmp_path: Path) -> None:
    with served(tmp_path, "--compare-timeout", "0.2") as s:
        s.send("primary", [tcp_frame(1, b"nobody answers")])  # the secondary never sends it
        t0 = time.monotonic()
        reply = s.ctl("next-request", timeout=5)
        waited = time.monotonic() - t0
        assert reply["request"]["reason"] in ("timeout", "ack")
        assert 0.1 < waited < 2
        assert s.ctl("next-request", timeout=0.1) == {"request": None}  # coalesced and consumed


def test_bad_framing_closes_only_that_connection_and_reconnect_works(tmp_path: Path) -> None:
    with served(tmp_path, "--mode", "mc") as s:
        good = [tcp_frame(1, b"a" * 100), tcp_frame(101, b"b" * 100)]
        s.conns["primary"].sendall(encode_frames(good) + b"\xff\xff\xff\xff" + b"garbage")
        stats = s.wait_stats(lambda st: st["transport"]["framing_errors"].get("primary") == 1)
        assert stats["transport"]["primary_frames"] == 2  # the frames before the garbage count
        assert not stats["transport"]["connected"]["primary"]
        assert stats["transport"]["connected"]["secondary"] and stats["transport"]["connected"]["out"]
        s.conns["primary"].close()
        s.conns["primary"] = s.connect("primary")  # what QEMU's reconnect=1 does
        more = [tcp_frame(201, b"c" * 100)]
        s.send("primary", more)
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == 3)
        epoch = s.ctl("seal")["epoch"]
        s.ctl("commit", epoch=epoch)
        assert s.released(3) == good + more
        assert "bad framing" in s.log.read_text()


def test_out_reconnect_keeps_released_frames(tmp_path: Path) -> None:
    with served(tmp_path, "--mode", "mc") as s:
        s.conns["out"].close()
        s.wait_stats(lambda st: not st["transport"]["connected"]["out"])
        frames = [tcp_frame(1 + 100 * i, b"x" * 100) for i in range(50)]
        s.send("primary", frames)
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == 50)
        s.ctl("commit", epoch=s.ctl("seal")["epoch"])
        assert s.ctl("stats")["transport"]["out_backlog_bytes"] > 0
        s.conns["out"] = s.connect("out")
        assert s.released(50) == frames


def test_vnet_headers_travel_with_their_frames(tmp_path: Path) -> None:
    with served(tmp_path, "--mode", "mc", vnet=True) as s:
        frames = [tcp_frame(1 + 10 * i, b"y" * 10) for i in range(5)]
        headers = [bytes([1, 0]) + bytes([i]) * 10 for i in range(5)]  # NEEDS_CSUM-like, distinct
        s.conns["primary"].sendall(encode_frames(frames, headers))
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == 5)
        s.ctl("commit", epoch=s.ctl("seal")["epoch"])
        assert s.released(5) == frames
        assert s.decoder.vnet_headers == headers
        assert s.ctl("stats")["transport"]["vnet_headers_missing"] == 0


def test_control_errors_change_nothing(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        for verb, args, code in [
            ("mode", {"mode": "turbo"}, "bad-args"),
            ("commit", {"epoch": "one"}, "bad-args"),
            ("commit", {"epoch": 1}, "bad-epoch"),
            ("next-request", {"timeout": -1}, "bad-args"),
            ("stats", {"signals_only": "yes"}, "bad-args"),
            ("launch", {}, "bad-verb"),
        ]:
            with pytest.raises(ControlError) as info:
                s.ctl(verb, **args)
            assert info.value.code == code
        assert s.ctl("mode", mode="mc") == {"mode": "colo", "next_mode": "mc"}
        assert s.ctl("seal")["epoch"] == 1
        assert s.ctl("stats")["core"]["mode"] == "mc"
        assert s.ctl("stats", signals_only=True)["signals"]["shadow"] is True
        with pytest.raises(ControlError) as info:
            s.ctl("mode", mode="mc", shadow="off")
        assert info.value.code == "bad-args"
        passive = s.ctl("mode", mode="mc", shadow=False)  # the secondary goes passive
        assert passive == {"mode": "mc", "next_mode": "mc", "next_shadow": False}
        assert s.ctl("stats", signals_only=True)["signals"]["shadow"] is True  # until the seal
        s.ctl("seal")
        assert s.ctl("stats", signals_only=True)["signals"]["shadow"] is False


def test_a_spin_catches_the_secondary_copy_and_status_counts_it(tmp_path: Path) -> None:
    """--poll-us: after the primary's batch the service spins on both inputs instead of sleeping;
    the secondary's copy, sent within the window, ends the spin (a hit) and releases the frames.
    Without the option nothing spins."""
    with served(tmp_path, "--mode", "colo") as s:
        assert s.ctl("stats")["runtime"]["busy_poll"] == {
            "window_us": 0, "polls": 0, "hits": 0, "spun_ns": 0, "back_offs": 0}  # fmt: skip
    # Both copies are built before the primary's is sent: scapy takes about 7 ms to build one, which
    # inside the 2 ms gap made it 9 ms, and on a loaded CI machine more than the 10 ms window (the
    # most the option takes; one CI run saw 2 hits in 5 flows).  Flows still go on, up to 40, until
    # 4 hits, so that a sender descheduled for a whole window now and then is no failure; without a
    # spin no flow ever scores one.
    with served(tmp_path, "--mode", "colo", "--poll-us", "10000") as s:
        for flow in range(40):
            primary = stream_frames(DATA, [1448], isn=1000, sport=7000 + flow, fin=False)
            secondary = stream_frames(DATA, [1000], isn=5000, sport=7000 + flow, fin=False)
            s.send("primary", primary)
            time.sleep(0.002)
            s.send("secondary", secondary)
            assert s.released(len(primary)) == primary
            time.sleep(0.05)  # the rest of this spin (at most 10 ms) runs out: a miss at most
            polls = s.ctl("stats")["runtime"]["busy_poll"]
            if polls["hits"] >= 4:
                break
        assert polls["window_us"] == 10000
        assert polls["hits"] >= 4 and polls["polls"] >= polls["hits"], polls
        assert polls["spun_ns"] >= polls["hits"] * 1_000_000, polls  # each hit waited for the 2 ms gap
    with served(tmp_path, "--poll-us", "50", relay=True) as s:
        frames = [os.urandom(60 + i) for i in range(10)]
        s.send("primary", frames)
        assert s.released(10) == frames


def test_relay_forwards_everything_at_once(tmp_path: Path) -> None:
    with served(tmp_path, relay=True) as s:
        frames = [os.urandom(60 + i) for i in range(100)]
        s.send("primary", frames)
        s.send("secondary", frames[:10])
        assert s.released(100) == frames


def test_unknown_bytes_on_a_single_frame_connection(tmp_path: Path) -> None:
    """A runt Ethernet frame (malformed for the core) is carried, never lost."""
    with served(tmp_path, "--mode", "mc") as s:
        s.conns["primary"].sendall(encode_frame(b"\x01\x02\x03"))
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == 1)
        s.ctl("commit", epoch=s.ctl("seal")["epoch"])
        assert s.released(1) == [b"\x01\x02\x03"]


def test_memory_is_bounded_and_nothing_is_lost(tmp_path: Path) -> None:
    """A daemon that does not checkpoint: the primary's input pauses at --max-buffer, then resumes."""
    import threading

    with served(tmp_path, "--mode", "mc", "--max-buffer", "2", "--out-high-water", "1") as s:
        # ~6 MB of one TCP stream (struct-built: scapy is slow at this size)
        frames = stream(9000, payload_bytes(4000 * 1448, 7), [1448], 1, Look(), syn=False)
        sender = threading.Thread(target=s.send, args=("primary", frames))
        sender.start()
        stats = s.wait_stats(lambda st: st["transport"]["primary_paused"])
        assert stats["transport"]["held_bytes"] <= 4 << 20  # ceiling plus one read batch
        assert sender.is_alive()  # the generator (QEMU) is blocked, not buffered without bound
        got: list[bytes] = []
        while len(got) < len(frames):
            epoch = s.ctl("seal")["epoch"]
            released = s.ctl("commit", epoch=epoch)["released_frames"]
            if released:
                got += s.released(released)
            else:
                time.sleep(0.02)
        sender.join(10)
        assert got == frames
        stats = s.ctl("stats")["transport"]
        assert stats["primary_pauses"] >= 1 and not stats["primary_paused"]


def test_slow_output_pauses_the_secondary_not_the_primary(tmp_path: Path) -> None:
    with served(tmp_path, "--out-high-water", "1", relay=True) as s:
        frames = [os.urandom(1400) for _ in range(16000)]  # 22 MB, more than the kernel buffers
        s.send("primary", frames)
        stats = s.wait_stats(lambda st: st["transport"]["primary_frames"] == len(frames))
        assert stats["transport"]["secondary_paused"]
        assert not stats["transport"]["primary_paused"]
        assert s.released(len(frames)) == frames
        s.wait_stats(lambda st: not st["transport"]["secondary_paused"])


def test_release_all_when_the_secondary_is_lost(tmp_path: Path) -> None:
    with served(tmp_path, "--compare-timeout", "0.1") as s:
        held = stream_frames(DATA, [1448], isn=3, fin=False)
        s.send("primary", held)  # the secondary never answers
        assert s.ctl("next-request", timeout=5)["request"] is not None
        s.send("primary", [tcp_frame(4 + len(DATA), b"more")])
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == len(held) + 1)
        assert s.nothing_released()
        assert s.ctl("release-all")["released_frames"] == len(held) + 1
        assert s.released(len(held) + 1)[: len(held)] == held
        assert s.ctl("next-request", timeout=0) == {"request": None}
        later = [tcp_frame(8 + len(DATA), b"unprotected now")]
        s.send("primary", later)  # pass-through until the next seal
        assert s.released(1) == later


def test_unsent_output_moves_to_the_next_out_connection(tmp_path: Path) -> None:
    with served(tmp_path, relay=True) as s:
        frames = [i.to_bytes(4, "big") + os.urandom(1396) for i in range(16000)]  # 22 MB, not read
        s.send("primary", frames)
        s.wait_stats(lambda st: st["transport"]["out_backlog_bytes"] > 4 << 20)
        s.conns["out"].close()  # QEMU's indev connection drops with megabytes queued
        s.wait_stats(lambda st: not st["transport"]["connected"]["out"])
        s.conns["out"] = s.connect("out")
        s.decoder = FrameDecoder()
        got = s.released(1)  # (everything the first read decoded)
        k = int.from_bytes(got[0][:4], "big")
        assert k > 0  # what the dead connection's kernel buffer held is gone (TCP retransmits)
        got += s.released(len(frames) - k - len(got))
        assert got == frames[k:]  # the rest: whole records, in order, none skipped


def test_tcp_addresses_speak_mutual_tls(tmp_path: Path) -> None:
    """tcp: data and control addresses work end to end over TLS with the pair's client certificate
    (QEMU's chardev ``tls-creds``); the relay into the unix-socket code loses no frame."""
    creds = make_creds(tmp_path / "creds")
    ports = [free_port() for _ in range(4)]
    names = ("primary", "secondary", "out", "control")
    addr = {r: f"tcp:127.0.0.1:{p}" for r, p in zip(names, ports, strict=True)}
    cmd = [*hybridft_command(), "compare", "serve", "--tls-creds", str(creds.host),
           "--mode", "mc", "--primary-in", addr["primary"], "--secondary-in", addr["secondary"],
           "--out", addr["out"], "--control", addr["control"]]  # fmt: skip
    control = f"{addr['control']},tls-creds={creds.host}"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        ctx = creds.client_context()
        conns = {r: tls_connect(p, ctx) for r, p in zip(ROLES, ports, strict=False)}
        frames = [tcp_frame(1 + 10 * i, b"t" * 10) for i in range(20)]
        conns["primary"].sendall(encode_frames(frames))
        deadline = time.monotonic() + 5
        while call(control, "stats")["transport"]["primary_frames"] < len(frames):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        epoch = call(control, "seal")["epoch"]
        call(control, "commit", epoch=epoch)
        decoder, got = FrameDecoder(), []
        conns["out"].settimeout(5)
        while len(got) < len(frames):
            got += decoder.feed(conns["out"].recv(65536))
        assert got == frames
        for c in conns.values():
            c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_tcp_addresses_without_credentials_are_refused(tmp_path: Path) -> None:
    cmd = [*hybridft_command(), "compare", "serve", "--mode", "mc",
           "--primary-in", f"unix:{tmp_path / 'p.sock'}", "--secondary-in", f"tcp:127.0.0.1:{free_port()}",
           "--out", f"unix:{tmp_path / 'o.sock'}", "--control", f"unix:{tmp_path / 'c.sock'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "needs TLS credentials" in proc.stderr and "hybridft certs init" in proc.stderr


def test_seal_includes_everything_written_before_it(tmp_path: Path) -> None:
    """The epoch protocol's guarantee: frames QEMU wrote before the seal (VM stopped) are in that
    epoch, even when the service has not had the loop turns to read them yet."""
    with served(tmp_path, "--mode", "mc") as s:
        # a big send buffer: sendall returns while megabytes still wait in the kernel, as when
        # QEMU's writes sit in the socket when ``stop`` returns
        s.conns["primary"].setsockopt(socket.SOL_SOCKET, 32, 32 << 20)  # SO_SNDBUFFORCE (root)
        ctl = s.connect("control")  # one persistent control connection, like the daemon's
        replies = ctl.makefile("rb")

        def verb(name: str, **args: object) -> dict:
            ctl.sendall(encode_request(name, args))
            return decode_reply(replies.readline())

        offset = 0
        for epoch in range(1, 4):
            n = 6000 + epoch * 7  # ~9 MB: many loop turns' worth of reading
            batch = stream(7000, payload_bytes(1448 * n, epoch), [1448], 0, Look(), syn=False, start=offset)
            offset += 1448 * n
            s.send("primary", batch)  # no waiting: seal right after the bytes reached the socket
            assert verb("seal")["epoch"] == epoch
            assert verb("commit", epoch=epoch)["released_frames"] == len(batch)
            assert s.released(len(batch)) == batch
        ctl.close()


MiB = 1 << 20


def secondary_flood(sock: socket.socket, total: int, sent: list[int]) -> None:
    """``total`` bytes of one in-order TCP stream the primary never sends (port 81): the comparator
    must keep them to compare with whatever the primary sends later."""
    template = bytearray(tcp_frame(0, b"s" * 1448, sport=81))
    seq = 1
    try:
        while sent[0] < total:
            frames = []
            for _ in range(256):
                struct.pack_into(">I", template, 38, seq & 0xFFFFFFFF)  # TCP sequence number
                frames.append(bytes(template))
                seq += 1448
            data = encode_frames(frames)
            sock.sendall(data)
            sent[0] += len(data)
    except OSError:
        pass  # the test closed the connection while this thread was blocked (the reader paused)


def test_a_secondary_flood_pauses_the_secondary_and_memory_stays_bounded(tmp_path: Path) -> None:
    """The secondary's bytes the core keeps count in --max-buffer: past half of it the secondary's
    input pauses (a 400 MiB flood took the comparator to 455 MB with --max-buffer 8), and the
    checkpoint's commit still releases every primary frame, drops the stale bytes and resumes it."""
    with served(tmp_path, "--mode", "colo", "--max-buffer", "8") as s:
        ps = psutil.Process(s.proc.pid)
        primary = [tcp_frame(1 + 100 * i, b"p" * 100) for i in range(50)]  # the secondary never matches
        s.send("primary", primary)
        s.wait_stats(lambda st: st["transport"]["primary_frames"] == len(primary))
        base = ps.memory_info().rss
        total, sent = 400 * MiB, [0]
        flood = threading.Thread(
            target=secondary_flood, args=(s.conns["secondary"], total, sent), daemon=True
        )
        flood.start()
        peak, deadline = base, time.monotonic() + 60
        last_sent, since = 0, time.monotonic()
        while flood.is_alive() and time.monotonic() < deadline:
            peak = max(peak, ps.memory_info().rss)
            if sent[0] != last_sent:
                last_sent, since = sent[0], time.monotonic()
            elif time.monotonic() - since > 0.5 and s.ctl("stats")["transport"]["secondary_paused"]:
                break  # paused, and the flood is blocked (the kernel's buffers are full)
            time.sleep(0.02)
        stats = s.ctl("stats")
        peak = max(peak, ps.memory_info().rss)
        # 8 MiB budget, one read batch per wake-up, the decoder's buffer, Python's slack
        assert peak - base < 48 * MiB, (
            f"RSS grew by {(peak - base) / MiB:.0f} MiB ({sent[0] / MiB:.0f} MiB sent)"
        )
        assert stats["transport"]["secondary_paused"] and flood.is_alive()
        assert stats["core"]["secondary_buffered_bytes"] <= 8 * MiB
        assert not stats["transport"]["primary_paused"]
        assert s.nothing_released()

        # the checkpoint: every primary frame goes out, the secondary's stale bytes are dropped and
        # its input resumes
        epoch = s.ctl("seal")["epoch"]
        assert s.ctl("commit", epoch=epoch)["released_frames"] == len(primary)
        assert s.released(len(primary)) == primary
        before = s.ctl("stats")["transport"]["secondary_frames"]
        s.wait_stats(lambda st: st["transport"]["secondary_frames"] > before)
        s.conns["secondary"].close()  # ends the flood (its sendall fails)
        flood.join(10)
        assert max(peak, ps.memory_info().rss) - base < 48 * MiB
        s.conns["secondary"] = s.connect("secondary")
