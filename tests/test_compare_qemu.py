"""Compatibility with a REAL QEMU 7.2: its net filters talk to our frame codec byte-exactly.

No guest is needed.  QEMU runs ``-M none`` with two UDP socket netdevs joined by a hub::

    test UDP socket ──▶ in0 ──hub──▶ out0 ──▶ UDP sink (the test)
                        │             │  ▲
     filter-mirror tx ──┘   redirector│  │redirector rx, indev
     (copy → our socket)    rx,outdev │  │(our socket → out0)
                            (steal →  ▼  │
                             our socket)

A frame sent into in0 is copied by the filter-mirror and stolen by the outdev redirector — exactly
how the primary's guest output reaches the comparator — and frames we write into the indev
redirector leave through out0 — how released frames reach the client.  Filter order matters: on
the rx queue QEMU walks filters in reverse, so the indev redirector is declared before the outdev one
(as in QEMU's docs/COLO-FT.txt), otherwise injected frames would be stolen again.

With ``vnet_hdr_support=on`` a socket netdev has a zero-length virtio header, so QEMU sends the
8-byte prefix with ``vnet_hdr_len`` 0; a non-empty header needs a virtio-net guest driver (covered
by the codec's unit tests and the VM-pair tests of later issues).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from colo_compare.transport import FrameDecoder, encode_frame, encode_frames
from hybridft_common.cli import hybridft_command
from hybridft_common.control import call
from tests.helpers.frames import stream_frames
from tests.helpers.qmp import qmp_commands

pytestmark = pytest.mark.qemu

QEMU = "qemu-system-x86_64"
PROBE = b"\xff" * 12 + b"\x88\xb5" + b"hybridft-probe"


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        pytest.fail(f"{QEMU} is not installed: these tests need a real QEMU (make setup installs it)")
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuNet:
    """A guest-less QEMU whose net filters connect (as reconnecting clients) to the given sockets."""

    def __init__(
        self, chardevs: dict[str, str], vnet_hdr: bool, workdir: Path, qmp: Path | None = None
    ) -> None:
        self.in_port = free_udp_port()
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE (root) else the capped size
            with contextlib.suppress(OSError):
                self.sink.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
                break
        self.sink.settimeout(5)
        support = ",vnet_hdr_support=on" if vnet_hdr else ""
        cmd = [
            qemu_binary(), "-M", "none", "-nodefaults", "-display", "none", "-monitor", "none",
            "-netdev", f"socket,id=in0,udp=127.0.0.1:9,localaddr=127.0.0.1:{self.in_port}",
            "-netdev", f"socket,id=out0,udp=127.0.0.1:{self.sink.getsockname()[1]},"
                       f"localaddr=127.0.0.1:{free_udp_port()}",
            "-netdev", "hubport,id=hp0,hubid=0,netdev=in0",
            "-netdev", "hubport,id=hp1,hubid=0,netdev=out0",
        ]  # fmt: skip
        for role, path in chardevs.items():
            cmd += ["-chardev", f"socket,id=c_{role},path={path},reconnect=1"]
        if "mirror" in chardevs:
            cmd += ["-object", f"filter-mirror,id=f_mirror,netdev=in0,queue=tx,outdev=c_mirror{support}"]
        if "in" in chardevs:
            cmd += ["-object", f"filter-redirector,id=f_in,netdev=out0,queue=rx,indev=c_in{support}"]
        if "out" in chardevs:
            cmd += ["-object", f"filter-redirector,id=f_out,netdev=out0,queue=rx,outdev=c_out{support}"]
        if qmp is not None:
            cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        self.log = open(workdir / "qemu.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, frame: bytes) -> None:
        """Put one Ethernet frame into netdev in0 (as if the guest had sent it)."""
        self.sender.sendto(frame, ("127.0.0.1", self.in_port))

    def sink_frames(self, count: int) -> list[bytes]:
        """The next ``count`` frames that left through netdev out0 (probes skipped)."""
        got: list[bytes] = []
        while len(got) < count:
            frame = self.sink.recv(70000)
            if frame != PROBE:
                got.append(frame)
        return got

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.sink.close()
        self.sender.close()


@contextlib.contextmanager
def qemu_net(
    chardevs: dict[str, str], vnet_hdr: bool, workdir: Path, qmp: Path | None = None
) -> Iterator[QemuNet]:
    net = QemuNet(chardevs, vnet_hdr, workdir, qmp)
    try:
        yield net
    finally:
        net.close()
        if net.proc.returncode not in (0, -15):
            print((workdir / "qemu.log").read_text(errors="replace"))


def listen_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.settimeout(15)
    return s


def read_frames(conn: socket.socket, decoder: FrameDecoder, count: int, timeout: float = 5.0) -> list[bytes]:
    """Decode ``count`` non-probe frames (and their headers, left in ``decoder.vnet_headers``)."""
    conn.settimeout(timeout)
    frames: list[bytes] = []
    headers: list[bytes] = []
    while len(frames) < count:
        try:
            data = conn.recv(1 << 20)
        except TimeoutError:
            raise AssertionError(f"only {len(frames)} of {count} frames arrived") from None
        assert data, "QEMU closed the connection"
        batch = decoder.feed(data)
        for i, frame in enumerate(batch):
            if frame != PROBE:
                frames.append(frame)
                headers.extend(decoder.vnet_headers[i : i + 1])
    decoder.vnet_headers = headers
    return frames


def wait_attached(net: QemuNet, conns: list[socket.socket], decoders: list[FrameDecoder]) -> None:
    """QEMU's reconnecting chardevs attach asynchronously after accept(): probe until frames flow."""
    deadline = time.monotonic() + 10
    seen = [False] * len(conns)
    while not all(seen):
        assert time.monotonic() < deadline, "QEMU's filters never delivered a probe frame"
        net.send(PROBE)
        for i, conn in enumerate(conns):
            conn.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                data = conn.recv(1 << 20)
                assert data, "QEMU closed the connection"
                if any(f == PROBE for f in decoders[i].feed(data)):
                    seen[i] = True


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr_support"])
def test_qemu_filter_framing_both_directions(tmp_path: Path, vnet_hdr: bool) -> None:
    paths = {role: tmp_path / f"{role}.sock" for role in ("mirror", "out", "in")}
    listeners = {role: listen_unix(p) for role, p in paths.items()}
    with qemu_net({r: str(p) for r, p in paths.items()}, vnet_hdr, tmp_path) as net:
        conns = {role: s.accept()[0] for role, s in listeners.items()}
        decoders = {role: FrameDecoder(vnet_hdr=vnet_hdr, read_size=4096) for role in ("mirror", "out")}
        wait_attached(net, [conns["mirror"], conns["out"]], [decoders["mirror"], decoders["out"]])

        # guest -> filters: every size from a runt to a jumbo frame, byte-exact, in order
        sizes = [14, 60, 61, 1514, 9014, 100] * 20
        frames = [bytes([i % 251]) * 6 + os.urandom(n - 6) for i, n in enumerate(sizes)]
        # (lock-step, since the UDP socket feeding QEMU drops what it cannot queue)
        got: dict[str, list[bytes]] = {"mirror": [], "out": []}
        for frame in frames:
            net.send(frame)
            for role in got:
                got[role] += read_frames(conns[role], decoders[role], 1)
                if vnet_hdr:
                    # socket netdevs have no virtio header: QEMU still sends the length word, as 0
                    assert decoders[role].vnet_headers == [b""]
        for role in got:
            assert got[role] == frames, f"{role}: frames differ from what QEMU carried"
        # a small burst: several records per read, split wherever the kernel splits them
        burst = [os.urandom(60) for _ in range(30)]
        for frame in burst:
            net.send(frame)
        for role in got:
            assert read_frames(conns[role], decoders[role], len(burst)) == burst

        # our writer -> indev redirector -> out of the netdev, byte-exact and in order
        back = [os.urandom(n) for n in [60, 1514, 200, 9014] * 25]
        conns["in"].sendall(encode_frames(back, [b""] * len(back) if vnet_hdr else None))
        assert net.sink_frames(len(back)) == back

        for conn in conns.values():
            conn.close()
    for s in listeners.values():
        s.close()


