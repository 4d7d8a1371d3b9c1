"""``hybridft bench disk --quick --json`` runs end to end (qemu-nbd baseline included) and has its shape.

The numbers of a quick run are not meaningful; speed goals live in the full benchmark, not here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.disk import render_table
from hybridft_common.cli import hybridft_command

RESULT_FIELDS = {
    "quick",
    "region_bytes",
    "epoch_ms",
    "rounds",
    "client",
    "poll_us",
    "busy_poll",
    "workloads",
    "commit",
    "writeout",
    "goals",
}
#: the fields every client run reports (the worker's JSON plus the rounds it is the median of)
RUN_FIELDS = {"ops", "errors", "seconds", "iops", "mb_s", "lat_p50_us", "lat_p99_us", "rounds_iops",
              "server_cpu_us_per_op", "client_cpu_us_per_op", "flushes"}  # fmt: skip

pytestmark = pytest.mark.qemu


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="hbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("client", ["fio", "libnbd"])
def test_bench_disk_quick_json_shape(short_tmp: Path, client: str) -> None:
    """Both clients: fio's libnbd engine (the default, installed by ``make setup``) and Python libnbd."""
    tmp_path = short_tmp
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd (the baseline) is not installed")
    if client == "fio" and shutil.which("fio") is None:
        pytest.fail("fio (the default benchmark client) is not installed: run make setup")
    # a minimal environment, but the tree under test: PYTHONPATH (if any) is what selects it
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    result = subprocess.run(
        hybridft_command("bench", "disk", "--quick", "--json", "--client", client),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == RESULT_FIELDS
    assert data["quick"] is True
    assert (data["region_bytes"], data["epoch_ms"], data["rounds"]) == (64 << 20, 100, 1)
    assert data["client"] == client
    # the servers spun for the next request by default, and said so (a quick run's QD1 workload
    # alone answers hundreds of requests one at a time)
    assert data["poll_us"] == 50
    for side in ("burst", "sustained"):
        polls = data["busy_poll"][side]
        assert polls["window_us"] == 50 and polls["polls"] > 0 and 0 <= polls["hits"] <= polls["polls"], polls
    assert set(data["workloads"]) == {
        "randwrite_4k_qd1",
        "randwrite_4k_qd16",
        "seqwrite_1m_qd4",
        "randread_4k_qd16",
    }
    for name, row in data["workloads"].items():
        for side in ("hybridft", "hybridft_sustained", "qemu_nbd"):
            run = row[side]
            assert set(run) == RUN_FIELDS | ({"checkpoints"} if side == "hybridft_sustained" else set())
            assert run["errors"] == 0, (name, side)
            assert run["ops"] > 0 and run["iops"] > 0 and run["mb_s"] > 0
            assert math.isclose(run["iops"], run["ops"] / run["seconds"])
            assert run["rounds_iops"] == [run["iops"]]  # one round: the median is that round
            assert 0 < run["lat_p50_us"] <= run["lat_p99_us"]
            # both processes did work for the requests (CPU times tick in 10 ms: >= 0 is all a
            # short run can promise per side)
            assert run["server_cpu_us_per_op"] >= 0 and run["client_cpu_us_per_op"] > 0
        assert row["qemu_nbd"]["flushes"] == row["hybridft"]["flushes"] == 0
        if name.startswith("randread"):
            assert "qemu_nbd_durable" not in row  # nothing to make durable
        else:
            # the durable baseline: the same writes with a FLUSH after every one epoch's worth of them
            durable = row["qemu_nbd_durable"]
            assert set(durable) == RUN_FIELDS | {"flush_every"}
            assert durable["errors"] == 0 and durable["ops"] == row["qemu_nbd"]["ops"]
            # (a quick run may be shorter than one epoch: then there is nothing to flush)
            assert durable["flush_every"] >= 1
            assert (durable["flushes"] > 0) == (durable["ops"] > durable["flush_every"]), durable
            ratio_to_durable = row["hybridft_sustained"]["iops"] / durable["iops"]
            assert math.isclose(row["ratio_sustained_to_durable"], ratio_to_durable)
        assert math.isclose(row["ratio"], row["hybridft"]["iops"] / row["qemu_nbd"]["iops"])
        sustained = row["hybridft_sustained"]
        assert math.isclose(row["ratio_sustained"], sustained["iops"] / row["qemu_nbd"]["iops"])
    # sustained means checkpointed: the seal+commit loop ran while the client wrote (a run can be
    # shorter than one 100 ms epoch, the four together are not)
    assert sum(row["hybridft_sustained"]["checkpoints"] for row in data["workloads"].values()) > 0
    commit = data["commit"]
    assert commit["hybridft"]["epochs"] == commit["fdatasync_4mb"]["epochs"] > 0
    assert 0 < commit["hybridft"]["commit_p50_ms"] <= commit["hybridft"]["commit_p99_ms"]
    assert 0 < commit["fdatasync_4mb"]["commit_p50_ms"] <= commit["fdatasync_4mb"]["commit_p99_ms"]
    writeout = data["writeout"]
    assert writeout["commits"] > 0 and writeout["achieved_mb_s"] > 0
    assert writeout["drain_after_s"] is not None  # the write-out caught up with IMG within 60 s
    assert set(data["goals"]) and all(isinstance(v, bool) for v in data["goals"].values())
    table = render_table(data)
    assert "randwrite_4k_qd16" in table and "goals:" in table and "busy-poll burst" in table
    assert list(tmp_path.iterdir()) == []  # the temporary image and sockets were removed


def test_disk_micro_feeds_the_request_path_and_answers_every_receive() -> None:
    """``python -m bench.disk_micro``: every request of every receive executed, one reply write each."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bench.disk_micro", "--requests", "512", "--qd", "16"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    data = json.loads(result.stdout)
    assert data["requests"] == 512 and data["reply_writes"] == 512 // 16
    assert data["cpu_us_per_request"] > 0 and data["wall_us_per_request"] > 0
