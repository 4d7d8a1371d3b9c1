"""Re-protection on the real pair: a new secondary after a lost secondary and after a failover, with
clients downloading and echoing throughout (every byte checked by :class:`tests.test_pair_qemu.Traffic`).

* kill -9 of the secondary -> ``pair reprotect`` with the same primary (MC) -> checkpoints -> kill -9 of
  the primary: the *new* secondary takes over, and every diskwriter record the client was told is
  durable is on its disk (so the copy and the mirroring carried everything) -> ``pair down`` leaves
  nothing;
* kill -9 of the primary -> failover -> ``pair reprotect`` whose new secondary is killed during the disk
  copy: the survivor keeps serving, ``status`` says why, the retry (COLO) succeeds, and the new replica's
  disk equals the survivor's.

After each re-protection the new secondary's RAM equals the primary's at a held checkpoint
(``hybridft verify``, patch 0007): in MC after a lost secondary, in COLO and then MC after a failover.

Longer drills (five cycles, --auto-reprotect across three failovers, timings) are ``hybridft bench
reprotect``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridft_common.cli import hybridft_command
from mc_driver.guest.expected import BLOB_SIZE, DISK_RECORD_SIZE, read_disk_records
from mc_driver.netns import NetNamespace, list_namespaces
from mc_driver.pair import down
from tests.helpers.ram_verify import ram_identical
from tests.test_pair_qemu import (
    Traffic,
    assert_nothing_left,
    daemon_status,
    hybridft,
    pair_json,
    pid_alive,
    wait_until,
)

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

UP_FIELDS = ("guest_ip", "client_netns", "primary_pid", "secondary_pid", "daemon_pid", "agent_pid",
             "disk_pid", "control", "config")  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pair"
    yield path
    down(path)
    logs = ("reprotect.json", "failover.json", "g1-agent.log", "daemon.log", "primary.log", "secondary.log")
    for name in logs:
        log = path / name
        if log.exists():
            # QEMU repeats a filter's send errors once per frame after its peer left: not news
            lines = [x for x in log.read_text(errors="replace").splitlines() if "filter mirror send" not in x]
            print(f"--- {name} (tail)\n" + "\n".join(lines[-25:]))


def status(workdir: Path) -> dict:
    proc = hybridft("status", "--workdir", str(workdir), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def read_export(endpoint: str, export: str, length: int) -> bytes:
    import nbd

    handle = nbd.NBD()
    handle.set_export_name(export)
    handle.connect_unix(endpoint.removeprefix("unix:"))
    try:
        out = bytearray()
        while len(out) < length:
            n = min(1 << 20, length - len(out))
            out += handle.pread(n, len(out))
        return bytes(out)
    finally:
        handle.shutdown()


def reprotect_json(workdir: Path, mode: str) -> dict:
    proc = hybridft("pair", "reprotect", "--workdir", str(workdir), "--mode", mode, "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    config = pair_json(workdir)
    for key in UP_FIELDS:
        assert answer[key], key
    assert answer["primary_pid"] == config["pids"]["primary"]
    assert answer["secondary_pid"] == config["pids"]["secondary"] and pid_alive(answer["secondary_pid"])
    assert answer["daemon_pid"] == config["pids"]["daemon"] and answer["agent_pid"] == config["pids"]["agent"]
    return answer


def checkpoints_advance(workdir: Path, mode: str) -> dict:
    before = status(workdir)
    assert before["state"] == "protected" and before["mode"] == mode, before
    daemon_checkpoint(workdir)  # returns once a checkpoint after this request committed
    after = status(workdir)
    assert after["checkpoints"]["committed"] > before["checkpoints"]["committed"], (before, after)
    assert after["checkpoints"]["failed"] == 0, after
    return after


def incoming_status(workdir: Path) -> str | None:
    """The new secondary's migration status (``query-migrate`` on its ops monitor), None before it runs."""
    import asyncio

    from mc_driver.qmp import QmpError, QmpSession

    record = json.loads((workdir / "reprotect.json").read_text())
    if "daemon" not in record.get("pids", {}):
        return None
    monitor = workdir / f"g{record['generation']}-secondary-ops.qmp"

    async def query() -> str | None:
        async with await QmpSession.connect(monitor, timeout=2) as session:
            return (await session.execute("query-migrate")).get("status")

    try:
        return asyncio.run(query())
    except (QmpError, OSError):
        return None


def daemon_checkpoint(workdir: Path) -> dict:
    from hybridft_common.control import call

    return call(pair_json(workdir)["daemon_control"], "checkpoint", io_timeout=60, timeout=30)


