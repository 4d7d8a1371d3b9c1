"""Issue 12, channels: only the pair may use the pair's sockets (fast tests, no QEMU).

Each named attack of the issue is tried as the attacker would, and must be refused:

* a forged heartbeat ``{"failover": true}`` (from another uid, from a second connection, over tcp
  without the pair's certificate) and a forged ``sealed`` for a future epoch;
* a second connection to the comparator's ``out`` stealing the clients' output;
* ``disk ctl failover`` over ``tcp:0.0.0.0`` from any local process;
* an NBD write to `replica` from a peer that is not the authenticated primary.

"Another user" is a forked child that drops to uid 65534 (the tests run as root); the test opens
the socket's directory and mode to it first, so what refuses it is the ``SO_PEERCRED`` check, not the
file mode (which is the first lock, tested on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd as libnbd
import pytest

from colo_compare.transport import FrameDecoder, encode_frames
from controller.agent import Agent
from controller.heartbeat import Heartbeat, HeartbeatSender
from disk_buffer import nbd
from hybridft_common.cli import hybridft_command
from hybridft_common.control import ControlError, call, encode_request
from hybridft_common.endpoints import parse_endpoint, start_server
from hybridft_common.secure import ChannelError, ensure_private_dir, open_nofollow
from tests.helpers.disk_server import start_disk_serve
from tests.helpers.frames import tcp_frame
from tests.helpers.tls import Creds, free_port, make_creds, tls_connect

NOBODY = 65534


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return make_creds(tmp_path_factory.mktemp("creds"))


def as_other_user(action: Callable[[], bytes], uid: int = NOBODY) -> bytes:
    """Run ``action`` in a forked child as ``uid``; its result (or ``b"error: ..."``) comes back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, act, report, leave without running any cleanup
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = action()
            except Exception as exc:
                result = f"error: {exc!r}".encode()
            os.write(write_end, result)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid can reach (pytest's own tmp directories are 0700 all the way up)."""
    path = Path(tempfile.mkdtemp(prefix="hft-channels-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_to_everyone(path: Path) -> None:
    """Make the socket reachable by any uid (directory 0755, socket 0666): only SO_PEERCRED is left."""
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)
    probe = as_other_user(lambda: b"reachable" if os.access(path, os.W_OK) else b"unreachable")
    assert probe == b"reachable", f"the test cannot reach {path} as another user: {probe!r}"


def unix_exchange(path: Path, payload: bytes, timeout: float = 3.0) -> Callable[[], bytes]:
    def action() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            try:
                return b"reply: " + sock.recv(65536)
            except TimeoutError:
                return b"no reply"
            except OSError as exc:
                return f"reset: {exc}".encode()

    return action


# ------------------------------------------------------------------------------- directories, files
def test_a_new_workdir_is_0700(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "a" / "work")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_a_workdir_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ChannelError, match="belongs to uid 65534"):
        ensure_private_dir(theirs)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_a_group_or_world_writable_workdir_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(ChannelError, match="group- or world-writable"):
        ensure_private_dir(shared)


def test_a_symlinked_workdir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ChannelError, match="symlink"):
        ensure_private_dir(tmp_path / "link")


def test_state_files_are_not_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "journal").symlink_to(victim)
    with pytest.raises(ChannelError, match="symlink"):
        open_nofollow(tmp_path / "journal", os.O_RDWR | os.O_CREAT)
    assert victim.read_text() == "precious"


# --------------------------------------------------------------------------------------- heartbeat
class _Manifest:
    """The agent's listener needs nothing of pair.json."""


@contextlib.asynccontextmanager
async def listening_agent(endpoint: str) -> Any:
    agent = Agent(_Manifest(), silence_limit=60.0)  # type: ignore[arg-type]
    server = await start_server(parse_endpoint(endpoint), agent._on_heartbeat)
    try:
        yield agent
    finally:
        server.close()
        if agent._writer is not None:
            agent._writer.close()


FORGED_FAILOVER = b'{"t": 1, "failover": true}\n'


