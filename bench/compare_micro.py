"""A fixed, deterministic micro-benchmark of the comparator core, for instruction counting.

Why: the machine the comparator is tuned on is shared and loaded, so wall-clock numbers of the
core swing by 10x between runs.  Instruction counts do not.  This module builds a fixed workload
(prebuilt frames, batches of 64 per side, the primary and the secondary cutting the same byte
streams differently) and feeds it through :class:`colo_compare.core.Comparator`.  Run it under
callgrind twice, once with ``--setup-only``; the difference divided by the frame count is the
core's cost per frame, independent of machine load::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m bench.compare_micro bulk [--setup-only]

``python -m bench.compare_micro --callgrind`` does exactly that for every workload and prints
instructions per primary frame (one primary frame comes with about one secondary frame).
Without ``--callgrind`` it prints wall-clock frames/s (noisy; for a quick look only).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

from bench.frames import (
    PLAIN_SECONDARY_LOOK,
    PRIMARY_LOOK,
    payload_bytes,
    stream,
)

BATCH = 64
WORKLOADS = ("bulk", "rpc", "bursts")


def build(kind: str, frames_target: int) -> tuple[list[list[bytes]], list[list[bytes]], int]:
    """Batches of primary and secondary frames, interleaved chunk by chunk as the shell sees them.

    bulk: 8 flows, primary 1448-byte segments, secondary 1000/1448.  rpc: 64 flows, primary
    100-byte segments, secondary 100/200/100.  bursts: see :func:`_build_bursts`.  Returns
    (primary batches, secondary batches, primary frame count).
    """
    if kind == "bursts":
        return _build_bursts(frames_target)
    flows = 8 if kind == "bulk" else 64
    seg = 1448 if kind == "bulk" else 100
    sec_sizes = [1000, 1448] if kind == "bulk" else [seg, 2 * seg, seg]
    per_flow = max(1, frames_target // flows)
    datas = [payload_bytes(per_flow * seg, f) for f in range(flows)]
    p_frames: list[bytes] = []
    s_frames: list[bytes] = []
    # flows are interleaved in runs of 16 segments (a burst per flow), like a NIC queue would
    run = 16 * seg
    for k in range(0, per_flow * seg, run):
        for f, data in enumerate(datas):
            piece = data[k : k + run]
            p_frames += stream(10000 + f, piece, [seg], 1000 * f + 5, PRIMARY_LOOK, syn=k == 0, start=k)
            s_frames += stream(10000 + f, piece, sec_sizes, 7_000_000 + 3 * f, PLAIN_SECONDARY_LOOK,
                               syn=k == 0, start=k)  # fmt: skip
    p_batches = [p_frames[i : i + BATCH] for i in range(0, len(p_frames), BATCH)]
    s_batches = [s_frames[i : i + BATCH] for i in range(0, len(s_frames), BATCH)]
    return p_batches, s_batches, len(p_frames)


def _build_bursts(frames_target: int) -> tuple[list[list[bytes]], list[list[bytes]], int]:
    """The pattern of ``bench compare``'s latency scenario: 4 flows, each burst 2 segments of 1448
    bytes per flow on the primary and 1000/1448/448 on the secondary, one burst per batch (a paced
    sender: each read finds one burst).  Short runs per flow: the per-run cost, not the per-byte."""
    flows, burst, seg = 4, 2, 1448
    nbursts = max(1, frames_target // (flows * burst))
    data = payload_bytes(nbursts * burst * seg, 7)
    p_batches: list[list[bytes]] = []
    s_batches: list[list[bytes]] = []
    size = burst * seg
    for b in range(nbursts):
        piece = data[b * size : (b + 1) * size]
        p: list[bytes] = []
        s: list[bytes] = []
        for f in range(flows):
            p += stream(10000 + f, piece, [seg], 1000 * f + 5, PRIMARY_LOOK, syn=b == 0, start=b * size)
            s += stream(10000 + f, piece, [1000, 1448, 448], 7_000_000 + 3 * f, PLAIN_SECONDARY_LOOK,
                        syn=b == 0, start=b * size)  # fmt: skip
        p_batches.append(p)
        s_batches.append(s)
    return p_batches, s_batches, sum(map(len, p_batches))


def run(kind: str, frames_target: int, setup_only: bool) -> dict[str, object]:
    from colo_compare.core import Comparator, Release
    from hybridft_common.vocabulary import Mode

    p_batches, s_batches, nframes = build(kind, frames_target)
    core = Comparator(Mode.COLO)
    released = 0
    start = time.perf_counter()
    if not setup_only:
        feed_p, feed_s = core.feed_primary, core.feed_secondary
        for i in range(max(len(p_batches), len(s_batches))):
            if i < len(p_batches):
                for action in feed_p(p_batches[i], 0.0):
                    if type(action) is Release:
                        released += len(action.frames)
            if i < len(s_batches):
                for action in feed_s(s_batches[i], 0.0):
                    if type(action) is Release:
                        released += len(action.frames)
        stats = core.stats()
        if released != nframes or stats["divergences"]:
            raise SystemExit(f"{kind}: released {released}/{nframes}, divergences {stats['divergences']}")
    elapsed = time.perf_counter() - start
    return {"workload": kind, "frames": nframes, "released": released, "seconds": round(elapsed, 4),
            "frames_per_s": round(nframes / elapsed) if elapsed and not setup_only else None}  # fmt: skip


def callgrind_instructions(kind: str, frames_target: int, setup_only: bool) -> int:
    """Total instructions (Ir) of one run under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
           "bench.compare_micro", kind, "--frames", str(frames_target)]  # fmt: skip
    if setup_only:
        cmd.append("--setup-only")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in callgrind output:\n{done.stderr[-2000:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compare_micro", description=__doc__.split("\n")[0])
    ap.add_argument("workload", nargs="?", choices=WORKLOADS)
    ap.add_argument("--frames", type=int, default=20_000, help="primary frames per workload")
    ap.add_argument("--setup-only", action="store_true", help="build the frames, feed nothing")
    ap.add_argument("--callgrind", action="store_true", help="instructions per frame via callgrind")
    args = ap.parse_args(argv)
    kinds = [args.workload] if args.workload else list(WORKLOADS)
    if args.callgrind:
        for kind in kinds:
            base = callgrind_instructions(kind, args.frames, True)
            full = callgrind_instructions(kind, args.frames, False)
            nframes = build(kind, args.frames)[2]
            print(json.dumps({"workload": kind, "frames": nframes, "instructions": full - base,
                              "instructions_per_frame": round((full - base) / nframes)}))  # fmt: skip
        return
    for kind in kinds:
        print(json.dumps(run(kind, args.frames, args.setup_only)))


if __name__ == "__main__":
    main()
