"""The two-host layout end to end: a real pair whose cross-host channels are all tcp + mutual TLS.

``pair up --tcp-host 127.0.0.1 --tls-creds DIR`` puts every channel that would cross between the primary's
host and the secondary's on loopback TCP with the pair's certificates (``hybridft certs``): the migration
stream (QEMU ``tls-creds``), the mirror and secondary-output chardevs (chardev ``tls-creds``), the mirror's
NBD target (STARTTLS), the disk server's control socket and the heartbeat.  The guest must then be
protected as on one host: checkpoints commit in MC and in COLO while a client checks every byte it gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridft_common.certs import init_ca, issue_host
from hybridft_common.control import call
from hybridft_common.endpoints import parse_endpoint
from mc_driver.netns import NetNamespace
from mc_driver.pair import PairConfig, PairError, down, up
from tests.test_pair_qemu import Traffic, daemon_status, hybridft, pair_json, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pair"
    yield path
    down(path)
    for name in ("daemon.log", "agent.log", "disk.log", "compare.log", "secondary.log", "primary.log"):
        log = path / name
        if log.exists():
            print(f"--- {name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def test_two_host_layout_over_tls_checkpoints_in_mc_and_colo(workdir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    creds = issue_host(tmp_path / "ca", "localhost", ("127.0.0.1",)).dir

    with pytest.raises(PairError, match="hybridft certs init"):  # tcp without credentials: refused
        up(PairConfig(workdir, tcp_host="127.0.0.1"))

    # COLO checkpoints at least every 2 s (the safety interval), so one commits within the test
    up(PairConfig(workdir, mode="mc", tcp_host="127.0.0.1", tls_creds=creds, safety_interval_ms=2000))
    config = pair_json(workdir)
    for key in ("heartbeat", "disk_control", "disk_nbd"):
        endpoint = parse_endpoint(config[key])
        assert endpoint.kind == "tcp" and endpoint.tls_creds == str(creds), (key, config[key])
    assert config["migrate_uri"].startswith("tcp:127.0.0.1:")
    secondary_cmdline = Path(f"/proc/{config['pids']['secondary']}/cmdline").read_bytes().split(b"\0")
    assert b"migration.tls-creds=hft-tls-server" in secondary_cmdline
    assert any(b"tls-creds=hft-tls-client" in arg and b"host=127.0.0.1" in arg for arg in secondary_cmdline)

    ns = NetNamespace(config["netns"])
    traffic = Traffic(ns).start()
    traffic.wait("a blob in MC over TLS", lambda: len(traffic.blobs) >= 1)
    mc = daemon_status(workdir)["checkpoints"]
    assert mc["committed"] >= 1 and mc["failed"] == 0, mc

    done = hybridft("mode", "colo", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    wait_until("COLO", lambda: daemon_status(workdir)["mode"] == "colo")
    committed = daemon_status(workdir)["checkpoints"]["committed"]
    blobs, echoed = len(traffic.blobs), traffic.echo_bytes
    traffic.wait("a blob in COLO over TLS", lambda: len(traffic.blobs) > blobs)
    wait_until(
        "a committed checkpoint in COLO",
        lambda: daemon_status(workdir)["checkpoints"]["committed"] > committed,
        timeout=30,
    )
    assert traffic.echo_bytes > echoed
    status = daemon_status(workdir)
    assert status["protected"] is True and status["checkpoints"]["failed"] == 0, status
    # the secondary's output reached the comparator over TLS, the daemon's commits the disk over TLS
    assert call(config["compare_control"], "stats")["transport"]["connected"]["secondary"]
    with ns.entered():  # the "hosts" talk over the pair's namespace's loopback
        assert call(config["disk_control"], "status")["committed"] >= 1
    traffic.finish()  # raises if any byte a client got was wrong
    down(workdir)