def test_a_heartbeat_from_another_uid_cannot_order_a_failover(open_dir: Path) -> None:
    path = open_dir / "hb.sock"

    async def scenario() -> Agent:
        async with listening_agent(f"unix:{path}") as agent:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the first lock: the file mode
            open_to_everyone(path)
            forged = FORGED_FAILOVER + b'{"t": 2, "epoch": 99, "state": "sealed"}\n'
            await asyncio.get_running_loop().run_in_executor(None, as_other_user, unix_exchange(path, forged))
            await asyncio.sleep(0.1)
            return agent

    agent = asyncio.run(scenario())
    assert agent.decider.trigger is None, "a forged heartbeat ordered a failover"
    assert 99 not in agent.decider.seal_times, "a forged sealed epoch was recorded"
    assert not agent.decider.armed


def test_a_second_heartbeat_connection_cannot_speak_for_the_daemon(tmp_path: Path) -> None:
    """Same uid, second connection while the daemon's lives: refused, so a forged ``sealed`` for a future
    epoch (which a later failover would commit although the secondary never loaded it) and a forged
    ``failover`` are never read."""
    path = tmp_path / "hb.sock"

    async def scenario() -> Agent:
        async with listening_agent(f"unix:{path}") as agent:
            _, daemon = await asyncio.open_unix_connection(str(path))
            daemon.write(Heartbeat(time.time(), 3, "committed").encode())
            await daemon.drain()
            await asyncio.sleep(0.05)
            assert agent.decider.armed and agent.decider.epoch == 3
            reader, forger = await asyncio.open_unix_connection(str(path))
            forger.write(Heartbeat(time.time(), 7, "sealed").encode() + FORGED_FAILOVER)
            await forger.drain()
            try:  # closed on it (a reset, when the forged lines were still unread)
                assert await asyncio.wait_for(reader.read(), 2) == b""
            except ConnectionResetError:
                pass
            daemon.write(Heartbeat(time.time(), 4, "sealed").encode())
            await daemon.drain()
            await asyncio.sleep(0.05)
            assert agent.refused == 1
            daemon.close()
            return agent

    agent = asyncio.run(scenario())
    assert 7 not in agent.decider.seal_times, "the forged future epoch was recorded"
    assert agent.decider.trigger != "planned failover"
    assert 4 in agent.decider.seal_times  # the daemon's own connection still speaks


def test_a_heartbeat_over_tcp_needs_the_pairs_client_certificate(creds: Creds) -> None:
    port = free_port()
    endpoint = f"tcp:127.0.0.1:{port},tls-creds={creds.host}"

    async def forge(ctx: ssl.SSLContext | None) -> bool:
        """True when the forged line got through."""
        async with listening_agent(endpoint) as agent:
            with contextlib.suppress(OSError, ssl.SSLError):
                hostname = "127.0.0.1" if ctx else None
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=hostname
                )
                writer.write(FORGED_FAILOVER)
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()
            await asyncio.sleep(0.1)
            return agent.decider.trigger == "planned failover"

    assert not asyncio.run(forge(None)), "plain tcp ordered a failover"
    assert not asyncio.run(forge(creds.client_context(with_cert=False))), "TLS without a client cert"
    assert not asyncio.run(forge(creds.client_context(stranger=True))), "a certificate of another CA"

    async def daemon() -> Agent:  # the pair's daemon, with the pair's credentials, is heard
        async with listening_agent(endpoint) as agent:
            sender = HeartbeatSender(endpoint, lambda: Heartbeat(time.time(), 1, "committed"))
            await asyncio.get_running_loop().run_in_executor(None, sender._connect)
            assert sender.connected
            sender.send(Heartbeat(time.time(), 1, "committed", failover=True))
            await asyncio.sleep(0.2)
            sender.close()
            return agent

    assert asyncio.run(daemon()).decider.trigger == "planned failover"


def test_a_tcp_heartbeat_without_credentials_is_refused_with_how_to_make_them() -> None:
    async def listen() -> None:
        await start_server(parse_endpoint(f"tcp:127.0.0.1:{free_port()}"), Agent._on_heartbeat)  # type: ignore[arg-type]

    with pytest.raises(ChannelError, match=r"hybridft certs init"):
        asyncio.run(listen())


