"""The real guest in a real QEMU (TCG), in a network namespace: services, workloads, control channel.

One guest boots per module (~4 s under TCG) and every test talks to it the way the pair tests will:
clients inside the namespace, the control loop on ttyS1, QMP for the dirty rate. QEMU missing is a
failure, not a skip.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from mc_driver.guest.control import GuestControl, wait_for_ready
from mc_driver.guest.errors import GuestControlTimeout, GuestError
from mc_driver.guest.expected import (
    BLOB_SIZE,
    BLOBD_PORT,
    DISKWRITER_PORT,
    ECHO_PORT,
    RR_PORT,
    SERVICE_PORTS,
    TOKEN_PORT,
    DiskWriterReports,
    Token,
    TokenReplies,
    blob_bytes,
    read_disk_records,
    stream_bytes,
)
from mc_driver.guest.image import build_guest
from mc_driver.guest.qemu_args import guest_cmdline, qemu_args
from mc_driver.netns import NetNamespace

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

GUEST_IP = "10.77.0.2"
HYBRIDFT = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hybridft"


@dataclass
class Guest:
    ns: NetNamespace
    proc: subprocess.Popen[bytes]
    workdir: Path
    console: Path
    control: Path
    qmp: Path
    disk: Path
    ready_line: str

    def connect(self, port: int, timeout: float = 30) -> socket.socket:
        with self.ns.entered():
            return socket.create_connection((GUEST_IP, port), timeout=timeout)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed: these tests need a real QEMU")
    image = build_guest()
    work = tmp_path_factory.mktemp("guest")
    disk = work / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"], check=True)
    with NetNamespace() as ns:
        ns.add_tap("tap0")
        cmdline = guest_cmdline(f"{GUEST_IP}/24", gateway="10.77.0.1", run=[("sleep", "600")])
        args = qemu_args(
            image,
            tap="tap0",
            disk=disk,
            console_log=work / "console.log",
            control_socket=work / "control.sock",
            cmdline=cmdline,
        )
        proc = ns.popen([qemu, *args, "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off"])
        try:
            ready = wait_for_ready(work / "console.log", timeout=90, proc=proc)
            yield Guest(
                ns, proc, work, work / "console.log", work / "control.sock", work / "qmp.sock", disk, ready
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    console = (work / "console.log").read_text(errors="replace")
    for bad in ("Oops", "BUG:", "Kernel panic", "virtio_net: "):
        assert bad not in console, f"guest console shows {bad!r}:\n{console[-3000:]}"


def test_guest_boots_and_reports_ready(guest: Guest) -> None:
    services = "echod,rrserver,httpd,blobd,tokend"
    assert guest.ready_line == f"HYBRIDFT-GUEST-READY ip={GUEST_IP}/24 services={services}"
    assert guest.proc.poll() is None


def test_network_settings_come_from_the_command_line(guest: Guest) -> None:
    with GuestControl(f"unix:{guest.control}") as ctl:
        assert "default via 10.77.0.1 dev eth0" in ctl.sh("ip", "route").text
        # IPv6 is off unless asked for: no spontaneous router solicitations to confuse COLO comparison
        assert ctl.sh("cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").text == "1"
        assert ctl.sh("cat", "/sys/class/net/eth0/address").text == "52:54:00:12:34:56"


def test_guests_that_cannot_boot_or_are_misconfigured_fail_loudly(tmp_path: Path) -> None:
    """Two broken guests side by side (one boot's time): no usable init, and an impossible address."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed")
    image = build_guest()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "disk.img"), "1M"], check=True)
    cases = {
        # the kernel panics; panic=-1 with -no-reboot ends QEMU
        "panic": ("rdinit=/no-such-init root=/dev/nothing", r"guest kernel panicked"),
        # a later hft.ip= wins in init.sh, which reports it instead of READY
        "badip": ("hft.ip=10.77.0.999/24", r"set-up failed: bad hft\.ip=10\.77\.0\.999/24"),
    }
    with NetNamespace() as ns:
        procs = {}
        for name, (extra, _) in cases.items():
            ns.add_tap(f"tap-{name}")
            args = qemu_args(
                image,
                tap=f"tap-{name}",
                disk=tmp_path / "disk.img",
                console_log=tmp_path / f"{name}.log",
                cmdline=guest_cmdline(extra=extra),
                mac="52:54:00:12:34:57" if name == "panic" else "52:54:00:12:34:58",
            )
            # read-only: the two guests share the image
            args = [a.replace("format=raw", "format=raw,readonly=on") for a in args]
            procs[name] = ns.popen([qemu, *args])
        for name, (_, message) in cases.items():
            with pytest.raises(GuestError, match=message):
                wait_for_ready(tmp_path / f"{name}.log", timeout=90, proc=procs[name])