def test_lost_secondary_reprotected_with_the_same_primary_then_a_failover_to_the_new_one(
    workdir: Path,
) -> None:
    up = hybridft("pair", "up", "--workdir", str(workdir), "--mode", "mc",
                  "--guest-run", "diskwriter,/dev/vda", "--json", timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stderr
    first = pair_json(workdir)
    ns = NetNamespace(first["netns"])
    traffic = Traffic(ns, diskwriter=True).start()
    traffic.wait("a blob", lambda: len(traffic.blobs) >= 1)

    os.kill(first["pids"]["secondary"], signal.SIGKILL)
    wait_until("the daemon to report the pair unprotected", lambda: not daemon_status(workdir)["protected"])
    blobs = len(traffic.blobs)
    answer = reprotect_json(workdir, "mc")
    assert answer["primary_pid"] == first["pids"]["primary"], "the primary stays the primary"
    summary = answer["reprotect"]
    assert summary["state"] == "protected" and summary["case"] == "secondary-lost"
    assert [p["name"] for p in summary["phases"]] == [
        "prepare",
        "secondary",
        "disk-copy",
        "migration",
        "verify",
    ]
    assert summary["progress"]["bytes_done"] == summary["progress"]["bytes_total"] > 0
    assert summary["unprotected_seconds"] > 0
    new = pair_json(workdir)
    assert answer["secondary_netns"] in list_namespaces() and answer["secondary_netns"] != new["netns"]
    checkpoints_advance(workdir, "mc")
    ram_identical(workdir, "mc")
    traffic.wait("a blob downloaded across the re-protection", lambda: len(traffic.blobs) > blobs + 1)
    print(f"\nreprotect: {summary['phases']}, pause {summary['initial_migration_pause_ms']} ms")

    # the new secondary takes over: everything reported durable is on its disk
    traffic.wait("a download in flight", lambda: BLOB_SIZE // 8 < traffic.blob_progress < BLOB_SIZE // 2)
    durable_before, blobs, echoes = len(traffic.reports.durable), len(traffic.blobs), len(traffic.echo_times)
    os.kill(new["pids"]["primary"], signal.SIGKILL)
    traffic.wait("the busy echo connection after the failover", lambda: len(traffic.echo_times) > echoes)
    traffic.wait("the download in flight at the kill", lambda: len(traffic.blobs) > blobs)
    traffic.wait("new durable records", lambda: len(traffic.reports.durable) > durable_before + 5)
    traffic.finish()
    report = json.loads((workdir / "failover.json").read_text())
    assert report["errors"] == [] and report["disk"]["error"] is None, report
    reports = traffic.reports
    assert reports.run is not None and reports.durable
    disk = read_export(new["disk_nbd"], "view", max(reports.durable) * DISK_RECORD_SIZE)
    missing = sorted(set(reports.durable) - read_disk_records(disk, reports.run))
    assert not missing, (
        f"{len(missing)} reported-durable records missing on the new secondary, first {missing[:10]}"
    )

    pids = {**{f"first-{k}": v for k, v in first["pids"].items()}, **new["pids"]}
    down(workdir)
    assert_nothing_left(workdir, pids)
    assert not [n for n in list_namespaces() if n.startswith(f"{new['netns']}-s")]


def test_failover_then_a_failed_reprotection_is_retried_in_colo(workdir: Path) -> None:
    up = hybridft("pair", "up", "--workdir", str(workdir), "--mode", "mc", "--disk-mib", "1024", "--json",
                  timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stderr
    first = pair_json(workdir)
    ns = NetNamespace(first["netns"])
    traffic = Traffic(ns).start()
    traffic.wait("a blob", lambda: len(traffic.blobs) >= 1)
    os.kill(first["pids"]["primary"], signal.SIGKILL)
    wait_until("the failover", lambda: (workdir / "failover.json").exists())
    blobs = len(traffic.blobs)
    traffic.wait("a blob from the survivor", lambda: len(traffic.blobs) > blobs)

    # kill -9 of the new secondary during the disk copy
    command = hybridft_command("pair", "reprotect", "--workdir", str(workdir), "--mode", "colo")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def copying() -> bool:
        record = (
            json.loads((workdir / "reprotect.json").read_text())
            if (workdir / "reprotect.json").exists()
            else {}
        )
        return record.get("phase") == "disk-copy" and "secondary" in record.get("pids", {})

    wait_until("the disk copy", copying, timeout=120)
    victim = json.loads((workdir / "reprotect.json").read_text())["pids"]["secondary"]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    failed = status(workdir)
    assert failed["state"] == "unprotected" and failed["reprotect"]["state"] == "failed", failed
    assert "disk-copy" in failed["reprotect"]["reason"] and "secondary" in failed["reprotect"]["reason"], (
        failed
    )
    assert pid_alive(first["pids"]["secondary"]), "the survivor must keep running"
    blobs = len(traffic.blobs)
    traffic.wait("a blob from the survivor after the failed attempt", lambda: len(traffic.blobs) > blobs)

    # kill -9 of the new secondary during the initial migration
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until("the initial migration", lambda: incoming_status(workdir) == "active", timeout=180)
    os.kill(json.loads((workdir / "reprotect.json").read_text())["pids"]["secondary"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    failed = status(workdir)
    assert failed["state"] == "unprotected" and failed["reprotect"]["state"] == "failed", failed
    assert failed["reprotect"]["reason"].startswith("migration"), failed
    blobs = len(traffic.blobs)
    traffic.wait(
        "a blob from the survivor after the second failed attempt", lambda: len(traffic.blobs) > blobs
    )

    answer = reprotect_json(workdir, "colo")
    assert answer["primary_pid"] == first["pids"]["secondary"], "the survivor is the primary now"
    assert answer["reprotect"]["attempt"] == 3 and answer["reprotect"]["case"] == "failed-over"
    after = checkpoints_advance(workdir, "colo")
    ram_identical(workdir, "colo")
    blobs = len(traffic.blobs)
    traffic.wait("blobs through the comparator in COLO", lambda: len(traffic.blobs) > blobs + 1)
    # and in MC: the switch lands at the next checkpoint
    switched = hybridft("mode", "mc", "--workdir", str(workdir))
    assert switched.returncode == 0, switched.stderr
    daemon_checkpoint(workdir)
    ram_identical(workdir, "mc")
    traffic.finish()
    print(f"\nretry: {answer['reprotect']['phases']}; COLO checkpoints {after['checkpoints']}")

    # the guest writes nothing here: the replica must be byte for byte the survivor's disk
    new = pair_json(workdir)
    size = 1024 << 20
    survivor_disk = read_export(first["disk_nbd"], "view", size)
    assert read_export(new["disk_nbd"], "view", size) == survivor_disk


def healed(workdir: Path, generation: int) -> bool:
    record = workdir / "reprotect.json"
    if not record.exists():
        return False
    data = json.loads(record.read_text())
    return data["generation"] > generation and data["state"] == "protected" and status(workdir)["protected"]


def test_auto_reprotect_heals_a_failover_and_then_a_lost_secondary(workdir: Path) -> None:
    up = hybridft("pair", "up", "--workdir", str(workdir), "--mode", "mc", "--auto-reprotect", "--json",
                  timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stderr
    answer = json.loads(up.stdout.strip().splitlines()[-1])
    assert pid_alive(answer["reprotector_pid"])
    first = pair_json(workdir)
    traffic = Traffic(NetNamespace(first["netns"])).start()
    traffic.wait("a blob", lambda: len(traffic.blobs) >= 1)

    os.kill(first["pids"]["primary"], signal.SIGKILL)
    wait_until("protection again after the failover, by itself", lambda: healed(workdir, 0), timeout=180)
    second = pair_json(workdir)
    assert second["pids"]["primary"] == first["pids"]["secondary"]
    blobs = len(traffic.blobs)
    traffic.wait("a blob after the automatic re-protection", lambda: len(traffic.blobs) > blobs)

    os.kill(second["pids"]["secondary"], signal.SIGKILL)
    wait_until(
        "protection again after the lost secondary, by itself", lambda: healed(workdir, 1), timeout=180
    )
    third = pair_json(workdir)
    assert third["pids"]["primary"] == second["pids"]["primary"], "the primary stays the primary"
    checkpoints_advance(workdir, "mc")
    ram_identical(workdir, "mc")
    blobs = len(traffic.blobs)
    traffic.wait("a blob after the second automatic re-protection", lambda: len(traffic.blobs) > blobs)
    traffic.finish()
    summary = status(workdir)["reprotect"]
    print(f"\nauto: {summary['unprotected_seconds']} s unprotected the second time")
    assert summary["unprotected_seconds"] > 0

    pids = {**{f"first-{k}": v for k, v in first["pids"].items()}, **third["pids"],
            "reprotector": answer["reprotector_pid"]}  # fmt: skip
    down(workdir)
    assert_nothing_left(workdir, pids)
