"""Real QEMU clients against ``hybridft disk serve``: qemu-io, qemu-img, and qemu-storage-daemon
running ``blockdev-mirror`` (copy-mode=write-blocking, sync=none) into ``replica``.

Missing QEMU tools make these tests fail, never skip.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.helpers.disk_server import DiskServerProcess

pytestmark = pytest.mark.qemu

IMAGE_SIZE = 16 << 20


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for this test and is not installed (run scripts/setup-host.sh)")
    return path


def qemu_io(uri: str, *commands: str) -> str:
    args = [tool("qemu-io"), "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # qemu-io reports a failed command (or pattern mismatch) on stdout and still exits 0
    assert "failed" not in result.stdout and "Pattern verification" not in result.stdout, result.stdout
    return result.stdout


def qemu_img_compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", a, b],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DiskServerProcess]:
    proc = DiskServerProcess(tmp_path, size=IMAGE_SIZE)
    yield proc
    assert proc.stop() == 0, getattr(proc, "stderr", "")


def test_qemu_io_on_both_exports(server: DiskServerProcess) -> None:
    replica, view = server.uri("replica"), server.uri("view")
    qemu_io(replica, "write -P 0xab 0 1M", "write -P 0xcd 2M 64k", "write -z 3M 64k", "discard 1M 4k")
    qemu_io(replica, "read -P 0xab 0 1M", "read -P 0xcd 2M 64k", "read -P 0 1M 4k")
    qemu_io(view, "read -P 0 0 1M", "write -P 0x11 4M 64k", "read -P 0x11 4M 64k")
    epoch = server.ctl_json("seal")["epoch"]
    qemu_io(view, "read -P 0xab 0 1M", "read -P 0xcd 2M 64k", "read -P 0 4M 64k")
    server.ctl("commit", str(epoch))
    qemu_io(view, "read -P 0xab 0 1M", "read -P 0xcd 2M 64k")
    bad = subprocess.run(
        [tool("qemu-io"), "-f", "raw", "-c", f"write 0 {IMAGE_SIZE + 4096}", replica],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "failed" in bad.stdout + bad.stderr or bad.returncode != 0


def test_qemu_img_convert_into_replica_then_compare(server: DiskServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    rng = random.Random(3)
    content = bytearray(IMAGE_SIZE)
    for _ in range(200):
        offset = rng.randrange(0, IMAGE_SIZE // 4096) * 4096
        content[offset : offset + 4096] = rng.randbytes(4096)
    source.write_bytes(content)
    result = subprocess.run(
        [tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri("replica")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert qemu_img_compare(str(source), server.uri("replica")).returncode == 0
    assert qemu_img_compare(str(source), server.uri("view")).returncode == 1  # not sealed yet
    server.ctl("commit", str(server.ctl_json("seal")["epoch"]))
    assert qemu_img_compare(str(source), server.uri("view")).returncode == 0
    info = subprocess.run(
        [tool("qemu-img"), "info", "--output=json", server.uri("view")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f'"virtual-size": {IMAGE_SIZE}' in info.stdout


class StorageDaemon:
    """qemu-storage-daemon exporting a source image over NBD, with a QMP monitor."""

    def __init__(self, directory: Path, size: int) -> None:
        self.image = directory / "source.raw"
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.nbd_socket = directory / "qsd-nbd.sock"
        qmp_socket = directory / "qsd-qmp.sock"
        self.proc = subprocess.Popen(
            [
                tool("qemu-storage-daemon"),
                "--blockdev",
                f"driver=file,filename={self.image},node-name=source-file,cache.direct=off",
                "--blockdev",
                "driver=raw,file=source-file,node-name=source",
                "--nbd-server",
                f"addr.type=unix,addr.path={self.nbd_socket}",
                "--export",
                "type=nbd,id=source-export,node-name=source,name=source,writable=on",
                "--chardev",
                f"socket,id=qmp,path={qmp_socket},server=on,wait=off",
                "--monitor",
                "chardev=qmp",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not qmp_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-storage-daemon did not start: {self.proc.stderr}")
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(qmp_socket))
        self.qmp.connect()

    def uri(self) -> str:
        return f"nbd+unix:///source?socket={self.nbd_socket}"

    def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.qmp.pull_event(wait=max(0.01, deadline - time.monotonic()))
            if event is not None and event["event"] == name:
                return event
        raise AssertionError(f"no {name} event within {timeout}s")

    def close(self) -> None:
        self.qmp.close()
        self.proc.terminate()
        self.proc.wait(30)


def test_blockdev_mirror_write_blocking_into_replica(server: DiskServerProcess, tmp_path: Path) -> None:
    qsd = StorageDaemon(tmp_path, IMAGE_SIZE)
    try:
        qsd.qmp.cmd(
            "blockdev-add",
            driver="nbd",
            **{"node-name": "replica"},
            server={"type": "unix", "path": str(server.nbd_socket)},
            export="replica",
        )
        qsd.qmp.cmd(
            "blockdev-mirror",
            **{"job-id": "mirror0", "copy-mode": "write-blocking", "auto-dismiss": False},
            device="source",
            target="replica",
            sync="none",
        )
        qsd.wait_event("BLOCK_JOB_READY")
        rng = random.Random(7)
        for round_ in range(3):
            commands = []
            for _ in range(60):
                offset = rng.randrange(0, IMAGE_SIZE // 4096 - 16) * 4096
                length = rng.choice([4096, 8192, 65536])
                commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
            commands.append(f"write -z {rng.randrange(0, 64) * 65536} 65536")
            qemu_io(qsd.uri(), *commands)
            # with write-blocking mirroring every acknowledged source write is already in replica
            assert qemu_img_compare(qsd.uri(), server.uri("replica")).returncode == 0, round_
            epoch = server.ctl_json("seal")["epoch"]
            assert qemu_img_compare(qsd.uri(), server.uri("view")).returncode == 0, round_
            server.ctl("commit", str(epoch))
        jobs = qsd.qmp.cmd("query-block-jobs")
        assert isinstance(jobs, list) and jobs and jobs[0]["status"] == "ready", jobs
        assert jobs[0]["io-status"] == "ok", jobs
        qsd.qmp.cmd("block-job-cancel", device="mirror0")
        qsd.wait_event("BLOCK_JOB_COMPLETED")
        qsd.qmp.cmd("job-dismiss", id="mirror0")
        qsd.qmp.cmd("blockdev-del", **{"node-name": "replica"})
        # after a restart the replica holds exactly the committed epochs == the source
        assert server.stop() == 0
        server.start()
        assert qemu_img_compare(qsd.uri(), server.uri("replica")).returncode == 0
        with open(server.image, "rb") as replica_file, open(qsd.image, "rb") as source_file:
            server.ctl("failover")  # finishes the write-out: IMG itself must now equal the source
            assert replica_file.read() == source_file.read()
    finally:
        qsd.close()
