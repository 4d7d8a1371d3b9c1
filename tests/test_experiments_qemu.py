"""``hybridft experiment run`` end to end on real pairs: a tiny matrix, Ctrl-C, resume, a finished rerun.

One flow, to keep the QEMU time short: run the matrix (cpu x unreplicated / MC / COLO / auto gilbert),
interrupt it with SIGINT once the first cell is recorded (exit 130, nothing of the pair left: no QEMU,
no namespace, no socket), run it again and kill it with -9 after one more cell, run it again on the
same directory (it cleans up after the killed run, continues and finishes: exit 0, cells.csv and
headline.json complete, nothing left behind), and once more (nothing runs).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

TINY = """
seconds = 3
repetitions = 1
workloads = ["cpu"]
[modes]
unreplicated = true
mc = [50]
colo = true
auto = ["gilbert"]
"""
MODES = {"unreplicated", "mc", "colo", "auto"}


def experiment(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    code = "from controller.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "experiment", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def leftovers(out: Path) -> list[str]:
    """QEMUs, namespaces and sockets of the run's pairs that still exist."""
    from mc_driver.launch import PairFiles
    from mc_driver.netns import list_namespaces

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "qemu-system" in cmdline and str(out) in cmdline:
            found.append(f"QEMU {proc.pid}")
    namespaces = set(list_namespaces())
    from experiments.runner import pair_root

    for pair_dir in pair_root(out).glob("*"):
        if PairFiles(pair_dir.resolve()).netns in namespaces:
            found.append(f"namespace of {pair_dir.name}")
        found += [str(s) for s in pair_dir.glob("*.sock")]
    return found


def wait_for_cells(out: Path, count: int, proc: subprocess.Popen[str]) -> None:
    path = out / "cells.jsonl"
    deadline = time.monotonic() + 120
    while not path.exists() or len(path.read_text().splitlines()) < count:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{count} cells not finished within 120 s"
        time.sleep(0.2)


def test_tiny_matrix_interrupted_killed_resumed_and_finished(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"

    first = experiment("run", str(config), "--out", str(out), "--no-report")
    wait_for_cells(out, 1, first)
    os.kill(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 130, output
    assert leftovers(out) == []
    done_before = len((out / "cells.jsonl").read_text().splitlines())
    assert 1 <= done_before < 4

    killed = experiment("run", str(config), "--out", str(out), "--no-report")
    wait_for_cells(out, done_before + 1, killed)
    killed.kill()  # -9: nothing tears down; the next run must
    killed.communicate(timeout=30)
    done_before = len((out / "cells.jsonl").read_text().splitlines())
    assert done_before < 4

    second = experiment("run", str(config), "--out", str(out))
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 0, output
    assert f"resuming: {done_before} of 4 cells already done" in output
    assert f"{4 - done_before} cells run now" in output
    assert leftovers(out) == []

    with (out / "cells.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["mode"] for r in rows} == MODES and len(rows) == 4
    for row in rows:
        assert row["ok"] == "True" and row["workload"] == "cpu" and row["rep"] == "1", row
        assert float(row["score"]) > 0 and float(row["normalised"]) > 0
    base = next(r for r in rows if r["mode"] == "unreplicated")
    assert float(base["normalised"]) == 1.0
    assert next(r for r in rows if r["mode"] == "mc")["epoch_ms"] == "50"
    assert float(next(r for r in rows if r["mode"] == "mc")["checkpoints_per_s"]) > 1
    assert next(r for r in rows if r["mode"] == "auto")["policy"] == "gilbert"

    headline = json.loads((out / "headline.json").read_text())
    assert len(headline) == 1 and headline[0]["workload"] == "cpu" and headline[0]["policy"] == "gilbert"
    assert headline[0]["best_static"] in ("mc-50", "colo")
    assert headline[0]["vs_oracle"] == pytest.approx(headline[0]["score"] / headline[0]["oracle_score"])
    assert (out / "score.png").exists() and (out / "report.md").exists()
    assert (out / "cells" / "cpu__auto-gilbert__rep1" / "decisions.jsonl").exists()

    third = experiment("run", str(config), "--out", str(out), "--no-report")
    output, _ = third.communicate(timeout=60)
    assert third.returncode == 0, output
    assert "0 cells run now" in output
