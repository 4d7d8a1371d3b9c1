"""The launcher of a protected VM pair: every process of ARCHITECTURE.md §1 on one host, and its teardown.

``hybridft pair up`` starts, in this order (each step waits until the previous one is listening, so no
QEMU chardev ever connects to nothing and no QMP command races a socket that is not there yet)::

    network namespace + bridge + taps     (the secondary's tap stays OFF the bridge: its output reaches
                                            clients only through the comparator, until failover)
    disk server       replica.img = copy of primary.img; exports `replica` (the mirror target) and
                      `view` (the secondary's disk)
    comparator        hybridft compare serve: listens for both QEMUs' filter output and for released frames
    secondary QEMU    -incoming, disk = NBD `view`, filters: redirector tx indev=mirror, redirector rx
                      outdev -> comparator, filter-rewriter
    primary QEMU      -S, its own image, filters: filter-mirror tx -> secondary, redirector rx outdev ->
                      comparator, redirector rx indev <- comparator; then (still paused) an `nbd` node on
                      `replica` and blockdev-mirror write-blocking sync=none into it, then `cont`
    agent             hybridft agent (listens on the heartbeat socket, watches the secondary's QMP)
    daemon            hybridft daemon: starts COLO (the initial migration) and runs the epochs

and returns once the guest answers an echo request *through the comparator* (which proves the whole
chain: epochs run, the comparator releases, the secondary keeps up).

Why these choices
-----------------
* **Every process runs inside the namespace** (``ip netns exec``) in its own session with its output in
  ``DIR/<name>.log``: ``pair up`` can exit, and ``pair down`` finds every process either by the pids in
  ``pair.json`` or — after a crash that lost them — by ``ip netns pids``.  The namespace name is derived
  from the work directory (``hftpair-<hash>``), never from a pid, so another run's stale-namespace sweep
  (:func:`mc_driver.netns.cleanup_stale`) does not take a live pair for leftovers, and ``pair down``
  finds it again from the directory alone.
* **QEMU-side chardevs are clients with ``reconnect=1``** (the comparator listens), except the
  primary->secondary mirror, where the primary listens and the secondary connects.
* **blockdev-mirror by default, not quorum.**  The notes measured quorum+NBD at 7.0k IOPS against
  mirror's 5.2k, but quorum only gives epoch semantics together with QEMU's ``replication`` driver
  (whose secondary side is QEMU's own active/hidden-disk scheme, which the disk server replaces);
  mirror write-blocking acknowledges a guest write only after the disk server has it, needs no
  replication driver, and a target failure surfaces as a job error the daemon watches.  The mirror
  is started while the primary is still paused at ``-S`` so no guest write escapes it.
* **QMP monitors**: each consumer gets its own ``-mon`` (daemon, ops on both sides; agent on the
  secondary), because a QEMU monitor socket serves one client at a time.
* **Channels are private.**  The work directory is created 0700 (an existing one must be ours and not
  group/world-writable), every socket in it is 0600 and every service checks its unix peers' uid.
* **The two-host layout** (``tcp_host`` + ``tls_creds``, ``pair up --tcp-host --tls-creds``): every
  channel that would cross between the primary's host (primary QEMU, comparator, daemon) and the
  secondary's host (secondary QEMU, disk server, agent) is ``tcp:`` with mutual TLS from one credentials
  directory (``hybridft certs``): the migration stream (QEMU ``tls-creds`` parameter), the primary's
  mirror chardev and the secondary's output chardev (chardev ``tls-creds``), the mirror's NBD target
  (NBD STARTTLS), the disk server's control socket and the heartbeat.  Channels local to one host stay
  unix sockets (the secondary's `view` disk, the primary's comparator chardevs, every QMP monitor).
  ``pair up`` runs both "hosts" on this machine, so it is how that layout is tested end to end.
* **Failure while starting** tears everything down (the same code as ``pair down``) and raises
  :class:`PairError` naming the step and the log to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import SubprocessError
from typing import Any

from hybridft_common import manifest
from hybridft_common.cli import hybridft_command
from hybridft_common.endpoints import Endpoint
from hybridft_common.processes import pid_alive, pid_exists
from hybridft_common.secure import ChannelError, ensure_private_dir, open_nofollow
from hybridft_common.tls import HOW_TO, TlsCreds
from hybridft_common.vocabulary import Mode
from mc_driver.accel import NoUsableQemu, QemuChoice, choose_qemu
from mc_driver.guest.control import FAILED_LINE, READY_LINE
from mc_driver.guest.errors import GuestError
from mc_driver.guest.expected import ECHO_PORT
from mc_driver.guest.image import GuestImage, build_guest
from mc_driver.guest.qemu_args import DEFAULT_MAC, guest_cmdline
from mc_driver.launch import (
    PRIMARY_MIRROR_CHARDEV,
    PRIMARY_REDIRECTORS,
    PRIMARY_TAP,
    SECONDARY_TAP,
    TLS_CLIENT,
    TLS_SERVER,
    ChardevAddress,
    PairFiles,
    add_pair_taps,
    chardev_client,
    chardev_server,
    filter_mirror,
    filter_redirector,
    guest_qemu_args,
    migration_tls_args,
    monitor_args,
    secondary_filter_args,
    tls_creds_object,
)
from mc_driver.netns import NetNamespace, NetnsError, list_namespaces
from mc_driver.qmp import QmpError, QmpSession

GUEST_IP = "10.77.0.2"
CLIENT_IP = "10.77.0.1"
BRIDGE = "hftbr0"
MIRROR_JOB = "hft-mirror"
MIRROR_TARGET_NODE = "hft-replica"
PRIMARY_DRIVE = "disk0"
# In COLO the client sees the primary's segments, whose TCP timestamp (TSval) is the primary's clock plus a
# per-connection offset hashed from a secret the kernel draws at first use.  For a connection opened since
# the last checkpoint the secondary computed its own TSvals (its own clock; and, when the secret was first
# drawn after the initial migration, its own random secret), and QEMU's filter-rewriter translates
# sequence numbers only.  After failover the client's PAWS check (RFC 7323) then drops every segment whose
# TSval looks older than the last one it saw: seen here as a busy echo connection stalled for ever,
# secondary TSval 3973153482 vs the primary's 807609829 (in about half of the runs).  The kernel's
# sysctl.* boot parameter turns timestamps off in the guest before any service starts.
GUEST_TCP_TIMESTAMPS_OFF = "sysctl.net.ipv4.tcp_timestamps=0"
PID_ROLES = ("primary", "secondary", "disk", "compare", "daemon", "agent")
# teardown order: the watchers first (so nobody fails over while we stop things), then QEMUs, then services
STOP_ORDER = ("agent", "daemon", "primary", "secondary", "compare", "disk")


class PairError(Exception):
    """The pair could not start or stop; the message names the step and where to look."""


@dataclass(frozen=True, slots=True)
class PairConfig:
    """What ``pair up`` starts.  ``start_daemon=False`` stops after the agent: both QEMUs and every service
    run, COLO is not started (for tests of the launcher alone and for debugging)."""

    workdir: Path
    mode: Mode = Mode.MC
    epoch_ms: int = 50
    accel: str | None = None  # None: mc_driver.accel.choose_qemu decides
    memory_mib: int = 256
    disk_mib: int = 64
    compare_timeout_ms: int = 3000
    safety_interval_ms: int = 10000
    boot_timeout: float = 120.0
    answer_timeout: float = 120.0
    start_daemon: bool = True
    passive_secondary: bool = False  # MC: the daemon stops the secondary after each checkpoint
    stop_via: str = "auto"  # who stops the VMs for a checkpoint: auto | qemu (patch 0005) | qmp
    # TCP timestamps in the guest break COLO failover of young connections (see GUEST_TCP_TIMESTAMPS_OFF)
    guest_tcp_timestamps: bool = False
    # workloads started at boot, e.g. (("diskwriter", "/dev/vda"),)
    guest_run: tuple[tuple[str, ...], ...] = ()
    daemon_args: tuple[str, ...] = ()
    # the two-host layout (module docstring): cross-host channels on tcp at this address, with mutual TLS
    tcp_host: str | None = None
    tls_creds: Path | None = None
    auto_reprotect: bool = False  # `pair watch` re-protects after a failover or a lost secondary
    reprotect_mode: str = "mc"  # the mode it re-protects in (mc | colo | auto)


# the channels that cross between the two hosts, in the order their ports are drawn
TCP_CHANNELS = ("disk-ctl", "disk-nbd-replica", "compare-secondary", "mirror", "migrate", "heartbeat")


@dataclass(frozen=True, slots=True)
class Channels:
    """Where each channel between the pair's processes is: unix sockets in the work directory, or, in the
    two-host layout, ``tcp:`` endpoints carrying the credentials directory."""

    disk_control: str
    disk_nbd: tuple[str, ...]  # the disk server's NBD listeners
    replica: Endpoint  # where the primary's mirror reaches `replica`
    view: Path  # the secondary's disk (`view`), always on its own host
    compare_secondary: ChardevAddress
    mirror: ChardevAddress
    migrate: str  # QEMU's migration URI (the secondary's -incoming, the primary's migrate)
    heartbeat: str
    creds: Path | None = None

    @property
    def tcp(self) -> bool:
        return self.creds is not None


def pair_channels(config: PairConfig, files: PairFiles, ports: dict[str, int] | None = None) -> Channels:
    """The channels of the pair: all unix (one host), or the two-host layout when ``config.tcp_host`` is
    set (then ``ports`` gives each of :data:`TCP_CHANNELS` its port)."""
    view = files.sock("disk-nbd")
    if config.tcp_host is None:
        return Channels(
            disk_control=files.endpoint("disk-ctl"),
            disk_nbd=(files.endpoint("disk-nbd"),),
            replica=Endpoint("unix", path=str(view)),
            view=view,
            compare_secondary=files.sock("compare-secondary"),
            mirror=files.mirror,
            migrate=f"unix:{files.migrate}",
            heartbeat=files.endpoint("heartbeat"),
        )
    if config.tls_creds is None:
        raise PairError(f"the two-host layout (tcp_host {config.tcp_host}) needs TLS credentials; {HOW_TO}")
    if ports is None or set(ports) != set(TCP_CHANNELS):
        raise PairError(f"the two-host layout needs a port for each of {', '.join(TCP_CHANNELS)}")
    creds = str(config.tls_creds)

    def tcp(name: str) -> Endpoint:
        return Endpoint("tcp", host=config.tcp_host, port=ports[name], tls_creds=creds)

    return Channels(
        disk_control=str(tcp("disk-ctl")),
        disk_nbd=(f"unix:{view}", str(tcp("disk-nbd-replica"))),
        replica=tcp("disk-nbd-replica"),
        view=view,
        compare_secondary=tcp("compare-secondary"),
        mirror=tcp("mirror"),
        migrate=f"tcp:{config.tcp_host}:{ports['migrate']}",  # QEMU's URI: its TLS comes from -global
        heartbeat=str(tcp("heartbeat")),
        creds=config.tls_creds,
    )


def _tls_args(channels: Channels, side: str) -> list[str]:
    """A QEMU's TLS objects and its migration parameter (nothing on one host)."""
    if channels.creds is None:
        return []
    migration = TLS_CLIENT if side == "primary" else TLS_SERVER
    return [
        *tls_creds_object(TLS_SERVER, channels.creds, "server"),
        *tls_creds_object(TLS_CLIENT, channels.creds, "client"),
        *migration_tls_args(migration),
    ]


