"""``hybridft bench disk --quick --json`` runs end to end (qemu-nbd baseline included) and has its shape.

The numbers of a quick run are not meaningful; speed goals live in the full benchmark, not here.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.disk import render_table

HYBRIDFT = str(Path(sys.executable).with_name("hybridft"))

pytestmark = pytest.mark.qemu


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="hbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bench_disk_quick_json_shape(short_tmp: Path) -> None:
    tmp_path = short_tmp
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd (the baseline) is not installed")
    result = subprocess.run(
        [HYBRIDFT, "bench", "disk", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["quick"] is True
    assert set(data["workloads"]) == {
        "randwrite_4k_qd1",
        "randwrite_4k_qd16",
        "seqwrite_1m_qd4",
        "randread_4k_qd16",
    }
    for name, row in data["workloads"].items():
        for side in ("hybridft", "hybridft_sustained", "qemu_nbd"):
            run = row[side]
            assert run["errors"] == 0, (name, side)
            assert run["ops"] > 0 and run["iops"] > 0 and run["mb_s"] > 0
            assert run["lat_p50_us"] <= run["lat_p99_us"]
        assert math.isclose(row["ratio"], row["hybridft"]["iops"] / row["qemu_nbd"]["iops"])
        sustained = row["hybridft_sustained"]
        assert math.isclose(row["ratio_sustained"], sustained["iops"] / row["qemu_nbd"]["iops"])
        assert row["hybridft_sustained"]["checkpoints"] >= 0
    commit = data["commit"]
    assert commit["hybridft"]["epochs"] == commit["fdatasync_4mb"]["epochs"] > 0
    assert 0 < commit["hybridft"]["commit_p50_ms"] <= commit["hybridft"]["commit_p99_ms"]
    writeout = data["writeout"]
    assert writeout["commits"] > 0 and writeout["achieved_mb_s"] > 0
    assert set(data["goals"]) and all(isinstance(v, bool) for v in data["goals"].values())
    table = render_table(data)
    assert "randwrite_4k_qd16" in table and "goals:" in table
    assert list(tmp_path.iterdir()) == []  # the temporary image and sockets were removed