def test_http_blob_is_the_exact_8_mib(guest: Guest) -> None:
    with guest.ns.entered():
        conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=60)
        conn.connect()
    conn.request("GET", "/blob")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    blob = blob_bytes()
    assert len(body) == BLOB_SIZE
    assert body == blob
    # busybox httpd stamps every answer with the time: two replicas answering in different seconds
    # differ here, which COLO counts as a divergence.
    assert resp.getheader("Date") is not None
    # blobd serves the same bytes with no clock in the header, on one persistent connection
    with guest.ns.entered():
        conn = http.client.HTTPConnection(GUEST_IP, BLOBD_PORT, timeout=60)
        conn.connect()
    for _ in range(2):
        conn.request("GET", "/blob")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Date") is None
        assert resp.read() == blob
    conn.close()


def test_echo_many_concurrent_connections(guest: Guest) -> None:
    conns = [guest.connect(ECHO_PORT) for _ in range(8)]
    payloads = [os.urandom(64_000 + 4099 * i) for i in range(len(conns))]
    got: list[bytes] = [b""] * len(conns)

    def pump(i: int) -> None:
        c, p = conns[i], payloads[i]
        sender = threading.Thread(target=c.sendall, args=(p,))
        sender.start()
        chunks, n = [], 0
        while n < len(p):
            data = c.recv(65536)
            if not data:
                break
            chunks.append(data)
            n += len(data)
        sender.join()
        got[i] = b"".join(chunks)

    threads = [threading.Thread(target=pump, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == payloads
    for c in conns:
        c.close()


def test_rrserver_answers(guest: Guest) -> None:
    c = guest.connect(RR_PORT)
    for n in (1, 100, 4096, 100_000):
        c.sendall(f"{n}\n".encode())
        data = b""
        while len(data) < n:
            chunk = c.recv(n - len(data))
            assert chunk
            data += chunk
        assert data == stream_bytes(n)
    c.close()


def _tokens(sock: socket.socket, replies: TokenReplies, n: int) -> list[Token]:
    got: list[Token] = []
    while len(got) < n:
        data = sock.recv(4096)
        assert data, "tokend closed the connection"
        got += replies.feed(data)
    return got


def _refused(guest: Guest, port: int) -> bool:
    try:
        guest.connect(port, timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_token_service_answers_each_request_with_a_distinct_growing_token(guest: Guest) -> None:
    replies = TokenReplies()  # checks the form, and that seq and clock never go back
    with guest.connect(TOKEN_PORT) as c:
        tokens = []
        for _ in range(20):
            c.sendall(b"token please\n")
            tokens += _tokens(c, replies, 1)
    assert len(set(tokens)) == 20
    assert all(a.seq < b.seq and a.ns < b.ns for a, b in itertools.pairwise(tokens))


def test_services_stop_and_start_on_command(guest: Guest) -> None:
    with GuestControl(f"unix:{guest.control}") as ctl:
        states = ctl.services()
        assert {name: s.port for name, s in states.items()} == SERVICE_PORTS  # init.sh agrees with the host
        assert all(s.running for s in states.values())
        busy = guest.connect(TOKEN_PORT)
        busy.sendall(b"\n")
        first = _tokens(busy, TokenReplies(), 1)[0]
        ctl.stop_service("tokend")
        try:
            assert busy.recv(4096) == b""  # stopping ends the open connections too
        except ConnectionResetError:
            pass
        busy.close()
        assert _refused(guest, TOKEN_PORT)
        assert not ctl.services()["tokend"].running
        ctl.stop_service("tokend")  # already stopped: nothing to do
        pid = ctl.start_service("tokend")
        assert ctl.start_service("tokend") == pid  # already running: left alone
        with guest.connect(TOKEN_PORT) as c:
            c.sendall(b"\n")
            again = _tokens(c, TokenReplies(), 1)[0]
        assert again.seq == 1 and again.ns > first.ns  # a fresh service, the same clock
        assert ctl.command("start", "sshd").rc == 2 and ctl.command("stop").rc == 2

    # rrserver through the CLI, as a host script would change the workload while a pair runs
    def cli(verb: str) -> dict[str, object]:
        out = subprocess.run(
            [str(HYBRIDFT), "guest", verb, "rrserver", "--control", f"unix:{guest.control}", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    assert cli("stop") == {"service": "rrserver", "port": RR_PORT, "stopped": True}
    assert _refused(guest, RR_PORT)
    assert cli("start")["port"] == RR_PORT
    with guest.connect(RR_PORT) as c:
        c.sendall(b"100\n")
        data = b""
        while len(data) < 100:
            chunk = c.recv(100 - len(data))
            assert chunk
            data += chunk
    assert data == stream_bytes(100)


def _dirty_rate_mb_s(qmp_path: Path) -> float:
    async def measure() -> float:
        qmp = QMPClient("test")
        await qmp.connect(str(qmp_path))
        try:
            # page sampling; the dirty-bitmap mode crashes QEMU 7.2 under TCG
            await qmp.execute("calc-dirty-rate", {"calc-time": 2, "sample-pages": 4096})
            while True:
                info = await qmp.execute("query-dirty-rate")
                if info["status"] == "measured":
                    return float(info["dirty-rate"])
                await asyncio.sleep(0.2)
        finally:
            await qmp.disconnect()

    return asyncio.run(asyncio.wait_for(measure(), 30))


def test_memdirty_runs_at_roughly_the_asked_rate(guest: Guest) -> None:
    idle = _dirty_rate_mb_s(guest.qmp)
    with GuestControl(f"unix:{guest.control}") as ctl:
        pid = ctl.run("memdirty", "32", "128")
        try:
            # measure only once the working set has been touched (that first pass is not paced)
            for _ in range(300):
                if "memdirty: started" in ctl.sh("cat", f"/tmp/memdirty.{pid}.log").text:
                    break
                ctl.sh("sleep", "0.1")
            else:
                pytest.fail("memdirty did not start")
            busy = _dirty_rate_mb_s(guest.qmp)
            assert (pid, "running") in [(p, s) for p, s, _ in ctl.jobs()]
        finally:
            ctl.kill(pid)
    assert idle < 8, idle
    print(f"dirty rate idle {idle} MB/s, memdirty 32 MiB/s -> {busy} MB/s")
    assert 20 < busy < 50, (idle, busy)


def test_diskwriter_records_are_on_the_disk(guest: Guest) -> None:
    with GuestControl(f"unix:{guest.control}") as ctl:
        ctl.run("diskwriter", "/dev/vda", "--port", str(DISKWRITER_PORT), "--count", "100")
        reports = DiskWriterReports()
        with guest.ns.entered():
            sock = None
            for _ in range(100):  # the writer needs a moment to listen
                try:
                    sock = socket.create_connection((GUEST_IP, DISKWRITER_PORT), timeout=30)
                    break
                except ConnectionRefusedError:
                    ctl.sh("sleep", "0.1")
        assert sock is not None
        while reports.finished is None:
            data = sock.recv(4096)
            if not data:
                break
            reports.feed(data)
        sock.close()
    assert reports.finished == "DONE" and reports.durable == list(range(1, 101))
    assert reports.run is not None
    # every record reported durable is in the image file, byte for byte, while QEMU still runs
    assert read_disk_records(guest.disk.read_bytes(), reports.run) >= set(reports.durable)


def test_hybridft_guest_run_starts_a_workload(guest: Guest) -> None:
    out = subprocess.run(
        [str(HYBRIDFT), "guest", "run", "cpuburn", "60", "--control", f"unix:{guest.control}", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    bad = subprocess.run(
        [str(HYBRIDFT), "guest", "run", "no-such-program", "--control", f"unix:{guest.control}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "no such program" in bad.stderr
    # the workload's own options pass through (e.g. diskwriter --port)
    opts = subprocess.run(
        [
            str(HYBRIDFT),
            "guest",
            "run",
            "echo",
            "-n",
            "--port",
            "9",
            "--console",
            f"unix:{guest.control}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert opts.returncode == 0, opts.stderr
    echo_pid = json.loads(opts.stdout)["pid"]
    with GuestControl(f"unix:{guest.control}") as ctl:
        jobs = {p: (state, cmd) for p, state, cmd in ctl.jobs()}
        assert jobs[pid] == ("running", "cpuburn 60")
        assert any(cmd == "sleep 600" for _, cmd in jobs.values())  # hft.run= from the command line
        assert ctl.sh("cat", f"/proc/{pid}/comm").text == "cpuburn"
        ctl.kill(pid, "KILL")
        assert ctl.sh("sleep", "0.2").rc == 0
        assert dict((p, s) for p, s, _ in ctl.jobs())[pid] == "exited"
        assert ctl.command("bogus").rc == 2
        assert ctl.sh("cat", f"/tmp/echo.{echo_pid}.log").text == "--port 9"
        # words reach the program literally (no globbing in the control loop)
        echo = ctl.run("echo", "*", "$HOME")
        ctl.sh("sleep", "0.2")
        assert ctl.sh("cat", f"/tmp/echo.{echo}.log").text == "* $HOME"
        # a command that outlives its timeout: the late reply is skipped, not taken for the next one
        with pytest.raises(GuestControlTimeout):
            ctl.sh("sleep", "2", "&&", "echo", "late", timeout=0.5)
        assert ctl.sh("echo", "after").text == "after"


def test_the_same_device_set_migrates_to_an_incoming_qemu(tmp_path: Path) -> None:
    """What the COLO secondary relies on: a second QEMU with the same arguments plus -incoming takes
    over the running guest, which then serves HTTP and its control loop from there."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed")
    image = build_guest()
    disk = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "8M"], check=True)
    cmdline = guest_cmdline(f"{GUEST_IP}/24")
    with NetNamespace() as ns:
        procs = {}
        for side in ("src", "dst"):
            ns.add_tap(f"tap-{side}")
            args = qemu_args(
                image,
                tap=f"tap-{side}",
                disk=disk,  # shared storage, as in a plain migration
                console_log=tmp_path / f"{side}.log",
                control_socket=tmp_path / f"{side}.ctl",
                cmdline=cmdline,
            )
            args += ["-qmp", f"unix:{tmp_path / side}.qmp,server=on,wait=off"]
            if side == "dst":
                args += ["-incoming", f"unix:{tmp_path / 'migrate.sock'}"]
            procs[side] = ns.popen([qemu, *args])
        wait_for_ready(tmp_path / "src.log", timeout=90, proc=procs["src"])

        async def migrate() -> str:
            qmp = QMPClient("src")
            await qmp.connect(str(tmp_path / "src.qmp"))
            try:
                await qmp.execute("migrate", {"uri": f"unix:{tmp_path / 'migrate.sock'}"})
                while True:
                    status = str((await qmp.execute("query-migrate")).get("status"))
                    if status in ("completed", "failed", "cancelled"):
                        return status
                    await asyncio.sleep(0.1)
            finally:
                await qmp.disconnect()

        assert asyncio.run(asyncio.wait_for(migrate(), 60)) == "completed"
        procs["src"].terminate()
        procs["src"].wait(timeout=10)
        with GuestControl(f"unix:{tmp_path / 'dst.ctl'}") as ctl:
            assert ctl.sh("echo", "on", "the", "destination").text == "on the destination"
        with ns.entered():
            conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=60)
            conn.connect()
        conn.request("GET", "/blob")
        body = conn.getresponse().read()
        conn.close()
        assert body == blob_bytes()
