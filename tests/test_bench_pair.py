"""``hybridft bench pair --quick`` end to end on real pairs (``pair up``), as a subprocess.

The benchmark checks every downloaded byte and echo itself (it fails on a mismatch); this test checks
that every section produced measurements with their same-run baselines, that the failover was
timed, and that no pair is left behind.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.pair import render_table
from hybridft_common.cli import hybridft_command
from mc_driver.netns import list_namespaces
from mc_driver.pair import PairFiles

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.netns]


def test_quick_bench_reports_every_section_with_baselines(tmp_path: Path) -> None:
    cmd = [*hybridft_command(),
           "bench", "pair", "--quick", "--json", "--kills", "1", "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for key in ("pause_idle", "pause_dirty"):
        pause = result[key]
        assert pause["daemon"]["n"] > 0 and pause["qemu_timer"]["n"] > 0, pause
        assert pause["p50_ratio"] is not None and pause["p50_ratio"] > 0
    idle = result["pause_idle"]
    # where the daemon's pause goes, step by step: QEMU stops the VMs (patch 0005, picked on this build)...
    assert idle["stop_via"] == "qemu"
    steps = idle["daemon_steps_p50_ms"]
    assert {"expect-seal", "fire", "stopped", "compare-seal", "disk-seal", "sealed"} <= set(steps), steps
    # ...beside the daemon stopping them with QMP, as with stock QEMU, in the same run
    qmp = idle["daemon_stop_via_qmp"]
    assert qmp["n"] > 0 and qmp["p50_ratio"] > 0
    assert {"stop-primary", "stop-secondary", "compare-seal", "disk-seal", "fire"} <= set(qmp["steps_p50_ms"])
    assert idle["daemon_passive_secondary"]["n"] > 0
    assert set(idle["secondary_cpu_percent"]) == {"active", "passive"}
    traffic = result["traffic"]
    # unreplicated+cpu: the unreplicated guest beside a stand-in burning the secondary's CPU share
    assert set(traffic) == {"mc 20 ms", "mc 100 ms", "colo", "unreplicated", "unreplicated+cpu"}
    for mode, row in traffic.items():
        assert row["http"]["n"] == 1 and row["http"]["mb_s"] > 0, mode
        assert row["echo_ms"]["n"] == 20 and row["echo_ms"]["p50"] > 0, mode
        cpu = row["http_cpu_percent"]  # what each process used during the downloads
        assert {"primary", "compare", "disk", "daemon", "bench client"} <= set(cpu), (mode, cpu)
        assert cpu["primary"] > 0, (mode, cpu)
    assert traffic["colo"]["http_cpu_percent"]["secondary"] > 0
    assert traffic["unreplicated"]["http_cpu_percent"].get("secondary", 0) == 0  # killed
    assert traffic["unreplicated"]["http_ratio"] == 1.0
    assert result["colo_divergences"]["httpd"]["minutes"] > 0  # quick: the COLO traffic above only
    assert result["daemon_status"]["checkpoints"]["failed"] == 0
    failover = result["failover"]
    assert failover["errors"] == [] and failover["served_ms"]["n"] == 1, failover
    text = render_table(result)
    assert "daemon/QEMU ratio" in text and "failover over 1 kill" in text
    assert "daemon, stop via qmp" in text and "QEMU timer (baseline)" in text
    left = set(list_namespaces())
    for workdir in (tmp_path / "main", tmp_path / "failover-0"):
        assert PairFiles(workdir.resolve()).netns not in left