# --------------------------------------------------------------------------------------- comparator
@contextlib.contextmanager
def comparator(tmp: Path, *extra: str) -> Iterator[dict[str, Path]]:
    socks = {r: tmp / f"{r}.sock" for r in ("primary", "secondary", "out", "control")}
    cmd = [*hybridft_command(), "compare", "serve", "--mode", "mc",
           "--primary-in", f"unix:{socks['primary']}", "--secondary-in", f"unix:{socks['secondary']}",
           "--out", f"unix:{socks['out']}", "--control", f"unix:{socks['control']}", *extra]  # fmt: skip
    log = tmp / "compare.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", log.read_text()
        yield socks
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def test_a_second_out_connection_cannot_steal_the_clients_output(tmp_path: Path) -> None:
    with comparator(tmp_path) as socks:
        for path in socks.values():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        qemu_out, primary = _connect(socks["out"]), _connect(socks["primary"])
        control = f"unix:{socks['control']}"
        deadline = time.monotonic() + 5
        while not call(control, "stats")["transport"]["connected"]["out"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        thief = _connect(socks["out"])
        thief.settimeout(3)
        assert thief.recv(65536) == b"", "the second out connection was accepted"
        frames = [tcp_frame(1 + 10 * i, b"o" * 10) for i in range(10)]
        primary.sendall(encode_frames(frames))
        while call(control, "stats")["transport"]["primary_frames"] < len(frames):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        call(control, "commit", epoch=call(control, "seal")["epoch"])
        qemu_out.settimeout(5)
        decoder, got = FrameDecoder(), []
        while len(got) < len(frames):
            data = qemu_out.recv(65536)
            assert data, "QEMU's out connection was closed"
            got += decoder.feed(data)
        assert got == frames
        # QEMU restarting: its old connection ends, and the new one is taken
        qemu_out.close()
        replacement = _connect(socks["out"])
        replacement.settimeout(0.5)
        with pytest.raises(TimeoutError):
            replacement.recv(1)  # not closed on it
        for sock in (replacement, thief, primary):
            sock.close()


def test_comparator_inputs_refuse_another_uid(open_dir: Path) -> None:
    with comparator(open_dir) as socks:
        open_to_everyone(socks["primary"])
        frames = encode_frames([tcp_frame(1, b"x" * 10)])
        as_other_user(unix_exchange(socks["primary"], frames, timeout=1.0))
        time.sleep(0.1)
        stats = call(f"unix:{socks['control']}", "stats")["transport"]
        assert stats["primary_frames"] == 0, "another uid's frames reached the comparator"


# --------------------------------------------------------------------------------------- disk server
@contextlib.contextmanager
def disk_server(tmp: Path, *, nbd_ep: str, control: str, extra: tuple[str, ...] = ()) -> Iterator[Any]:
    image = tmp / "replica.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    proc, ready = start_disk_serve(image, tmp / "state", nbd=nbd_ep, control=control, extra=extra,
                                   stderr=tmp / "disk.log")  # fmt: skip
    try:
        yield ready
    finally:
        proc.terminate()
        proc.wait(10)


