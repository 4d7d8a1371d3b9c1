"""``hybridft bench compare``: the live comparator against a forward-only relay, end to end.

Every number is measured over real sockets with three processes: a generator (playing the primary
and the secondary QEMU's filter-redirectors), the service under test (``hybridft compare serve``,
or the relay ``python -m colo_compare.relay`` — the same transport and shell without comparison)
and a sink (playing the primary's indev redirector).  The generator and the sink are separate
processes so the service has a core of its own; the machine is shared and noisy, so the relay is
measured in the same run and the table reports ratios.

Frames are prebuilt with ``bench.frames`` (``struct``; scapy is far too slow), before the clock starts:

* **bulk**  — TCP, 1448-byte segments on the primary; the secondary cuts the same byte stream
  differently (a 1000-byte first segment, then 1448) and uses another ISN.
* **rpc**   — TCP, 100-byte segments (request/response sized), many flows.
* **noise** — as bulk but the secondary differs in IP ID, TTL, checksums, window and TCP
  timestamps: all benign, so any divergence here is a false miscompare.
* **divergence** — short flows with one flipped byte each on the secondary; a small daemon
  long-polls ``next-request`` and checkpoints (seal + commit); detections must equal injections
  and every primary frame must still reach the sink.
* **mc**    — MC mode with a checkpoint every ``--epoch-ms``; plus the core alone in MC mode.
* **latency** — COLO at 50 % of the measured bulk throughput; each segment carries its send time,
  the sink computes hold latency (send of the later side -> arrival at the sink).
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from bench.frames import (
    ACK,
    NOISY_LOOK,
    PLAIN_SECONDARY_LOOK,
    PRIMARY_LOOK,
    SYN,
    payload_bytes,
    stream,
    tcp_frame,
)
from colo_compare.transport import FrameDecoder, encode_frames
from hybridft_common.cli import hybridft_command
from hybridft_common.control import decode_reply, encode_request
from hybridft_common.processes import cpu_seconds
from hybridft_common.stats import percentile, ratio

# ------------------------------------------------------------------------------------------------
# workloads (frames from bench.frames, prebuilt before any clock starts)
# ------------------------------------------------------------------------------------------------


def build_workload(kind: str, frames_target: int, flows: int) -> tuple[list[bytes], list[bytes], int]:
    """(primary encoded chunks, secondary encoded chunks, primary frame count).

    Chunk ``k`` of both sides covers the same stream bytes of every flow (64 primary segments per
    flow), so the generator never runs one side ahead of the other; only the segmentation, ISN
    and (for ``noise``) the header fields differ.

    ``mc-bulk`` is bulk as the secondary sends it in MC mode: after its SYN/ACK, in the primary's
    sequence space.  A secondary that loaded a checkpoint has the primary's TCP state (and QEMU's
    filter-rewriter maps the rest into that space), so from the first checkpoint on every real
    secondary segment is there; one that kept its own ISN across checkpoints, as ``bulk``'s does,
    exists only in a generator, and the core files all of it as out of order.
    """
    if kind not in ("bulk", "mc-bulk", "rpc", "noise"):
        raise ValueError(f"unknown workload {kind!r}")
    seg = 100 if kind == "rpc" else 1448
    step = 64
    per_flow = max(1, frames_target // flows)
    sec_look = NOISY_LOOK if kind == "noise" else PLAIN_SECONDARY_LOOK
    # the secondary cuts differently: a short first segment (bulk) or coalesced requests (rpc)
    sec_sizes = [seg, 2 * seg, seg] if kind == "rpc" else [1000, 1448]
    datas = [payload_bytes(per_flow * seg, f) for f in range(flows)]
    p_chunks: list[bytes] = []
    s_chunks: list[bytes] = []
    nframes = 0
    width = step * seg
    for k in range(0, per_flow * seg, width):
        p_batch: list[bytes] = []
        s_batch: list[bytes] = []
        for f, data in enumerate(datas):
            piece = data[k : k + width]
            p_isn, s_isn = 1000 * f + 5, 7_000_000 + 3 * f
            p_batch += stream(10000 + f, piece, [seg], p_isn, PRIMARY_LOOK, syn=k == 0, start=k)
            if kind == "mc-bulk":
                if k == 0:
                    s_batch += stream(10000 + f, b"", [seg], s_isn, sec_look)  # its SYN/ACK, own ISN
                s_batch += stream(10000 + f, piece, sec_sizes, p_isn, sec_look, syn=False, start=k)
            else:
                s_batch += stream(10000 + f, piece, sec_sizes, s_isn, sec_look, syn=k == 0, start=k)
        nframes += len(p_batch)
        p_chunks.append(encode_frames(p_batch))
        s_chunks.append(encode_frames(s_batch))
    return p_chunks, s_chunks, nframes


_WORKLOADS: dict[tuple[str, int, int], tuple[list[bytes], list[bytes], int]] = {}


def cached_workload(kind: str, frames_target: int, flows: int) -> tuple[list[bytes], list[bytes], int]:
    """Build once in the parent; forked generators share the pages instead of rebuilding."""
    key = (kind, frames_target, flows)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = build_workload(kind, frames_target, flows)
    return _WORKLOADS[key]


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    s.connect(path)
    return s


def _harness_process() -> None:
    """The generator and the sink are measuring tools: no garbage collector in them.  The sink keeps
    one tuple per latency sample; with the collector on, its full collections over hundreds of
    thousands of them paused it for milliseconds, and every frame it had not yet read counted that
    as latency (p99 at 220k frames/s: 4.9-20 ms with it, 0.95-2.3 ms without, the service unchanged)."""
    gc.disable()


def _generator(paths: dict[str, str], spec: dict[str, Any], conn: Any) -> None:
    """Child process: build the frames, connect, wait for go, send; report the start time."""
    _harness_process()
    if spec["kind"] == "latency":
        _latency_generator(paths, spec, conn)
        return
    if spec["kind"] == "divergence":
        p_chunks, s_chunks, nframes = build_divergence(spec["flows"])
    else:
        p_chunks, s_chunks, nframes = cached_workload(spec["kind"], spec["frames"], spec["flows"])
    psock, ssock = _connect(paths["primary"]), _connect(paths["secondary"])
    pbytes = sum(map(len, p_chunks))
    s_frames = sum(len(FrameDecoder().feed(c)) for c in s_chunks) if spec["kind"] == "divergence" else 0
    conn.send({"frames": nframes, "bytes": pbytes - 4 * nframes, "secondary_frames": s_frames})
    conn.recv()  # go
    cpu0 = time.process_time()
    start = time.monotonic()
    for i in range(max(len(p_chunks), len(s_chunks))):
        if i < len(s_chunks) and spec.get("secondary_first"):
            ssock.sendall(s_chunks[i])
        if i < len(p_chunks):
            psock.sendall(p_chunks[i])
        if i < len(s_chunks) and not spec.get("secondary_first"):
            ssock.sendall(s_chunks[i])
    conn.send({"start": start, "end": time.monotonic(), "cpu": time.process_time() - cpu0})
    conn.recv()  # keep the connections open until told
    psock.close()
    ssock.close()


def _latency_generator(paths: dict[str, str], spec: dict[str, Any], conn: Any) -> None:
    """Paced COLO traffic: bursts of ``burst`` segments on each of ``flows`` flows.

    Every burst is prebuilt (its index in the first 8 payload bytes of each primary segment) so
    the clock measures the service, not frame building; the send time of a burst is taken when
    both sides' frames are handed to the kernel.
    """
    rate = spec["rate"]  # primary frames per second
    burst, flows, seg = 2, 4, 1448
    nbursts = max(1, spec["frames"] // (burst * flows))
    offsets = [0] * flows
    bursts: list[tuple[bytes, bytes]] = []
    syn_p = encode_frames([tcp_frame(20000 + f, 40001, 5 + f, 1, SYN | ACK, b"", PRIMARY_LOOK, 0)
                           for f in range(flows)])  # fmt: skip
    syn_s = encode_frames([tcp_frame(20000 + f, 40001, 9_000 + f, 1, SYN | ACK, b"", PLAIN_SECONDARY_LOOK, 0)
                           for f in range(flows)])  # fmt: skip
    filler = payload_bytes(seg * burst, 3)
    for index in range(nbursts):
        p_frames: list[bytes] = []
        s_frames: list[bytes] = []
        data = bytearray(filler)
        for k in range(burst):
            struct.pack_into("!Q", data, k * seg, index)
        data_b = bytes(data)
        for f in range(flows):
            p_frames += stream(20000 + f, data_b, [seg], 5 + f, PRIMARY_LOOK, syn=False, start=offsets[f])
            s_frames += stream(20000 + f, data_b, [1000, 1448, 448], 9_000 + f, PLAIN_SECONDARY_LOOK,
                               syn=False, start=offsets[f])  # fmt: skip
            offsets[f] += len(data_b)
        bursts.append((encode_frames(p_frames), encode_frames(s_frames)))
    psock, ssock = _connect(paths["primary"]), _connect(paths["secondary"])
    conn.send({"frames": nbursts * burst * flows + flows, "bytes": 0, "secondary_frames": 0})
    conn.recv()
    cpu0 = time.process_time()
    psock.sendall(syn_p)
    ssock.sendall(syn_s)
    start = time.monotonic()
    interval = burst * flows / rate
    next_at = start + 0.05
    sent_ns: list[int] = []
    for p_data, s_data in bursts:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += interval
        psock.sendall(p_data)
        ssock.sendall(s_data)
        sent_ns.append(time.monotonic_ns())
    conn.send(
        {"start": start, "end": time.monotonic(), "sent_ns": sent_ns, "cpu": time.process_time() - cpu0}
    )
    conn.recv()
    psock.close()
    ssock.close()


#: a sleep that overran by this much was the machine's doing (see _stall_meter)
STALL_NS = 10_000_000


def _stall_meter(stop: Any, conn: Any) -> None:
    """Child process: the intervals in which the machine itself stopped a process that only sleeps.

    Why: on a shared virtual machine a whole guest is sometimes descheduled for tens of ms; a run
    of the latency scenario that catches one reports that pause as its p99, for the relay as much
    as for the comparator.  This process sleeps 0.5 ms at a time and records every wakeup that came
    more than ``STALL_NS`` late.  A process that sleeps is woken ahead of busy ones, so a delay that
    long is not the 2-3 busy processes of the run competing for 2 cores.
    """
    stalls: list[tuple[int, int]] = []
    prev = time.monotonic_ns()
    while not stop.is_set():
        time.sleep(0.0005)
        now = time.monotonic_ns()
        if now - prev > STALL_NS:
            stalls.append((prev, now))
        prev = now
    conn.send(stalls)


def split_by_stalls(samples: list[tuple[int, int]], stalls: list[tuple[int, int]]) -> tuple[list[int], int]:
    """(latencies of the (sent, arrived) samples that overlap no stall, how many did)."""
    outside: list[int] = []
    hit = 0
    for sent, arrived in samples:
        if any(sent < end and arrived > start for start, end in stalls):
            hit += 1
        else:
            outside.append(arrived - sent)
    return outside, hit


def build_divergence(flows: int) -> tuple[list[bytes], list[bytes], int]:
    p_frames: list[bytes] = []
    s_frames: list[bytes] = []
    for f in range(flows):
        data = payload_bytes(8 * 1448, f)
        bad = bytearray(data)
        bad[len(data) - 1 - f % 1000] ^= 0x5A  # in the last segment: nothing follows it on the flow
        p_frames += stream(30000 + f, data, [1448], 11 + f, PRIMARY_LOOK)
        s_frames += stream(30000 + f, bytes(bad), [1000, 1448], 70_000 + f, PLAIN_SECONDARY_LOOK)
    return [encode_frames(p_frames)], [encode_frames(s_frames)], len(p_frames)


def _sink(path: str, expect_frames: int, decode: bool, conn: Any) -> None:
    """Child process: read released frames; count them (and stamp latencies when ``decode``)."""
    _harness_process()
    s = _connect(path)
    cpu0 = time.process_time()  # waiting for frames costs none
    conn.send("connected")
    decoder = FrameDecoder()
    frames = 0
    first = last = 0.0
    arrivals: list[tuple[int, int]] = []
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    pending = 0  # bytes of a record cut by the previous read (count-only mode)
    s.settimeout(30)
    try:
        while frames < expect_frames:
            if decode:
                data = s.recv(1 << 20)
                if not data:
                    break
                now = time.monotonic_ns()
                for frame in decoder.feed(data):
                    frames += 1
                    if len(frame) > 62:
                        (index,) = struct.unpack_from("!Q", frame, 54)
                        arrivals.append((index, now))
            else:
                n = s.recv_into(view[pending:])
                if not n:
                    break
                end = pending + n
                pos = 0
                while end - pos >= 4:
                    (length,) = struct.unpack_from("!I", buf, pos)
                    if end - pos < 4 + length:
                        break
                    pos += 4 + length
                    frames += 1
                buf[0 : end - pos] = buf[pos:end]
                pending = end - pos
            last = time.monotonic()
            if not first:
                first = last
    except TimeoutError:
        pass
    cpu = time.process_time() - cpu0
    conn.send({"frames": frames, "first": first, "last": last, "arrivals": arrivals, "cpu": cpu})
    s.close()


class Service:
    """The comparator or the relay as a child process, plus a control connection."""

    def __init__(self, workdir: Path, relay: bool, extra: list[str]) -> None:
        self.paths = {r: str(workdir / f"{r}.sock") for r in ("primary", "secondary", "out", "control")}
        prog = [sys.executable, "-m", "colo_compare.relay"] if relay else [
            *hybridft_command(), "compare", "serve"]  # fmt: skip
        cmd = [*prog, "--primary-in", f"unix:{self.paths['primary']}", "--secondary-in",
               f"unix:{self.paths['secondary']}", "--out", f"unix:{self.paths['out']}", "--control",
               f"unix:{self.paths['control']}", "--log-level", "warning", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            raise click.ClickException("the service under test did not start")
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctl.connect(self.paths["control"])
        self._ctl_file = self._ctl.makefile("rb")

    def ctl(self, verb: str, **args: Any) -> dict[str, Any]:
        self._ctl.sendall(encode_request(verb, args))
        return decode_reply(self._ctl_file.readline())

    def close(self) -> None:
        self._ctl_file.close()
        self._ctl.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def _service(relay: bool, extra: list[str]) -> Iterator[Service]:
    with tempfile.TemporaryDirectory(prefix="hybridft-bench-") as tmp:
        svc = Service(Path(tmp), relay, extra)
        try:
            yield svc
        finally:
            svc.close()


def run_end_to_end(
    relay: bool,
    spec: dict[str, Any],
    extra: list[str] = (),  # type: ignore[assignment]
    daemon: Callable[[Service, Callable[[], bool], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One scenario through one service: returns frames/s, Mbit/s, latencies, the service's stats."""
    ctx = mp.get_context("fork")
    with _service(relay, list(extra)) as svc:
        gen_conn, gen_child = ctx.Pipe()
        gen = ctx.Process(target=_generator, args=(svc.paths, spec, gen_child), daemon=True)
        gen.start()
        meta = gen_conn.recv()  # built and connected
        sink_conn, sink_child = ctx.Pipe()
        decode = spec["kind"] == "latency"
        sink_args = (svc.paths["out"], meta["frames"], decode, sink_child)
        sink = ctx.Process(target=_sink, args=sink_args, daemon=True)
        sink.start()
        sink_conn.recv()
        _wait_connected(svc)
        meter = None
        if decode:
            stop, (meter_conn, meter_child) = ctx.Event(), ctx.Pipe()
            meter = ctx.Process(target=_stall_meter, args=(stop, meter_child), daemon=True)
            meter.start()
        cpu_start, cpu_wall_start = cpu_seconds(svc.proc.pid), time.monotonic()
        gen_conn.send("go")
        if daemon is not None:
            daemon(svc, lambda: sink_conn.poll(), meta)
        result = sink_conn.recv()
        cpu_used = cpu_seconds(svc.proc.pid) - cpu_start
        cpu_window = max(time.monotonic() - cpu_wall_start, 1e-9)
        timing = gen_conn.recv()
        # the generator's and the sink's CPU over the run, as each measured its own
        harness_used = timing["cpu"] + result["cpu"]
        stalls: list[tuple[int, int]] = []
        if meter is not None:
            stop.set()
            stalls = meter_conn.recv()
            meter.join(10)
        stats = svc.ctl("stats")
        gen_conn.send("done")
        gen.join(10)
        sink.join(10)
    elapsed = max(result["last"] - timing["start"], 1e-9)
    out: dict[str, Any] = {
        "frames": result["frames"],
        "expected_frames": meta["frames"],
        "seconds": round(elapsed, 4),
        "frames_per_s": round(result["frames"] / elapsed),
        "mbit_per_s": round(meta["bytes"] * 8 / elapsed / 1e6, 1) if meta["bytes"] else None,
        "divergences": stats["core"].get("divergences", 0),
        "timeouts": stats["core"].get("timeouts", 0),
        "checkpoints": stats["core"].get("checkpoints", 0),
        "framing_errors": sum(stats["transport"]["framing_errors"].values()),
        "service_hold_p50_us": stats["transport"]["hold_us"].get("p50"),
        "service_hold_p99_us": stats["transport"]["hold_us"].get("p99"),
        # the service's CPU per primary frame over the run: whether it was saturated (a paced run
        # whose service needs more than 1 s of CPU per second queues, whatever its bulk rate)
        "service_cpu_us_per_frame": round(cpu_used / max(result["frames"], 1) * 1e6, 2),
        # over the interval the CPU was read across (from "go" to the sink's last frame), which is
        # longer than the generator's clock above
        "service_cpu_share": round(cpu_used / cpu_window, 3),
        "service_cpu_window_s": round(cpu_window, 4),
        # what the generator and the sink took of the same 2 cores: near 2 with the service's, every
        # process waits for a core and latency measures that sharing, not the service
        "harness_cpu_share": round(harness_used / cpu_window, 3),
    }
    sent_ns = timing.get("sent_ns", [])
    samples = [(sent_ns[i], t) for i, t in result["arrivals"] if i < len(sent_ns)]
    lat_ns = [arrived - sent for sent, arrived in samples]
    p50_ns, p99_ns = percentile(lat_ns, 0.5), percentile(lat_ns, 0.99)
    if p50_ns is not None and p99_ns is not None:
        out["latency_p50_us"] = round(p50_ns / 1e3, 1)
        out["latency_p99_us"] = round(p99_ns / 1e3, 1)
        out["latency_samples"] = len(lat_ns)
        # the same, leaving out the samples in flight while the machine stalled (both are reported)
        outside, hit = split_by_stalls(samples, stalls)
        p99_outside = percentile(outside, 0.99)
        out["machine_stalls"] = len(stalls)
        out["machine_stall_max_ms"] = round(max((b - a for a, b in stalls), default=0) / 1e6, 1)
        out["latency_samples_in_stalls"] = hit
        out["latency_p99_outside_stalls_us"] = None if p99_outside is None else round(p99_outside / 1e3, 1)
    return out


