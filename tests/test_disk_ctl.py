"""``hybridft disk serve`` as a real process, driven by ``hybridft disk ctl`` and read with libnbd.

Also holds :class:`DiskServerProcess`, the helper the QEMU and benchmark tests use to run the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd as libnbd
import pytest

HYBRIDFT = str(Path(sys.executable).with_name("hybridft"))
IMAGE_SIZE = 16 << 20


class DiskServerProcess:
    """``hybridft disk serve`` on unix sockets under ``directory``; waits for its ready line."""

    def __init__(
        self, directory: Path, image: Path | None = None, *extra: str, size: int = IMAGE_SIZE
    ) -> None:
        self.directory = directory
        self.image = image or directory / "replica.raw"
        if not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(size)
        self.state_dir = directory / "state"
        self.nbd_socket = directory / "nbd.sock"
        self.control_socket = directory / "control.sock"
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    @property
    def control(self) -> str:
        return f"unix:{self.control_socket}"

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                HYBRIDFT,
                "disk",
                "serve",
                "--image",
                str(self.image),
                "--state-dir",
                str(self.state_dir),
                "--nbd",
                f"unix:{self.nbd_socket}",
                "--control",
                self.control,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            _out, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"disk serve did not start: {line!r} {err[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _out, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [HYBRIDFT, "disk", "ctl", "--control", self.control, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"disk ctl {args} failed: {result.stderr}")
        return result

    def ctl_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.ctl(*args, "--json").stdout)

    def connect(self, export: str) -> libnbd.NBD:
        h = libnbd.NBD()
        h.set_export_name(export)
        h.connect_unix(str(self.nbd_socket))
        return h


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DiskServerProcess]:
    proc = DiskServerProcess(tmp_path)
    yield proc
    assert proc.stop() == 0, getattr(proc, "stderr", "")


def test_seal_commit_views_through_the_cli(server: DiskServerProcess) -> None:
    replica = server.connect("replica")
    view = server.connect("view")
    base = server.ctl_json("status")
    replica.pwrite(b"\xaa" * 65536, 0)
    view.pwrite(b"\x11" * 4096, 1 << 20)  # the secondary VM's own write: an overlay
    assert replica.pread(65536, 0) == b"\xaa" * 65536
    assert view.pread(65536, 0) == bytes(65536)  # uncommitted primary writes are invisible
    assert view.pread(4096, 1 << 20) == b"\x11" * 4096
    epoch = server.ctl_json("seal")["epoch"]
    assert view.pread(65536, 0) == b"\xaa" * 65536  # view = committed + sealed epoch
    assert view.pread(4096, 1 << 20) == bytes(4096)  # with an empty overlay
    status = server.ctl_json("status")
    assert epoch in status["sealed"] or epoch == status.get("sealed")
    result = server.ctl("commit", str(epoch))
    assert result.returncode == 0
    status = server.ctl_json("status")
    assert status["committed"] == epoch and status["committed"] != base["committed"]
    text = server.ctl("status").stdout
    assert "committed" in text and not text.startswith("{")


def test_errors_are_clear_and_change_nothing(server: DiskServerProcess) -> None:
    replica = server.connect("replica")
    replica.pwrite(b"\x42" * 4096, 0)
    epoch = server.ctl_json("seal")["epoch"]
    before = server.ctl_json("status")
    for args in (("commit", str(epoch + 5)), ("commit", str(epoch - 1))):
        bad = server.ctl(*args, check=False)
        assert bad.returncode != 0 and bad.stderr.startswith("error: "), bad
        assert server.ctl_json("status") == before
    as_json = server.ctl("commit", str(epoch + 5), "--json", check=False)
    assert as_json.returncode != 0 and json.loads(as_json.stdout)["ok"] is False
    usage = server.ctl("commit", check=False)
    assert usage.returncode == 2 and "epoch" in usage.stderr
    assert server.ctl("seal", "3", check=False).returncode == 2
    server.ctl("commit", str(epoch))
    assert server.ctl_json("status")["committed"] == epoch


def test_rollback_restores_previous_view(server: DiskServerProcess) -> None:
    replica = server.connect("replica")
    view = server.connect("view")
    replica.pwrite(b"\x01" * 4096, 0)
    server.ctl("commit", str(server.ctl_json("seal")["epoch"]))
    view.pwrite(b"\x02" * 4096, 8192)  # overlay of the current view
    replica.pwrite(b"\x03" * 4096, 0)
    server.ctl_json("seal")
    assert view.pread(4096, 0) == b"\x03" * 4096
    server.ctl("rollback")
    assert view.pread(4096, 0) == b"\x01" * 4096
    assert view.pread(4096, 8192) == b"\x02" * 4096  # the previous view with its overlay


def test_failover_makes_view_a_plain_disk(server: DiskServerProcess) -> None:
    replica = server.connect("replica")
    view = server.connect("view")
    replica.pwrite(b"\x05" * 4096, 0)
    server.ctl("commit", str(server.ctl_json("seal")["epoch"]))
    replica.pwrite(b"\x06" * 4096, 4096)  # never committed: discarded by failover
    view.pwrite(b"\x07" * 4096, 8192)
    server.ctl("failover")
    view.pwrite(b"\x08" * 4096, 12288)
    view.flush()
    assert view.pread(16384, 0) == b"\x05" * 4096 + bytes(4096) + b"\x07" * 4096 + b"\x08" * 4096
    view.shutdown()
    replica.shutdown()
    assert server.stop() == 0
    with open(server.image, "rb") as f:
        assert f.read(16384) == b"\x05" * 4096 + bytes(4096) + b"\x07" * 4096 + b"\x08" * 4096
    server.start()


def test_restart_keeps_committed_and_drops_uncommitted(server: DiskServerProcess) -> None:
    replica = server.connect("replica")
    replica.pwrite(b"\x31" * 8192, 0)
    epoch = server.ctl_json("seal")["epoch"]
    server.ctl("commit", str(epoch))
    replica.pwrite(b"\x32" * 4096, 0)  # uncommitted
    replica.shutdown()
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server.start()
    replica = server.connect("replica")
    assert replica.pread(8192, 0) == b"\x31" * 8192
    assert server.ctl_json("status")["committed"] == epoch


def test_serve_rejects_bad_arguments(tmp_path: Path) -> None:
    serve = [
        HYBRIDFT,
        "disk",
        "serve",
        "--image",
        str(tmp_path / "nope.raw"),
        "--state-dir",
        str(tmp_path / "s"),
    ]
    control = f"unix:{tmp_path}/c.sock"
    missing = subprocess.run(
        [*serve, "--nbd", f"unix:{tmp_path}/n.sock", "--control", control],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "nope.raw" in missing.stderr
    bad_addr = subprocess.run(
        [*serve, "--nbd", "udp:1", "--control", f"unix:{tmp_path}/c.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_addr.returncode == 2 and "bad address" in bad_addr.stderr


def test_ctl_unreachable_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [HYBRIDFT, "disk", "ctl", "--control", f"unix:{tmp_path}/none.sock", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode != 0 and "cannot reach" in result.stderr


def test_tcp_endpoints_and_sigint(tmp_path: Path) -> None:
    image = tmp_path / "tcp.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    proc = subprocess.Popen([HYBRIDFT, "disk", "serve", "--image", str(image),
                             "--state-dir", str(tmp_path / "st"), "--nbd", "tcp:127.0.0.1:0",
                             "--control", "tcp:127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        nbd_addr = ready[1].removeprefix("nbd=")
        control = ready[2].removeprefix("control=")
        host, port = nbd_addr.removeprefix("tcp:").rsplit(":", 1)
        assert int(port) > 0 and not control.endswith(":0")
        h = libnbd.NBD()
        h.set_export_name("replica")
        h.connect_tcp(host, port)
        h.pwrite(b"\x77" * 4096, 0)
        result = subprocess.run([HYBRIDFT, "disk", "ctl", "--control", control, "seal", "--json"],
                                capture_output=True, text=True, timeout=60)
        assert json.loads(result.stdout)["epoch"] >= 1
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_second_server_on_the_same_state_dir_is_refused(server: DiskServerProcess, tmp_path: Path) -> None:
    other = subprocess.run([HYBRIDFT, "disk", "serve", "--image", str(server.image), "--state-dir",
                            str(server.state_dir), "--nbd", f"unix:{tmp_path}/o.sock", "--control",
                            f"unix:{tmp_path}/oc.sock"], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and other.stderr.startswith("Error:"), other.stderr
    assert "Traceback" not in other.stderr
    assert server.ctl_json("status")["committed"] == 0  # the running server is untouched
