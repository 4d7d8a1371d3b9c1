"""The vocabulary both pair launchers speak: where a pair's files are, and the pieces of a QEMU command line.

Two launchers start a primary and a secondary QEMU: :mod:`mc_driver.pair` (``hybridft pair up``, the
product: comparator, disk buffer, agent and daemon around the two QEMUs) and :mod:`mc_driver.qemu_pair`
(QEMU's own COLO and nothing else, for the fidelity tests and ``verify-checkpoint``).  Both boot the same
guest with the same devices, give QEMU unix-socket monitors and chardevs, and wire the same COLO filters
on the secondary.  Those pieces live here once, so that a change to, say, the secondary's filters (whose
ids failover removes again by name) cannot reach one launcher and miss the other.

The builders return argument lists to be concatenated in order; they are pure functions of their
arguments.  A chardev's address is a unix socket path or a ``tcp:`` :class:`Endpoint`; a tcp one always
carries ``tls-creds=`` naming a ``tls-creds-x509`` object (:func:`tls_creds_object`, the credentials
layout of :mod:`hybridft_common.tls`): the pair never speaks TCP in clear, and QEMU's TLS client checks
the server's certificate against the address it dials, as ours do.

Each launcher keeps its own file names (they appear in its QEMU command lines and in
``pair.json``); :class:`PairFiles` says which are whose.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from hybridft_common.endpoints import Endpoint
from mc_driver.accel import QemuChoice
from mc_driver.guest.image import GuestImage
from mc_driver.guest.qemu_args import DEFAULT_MAC, qemu_args
from mc_driver.netns import NetNamespace

SIDES = ("primary", "secondary")
PRIMARY_TAP = "hftp0"
SECONDARY_TAP = "hfts0"
NETNS_PREFIX = "hftpair-"
NETDEV = "hn0"  # the guest's -netdev id (mc_driver.guest.qemu_args); every filter attaches to it

# The secondary's COLO filters (see secondary_filter_args): failover removes them again by these ids.
SECONDARY_TX_REDIRECTOR = "f1"  # client packets mirrored by the primary -> into the secondary's guest
SECONDARY_RX_REDIRECTOR = "f2"  # the secondary guest's output -> the comparator
SECONDARY_MIRROR_CHARDEV = "red0"
SECONDARY_OUTPUT_CHARDEV = "red1"
REWRITER = "rew0"  # maps the secondary's TCP sequence numbers to the primary's
PRIMARY_MIRROR_CHARDEV = "mirror0"
# the tls-creds-x509 objects of a QEMU with tcp channels: one per role it plays (it listens on one
# chardev and dials others, and the migration stream is a client on the primary, a server on the secondary)
TLS_SERVER = "hft-tls-server"
TLS_CLIENT = "hft-tls-client"

ChardevAddress = Path | Endpoint


@dataclass(frozen=True, slots=True)
class PairFiles:
    """Every file and socket of one pair: all under ``workdir``; guest RAM files under ``shm_dir``.

    Shared names: sockets (:meth:`sock`, :attr:`migrate`, :attr:`mirror`), logs, consoles.  ``pair up``
    also has ``pair.json``, the namespace name, the disk images (:meth:`image`), the disk server's state
    and one monitor socket per QMP user (:meth:`qmp` with ``user``).  The QEMU-only pair has one main
    monitor and one auxiliary per side (:meth:`qmp` without a user, :meth:`qmp_aux`), its own guest
    control socket and scratch disk, trace files, and RAM files (only it sets ``shm_dir``).
    """

    workdir: Path
    shm_dir: Path | None = None

    # ------------------------------------------------------------------------------ both launchers
    def sock(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def endpoint(self, name: str) -> str:
        return f"unix:{self.sock(name)}"

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def console(self, side: str) -> Path:
        return self.workdir / f"{side}.console"

    @property
    def migrate(self) -> Path:
        """The secondary's ``-incoming`` socket."""
        return self.sock("migrate")

    @property
    def mirror(self) -> Path:
        """The primary's filter-mirror output, the secondary's redirector input (the primary listens)."""
        return self.sock("mirror")

    def qmp(self, side: str, user: str | None = None) -> Path:
        """A QMP monitor socket: ``pair up`` gives each user its own, the QEMU-only pair has one main one."""
        return self.workdir / (f"{side}.qmp" if user is None else f"{side}-{user}.qmp")

    # ------------------------------------------------------------------------------------ pair up
    @property
    def config(self) -> Path:
        return self.workdir / "pair.json"

    @property
    def netns(self) -> str:
        digest = hashlib.sha256(str(self.workdir).encode()).hexdigest()[:8]
        return f"{NETNS_PREFIX}{digest}"

    def image(self, side: str) -> Path:
        return self.workdir / ("primary.img" if side == "primary" else "replica.img")

    @property
    def disk_state(self) -> Path:
        return self.workdir / "disk-state"

    @property
    def failover_report(self) -> Path:
        return self.workdir / "failover.json"

    @property
    def auto_reprotect_pid(self) -> Path:
        return self.workdir / "auto-reprotect.pid"

    def all_sockets(self) -> list[Path]:
        return sorted(self.workdir.glob("*.sock")) + sorted(self.workdir.glob("*.qmp"))

    # ---------------------------------------------------------------------------- QEMU-only pair
    def qmp_aux(self, side: str) -> Path:
        return self.workdir / f"{side}.qmp-aux"

    def control(self, side: str) -> Path:
        return self.workdir / f"{side}.control"

    def disk(self, side: str) -> Path:
        return self.workdir / f"{side}.disk"

    def trace(self, side: str) -> Path:
        return self.workdir / f"{side}.trace"

    def ram(self, side: str) -> Path:
        if self.shm_dir is None:
            raise ValueError(f"the pair in {self.workdir} keeps no RAM files (no shm_dir)")
        return self.shm_dir / f"{side}.ram"