def _wait_connected(svc: Service) -> None:
    deadline = time.monotonic() + 10
    while True:
        connected = svc.ctl("stats")["transport"]["connected"]
        if all(connected.values()):
            return
        if time.monotonic() > deadline:
            raise click.ClickException(f"generator/sink never connected: {connected}")
        time.sleep(0.01)


def checkpoint_on_request(svc: Service, finished: Callable[[], bool], meta: dict[str, Any]) -> None:
    """The daemon's loop in miniature: wait for a request, seal, commit.

    The synthetic secondary cannot "restore" a checkpoint (a real one resumes from the primary's
    state), so the first checkpoint waits until both sides' frames were all read.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        core = svc.ctl("stats")["core"]
        if core["primary_frames"] >= meta["frames"] and core["secondary_frames"] >= meta["secondary_frames"]:
            break
        time.sleep(0.005)
    while not finished():
        reply = svc.ctl("next-request", timeout=0.05)
        if reply["request"] is not None:
            epoch = svc.ctl("seal")["epoch"]
            svc.ctl("commit", epoch=epoch)


def checkpoint_every(epoch_ms: float) -> Callable[[Service, Callable[[], bool], dict[str, Any]], None]:
    def loop(svc: Service, finished: Callable[[], bool], meta: dict[str, Any]) -> None:
        while not finished():
            time.sleep(epoch_ms / 1000)
            epoch = svc.ctl("seal")["epoch"]
            svc.ctl("commit", epoch=epoch)

    return loop


def core_mc_throughput(frames_total: int) -> dict[str, Any]:
    """The sans-I/O core alone in MC mode, shadow comparison on (the default): the ``mc-bulk``
    workload's batches, a seal and a commit every 32 batches (16k primary frames).

    Until this session it fed the same 256 frames over and over: every batch after the first was a
    retransmission to the shadow, which in the default shadowed MC mode measured its out-of-order
    path (0.35M frames/s here), not the core's work on a stream (module docstring of
    ``build_workload``)."""
    from colo_compare.core import Comparator
    from colo_compare.transport import FrameDecoder as _D
    from hybridft_common.vocabulary import Mode

    p_chunks, s_chunks, n = build_workload("mc-bulk", frames_total, 8)
    dec_p, dec_s = _D(), _D()
    p = [dec_p.feed(c) for c in p_chunks]
    s = [dec_s.feed(c) for c in s_chunks]
    core = Comparator(Mode.MC)
    released = 0
    start = time.perf_counter()
    for i in range(len(p)):
        core.feed_primary(p[i], 0.0)
        core.feed_secondary(s[i], 0.0)
        if i % 32 == 31 or i == len(p) - 1:
            for action in core.commit(core.seal()):
                released += len(getattr(action, "frames", ()))
    elapsed = time.perf_counter() - start
    return {
        "frames": n,
        "released": released,
        "seconds": round(elapsed, 4),
        "frames_per_s": round(n / elapsed),
    }


def core_colo_throughput(frames_total: int) -> dict[str, Any]:
    """The core alone in COLO mode, bulk TCP with different segmentation per side."""
    from colo_compare.core import Comparator
    from colo_compare.transport import FrameDecoder as _D
    from hybridft_common.vocabulary import Mode

    p_chunks, s_chunks, n = build_workload("bulk", frames_total, 8)
    dec_p, dec_s = _D(), _D()
    p = [dec_p.feed(c) for c in p_chunks]
    s = [dec_s.feed(c) for c in s_chunks]
    core = Comparator(Mode.COLO)
    released = 0
    start = time.perf_counter()
    for i in range(max(len(p), len(s))):
        for batch, feed in ((p, core.feed_primary), (s, core.feed_secondary)):
            if i < len(batch):
                for action in feed(batch[i], 0.0):
                    frames_out = getattr(action, "frames", None)
                    if frames_out is not None:
                        released += len(frames_out)
    elapsed = time.perf_counter() - start
    return {
        "frames": n,
        "released": released,
        "seconds": round(elapsed, 4),
        "frames_per_s": round(n / elapsed),
    }


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

GOALS = {
    "frames_per_s": 250_000,
    "mbit_per_s": 1500,
    "ratio_to_relay": 0.5,
    "latency_p50_over_relay_us": 100,
    "latency_p99_us": 1000,
    "mc_core_frames_per_s": 1_000_000,
}


def run_bench(quick: bool, epoch_ms: float) -> dict[str, Any]:
    scale = 0.05 if quick else 1.0
    sizes = {"bulk": int(400_000 * scale), "rpc": int(300_000 * scale), "noise": int(300_000 * scale)}
    scenarios: dict[str, Any] = {}
    for kind, frames in sizes.items():
        spec = {"kind": kind, "frames": frames, "flows": 8 if kind != "rpc" else 64}
        cached_workload(kind, frames, spec["flows"])
        relay = run_end_to_end(True, spec)
        comp = run_end_to_end(False, spec)
        comp["ratio_to_relay"] = ratio(comp["frames_per_s"], max(relay["frames_per_s"], 1))
        scenarios[kind] = {"comparator": comp, "relay": relay}

    # injected divergences: every one detected, every primary frame delivered
    div_flows = 10 if quick else 50
    div = run_end_to_end(False, {"kind": "divergence", "flows": div_flows, "secondary_first": True},
                         daemon=checkpoint_on_request)  # fmt: skip
    div["injected"] = div_flows
    div["detected"] = div["divergences"]
    scenarios["divergence"] = {"comparator": div}

    # MC mode end to end, checkpoint every epoch_ms
    mc_spec = {"kind": "mc-bulk", "frames": sizes["bulk"], "flows": 8}
    mc = run_end_to_end(False, mc_spec, ["--mode", "mc"], daemon=checkpoint_every(epoch_ms))
    mc_relay = scenarios["bulk"]["relay"]
    mc["ratio_to_relay"] = ratio(mc["frames_per_s"], max(mc_relay["frames_per_s"], 1))
    scenarios["mc"] = {"comparator": mc, "relay": mc_relay}
    _WORKLOADS.clear()

    # hold latency at 50 % of the comparator's bulk throughput (same rate for the relay)
    rate = max(1000, scenarios["bulk"]["comparator"]["frames_per_s"] // 2)
    lat_frames = int(min(rate * (0.5 if quick else 4), 200_000))
    lat_spec = {"kind": "latency", "frames": lat_frames, "rate": rate}
    lat_comp = run_end_to_end(False, lat_spec)
    lat_relay = run_end_to_end(True, lat_spec)
    if lat_comp.get("latency_p50_us") is not None and lat_relay.get("latency_p50_us") is not None:
        lat_comp["p50_over_relay_us"] = round(lat_comp["latency_p50_us"] - lat_relay["latency_p50_us"], 1)
    scenarios["latency"] = {"comparator": lat_comp, "relay": lat_relay, "rate_frames_per_s": rate}

    core = {
        "mc_core": core_mc_throughput(int(200_000 * scale) or 20_000),
        "colo_core": core_colo_throughput(int(200_000 * scale)),
    }
    clean = ("bulk", "rpc", "noise", "latency")
    compared = sum(scenarios[k]["comparator"]["frames"] for k in clean)
    false_miscompares = sum(scenarios[k]["comparator"]["divergences"] for k in clean)
    return {
        "quick": quick,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "scenarios": scenarios,
        "core": core,
        "false_miscompares": false_miscompares,
        "frames_compared": compared,
        "detections": {
            "injected": div_flows,
            "detected": div["detected"],
            "delivered": div["frames"],
            "expected": div["expected_frames"],
        },
        "goals": GOALS,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _stalls(r: dict[str, Any]) -> str:
    n = r.get("machine_stalls")
    if n is None:
        return "-"
    left_out = _fmt(r["latency_samples_in_stalls"])
    return f"{n} (longest {r['machine_stall_max_ms']} ms, {left_out} samples left out)"


def render_table(res: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<11} {'service':<10} {'frames':>9} {'frames/s':>10} {'Mbit/s':>9} {'x relay':>8} "
        f"{'p50 us':>8} {'p99 us':>8} {'p99 ex-st':>9} {'hold50':>8} {'hold99':>8} {'diverg.':>7} "
        f"{'ckpts':>6} {'cpu us/f':>8} {'cpu %':>6} {'gen+sink %':>10}",
    ]
    for name, sc in res["scenarios"].items():
        for who in ("comparator", "relay"):
            r = sc.get(who)
            if r is None:
                continue
            lines.append(
                f"{name:<11} {who:<10} {_fmt(r['frames']):>9} {_fmt(r['frames_per_s']):>10} "
                f"{_fmt(r.get('mbit_per_s')):>9} {_fmt(r.get('ratio_to_relay')):>8} "
                f"{_fmt(r.get('latency_p50_us')):>8} {_fmt(r.get('latency_p99_us')):>8} "
                f"{_fmt(r.get('latency_p99_outside_stalls_us')):>9} "
                f"{_fmt(r.get('service_hold_p50_us')):>8} {_fmt(r.get('service_hold_p99_us')):>8} "
                f"{_fmt(r['divergences']):>7} {_fmt(r['checkpoints']):>6} "
                f"{r['service_cpu_us_per_frame']:>8.2f} {r['service_cpu_share'] * 100:>6.0f} "
                f"{r['harness_cpu_share'] * 100:>10.0f}"
            )
    core = res["core"]
    det = res["detections"]
    lines += [
        "",
        f"core alone, MC mode:   {_fmt(core['mc_core']['frames_per_s'])} frames/s "
        f"(goal {_fmt(GOALS['mc_core_frames_per_s'])})",
        f"core alone, COLO bulk: {_fmt(core['colo_core']['frames_per_s'])} frames/s",
        f"latency load: {_fmt(res['scenarios']['latency']['rate_frames_per_s'])} frames/s "
        "(50% of the comparator's bulk rate); p50/p99 = generator send -> sink arrival, "
        "hold50/hold99 = inside the service (arrival -> release, sampled, last 8192); cpu us/f, cpu % = "
        "the service's CPU per primary frame and its share of one core over the run (10 ms CPU ticks: "
        "a run of a few ms, like divergence, reads coarse); gen+sink % = the generator's and the sink's "
        f"share, on the same {os.cpu_count()} cores",
        "p99 ex-st = p99 of the samples in flight during no machine stall (a sleeping process woken "
        f"more than {STALL_NS // 1_000_000} ms late); stalls seen: comparator run "
        f"{_stalls(res['scenarios']['latency']['comparator'])}, relay run "
        f"{_stalls(res['scenarios']['latency']['relay'])}",
        f"p50 over relay: {_fmt(res['scenarios']['latency']['comparator'].get('p50_over_relay_us'))} us",
        f"false miscompares: {res['false_miscompares']} over {_fmt(res['frames_compared'])} "
        "compared primary frames",
        f"injected divergences: {det['injected']}, detected {det['detected']}, "
        f"primary frames delivered {_fmt(det['delivered'])}/{_fmt(det['expected'])}",
        f"goals: >= {_fmt(GOALS['frames_per_s'])} frames/s and >= {_fmt(GOALS['mbit_per_s'])} Mbit/s "
        "end to end, "
        f">= {GOALS['ratio_to_relay']}x relay, p50 <= {GOALS['latency_p50_over_relay_us']} us over relay, "
        f"p99 <= {GOALS['latency_p99_us']} us",
    ]
    return "\n".join(lines)


@click.command("compare")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quick", is_flag=True, help="A short run (for tests): ~5% of the frames.")
@click.option("--epoch-ms", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="MC scenario: checkpoint interval.")  # fmt: skip
def bench_compare(as_json: bool, quick: bool, epoch_ms: float) -> None:
    """Comparator vs forward-only relay, end to end over real sockets.

    The generator and the sink run in their own processes; the relay is measured in the same run.
    """
    result = run_bench(quick, epoch_ms)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(render_table(result))