def test_disk_ctl_failover_over_plain_tcp_is_refused(tmp_path: Path) -> None:
    """The server does not even start on ``tcp:0.0.0.0`` without credentials, and says how to make them."""
    image = tmp_path / "replica.img"
    image.write_bytes(bytes(1 << 20))
    argv = [*hybridft_command(), "disk", "serve", "--image", str(image), "--state-dir", str(tmp_path / "s"),
            "--nbd", f"unix:{tmp_path / 'nbd.sock'}", "--control", f"tcp:0.0.0.0:{free_port()}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "hybridft certs init" in proc.stderr, proc.stderr
    with pytest.raises(ControlError, match="needs TLS credentials"):
        call(f"tcp:127.0.0.1:{free_port()}", "failover")


def test_disk_ctl_failover_over_tcp_needs_the_pairs_certificate(tmp_path: Path, creds: Creds) -> None:
    port = free_port()
    ctl = f"tcp:0.0.0.0:{port}"
    with disk_server(tmp_path, nbd_ep=f"unix:{tmp_path / 'nbd.sock'}", control=ctl,
                     extra=("--tls-creds", str(creds.host))):  # fmt: skip
        request = encode_request("failover")
        attackers = (
            ("plain tcp", None),
            ("TLS without a client certificate", creds.client_context(with_cert=False)),
            ("a certificate of another CA", creds.client_context(stranger=True)),
        )
        for name, ctx in attackers:
            with contextlib.suppress(OSError):
                sock: socket.socket = (
                    socket.create_connection(("127.0.0.1", port), timeout=3)
                    if ctx is None
                    else tls_connect(port, ctx, timeout=3)
                )
                with sock:
                    sock.sendall(request)
                    sock.settimeout(3)
                    reply = sock.recv(65536)
                    assert b'"ok":true' not in reply, f"{name}: failover accepted"
        status = call(f"tcp:127.0.0.1:{port},tls-creds={creds.host}", "status")
        assert not status.get("failed_over"), f"the disk failed over: {status}"


def test_disk_control_refuses_another_uid(open_dir: Path) -> None:
    ctl = open_dir / "ctl.sock"
    with disk_server(open_dir, nbd_ep=f"unix:{open_dir / 'nbd.sock'}", control=f"unix:{ctl}"):
        assert stat.S_IMODE(ctl.stat().st_mode) == 0o600
        open_to_everyone(ctl)
        reply = as_other_user(unix_exchange(ctl, encode_request("failover")))
        assert b'"ok":true' not in reply, reply
        assert not call(f"unix:{ctl}", "status").get("failed_over")


def _nbd_handle(creds_dir: Path | None) -> Any:
    h = libnbd.NBD()
    if creds_dir is not None:
        h.set_tls(libnbd.TLS_REQUIRE)
        h.set_tls_certificates(str(creds_dir))
    h.set_export_name("replica")
    return h


def test_an_nbd_write_to_replica_needs_the_pairs_certificate_over_tcp(tmp_path: Path, creds: Creds) -> None:
    port = free_port()
    with disk_server(tmp_path, nbd_ep=f"tcp:127.0.0.1:{port}", control=f"unix:{tmp_path / 'ctl.sock'}",
                     extra=("--tls-creds", str(creds.host))):  # fmt: skip
        for creds_dir in (None, creds.stranger):
            h = _nbd_handle(creds_dir)
            with pytest.raises(libnbd.Error):
                h.connect_tcp("127.0.0.1", str(port))
                h.pwrite(b"\xee" * 4096, 0)
            del h
        h = _nbd_handle(creds.host)  # the primary's mirror: STARTTLS with the pair's client certificate
        h.connect_tcp("127.0.0.1", str(port))
        assert h.get_size() == 4 << 20
        assert h.pread(4096, 0) == bytes(4096)  # nobody wrote before
        h.pwrite(b"\x5a" * 4096, 0)
        assert h.pread(4096, 0) == b"\x5a" * 4096
        h.shutdown()


def test_an_nbd_write_to_replica_from_another_uid_is_refused(open_dir: Path) -> None:
    path = open_dir / "nbd.sock"
    with disk_server(open_dir, nbd_ep=f"unix:{path}", control=f"unix:{open_dir / 'ctl.sock'}"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        open_to_everyone(path)

        def write_replica() -> bytes:
            h = libnbd.NBD()
            h.set_export_name("replica")
            h.connect_unix(str(path))
            h.pwrite(b"\xee" * 4096, 0)
            h.flush()
            return b"written"

        assert as_other_user(write_replica) != b"written"
        h = libnbd.NBD()
        h.set_export_name("replica")
        h.connect_unix(str(path))
        assert h.pread(4096, 0) == bytes(4096), "another uid's write reached replica"
        h.shutdown()


# ------------------------------------------------------------------------------------ NBD STARTTLS
def _handshake(tls: bool) -> nbd.ServerHandshake:
    exports = {"replica": nbd.ExportInfo("replica", 1 << 20, nbd.DEFAULT_TRANSMISSION_FLAGS)}
    hs = nbd.ServerHandshake(exports, tls=tls)
    hs.receive(bytes(4))  # client flags
    return hs


def _reply_codes(data: bytes) -> list[int]:
    codes = []
    while data:
        _magic, _option, reply, length = nbd._OPTION_REPLY.unpack_from(data)
        codes.append(reply)
        data = data[nbd._OPTION_REPLY.size + length :]
    return codes


def test_a_tls_only_handshake_refuses_every_option_before_starttls() -> None:
    hs = _handshake(tls=True)
    assert _reply_codes(hs.receive(nbd.encode_go("replica"))) == [nbd.Rep.ERR_TLS_REQD]
    assert _reply_codes(hs.receive(nbd.encode_option(nbd.Opt.LIST))) == [nbd.Rep.ERR_TLS_REQD]
    assert hs.export is None
    with pytest.raises(nbd.HandshakeError):
        _handshake(tls=True).receive(nbd.encode_option(nbd.Opt.EXPORT_NAME, b"replica"))
    assert _reply_codes(hs.receive(nbd.encode_option(nbd.Opt.STARTTLS))) == [nbd.Rep.ACK]
    assert hs.starttls
    with pytest.raises(nbd.HandshakeError):  # nothing in clear between the ACK and the TLS handshake
        hs.receive(nbd.encode_go("replica"))
    hs.tls_started()
    assert _reply_codes(hs.receive(nbd.encode_option(nbd.Opt.STARTTLS))) == [nbd.Rep.ERR_INVALID]
    assert _reply_codes(hs.receive(nbd.encode_go("replica")))[-1] == nbd.Rep.ACK
    assert hs.export is not None and hs.export.name == "replica"


def test_without_tls_starttls_is_refused_by_policy() -> None:
    hs = _handshake(tls=False)
    assert _reply_codes(hs.receive(nbd.encode_option(nbd.Opt.STARTTLS))) == [nbd.Rep.ERR_POLICY]


# ------------------------------------------------------------------------------------ control, TLS
def test_control_over_tcp_is_mutual_tls(tmp_path: Path, creds: Creds) -> None:
    port = free_port()

    async def dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"verb": verb}

    async def scenario() -> dict[str, Any]:
        from hybridft_common.control import AsyncControlClient, serve_control

        server = await serve_control(f"tcp:127.0.0.1:{port},tls-creds={creds.host}", dispatch)
        results: dict[str, Any] = {}
        try:
            client = AsyncControlClient(f"tcp:127.0.0.1:{port},tls-creds={creds.host}")
            results["pair"] = await client.call("status")
            await client.close()
            for name, ctx in (
                ("no cert", creds.client_context(with_cert=False)),
                ("stranger", creds.client_context(stranger=True)),
            ):
                try:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
                    )
                    writer.write(encode_request("status"))
                    await writer.drain()
                    results[name] = await asyncio.wait_for(reader.readline(), 3)
                    writer.close()
                except (OSError, ssl.SSLError) as exc:
                    results[name] = exc
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(encode_request("status"))
                await writer.drain()
                results["plain"] = await asyncio.wait_for(reader.readline(), 3)
                writer.close()
            except (OSError, TimeoutError) as exc:
                results["plain"] = exc
        finally:
            server.close()
        return results

    results = asyncio.run(scenario())
    assert results["pair"] == {"verb": "status"}
    for name in ("no cert", "stranger", "plain"):
        assert not (isinstance(results[name], bytes) and b'"ok":true' in results[name]), (name, results[name])
    with pytest.raises(ControlError, match="hybridft certs init"):
        call(f"tcp:127.0.0.1:{port}", "status")