QMP_USERS = {"primary": ("daemon", "ops"), "secondary": ("daemon", "agent", "ops")}


def _monitor_args(files: PairFiles, side: str) -> list[str]:
    args: list[str] = []
    for user in QMP_USERS[side]:
        args += monitor_args(f"qmp-{user}", files.qmp(side, user))
    return args


def _guest_args(
    config: PairConfig, files: PairFiles, image: GuestImage, qemu: QemuChoice, side: str
) -> list[str]:
    disk: str | Path = files.image("primary")
    if side == "secondary":  # the secondary's host serves its `view` locally
        disk = f"nbd+unix:///view?socket={files.sock('disk-nbd')}"
    extra = "" if config.guest_tcp_timestamps else GUEST_TCP_TIMESTAMPS_OFF
    args = guest_qemu_args(
        qemu,
        image,
        tap=PRIMARY_TAP if side == "primary" else SECONDARY_TAP,
        disk=disk,
        console=files.console(side),
        control=files.sock(f"{side}-guestctl"),
        cmdline=guest_cmdline(f"{GUEST_IP}/24", run=config.guest_run, extra=extra),
        memory_mib=config.memory_mib,
    )
    # timestamped log lines (errors, and trace events enabled over QMP) line up with failover.json
    stamp = ["-msg", "timestamp=on"]
    return [*args, *stamp, "-name", side, *_monitor_args(files, side)]


