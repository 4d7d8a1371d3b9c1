"""mc_driver.netns against the real kernel: namespaces, bridge, taps, processes inside, stale clean-up."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from mc_driver.netns import NetNamespace, NetnsError, cleanup_stale, list_namespaces

pytestmark = pytest.mark.netns


def _links(ns: NetNamespace) -> str:
    return subprocess.run(
        ["ip", "-n", ns.name, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout


def test_namespace_with_bridge_and_tap_is_created_and_removed() -> None:
    with NetNamespace() as ns:
        assert ns.name in list_namespaces()
        ns.add_tap("tap-a")
        links = _links(ns)
        assert "hftbr0" in links
        tap_line = next(line for line in links.splitlines() if "tap-a" in line)
        assert "master hftbr0" in tap_line
        addr = ns.run(["ip", "-4", "-o", "addr", "show", "hftbr0"], capture_output=True).stdout
        assert "10.77.0.1/24" in addr
        # the host's own interfaces are not visible inside
        inside = ns.run(["ip", "-o", "link"], capture_output=True).stdout
        assert len(inside.splitlines()) == 3  # lo, hftbr0, tap-a
        ns.detach_tap("tap-a")
        assert "master" not in next(line for line in _links(ns).splitlines() if "tap-a" in line)
        ns.attach_tap("tap-a")
        assert "master hftbr0" in next(line for line in _links(ns).splitlines() if "tap-a" in line)
        stats = ns.link_stats("hftbr0")
        assert "tx_bytes" in stats and "rx_packets" in stats
    assert ns.name not in list_namespaces()


def test_the_bridge_keeps_its_mac_when_the_taps_are_swapped() -> None:
    """The clients' MAC must not change at a failover's tap swap (a guest that cached the old one
    sent into the void for ~5 s: 1 of ~50 failovers in `bench pair`)."""
    with NetNamespace() as ns:

        def mac(dev: str) -> str:
            return ns.run(["cat", f"/sys/class/net/{dev}/address"], capture_output=True).stdout.strip()

        before = mac("hftbr0")
        first_octet = int(before.split(":")[0], 16)
        assert first_octet & 0x02 and not first_octet & 0x01, before  # locally administered unicast
        ns.add_tap("tap-p")
        ns.add_tap("tap-s")
        ns.detach_tap("tap-s")
        ns.detach_tap("tap-p")
        ns.attach_tap("tap-s")
        assert mac("hftbr0") == before, (before, mac("tap-p"), mac("tap-s"))


def test_processes_are_stopped_when_the_namespace_closes() -> None:
    with NetNamespace() as ns:
        ours = ns.popen(["sleep", "600"])
        # a process started in the namespace by other means (as a launcher might) is stopped too
        other = subprocess.Popen(["ip", "netns", "exec", ns.name, "sleep", "600"])
        name = ns.name
    assert ours.wait(timeout=5) is not None
    assert other.wait(timeout=5) is not None
    assert name not in list_namespaces()


def test_two_namespaces_use_the_same_addresses_independently() -> None:
    with NetNamespace() as a, NetNamespace() as b:
        with a.entered():
            server = socket.create_server(("10.77.0.1", 5555))
        with b.entered():
            # same address and port in the other namespace: no conflict, and nothing listening there
            other = socket.create_server(("10.77.0.1", 5555))
            other.close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("10.77.0.1", 5555), timeout=2)
        with a.entered():
            client = socket.create_connection(("10.77.0.1", 5555), timeout=2)
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        for s in (client, conn, server):
            s.close()


def test_stale_namespace_of_a_dead_creator_is_cleaned_up() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = NetNamespace(f"hftt-{dead.pid}-0")  # own prefix: never touch other runs' namespaces
    stale.create()
    leftover = subprocess.Popen(["ip", "netns", "exec", stale.name, "sleep", "600"])
    with NetNamespace(prefix="hftt-") as alive:
        removed = cleanup_stale("hftt-")
        assert stale.name in removed
        assert alive.name not in removed
        assert alive.name in list_namespaces()
    assert stale.name not in list_namespaces()
    assert leftover.wait(timeout=5) is not None


def test_bad_names_and_duplicates_are_clear_errors() -> None:
    with NetNamespace() as ns:
        with pytest.raises(NetnsError, match="bad interface name"):
            ns.add_tap("a-name-much-too-long-for-linux")
        with pytest.raises(NetnsError, match="already exists"):
            NetNamespace(ns.name).create()
        ns.add_tap("tap-x")
        with pytest.raises(NetnsError):
            ns.add_tap("tap-x")
        assert ns.name in list_namespaces()


def test_a_zombie_is_not_alive() -> None:
    """A killed QEMU nobody reaped yet (PID 1 of a container may never reap it) counts as dead:
    re-protection after a failover took the old primary's zombie for a live primary."""
    import time

    from hybridft_common.processes import pid_alive

    child = subprocess.Popen(["true"])  # exits at once; unwaited, it stays our zombie
    try:
        deadline = time.monotonic() + 10
        while pid_alive(child.pid):
            assert time.monotonic() < deadline, "a zombie still counts as alive"
            time.sleep(0.05)
        with open(f"/proc/{child.pid}/stat") as stat:
            assert stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # it was a zombie, not gone
    finally:
        child.wait()
    assert pid_alive(os.getpid())
    assert not pid_alive(child.pid)