def add_pair_taps(ns: NetNamespace, primary_tap: str, secondary_tap: str) -> None:
    """Both QEMUs' taps; the secondary's stays off the bridge: its own output must reach clients only
    through the comparator (until a failover attaches it)."""
    ns.add_tap(primary_tap)
    ns.add_tap(secondary_tap)
    ns.detach_tap(secondary_tap)


# ------------------------------------------------------------------------------------- command line
def guest_qemu_args(
    qemu: QemuChoice,
    image: GuestImage,
    *,
    tap: str,
    disk: Path | str,
    console: Path,
    control: Path,
    cmdline: str,
    memory_mib: int,
) -> list[str]:
    """The QEMU binary (first) and the guest's device set on the chosen accelerator."""
    return [
        str(qemu.binary),
        *qemu.firmware_args,
        *qemu_args(
            image,
            tap=tap,
            disk=disk,
            console_log=console,
            control_socket=control,
            cmdline=cmdline,
            mac=DEFAULT_MAC,
            memory_mib=memory_mib,
            accel=qemu.accel,
            cpu=qemu.cpu,
        ),
    ]


def tls_creds_object(object_id: str, creds_dir: Path | str, endpoint: str) -> list[str]:
    """A ``tls-creds-x509`` object: ``endpoint`` is ``server`` (QEMU listens) or ``client`` (it dials);
    either way the peer must present a certificate of the pair's CA (``verify-peer=on``)."""
    if endpoint not in ("server", "client"):
        raise ValueError(f"a tls-creds endpoint is server or client, not {endpoint!r}")
    return ["-object", f"tls-creds-x509,id={object_id},dir={creds_dir},endpoint={endpoint},verify-peer=on"]


def _socket_address(where: ChardevAddress, tls_object: str) -> str:
    if isinstance(where, Path):
        return f"path={where}"
    if where.kind == "unix":
        return f"path={where.path}"
    where.creds()  # a tcp chardev without credentials is refused, with how to make them
    return f"host={where.host},port={where.port},tls-creds={tls_object}"


def chardev_server(chardev: str, where: ChardevAddress) -> list[str]:
    """A socket chardev QEMU listens on (and does not wait for a client before starting); over tcp it is
    the TLS server with :data:`TLS_SERVER`."""
    return ["-chardev", f"socket,id={chardev},{_socket_address(where, TLS_SERVER)},server=on,wait=off"]


