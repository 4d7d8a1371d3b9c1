"""A real Linux guest's traffic through the comparator: virtio-net with vnet_hdr=on, both modes.

The guest (TCG, in a network namespace the test creates and removes) has a tap with
``vnet_hdr=on``, so QEMU's filters carry a non-empty virtio-net header (checksum offload: TCP
checksums are partial, segments can be GSO-sized).  Its output is stolen by a filter-redirector
into ``--primary-in`` and copied by a filter-mirror into ``--secondary-in`` (the same bytes: COLO must
release them at once); released frames go back through the indev redirector to the tap.  An 8 MiB
HTTP download must arrive byte-exact: a lost or wrong virtio header would corrupt checksums and the
transfer would stall.  One guest serves three services in turn (relay, COLO, MC): QEMU's
``reconnect=1`` chardevs find each new service, and the indev redirector is re-created over QMP
each time (QEMU 7.2 stops reading it after a disconnect).
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybridft_common.cli import hybridft_command
from hybridft_common.control import call
from mc_driver.guest.control import wait_for_ready
from mc_driver.guest.expected import BLOB_SIZE, blob_bytes
from mc_driver.guest.image import build_guest
from mc_driver.guest.qemu_args import guest_cmdline, qemu_args
from mc_driver.netns import NetNamespace
from tests.helpers.qmp import qmp_commands

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

GUEST_IP = "10.77.0.2"


@dataclass
class Guest:
    ns: NetNamespace
    work: Path
    paths: dict[str, Path]
    qmp: Path
    indev_id: str = "rin"
    services_started: int = 0

    def recreate_indev(self) -> None:
        """A new comparator: re-create the indev redirector (QEMU 7.2 stops reading it after a
        disconnect, see test_compare_qemu.py), in front of the others."""
        new_id = f"rin{self.services_started}"
        qmp_commands(self.qmp, {"execute": "object-del", "arguments": {"id": self.indev_id}},
                     {"execute": "object-add", "arguments": {"qom-type": "filter-redirector", "id": new_id,
                      "netdev": "hn0", "queue": "rx", "indev": "c_out", "vnet_hdr_support": True,
                      "position": "head"}})  # fmt: skip
        self.indev_id = new_id


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed: these tests need a real QEMU")
    image = build_guest()
    work = tmp_path_factory.mktemp("cmpguest")
    paths = {r: work / f"{r}.sock" for r in ("primary", "secondary", "out", "control")}
    disk = work / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"], check=True)
    args = qemu_args(
        image, tap="tap0", disk=disk, console_log=work / "console.log",
        cmdline=guest_cmdline(f"{GUEST_IP}/24", services=["httpd"]),
    )  # fmt: skip
    args = [a.replace("vnet_hdr=off", "vnet_hdr=on") if a.startswith("tap,") else a for a in args]
    assert any("vnet_hdr=on" in a for a in args), "the guest's netdev changed shape"
    support = "vnet_hdr_support=on"
    args += [
        "-chardev", f"socket,id=c_out,path={paths['out']},reconnect=1",
        "-chardev", f"socket,id=c_pri,path={paths['primary']},reconnect=1",
        "-chardev", f"socket,id=c_sec,path={paths['secondary']},reconnect=1",
        # rx filters run in reverse order: mirror (copy) -> redirector (steal); injected frames
        # from the first-declared indev redirector go straight to the tap
        "-object", f"filter-redirector,id=rin,netdev=hn0,queue=rx,indev=c_out,{support}",
        "-object", f"filter-redirector,id=rout,netdev=hn0,queue=rx,outdev=c_pri,{support}",
        "-object", f"filter-mirror,id=mir,netdev=hn0,queue=rx,outdev=c_sec,{support}",
    ]  # fmt: skip
    with NetNamespace() as ns:
        ns.add_tap("tap0")
        qmp = work / "qmp.sock"
        proc = ns.popen([qemu, *args, "-qmp", f"unix:{qmp},server=on,wait=off"])
        try:
            wait_for_ready(work / "console.log", timeout=120, proc=proc)
            yield Guest(ns, work, paths, qmp)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    console = (work / "console.log").read_text(errors="replace")
    for bad in ("Oops", "BUG:", "Kernel panic"):
        assert bad not in console, f"guest console shows {bad!r}:\n{console[-3000:]}"


@pytest.fixture
def service(guest: Guest, request: pytest.FixtureRequest) -> Iterator[str]:
    """Start the service named by the test's parameter on the guest's chardev paths."""
    kind = request.param
    p = guest.paths
    addrs = ["--primary-in", f"unix:{p['primary']}", "--secondary-in", f"unix:{p['secondary']}",
             "--out", f"unix:{p['out']}", "--control", f"unix:{p['control']}", "--vnet-hdr"]  # fmt: skip
    if kind == "relay":
        cmd = [sys.executable, "-m", "colo_compare.relay", *addrs]
    else:
        cmd = [*hybridft_command(), "compare", "serve",
               *addrs, "--mode", kind]  # fmt: skip
    log = guest.work / f"{kind}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"))  # noqa: SIM115
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", log.read_text()
    ctl = f"unix:{p['control']}"
    deadline = time.monotonic() + 15
    while not all(call(ctl, "stats")["transport"]["connected"].values()):
        assert time.monotonic() < deadline, "QEMU did not (re)connect its chardevs"
        time.sleep(0.05)
    time.sleep(0.3)  # QEMU attaches an accepted chardev on its next main-loop turn
    if guest.services_started:
        guest.recreate_indev()
    guest.services_started += 1
    try:
        yield ctl
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()


def fetch_blob(guest: Guest) -> bytes:
    with guest.ns.entered():
        conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=60)
        conn.connect()
    conn.request("GET", "/blob")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    return body


@pytest.mark.parametrize("service", ["relay", "colo", "mc"], indirect=True)
def test_http_download_through_the_service(guest: Guest, service: str) -> None:
    stop = threading.Event()
    checkpoints = 0

    def checkpoint_loop() -> None:  # MC: the daemon's epochs, every 20 ms
        nonlocal checkpoints
        while not stop.is_set():
            time.sleep(0.02)
            call(service, "commit", epoch=call(service, "seal")["epoch"])
            checkpoints += 1

    mode = call(service, "stats")["core"]["mode"]
    ticker = threading.Thread(target=checkpoint_loop)
    if mode == "mc":
        ticker.start()
    try:
        body = fetch_blob(guest)
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
    assert len(body) == BLOB_SIZE and body == blob_bytes()
    stats = call(service, "stats")
    transport, core = stats["transport"], stats["core"]
    assert transport["vnet_hdr_len"] in (10, 12)  # a real virtio-net header travelled with each frame
    assert transport["vnet_headers_missing"] == 0
    assert sum(transport["framing_errors"].values()) == 0
    assert transport["released_frames"] > 100
    if mode == "colo":
        assert core["divergences"] == 0
        assert core["secondary_frames"] > 100
    if mode == "mc":
        assert checkpoints > 5 and core["checkpoints"] >= checkpoints
