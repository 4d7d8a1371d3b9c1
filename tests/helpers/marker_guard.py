"""A test that starts QEMU must be marked ``qemu``, one that creates a network namespace ``netns``.

Why: ``make test-fast`` runs ``-m "not qemu and not netns"``.  A test that starts QEMU or a namespace
without its marker would slip into the fast lane and make it slow, root-only or flaky; the markers
are only worth anything if something checks them.  This plugin (registered by ``tests/conftest.py``,
so it is active in every run) watches each test while it runs and fails it with an error when it
did either without the marker.

How a process is traced back to its test: every test's children inherit ``HYBRIDFT_TEST_NODEID``
(set in ``os.environ`` before the test's fixtures are set up), and so do their children, including
QEMUs started by a ``hybridft`` child and re-parented ones.  While a test runs, a watcher thread
looks every :data:`INTERVAL` seconds (and once more after teardown) for

* a ``qemu-system-*`` process carrying the test's id (unless it is marked ``qemu``);
* a namespace in ``/run/netns`` named by :class:`mc_driver.netns.NetNamespace` (``hft-<pid>-<n>``)
  whose creator is this process or carries the test's id, or a process carrying the test's id that
  lives in another network namespace (unless it is marked ``netns``).

What it cannot see: a child started with a scrubbed environment, or a QEMU/namespace that lives for
less than :data:`INTERVAL` and leaves no trace by teardown.  Processes of other test runs on the
machine carry other ids (or none) and are ignored.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ENV = "HYBRIDFT_TEST_NODEID"
INTERVAL = 0.2
NETNS_DIR = Path("/run/netns")
_NETNS_NAME = re.compile(r"^hft-(\d+)-\d+$")


@dataclass(frozen=True)
class Check:
    """What to look for on behalf of one test."""

    nodeid: str
    qemu: bool  # look for QEMU (the test is not marked qemu)
    netns: bool  # look for namespaces (the test is not marked netns)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def _carries(pid: str, nodeid: str) -> bool:
    environ = _read(f"/proc/{pid}/environ")
    return environ is not None and f"{ENV}={nodeid}".encode() in environ.split(b"\0")


def _cmdline(pid: str) -> str:
    raw = _read(f"/proc/{pid}/cmdline") or b""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:300]


def _pids() -> Iterator[str]:
    return (name for name in os.listdir("/proc") if name.isdigit())


def find_violations(check: Check, netns_dir: Path = NETNS_DIR) -> list[str]:
    """What the test of ``check`` is running right now that its markers do not allow."""
    found: list[str] = []
    own_net = os.readlink("/proc/self/ns/net") if check.netns else ""
    for pid in _pids():
        if check.qemu:
            comm = (_read(f"/proc/{pid}/comm") or b"").decode(errors="replace")
            if comm.startswith("qemu-system") and _carries(pid, check.nodeid):
                found.append(f"started QEMU without the qemu marker: pid {pid}: {_cmdline(pid)}")
                continue
        if check.netns:
            try:
                net = os.readlink(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            if net != own_net and _carries(pid, check.nodeid):
                found.append(f"runs a process in another network namespace without the netns marker: "
                             f"pid {pid}: {_cmdline(pid)}")  # fmt: skip
    if check.netns:
        try:
            names = os.listdir(netns_dir)
        except OSError:
            names = []
        for name in names:
            match = _NETNS_NAME.match(name)
            if match and (int(match[1]) == os.getpid() or _carries(match[1], check.nodeid)):
                found.append(f"created network namespace {name} without the netns marker")
    return found


@dataclass
class _Watcher:
    """One thread for the session; it scans only while a test that needs watching runs."""

    check: Check | None = None
    found: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    armed: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def arm(self, check: Check) -> None:
        with self.lock:
            self.check = check
            self.found = []
            self.armed.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="hybridft-marker-guard", daemon=True)
            self.thread.start()

    def disarm(self) -> list[str]:
        """Stop watching; after a last scan, every distinct finding of the test."""
        with self.lock:
            check, self.check = self.check, None
            self.armed.clear()
            found = self.found
        if check is None:
            return []
        found.extend(find_violations(check))
        return list(dict.fromkeys(found))

    def _run(self) -> None:
        while True:
            self.armed.wait()
            with self.lock:
                check = self.check
            if check is not None:
                found = find_violations(check)
                with self.lock:
                    if self.check is check:  # not disarmed meanwhile
                        self.found.extend(found)
            time.sleep(INTERVAL)


_watcher = _Watcher()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    os.environ[ENV] = item.nodeid
    check = Check(
        item.nodeid,
        qemu=item.get_closest_marker("qemu") is None,
        netns=item.get_closest_marker("netns") is None,
    )
    if check.qemu or check.netns:
        _watcher.arm(check)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        found = _watcher.disarm()
        if found:
            pytest.fail(f"{item.nodeid}: " + "; ".join(found), pytrace=False)