def chardev_client(chardev: str, where: ChardevAddress) -> list[str]:
    """A socket chardev QEMU connects to, retrying every second until the listener is there; over tcp it
    is the TLS client with :data:`TLS_CLIENT`."""
    return ["-chardev", f"socket,id={chardev},{_socket_address(where, TLS_CLIENT)},reconnect=1"]


def migration_tls_args(tls_object: str) -> list[str]:
    """The migration stream over TLS (QEMU's ``tls-creds`` migration parameter, set at start so that
    ``-incoming`` listens with it and ``migrate`` dials with it)."""
    return ["-global", f"migration.tls-creds={tls_object}"]


def monitor_args(chardev: str, path: Path) -> list[str]:
    """A QMP monitor on its own socket (a QEMU monitor serves one client at a time)."""
    return [*chardev_server(chardev, path), "-mon", f"chardev={chardev},mode=control"]


def qmp_option_args(path: Path) -> list[str]:
    """A QMP monitor in ``-qmp`` shorthand."""
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def filter_mirror(name: str, outdev: str) -> list[str]:
    """Copy every packet the client sends the guest (tx) to the chardev ``outdev``."""
    return ["-object", f"filter-mirror,id={name},netdev={NETDEV},queue=tx,outdev={outdev}"]


def filter_redirector(
    name: str, queue: str, *, indev: str | None = None, outdev: str | None = None
) -> list[str]:
    """Redirect the ``queue`` (tx: towards the guest, rx: from it) from chardev ``indev`` or to ``outdev``.

    rx filters run in the reverse order of their declaration: declare an rx ``indev`` redirector before
    an rx ``outdev`` one, or released frames go straight back out.
    """
    if (indev is None) == (outdev is None):
        raise ValueError("a redirector has exactly one of indev and outdev")
    end = f"indev={indev}" if indev is not None else f"outdev={outdev}"
    return ["-object", f"filter-redirector,id={name},netdev={NETDEV},queue={queue},{end}"]


# The primary's two redirectors in a `pair up` pair (mc_driver.pair.primary_args): its output to the
# comparator, the comparator's released frames back in.  Without a comparator the daemon deletes them,
# so that the primary, alone and unprotected, talks to its tap directly.
PRIMARY_REDIRECTORS = ("rout", "rin")


def filter_rewriter(name: str) -> list[str]:
    return ["-object", f"filter-rewriter,id={name},netdev={NETDEV},queue=all"]


def secondary_filter_args(mirror: ChardevAddress, output: ChardevAddress) -> list[str]:
    """The secondary's COLO filters: the client packets the primary mirrors (``mirror``) go into its guest,
    its guest's output goes to the comparator (``output``), and the rewriter keeps TCP sequence numbers
    consistent with the primary's.  Both sockets are the far side's listeners."""
    return [
        *chardev_client(SECONDARY_MIRROR_CHARDEV, mirror),
        *chardev_client(SECONDARY_OUTPUT_CHARDEV, output),
        *filter_redirector(SECONDARY_TX_REDIRECTOR, "tx", indev=SECONDARY_MIRROR_CHARDEV),
        *filter_redirector(SECONDARY_RX_REDIRECTOR, "rx", outdev=SECONDARY_OUTPUT_CHARDEV),
        *filter_rewriter(REWRITER),
    ]


def secondary_filter_teardown(*, keep_rewriter: bool) -> list[tuple[str, str]]:
    """The QMP ``(command, id)`` steps that remove :func:`secondary_filter_args` at failover, in order.

    The rewriter is usually kept: connections opened since the last checkpoint have a secondary-side ISN,
    and only the rewriter still maps their sequence numbers to what the client saw.
    """
    steps = [
        ("object-del", SECONDARY_RX_REDIRECTOR),
        ("object-del", SECONDARY_TX_REDIRECTOR),
        ("chardev-remove", SECONDARY_OUTPUT_CHARDEV),
        ("chardev-remove", SECONDARY_MIRROR_CHARDEV),
    ]
    if not keep_rewriter:
        steps.append(("object-del", REWRITER))
    return steps