def test_an_endpoint_carries_its_credentials() -> None:
    ep = parse_endpoint("tcp:10.0.0.2:7000,tls-creds=/etc/hft/host-b")
    assert (ep.host, ep.port, ep.tls_creds) == ("10.0.0.2", 7000, "/etc/hft/host-b")
    assert parse_endpoint(str(ep)) == ep
    assert parse_endpoint("tcp:h:1", "/d").tls_creds == "/d"
    assert parse_endpoint("unix:/x", "/d").tls_creds is None
    with pytest.raises(ValueError, match="unknown option"):
        parse_endpoint("tcp:h:1,tls=/d")


def test_certs_cli_makes_a_qemu_layout_of_private_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    subprocess.run([*hybridft_command(), "certs", "init", str(ca)], check=True, capture_output=True)
    issue = [*hybridft_command(), "certs", "issue", str(ca), "--host", "hostb", "--ip", "10.0.0.2"]
    out = subprocess.run(issue, check=True, capture_output=True, text=True)
    host = ca / "hostb"
    assert str(host) in out.stdout
    names = {"ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"}
    assert {p.name for p in host.iterdir()} == names
    for path in [*host.iterdir(), ca / "ca-key.pem"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(host.stat().st_mode) == 0o700
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((host / "server-cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hostb" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    again = subprocess.run([*hybridft_command(), "certs", "init", str(ca)], capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_the_disk_state_dir_is_private_and_its_files_are_not_symlinks(tmp_path: Path) -> None:
    from disk_buffer.buffer import DiskBuffer
    from disk_buffer.store import DiskBufferError

    image = tmp_path / "replica.img"
    image.write_bytes(bytes(1 << 20))
    shared = tmp_path / "shared-state"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(DiskBufferError, match="group- or world-writable"):
        DiskBuffer.open(image, shared)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (state / "journal.0").symlink_to(victim)
    with pytest.raises(ChannelError, match="symlink"):
        DiskBuffer.open(image, state)
    assert victim.read_bytes() == b"precious"


def test_pair_json_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    from tests.test_manifest import manifest_for

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "pair.json.tmp").symlink_to(victim)
    with pytest.raises(ChannelError, match="symlink"):
        manifest_for(tmp_path).write(tmp_path / "pair.json")
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------------- QEMU's side of TLS
def test_qemu_chardevs_over_tcp_name_their_tls_creds_object() -> None:
    from hybridft_common.tls import TlsError
    from mc_driver.launch import chardev_client, chardev_server, migration_tls_args, tls_creds_object

    ep = parse_endpoint("tcp:10.0.0.2:7001,tls-creds=/etc/hft/b")
    assert chardev_client("red0", ep) == [
        "-chardev", "socket,id=red0,host=10.0.0.2,port=7001,tls-creds=hft-tls-client,reconnect=1",
    ]  # fmt: skip
    assert chardev_server("mirror0", ep) == [
        "-chardev", "socket,id=mirror0,host=10.0.0.2,port=7001,tls-creds=hft-tls-server,server=on,wait=off",
    ]  # fmt: skip
    assert chardev_client("c", Path("/w/x.sock")) == ["-chardev", "socket,id=c,path=/w/x.sock,reconnect=1"]
    assert tls_creds_object("hft-tls-server", "/etc/hft/b", "server") == [
        "-object", "tls-creds-x509,id=hft-tls-server,dir=/etc/hft/b,endpoint=server,verify-peer=on",
    ]  # fmt: skip
    assert migration_tls_args("hft-tls-client") == ["-global", "migration.tls-creds=hft-tls-client"]
    with pytest.raises(TlsError, match="hybridft certs init"):
        chardev_client("red0", parse_endpoint("tcp:10.0.0.2:7001"))


def test_the_two_host_layout_puts_every_cross_host_channel_on_tls(tmp_path: Path) -> None:
    from mc_driver.launch import PairFiles
    from mc_driver.pair import TCP_CHANNELS, PairConfig, PairError, pair_channels

    files = PairFiles(tmp_path)
    one_host = pair_channels(PairConfig(tmp_path), files)
    assert not one_host.tcp and one_host.heartbeat.startswith("unix:")
    ports = {name: 7000 + i for i, name in enumerate(TCP_CHANNELS)}
    config = PairConfig(tmp_path, tcp_host="127.0.0.1", tls_creds=Path("/c"))
    two = pair_channels(config, files, ports)
    for address in (
        two.disk_control,
        two.heartbeat,
        str(two.replica),
        str(two.mirror),
        str(two.compare_secondary),
    ):
        ep = parse_endpoint(address)
        assert ep.kind == "tcp" and ep.tls_creds == "/c", address
    assert two.migrate == f"tcp:127.0.0.1:{ports['migrate']}"
    assert two.disk_nbd[0] == f"unix:{two.view}"  # the secondary's own disk stays on its host
    with pytest.raises(PairError, match="hybridft certs init"):
        pair_channels(PairConfig(tmp_path, tcp_host="127.0.0.1"), files, ports)