def primary_args(
    config: PairConfig,
    files: PairFiles,
    image: GuestImage,
    qemu: QemuChoice,
    channels: Channels | None = None,
) -> list[str]:
    """The primary QEMU (binary first): paused at ``-S`` until the mirror runs; output to the comparator."""
    channels = channels or pair_channels(config, files)
    return [
        *_guest_args(config, files, image, qemu, "primary"), "-S",
        *_tls_args(channels, "primary"),
        *chardev_server(PRIMARY_MIRROR_CHARDEV, channels.mirror),
        *chardev_client("cmp_out", files.sock("compare-out")),
        *chardev_client("cmp_pri", files.sock("compare-primary")),
        *filter_mirror("m0", PRIMARY_MIRROR_CHARDEV),
        # rx filters run in reverse order of declaration: the indev redirector comes first
        *filter_redirector(PRIMARY_REDIRECTORS[1], "rx", indev="cmp_out"),
        *filter_redirector(PRIMARY_REDIRECTORS[0], "rx", outdev="cmp_pri"),
    ]  # fmt: skip


def secondary_args(
    config: PairConfig,
    files: PairFiles,
    image: GuestImage,
    qemu: QemuChoice,
    channels: Channels | None = None,
) -> list[str]:
    """The secondary QEMU (binary first): waits on ``-incoming``; disk = the `view` export."""
    channels = channels or pair_channels(config, files)
    return [
        *_guest_args(config, files, image, qemu, "secondary"),
        *_tls_args(channels, "secondary"),
        *secondary_filter_args(channels.mirror, channels.compare_secondary),
        "-incoming", channels.migrate,
    ]  # fmt: skip


