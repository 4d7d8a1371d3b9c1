"""``hybridft disk serve`` as a real process, driven by ``hybridft disk ctl`` and read with libnbd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd as libnbd
import pytest

from tests.helpers.disk_server import DiskServerProcess, disk_serve_argv, start_disk_serve
from tests.helpers.tls import make_creds

HYBRIDFT = str(Path(sys.executable).with_name("hybridft"))
IMAGE_SIZE = 16 << 20


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


def test_status_reports_how_the_nbd_side_polls(server: DiskServerProcess) -> None:
    """``hybridft disk serve`` spins for a client's next request by default (--poll-us), and
    status says how that went: spins started, spins that caught a request, time spent."""
    polls = server.ctl_json("status")["runtime"]["busy_poll"]
    assert polls["window_us"] == 50 and polls["polls"] == 0
    replica = server.connect("replica")
    for i in range(50):
        replica.pwrite(b"\x5a" * 4096, i * 4096)
    polls = server.ctl_json("status")["runtime"]["busy_poll"]
    assert polls["polls"] >= 1 and polls["spun_ns"] > 0, polls
    assert 0 <= polls["hits"] <= polls["polls"]
    assert replica.pread(4096, 49 * 4096) == b"\x5a" * 4096


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
    image, state = tmp_path / "nope.raw", tmp_path / "s"
    control = f"unix:{tmp_path}/c.sock"
    missing = subprocess.run(
        disk_serve_argv(image, state, nbd=f"unix:{tmp_path}/n.sock", control=control),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "nope.raw" in missing.stderr
    bad_addr = subprocess.run(
        disk_serve_argv(image, state, nbd="udp:1", control=f"unix:{tmp_path}/c.sock"),
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
    """tcp: NBD (STARTTLS) and control (TLS) with the pair's credentials; the ready line names them."""
    creds = make_creds(tmp_path / "creds")
    image = tmp_path / "tcp.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    proc, ready = start_disk_serve(
        image, tmp_path / "st", nbd="tcp:127.0.0.1:0", control="tcp:127.0.0.1:0", stderr=subprocess.PIPE,
        extra=("--tls-creds", str(creds.host)),
    )  # fmt: skip
    try:
        nbd_addr, control = ready.nbd, ready.control
        assert control.endswith(f",tls-creds={creds.host}")
        host, port = nbd_addr.removeprefix("tcp:").partition(",")[0].rsplit(":", 1)
        assert int(port) > 0 and ":0," not in control
        h = libnbd.NBD()
        h.set_tls(libnbd.TLS_REQUIRE)
        h.set_tls_certificates(str(creds.host))
        h.set_export_name("replica")
        h.connect_tcp(host, port)
        h.pwrite(b"\x77" * 4096, 0)
        result = subprocess.run(
            [HYBRIDFT, "disk", "ctl", "--control", control, "seal", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(result.stdout)["epoch"] >= 1
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_second_server_on_the_same_state_dir_is_refused(server: DiskServerProcess, tmp_path: Path) -> None:
    argv = disk_serve_argv(
        server.image, server.state_dir, nbd=f"unix:{tmp_path}/o.sock", control=f"unix:{tmp_path}/oc.sock"
    )
    other = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and other.stderr.startswith("Error:"), other.stderr
    assert "Traceback" not in other.stderr
    assert server.ctl_json("status")["committed"] == 0  # the running server is untouched
