"""A throw-away network namespace with a bridge and taps: the wire between QEMU guests and test clients.

Why a namespace: the guests' taps, the bridge and every client socket live in one namespace that the
test creates and always removes, so nothing touches the host's network and several runs (or several
engineers) can use the same guest addresses at once. QEMU opens its tap by name (``ifname=``,
``script=no``), which only finds the tap if QEMU itself runs in the namespace: start it with
:meth:`NetNamespace.popen`, which prefixes ``ip netns exec NAME``.

Layout (defaults)::

    namespace hft-<pid>-<n>
      lo                 up
      hftbr0 (bridge)    10.77.0.1/24    <- clients (run() / popen()) use this address
        tap-a, tap-b...  added by add_tap(), enslaved to the bridge, up
      guest eth0         10.77.0.2/24    (set by the guest's kernel command line)

Names carry the creating process's pid, so :func:`cleanup_stale` can remove what a crashed run left
behind (namespace, its taps and bridge, and the processes still inside it) without touching a
namespace whose creator is alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from hybridft_common.processes import pid_alive

DEFAULT_PREFIX = "hft-"
DEFAULT_BRIDGE = "hftbr0"
DEFAULT_BRIDGE_IP = "10.77.0.1/24"
_counter = itertools.count()
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class NetnsError(Exception):
    """An ``ip`` command failed, or a name is invalid."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pids_in(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_all_in(name: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process left in the namespace (all of them were started in it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_in(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pids_in(name):
            time.sleep(0.05)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces named ``<prefix><pid>-<n>`` whose creating process is gone; return their names."""
    removed = []
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-\d+$")
    for name in list_namespaces():
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            _kill_all_in(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


def _local_mac() -> str:
    """A random unicast, locally administered MAC address."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _check_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name):
        raise NetnsError(f"bad interface name {name!r}: 1-15 characters from [A-Za-z0-9_.-]")
    return name


class NetNamespace:
    """A namespace with a bridge; use as a context manager so it is always removed.

    ``run``/``popen`` execute commands inside it; processes from ``popen`` are terminated on close,
    and so is anything else still inside (QEMU started by someone else in this namespace included).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        bridge: str = DEFAULT_BRIDGE,
        bridge_ip: str = DEFAULT_BRIDGE_IP,
    ) -> None:
        self.name = name or f"{prefix}{os.getpid()}-{next(_counter)}"
        self.bridge = _check_ifname(bridge)
        self.bridge_ip = bridge_ip
        self.taps: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._created = False

    # lifecycle -------------------------------------------------------------------------------------
    def create(self) -> NetNamespace:
        if self.name in list_namespaces():
            raise NetnsError(f"network namespace {self.name} already exists")
        _ip("netns", "add", self.name)
        self._created = True
        try:
            self._in("link", "set", "lo", "up")
            # A bridge whose MAC was never set takes the lowest MAC of its ports, so the failover's tap
            # swap would change the clients' MAC: a guest that keeps the old one in its ARP cache (the
            # client re-learned the guest from its gratuitous ARP and never asks) sends into the void
            # until its neighbour entry is probed again, about 5 s.  A set address never changes.
            self._in("link", "add", self.bridge, "address", _local_mac(), "type", "bridge")
            # no STP / forwarding delay: a tap is forwarding the moment it is enslaved
            self._in("link", "set", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self._in("addr", "add", self.bridge_ip, "dev", self.bridge)
            self._in("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop our processes and anything else inside, then delete the namespace with its devices."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._created:
            _kill_all_in(self.name)
            for tap in self.taps:
                self._in("link", "del", tap, check=False)
            self.taps.clear()
            _ip("netns", "del", self.name, check=False)
            self._created = False

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # devices ---------------------------------------------------------------------------------------
    def _in(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _ip("-n", self.name, *args, check=check)

    def add_tap(self, name: str) -> str:
        """Create a tap for QEMU (``ifname=name``), on the bridge and up; returns its name."""
        _check_ifname(name)
        self._in("tuntap", "add", "dev", name, "mode", "tap")
        self.taps.append(name)
        self._in("link", "set", name, "master", self.bridge)
        self._in("link", "set", name, "up")
        return name

    def detach_tap(self, name: str) -> None:
        """Take a tap off the bridge (a dead primary's, so the bridge stops sending it the guest's MAC)."""
        self._in("link", "set", name, "nomaster")

    def attach_tap(self, name: str) -> None:
        self._in("link", "set", name, "master", self.bridge)

    def link_stats(self, name: str) -> dict[str, int]:
        """rx/tx bytes and packets of an interface in the namespace, from sysfs as seen inside it."""
        out = self.run(
            ["sh", "-c", f"cd /sys/class/net/{_check_ifname(name)}/statistics && grep -H . *"],
            capture_output=True,
        ).stdout
        stats: dict[str, int] = {}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if value.strip().isdigit():
                stats[key] = int(value)
        return stats

    # processes -------------------------------------------------------------------------------------
    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        capture_output: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and wait for it."""
        return subprocess.run(
            [*self.exec_prefix, *cmd],
            check=check,
            capture_output=capture_output,
            timeout=timeout,
            text=True,
            **kwargs,
        )

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace; it is terminated when the namespace closes."""
        proc = subprocess.Popen([*self.exec_prefix, *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[NetNamespace]:
        """Move the calling *thread* into the namespace for the ``with`` block (for in-process clients).

        Sockets created inside keep working after the block. Only for short, single-threaded use:
        other threads stay where they are.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)