def pair_json(
    config: PairConfig,
    files: PairFiles,
    qemu: QemuChoice,
    pids: dict[str, int],
    channels: Channels | None = None,
) -> manifest.PairManifest:
    """The contents of ``pair.json`` (the contract with the daemon and the agent)."""
    if channels is None:  # before the namespace exists, tcp ports are not drawn yet (0: not known)
        channels = pair_channels(config, files, dict.fromkeys(TCP_CHANNELS, 0) if config.tcp_host else None)

    def monitor(side: str, user: str) -> str:
        return f"unix:{files.qmp(side, user)}"

    return manifest.PairManifest(
        workdir=files.workdir,
        netns=files.netns,
        bridge=BRIDGE,
        guest_ip=GUEST_IP,
        client_ip=CLIENT_IP,
        guest_mac=DEFAULT_MAC,
        taps=manifest.Sides(PRIMARY_TAP, SECONDARY_TAP),
        accel=qemu.accel,
        qemu_binary=qemu.binary,
        accel_reason=qemu.reason_with_warnings(),
        qmp=manifest.QmpMonitors(  # one monitor per user: QMP_USERS
            manifest.PrimaryMonitors(daemon=monitor("primary", "daemon"), ops=monitor("primary", "ops")),
            manifest.SecondaryMonitors(
                daemon=monitor("secondary", "daemon"),
                agent=monitor("secondary", "agent"),
                ops=monitor("secondary", "ops"),
            ),
        ),
        compare_control=files.endpoint("compare-ctl"),
        disk_control=channels.disk_control,
        disk_nbd=str(channels.replica),
        daemon_control=files.endpoint("daemon-ctl"),
        heartbeat=channels.heartbeat,
        migrate_uri=channels.migrate,
        guest_control=manifest.Sides(
            files.endpoint("primary-guestctl"),
            files.endpoint("secondary-guestctl"),
        ),
        consoles=manifest.Sides(str(files.console("primary")), str(files.console("secondary"))),
        failover_report=files.failover_report,
        mode=Mode(config.mode),
        epoch_ms=config.epoch_ms,
        compare_timeout_ms=config.compare_timeout_ms,
        safety_interval_ms=config.safety_interval_ms,
        mirror_job=MIRROR_JOB,
        passive_secondary=config.passive_secondary,
        stop_via=config.stop_via,
        pids=manifest.Pids(**{role: pids.get(role, 0) for role in PID_ROLES}),
    )