def test_qemu_reconnects_after_we_drop_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "out.sock"
    listener = listen_unix(path)
    with qemu_net({"out": str(path)}, False, tmp_path) as net:
        conn = listener.accept()[0]
        wait_attached(net, [conn], [FrameDecoder()])
        conn.close()  # as the comparator does after bad framing, or when it restarts
        conn = listener.accept()[0]  # reconnect=1: QEMU is back within about a second
        decoder = FrameDecoder()
        wait_attached(net, [conn], [decoder])
        frames = [os.urandom(100) for _ in range(10)]
        for frame in frames:
            net.send(frame)
        assert read_frames(conn, decoder, len(frames)) == frames
        conn.close()
    listener.close()


def _serve(tmp: Path, mode: str, vnet_hdr: bool) -> tuple[subprocess.Popen[bytes], dict[str, Path]]:
    paths = {r: tmp / f"serve-{r}.sock" for r in ("primary", "secondary", "out", "control")}
    cmd = [*hybridft_command(), "compare", "serve",
           "--primary-in", f"unix:{paths['primary']}", "--secondary-in", f"unix:{paths['secondary']}",
           "--out", f"unix:{paths['out']}", "--control", f"unix:{paths['control']}",
           "--mode", mode]  # fmt: skip
    if vnet_hdr:
        cmd.append("--vnet-hdr")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp / "serve.log", "wb"))  # noqa: SIM115
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", (tmp / "serve.log").read_text()
    return proc, paths


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr_support"])
def test_compare_serve_between_qemu_filters(tmp_path: Path, vnet_hdr: bool) -> None:
    """QEMU -> compare serve -> QEMU, both modes.

    The filter-mirror's copy plays the secondary's output and the outdev redirector the primary's,
    so in COLO both sides carry the same TCP stream and the comparator must release it at once; in
    MC mode nothing leaves before seal + commit, then exactly the sealed frames do, in order.
    """
    proc, paths = _serve(tmp_path, "colo", vnet_hdr)
    chardevs = {"mirror": str(paths["secondary"]), "out": str(paths["primary"]), "in": str(paths["out"])}
    try:
        with qemu_net(chardevs, vnet_hdr, tmp_path) as net:
            ctl = f"unix:{paths['control']}"
            deadline = time.monotonic() + 15
            while not all(call(ctl, "stats")["transport"]["connected"].values()):
                assert time.monotonic() < deadline, "QEMU's chardevs never connected to compare serve"
                time.sleep(0.05)
            time.sleep(0.3)  # QEMU attaches accepted chardevs on its next main-loop turn

            colo = stream_frames(bytes(range(256)) * 20, [1448], isn=4242, fin=True)
            for frame in colo:
                net.send(frame)
                time.sleep(0.002)  # the UDP socket feeding QEMU drops bursts
            assert net.sink_frames(len(colo)) == colo  # compared, matched, released
            stats = call(ctl, "stats")
            assert stats["core"]["divergences"] == 0 and stats["core"]["released_frames"] == len(colo)

            # switch to MC at the next checkpoint: epoch 2 is MC
            call(ctl, "mode", mode="mc")
            call(ctl, "commit", epoch=call(ctl, "seal")["epoch"])
            mc = stream_frames(b"mc-epoch" * 500, [1448], isn=99, sport=8080)
            for frame in mc:
                net.send(frame)
                time.sleep(0.002)
            deadline = time.monotonic() + 5
            while call(ctl, "stats")["transport"]["primary_frames"] < len(colo) + len(mc):
                assert time.monotonic() < deadline, "QEMU's frames did not reach the comparator"
                time.sleep(0.02)
            net.sink.settimeout(0.3)
            with pytest.raises(TimeoutError):
                net.sink.recv(70000)  # held: MC releases only at commit
            epoch = call(ctl, "seal")["epoch"]
            assert call(ctl, "commit", epoch=epoch)["released_frames"] == len(mc)
            net.sink.settimeout(5)
            assert net.sink_frames(len(mc)) == mc
            assert call(ctl, "stats")["transport"]["vnet_headers_missing"] == 0
    finally:
        _stop(proc)


def test_indev_redirector_stops_after_a_disconnect_until_recreated(tmp_path: Path) -> None:
    """QEMU 7.2 fact the daemon must handle: after its chardev disconnects, an indev
    filter-redirector never reads again (it drops its handlers on CHR_EVENT_CLOSED), although
    reconnect=1 re-opens the socket.  So when the comparator restarts, released frames go nowhere
    until the daemon re-creates that filter over QMP: object-del, then object-add with
    position=head (rx filters run in reverse order, so it must stay in front of the outdev
    redirector or its frames would be stolen back into the comparator)."""
    in_path, out_path, qmp = tmp_path / "in.sock", tmp_path / "out.sock", tmp_path / "qmp.sock"
    lin, lout = listen_unix(in_path), listen_unix(out_path)
    with qemu_net({"in": str(in_path), "out": str(out_path)}, False, tmp_path, qmp=qmp) as net:
        conn, out_conn = lin.accept()[0], lout.accept()[0]
        conn.sendall(encode_frame(b"A" * 60))
        assert net.sink_frames(1) == [b"A" * 60]

        conn.close()  # the comparator goes away...
        conn = lin.accept()[0]  # ...and QEMU reconnects
        time.sleep(0.3)
        conn.sendall(encode_frame(b"B" * 60))
        net.sink.settimeout(1.5)
        with pytest.raises(TimeoutError):
            net.sink_frames(1)  # never read: the release path is dead

        qmp_commands(qmp, {"execute": "object-del", "arguments": {"id": "f_in"}},
                     {"execute": "object-add", "arguments": {"qom-type": "filter-redirector", "id": "f_in2",
                      "netdev": "out0", "queue": "rx", "indev": "c_in", "position": "head"}})  # fmt: skip
        conn.sendall(encode_frame(b"C" * 60))
        net.sink.settimeout(5)
        got = net.sink_frames(1)
        assert got in ([b"C" * 60], [b"B" * 60])  # "B" may still sit in the new reader's socket
        out_conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            out_conn.recv(100)  # not stolen back by the outdev redirector
        conn.close()
        out_conn.close()
    lin.close()
    lout.close()


def test_no_output_bypasses_a_missing_comparator(tmp_path: Path) -> None:
    """Safety: with the comparator gone (connection and listener closed), QEMU's outdev
    redirector drops the guest's output; it never falls through to the netdev unprotected."""
    path = tmp_path / "out.sock"
    listener = listen_unix(path)
    with qemu_net({"out": str(path)}, False, tmp_path) as net:
        conn = listener.accept()[0]
        wait_attached(net, [conn], [FrameDecoder()])
        conn.close()
        listener.close()
        path.unlink()
        net.sink.settimeout(0.2)
        for i in range(8):
            net.send(bytes([i]) * 60)
            with pytest.raises(TimeoutError):
                net.sink.recv(100)