@dataclass
class PairLauncher:
    """Starts the processes one by one, records each pid in ``pair.json`` as soon as it exists."""

    config: PairConfig
    files: PairFiles
    qemu: QemuChoice | None = None
    image: GuestImage | None = None
    ns: NetNamespace | None = None
    pids: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timeline: list[tuple[str, float]] = field(default_factory=list)
    channels: Channels | None = None
    _t0: float = field(default_factory=time.monotonic)

    def mark(self, step: str) -> None:
        self.timeline.append((step, round(time.monotonic() - self._t0, 3)))

    def write_config(self) -> None:
        assert self.qemu is not None
        pair_json(self.config, self.files, self.qemu, self.pids, self.channels).write(self.files.config)

    def spawn(self, role: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        assert self.ns is not None
        log_fd = open_nofollow(self.files.log(role), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            proc = subprocess.Popen(
                [*self.ns.exec_prefix, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # pair up may exit; a Ctrl-C in its terminal must not kill the pair
                cwd=self.files.workdir,
            )
        self.procs[role] = proc
        self.pids[role] = proc.pid
        self.write_config()
        return proc

    def check_alive(self, waiting_for: str) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise PairError(
                    f"{role} exited ({proc.returncode}) while {waiting_for}; see {self.files.log(role)}:\n"
                    f"{log_tail(self.files.log(role))}"
                )

    def wait_for(self, what: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive(f"waiting for {what}")
            if time.monotonic() > deadline:
                raise PairError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)
        self.mark(what)

    def wait_for_socket(self, path: Path, timeout: float = 30.0) -> None:
        self.wait_for(f"{path.name}", lambda: accepts_connections(path), timeout)

    def wait_for_listener(self, role: str, where: ChardevAddress | str, timeout: float = 30.0) -> None:
        """A unix socket that accepts, or a tcp port ``role``'s process listens on (read from its
        network namespace's /proc table: a probe connection would fail the service's TLS handshake)."""
        if isinstance(where, str):
            where = Endpoint("unix", path=where[5:]) if where.startswith("unix:") else _tcp(where)
        if isinstance(where, Path) or where.kind == "unix":
            self.wait_for_socket(Path(str(where if isinstance(where, Path) else where.path)), timeout)
            return
        port = where.port or 0
        self.wait_for(
            f"{role} listening on port {port}", lambda: _listens_tcp(self.procs[role].pid, port), timeout
        )


def _tcp(text: str) -> Endpoint:
    from hybridft_common.endpoints import parse_endpoint

    return parse_endpoint(text)


def _listens_tcp(pid: int, port: int) -> bool:
    """Does the network namespace of ``pid`` have a TCP socket listening on ``port``?"""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _console_ready(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    if FAILED_LINE in text or "Kernel panic" in text:
        raise PairError(f"the guest failed to boot; console {path}:\n{text[-2000:]}")
    return READY_LINE in text


def _sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def _nbd_server(replica: Endpoint) -> dict[str, Any]:
    """The blockdev ``nbd`` node's address (and TLS) for the mirror's target."""
    if replica.kind == "unix":
        return {"server": {"type": "unix", "path": str(replica.path)}}
    replica.creds()
    return {
        "server": {"type": "inet", "host": str(replica.host), "port": str(replica.port)},
        "tls-creds": TLS_CLIENT,
    }


async def _start_mirror(launcher: PairLauncher) -> None:
    """At ``-S``: an ``nbd`` node on `replica`, blockdev-mirror into it, READY, then ``cont``."""
    files = launcher.files
    channels = launcher.channels or pair_channels(launcher.config, files)
    session = await QmpSession.connect(
        files.qmp("primary", "ops"), name="primary", timeout=30,
        alive=lambda: launcher.procs["primary"].poll() is None,
    )  # fmt: skip
    try:
        await session.execute("blockdev-add", {
            "driver": "nbd", "node-name": MIRROR_TARGET_NODE, "export": "replica",
            **_nbd_server(channels.replica),
        })  # fmt: skip
        await session.execute("blockdev-mirror", {
            "job-id": MIRROR_JOB, "device": PRIMARY_DRIVE, "target": MIRROR_TARGET_NODE,
            "sync": "none", "copy-mode": "write-blocking", "auto-dismiss": False,
        })  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            jobs = await session.execute("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == MIRROR_JOB), None)
            if job is None or job.get("status") in ("aborting", "concluded", "null"):
                raise PairError(f"the disk mirror job did not start: {job}")
            if job.get("ready"):
                break
            if time.monotonic() > deadline:
                raise PairError(f"the disk mirror job is not ready after 30 s: {job}")
            await asyncio.sleep(0.02)
        await session.execute("cont")
    finally:
        await session.close()


def _free_ports(ns: NetNamespace, host: str | None) -> dict[str, int] | None:
    """A free port inside the pair's namespace for each of :data:`TCP_CHANNELS` (None on one host)."""
    if host is None:
        return None
    probes: list[socket.socket] = []
    try:
        with ns.entered():
            for _ in TCP_CHANNELS:
                probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((host, 0))
        return {name: int(probe.getsockname()[1]) for name, probe in zip(TCP_CHANNELS, probes, strict=True)}
    finally:
        for probe in probes:
            probe.close()


def _echo_through_guest(ns: NetNamespace, timeout: float) -> None:
    payload = b"hybridft-pair-up\n"
    with ns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((GUEST_IP, ECHO_PORT))
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                raise OSError("the echo connection closed early")
            got += chunk
    if got != payload:
        raise PairError(f"the guest's echo answered {got!r}, expected {payload!r}")


def _wait_until_guest_answers(launcher: PairLauncher, timeout: float) -> None:
    assert launcher.ns is not None
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        launcher.check_alive("waiting for the guest to answer through the comparator")
        try:
            _echo_through_guest(launcher.ns, min(10.0, max(1.0, deadline - time.monotonic())))
            launcher.mark("guest answers through the comparator")
            return
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise PairError(f"the guest did not answer on {GUEST_IP}:{ECHO_PORT} within {timeout:.0f} s: {last}")


def _existing_pair(files: PairFiles) -> list[str]:
    """Roles of a previous pair in this directory whose processes still run."""
    live = []
    try:
        data = json.loads(files.config.read_text())
    except (OSError, ValueError):
        data = {}
    for role, pid in (data.get("pids") or {}).items():
        if isinstance(pid, int) and pid > 0 and pid_alive(pid):
            live.append(role)
    if files.netns in list_namespaces():
        live.append(f"network namespace {files.netns}")
    return live


def up(config: PairConfig) -> dict[str, Any]:
    """Start the pair; return the ``--json`` answer.  On any failure everything is torn down and
    :class:`PairError` is raised."""
    workdir = config.workdir.resolve()
    config = dataclasses.replace(config, workdir=workdir)
    files = PairFiles(workdir)
    if config.mode not in ("mc", "colo"):
        raise PairError(f"mode must be mc or colo, not {config.mode!r}")
    if config.epoch_ms < 1:
        raise PairError(f"--epoch-ms must be at least 1, not {config.epoch_ms}")
    try:
        ensure_private_dir(workdir)
    except ChannelError as exc:
        raise PairError(exc.message) from None
    if config.tcp_host is not None:
        if config.tls_creds is None:
            raise PairError(f"--tcp-host {config.tcp_host} needs TLS credentials (--tls-creds DIR); {HOW_TO}")
        config = dataclasses.replace(config, tls_creds=config.tls_creds.resolve())
        try:
            assert config.tls_creds is not None
            TlsCreds(config.tls_creds).check()
        except ChannelError as exc:
            raise PairError(exc.message) from None
    live = _existing_pair(files)
    if live:
        raise PairError(
            f"a pair is already running in {workdir} ({', '.join(live)}): `hybridft pair down` first"
        )
    for stale in [*files.all_sockets(), *workdir.glob("*.log")]:
        stale.unlink(missing_ok=True)
    files.failover_report.unlink(missing_ok=True)
    # a previous pair's re-protection record and its secondaries' disks (g<N>/) are not this pair's
    for stale in [workdir / "reprotect.json", *workdir.glob("failover-g*.json")]:
        stale.unlink(missing_ok=True)
    for host_dir in workdir.glob("g[0-9]*"):
        if host_dir.is_dir() and host_dir.name[1:].isdigit():
            shutil.rmtree(host_dir, ignore_errors=True)
    for fresh in ("failover-started.json", "generation", "compare-generation"):  # a new pair: generation 0
        (workdir / fresh).unlink(missing_ok=True)
    launcher = PairLauncher(config, files)
    try:
        return _up(launcher)
    except BaseException as exc:
        down(workdir)
        if isinstance(exc, PairError):
            raise
        if isinstance(exc, NoUsableQemu | GuestError | NetnsError | QmpError | OSError | SubprocessError):
            raise PairError(f"pair up failed: {exc}") from exc
        raise


def _up(launcher: PairLauncher) -> dict[str, Any]:
    config, files = launcher.config, launcher.files
    launcher.qemu = choose_qemu(build=True, force_accel=config.accel)
    if shutil.which("ip") is None:
        raise PairError("the `ip` command (iproute2) is missing")
    launcher.image = build_guest()
    launcher.mark("guest image")
    launcher.write_config()

    ns = NetNamespace(files.netns, bridge=BRIDGE, bridge_ip=f"{CLIENT_IP}/24")
    ns.create()
    launcher.ns = ns
    add_pair_taps(ns, PRIMARY_TAP, SECONDARY_TAP)
    launcher.channels = channels = pair_channels(config, files, _free_ports(ns, config.tcp_host))
    launcher.write_config()
    launcher.mark("network")

    primary_img = files.image("primary")
    with primary_img.open("wb") as img:
        img.truncate(config.disk_mib << 20)
    _sparse_copy(primary_img, files.image("secondary"))
    shutil.rmtree(files.disk_state, ignore_errors=True)
    nbd_args = [word for address in channels.disk_nbd for word in ("--nbd", address)]
    launcher.spawn("disk", hybridft_command(
        "disk", "serve", "--image", str(files.image("secondary")), "--state-dir", str(files.disk_state),
        *nbd_args, "--control", channels.disk_control))  # fmt: skip
    for address in (channels.disk_control, *channels.disk_nbd):
        launcher.wait_for_listener("disk", address)

    secondary_in = channels.compare_secondary
    launcher.spawn("compare", hybridft_command(
        "compare", "serve", "--mode", config.mode,
        "--compare-timeout", str(config.compare_timeout_ms / 1000),
        "--primary-in", files.endpoint("compare-primary"),
        "--secondary-in", str(secondary_in) if isinstance(secondary_in, Endpoint) else f"unix:{secondary_in}",
        "--out", files.endpoint("compare-out"), "--control", files.endpoint("compare-ctl"),
        "--fence-file", str(files.workdir / "compare-generation")))  # fmt: skip
    for name in ("compare-ctl", "compare-primary", "compare-out"):
        launcher.wait_for_socket(files.sock(name))
    launcher.wait_for_listener("compare", secondary_in)

    assert launcher.qemu is not None and launcher.image is not None
    for side in ("primary", "secondary"):
        files.console(side).unlink(missing_ok=True)
    launcher.spawn("secondary", secondary_args(config, files, launcher.image, launcher.qemu, channels))
    for user in QMP_USERS["secondary"]:
        launcher.wait_for_socket(files.qmp("secondary", user))
    launcher.spawn("primary", primary_args(config, files, launcher.image, launcher.qemu, channels))
    for user in QMP_USERS["primary"]:
        launcher.wait_for_socket(files.qmp("primary", user))
    asyncio.run(_start_mirror(launcher))
    launcher.mark("disk mirror running, primary started")
    launcher.wait_for("guest boot", lambda: _console_ready(files.console("primary")), config.boot_timeout)

    config_arg = ("--config", str(files.config))
    launcher.spawn("agent", hybridft_command("agent", *config_arg))
    launcher.wait_for_listener("agent", channels.heartbeat)
    result: dict[str, Any] = {
        "guest_ip": GUEST_IP,
        "client_netns": files.netns,
        "primary_pid": launcher.pids["primary"],
        "secondary_pid": launcher.pids["secondary"],
        "daemon_pid": None,
        "agent_pid": launcher.pids["agent"],
        "disk_pid": launcher.pids["disk"],
        "control": str(files.sock("daemon-ctl")),
        "config": str(files.config),
        # which QEMU and accelerator, and why (with what stock QEMU lacks): `pair up` prints it
        "qemu": {
            "binary": str(launcher.qemu.binary),
            "accel": launcher.qemu.accel,
            "reason": launcher.qemu.reason_with_warnings(),
        },
    }
    if not config.start_daemon:
        result["colo"] = False
        return result
    launcher.spawn("daemon", hybridft_command("daemon", *config_arg, *config.daemon_args))
    result["daemon_pid"] = launcher.pids["daemon"]
    launcher.wait_for_socket(files.sock("daemon-ctl"), timeout=180)  # after the initial migration
    _wait_until_guest_answers(launcher, config.answer_timeout)
    result["colo"] = True
    result["startup_seconds"] = launcher.timeline[-1][1]
    if config.auto_reprotect:
        # on the host, not in the namespace: it creates the new secondaries' namespaces
        watch = ("pair", "watch", "--workdir", str(files.workdir), "--mode", config.reprotect_mode)
        with files.log("reprotector").open("ab") as log:
            watcher = subprocess.Popen(
                hybridft_command(*watch),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=files.workdir,
            )  # fmt: skip
        files.auto_reprotect_pid.write_text(f"{watcher.pid}\n")
        result["reprotector_pid"] = watcher.pid
    return result


# ------------------------------------------------------------------------------------------- down
def down(workdir: Path, *, grace: float = 3.0) -> dict[str, Any]:
    """Stop everything of the pair in ``workdir``: by pid (pair.json), then whatever is left in its
    namespace; delete the taps and the namespace, remove the sockets.  Idempotent; works after a crash
    (pair.json missing or stale, processes already dead)."""
    files = PairFiles(workdir.resolve())
    stopped: list[str] = []
    try:
        data = json.loads(files.config.read_text())
    except (OSError, ValueError):
        data = {}
    pids = data.get("pids") or {}
    netns = data.get("netns") or files.netns
    with contextlib.suppress(OSError, ValueError):  # first: it would re-protect what is being stopped
        if _stop_pid(int(files.auto_reprotect_pid.read_text()), 1.0):
            stopped.append("reprotector")
        files.auto_reprotect_pid.unlink()
    for role in STOP_ORDER:
        pid = pids.get(role)
        if isinstance(pid, int) and pid > 0 and _stop_pid(pid, grace if role != "agent" else 0.5):
            stopped.append(role)
    for name in secondary_namespaces(netns):  # re-protection's secondaries (mc_driver.reprotect)
        extra = NetNamespace(name)
        extra._created = True
        extra.close()
        stopped.append(f"netns {name}")
    if netns in list_namespaces():
        ns = NetNamespace(netns, bridge=str(data.get("bridge") or BRIDGE))
        ns._created = True  # adopt it: close() kills what is left inside and deletes it
        ns.taps = [str(t) for t in (data.get("taps") or {}).values()] or [PRIMARY_TAP, SECONDARY_TAP]
        ns.close()
        stopped.append(f"netns {netns}")
    for path in files.all_sockets():
        path.unlink(missing_ok=True)
    if files.config.exists() and pids:
        data["pids"] = {role: 0 for role in PID_ROLES}
        files.config.write_text(json.dumps(data, indent=1) + "\n")
    return {"workdir": str(files.workdir), "stopped": stopped}


def secondary_namespaces(pair_netns: str) -> list[str]:
    """The namespaces ``pair reprotect`` gave new secondaries (``<netns>-s<generation>``)."""
    prefix = f"{pair_netns}-s"
    return [name for name in list_namespaces() if name.startswith(prefix) and name[len(prefix) :].isdigit()]


def _stop_pid(pid: int, grace: float) -> bool:
    """SIGTERM, wait, SIGKILL the process group led by ``pid`` (every process here leads its own session)."""
    if not pid_exists(pid):  # a zombie leader still gets its group signalled, and is reaped
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                _reap(pid)
                return True
            time.sleep(0.02)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def load_pair(path: Path) -> dict[str, Any]:
    """Read a ``pair.json`` (a directory means its ``pair.json``) with a clear error."""
    if path.is_dir():
        path = path / "pair.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PairError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PairError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "workdir" not in data:
        raise PairError(f"{path} is not a pair.json (no 'workdir')")
    return data
