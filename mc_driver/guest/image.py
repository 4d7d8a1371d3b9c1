"""The protected test guest: a tiny Linux from Debian packages, its workloads, and its control channel.

Why this shape:

* **Only Debian packages, nothing installed on the host.** The kernel is Debian's cloud kernel package,
  fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache; userland is
  busybox-static plus a few static C programs compiled here (``guest_src/*.c``). A fresh Debian machine
  can build the exact same guest without any image download.
* **Cached by content.** The output lives in ``~/.cache/hybridft/guest/<hash>/`` where the hash covers
  every input: the C sources and init script, the kernel package name and version, the module list,
  the busybox binary and this file. A cached build costs one ``apt-cache`` query (< 1 s).
* **Deterministic workloads.** Everything a test compares is derivable on the host: ``GET /blob`` and
  ``rrserver`` answers are prefixes of one counter-based stream (:func:`stream_bytes`), and every
  diskwriter record is implied by its number (:func:`read_disk_records`). COLO tests check every byte.
* **Control off the network.** ``hybridft guest run`` talks to a command loop on the guest's second
  serial port (ttyS1), never to the guest's network, so starting a workload adds no packets to the
  streams COLO compares. The same device set is used for the COLO secondary (whose ttyS1 nobody reads).

The guest (``init.sh``) loads the virtio modules, sets ``eth0`` from ``hft.ip=``, writes the 8 MiB blob,
starts ``echod`` (TCP 7), ``rrserver`` (TCP 8000), busybox ``httpd`` (TCP 80; it sends a ``Date:``
header, so two replicas answering the same request in different seconds differ: expected COLO
divergences) and ``blobd`` (TCP 8080: the same ``/blob`` with no time-dependent header, keep-alive),
prints ``HYBRIDFT-GUEST-READY`` on ttyS0 and serves the control loop on ttyS1.

The QEMU command line (see :func:`qemu_args`; one vCPU, 256 MiB, TCG because this host's ``kvm_pvm`` cannot
boot Linux)::

    qemu-system-x86_64 -accel tcg -cpu qemu64 -m 256 -smp 1 -nodefaults -display none -no-user-config
      -kernel vmlinuz -initrd initrd.img -append "<guest_cmdline()>"
      -netdev tap,id=hn0,ifname=TAP,script=no,downscript=no,vhost=off,vnet_hdr=off
      -device virtio-net-pci,netdev=hn0,mac=52:54:00:12:34:56
      -drive if=none,id=disk0,file=DISK,format=raw -device virtio-blk-pci,drive=disk0
      -chardev file,id=con0,path=CONSOLE.log -device isa-serial,chardev=con0,index=0
      -chardev socket,id=ctl0,path=CONTROL.sock,server=on,wait=off -device isa-serial,chardev=ctl0,index=1

QEMU must run inside the network namespace that holds the tap (:mod:`mc_driver.netns`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import click

from hybridft_common.endpoints import parse_endpoint

SRC_DIR = Path(__file__).parent.with_name("guest_src")
PROGRAMS = ("memdirty", "cpuburn", "diskwriter", "echod", "rrserver", "blobgen", "blobd")
# The modules the guest needs; each one's dependencies are read from its modinfo and loaded first.
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-cloud-amd64-unsigned$")

READY_LINE = "HYBRIDFT-GUEST-READY"
FAILED_LINE = "HYBRIDFT-GUEST-FAILED"
CONTROL_READY_LINE = "HFT-CONTROL-READY"
CONTROL_END = "HFT-END"

DEFAULT_GUEST_IP = "10.77.0.2/24"
DEFAULT_MAC = "52:54:00:12:34:56"
ECHO_PORT = 7
RR_PORT = 8000
HTTP_PORT = 80
BLOBD_PORT = 8080
DISKWRITER_PORT = 9000
BLOB_SIZE = 8 * 1024 * 1024
STREAM_SEED = 0x4859425249444654  # "HYBRIDFT"; must match blobgen.c and rrserver.c

# no_timer_check: under TCG on a loaded host Linux's IO-APIC timer check can time out and panic the
# guest at boot ("IO-APIC + timer doesn't work!"), seen here while a QEMU build shared the CPUs.
BASE_APPEND = "console=ttyS0,115200 rdinit=/init panic=-1 quiet loglevel=5 mitigations=off no_timer_check"


class GuestError(Exception):
    """Base class of every error this module raises."""


class GuestBuildError(GuestError):
    """The guest could not be built (missing tool, package, compile error)."""


class GuestControlError(GuestError):
    """The control channel failed: no connection, timeout, or a command the guest rejected."""


class GuestControlTimeout(GuestControlError):
    """The guest did not answer in time."""


# --------------------------------------------------------------------------------------------------
# The image


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append guest_cmdline(...)``."""

    kernel: Path
    initrd: Path
    append: str
    directory: Path
    kernel_package: str
    kernel_version: str
    modules: tuple[str, ...]
    inputs_hash: str

    def to_json(self) -> dict[str, object]:
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "append": self.append,
            "directory": str(self.directory),
            "kernel_package": self.kernel_package,
            "kernel_version": self.kernel_version,
            "modules": list(self.modules),
            "inputs_hash": self.inputs_hash,
        }


def guest_cmdline(
    ip: str = DEFAULT_GUEST_IP,
    *,
    gateway: str | None = None,
    services: Sequence[str] | None = None,
    run: Sequence[Sequence[str]] = (),
    ipv6: bool = False,
    base: str = BASE_APPEND,
    extra: str = "",
) -> str:
    """The kernel command line for one guest: the base plus the ``hft.*`` parameters ``init.sh`` reads.

    ``services`` defaults to echod, rrserver, httpd and blobd (``[]`` starts none); each ``run`` entry is a
    program with arguments started at boot (e.g. ``[("memdirty", "32", "64")]``).
    """
    for value, what in ((ip, "ip"), (gateway or "", "gateway")):
        if any(c.isspace() for c in value):
            raise ValueError(f"{what} {value!r} contains blanks")
    parts = [base, f"hft.ip={ip}"]
    if gateway:
        parts.append(f"hft.gw={gateway}")
    if services is not None:
        allowed = {"echod", "rrserver", "httpd", "blobd"}
        unknown = [s for s in services if s not in allowed]
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {sorted(allowed)}")
        parts.append("hft.services=" + (",".join(services) if services else "none"))
    for argv in run:
        if not argv or any(not a or "," in a or any(c.isspace() for c in a) for a in argv):
            raise ValueError(f"bad boot workload {argv!r}: non-empty words without blanks or commas")
        parts.append("hft.run=" + ",".join(argv))
    if ipv6:
        parts.append("hft.ipv6=1")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def qemu_args(
    image: GuestImage,
    *,
    tap: str,
    disk: Path | str,
    console_log: Path | str,
    control_socket: Path | str | None = None,
    cmdline: str | None = None,
    mac: str = DEFAULT_MAC,
    memory_mib: int = 256,
    accel: str = "tcg",
    cpu: str = "qemu64",
    disk_format: str = "raw",
) -> list[str]:
    """The guest's device set (no binary, no migration or monitor options: the launcher adds those).

    The same list serves the COLO primary and secondary; only the tap, disk, console and control
    paths differ.
    """
    args = [
        "-accel", accel, "-cpu", cpu, "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", cmdline if cmdline is not None else guest_cmdline(),
        "-netdev", f"tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off",
        "-device", f"virtio-net-pci,netdev=hn0,mac={mac}",
        "-drive", f"if=none,id=disk0,file={disk},format={disk_format}",
        "-device", "virtio-blk-pci,drive=disk0",
        "-chardev", f"file,id=con0,path={console_log}",
        "-device", "isa-serial,chardev=con0,index=0",
    ]  # fmt: skip
    if control_socket is not None:
        args += [
            "-chardev", f"socket,id=ctl0,path={control_socket},server=on,wait=off",
            "-device", "isa-serial,chardev=ctl0,index=1",
        ]  # fmt: skip
    return args


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hybridft"


def _run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"{what}: {cmd[0]} is not installed") from None
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{what} failed ({' '.join(cmd)}):\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def newest_kernel_package(apt_output: str) -> str | None:
    """Pick the highest ABI number among package names (one a line, ``apt-cache`` output) of cloud kernels."""
    best: tuple[int, str] | None = None
    for line in apt_output.splitlines():
        name = line.split(" - ", 1)[0].strip()
        m = KERNEL_PACKAGE_RE.match(name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), name)
    return best[1] if best else None


_APT_INPUTS = (
    "/var/lib/apt/lists",  # apt-get update renames new lists into place: the directory's mtime moves
    "/etc/apt",
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d",
    "/etc/apt/preferences.d",
    "/etc/apt/apt.conf.d",
)


def _apt_state() -> str | None:
    """A fingerprint of what apt-cache answers from; None when apt has no package lists."""
    parts = []
    for path in _APT_INPUTS:
        try:
            st = os.stat(path)
        except OSError:
            if path == _APT_INPUTS[0]:
                return None
            parts.append(f"{path}:-")
            continue
        parts.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def find_kernel_package() -> tuple[str, str]:
    """(package, version) of the newest cloud kernel, remembered while apt's state is unchanged.

    ``apt-cache`` takes one to three seconds on a busy machine; the answer only changes when apt's
    package lists do, so a cached build needs no apt call at all.
    """
    memo = cache_root() / "kernel-package.json"
    state = _apt_state()
    try:
        saved = json.loads(memo.read_text())
        if state is not None and saved["apt_state"] == state:
            return str(saved["package"]), str(saved["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package, version = _query_kernel_package()
    if state is not None and _apt_state() == state:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"apt_state": state, "package": package, "version": version}))
        os.replace(tmp, memo)
    return package, version


def _query_kernel_package() -> tuple[str, str]:
    """(package, candidate version) of the newest Debian 6.1 cloud kernel; ``apt-get update`` once if none."""
    for attempt in range(2):
        names = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"], what="apt-cache pkgnames")
        name = newest_kernel_package(names)
        if name:
            policy = _run(["apt-cache", "policy", name], what="apt-cache policy")
            m = re.search(r"^\s*Candidate: (\S+)$", policy, re.M)
            if m and m.group(1) != "(none)":
                return name, m.group(1)
        if attempt == 0:
            _run(["apt-get", "update", "-q"], what="apt-get update")
    raise GuestBuildError("no linux-image-6.1.0-*-cloud-amd64-unsigned package in the apt sources")


def inputs_hash(kernel_package: str, kernel_version: str) -> str:
    """Hash of everything the image is made from; a change to any of it means a new cache entry."""
    h = hashlib.sha256()
    h.update(f"{kernel_package}={kernel_version}\n".encode())
    h.update((" ".join(MODULES) + "\n").encode())
    for path in sorted(SRC_DIR.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestBuildError("busybox is not installed (apt-get install busybox-static)")
    h.update(Path(busybox).read_bytes())
    return h.hexdigest()[:16]


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a kernel module's ``.modinfo`` strings (names as the kernel spells them)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def module_load_order(wanted: Iterable[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Dependencies first, each module once, else in the order asked; a cycle or unknown module raises."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            raise GuestBuildError(
                f"module {name} (needed by {chain[-1] if chain else 'the guest'}) not found"
            )
        state[name] = "visiting"
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        try:
            proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        except FileNotFoundError:
            raise GuestBuildError(f"{path.name} is zstd-compressed and zstd is not installed") from None
        if proc.returncode != 0:
            raise GuestBuildError(f"zstd -d {path.name}: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    return data


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _download_kernel(package: str, version: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    # apt-get download writes into the current directory; let the _apt sandbox user write there too
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o777)
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp), what="apt-get download")
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestBuildError(f"apt-get download {package}: expected one .deb, got {got}")
        dest = debs / got[0].name
        os.replace(got[0], dest)
        return dest


def _write_initramfs(stage: Path, out: Path) -> None:
    """``busybox cpio -o -H newc`` of the staging tree (uncompressed: TCG boots it faster)."""
    names = [".", *sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))]
    with out.open("wb") as f:
        proc = subprocess.run(
            ["busybox", "cpio", "-o", "-H", "newc"],
            cwd=stage,
            input="\n".join(names).encode() + b"\n",
            stdout=f,
            stderr=subprocess.PIPE,
            check=False,
        )
    if proc.returncode != 0:
        raise GuestBuildError(f"busybox cpio failed: {proc.stderr.decode(errors='replace').strip()}")


def _compile(src: Path, out: Path) -> None:
    _run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], what=f"gcc {src.name}")


def _build_into(work: Path, package: str, version: str, digest: str) -> GuestImage:
    deb = _download_kernel(package, version, cache_root() / "debs")
    unpacked = work / "deb"
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)], what="dpkg-deb -x")
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"{deb.name}: expected one boot/vmlinuz-*, found {kernels}")
    kmods = {_module_name(p): p for p in unpacked.glob("lib/modules/*/kernel/**/*.ko*")}
    depends: dict[str, list[str]] = {}
    todo = list(MODULES)
    while todo:
        name = todo.pop()
        if name in depends or name not in kmods:
            continue
        depends[name] = modinfo_depends(_module_bytes(kmods[name]))
        todo.extend(depends[name])
    order = module_load_order(MODULES, depends)

    stage = work / "stage"
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "www", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None  # checked by inputs_hash
    shutil.copy2(busybox, stage / "bin" / "busybox")
    for applet in _run(["busybox", "--list"], what="busybox --list").split():
        if applet != "busybox" and not (stage / "bin" / applet).exists():
            (stage / "bin" / applet).symlink_to("busybox")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = [pool.submit(_compile, SRC_DIR / f"{p}.c", stage / "bin" / p) for p in PROGRAMS]
        for job in jobs:
            job.result()
    for name in order:
        (stage / "lib" / "modules" / f"{name}.ko").write_bytes(_module_bytes(kmods[name]))
    (stage / "etc" / "hft-modules").write_text("\n".join(order) + "\n")
    shutil.copy2(SRC_DIR / "init.sh", stage / "init")
    (stage / "init").chmod(0o755)
    try:
        os.mknod(stage / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    except PermissionError:
        raise GuestBuildError("creating /dev/console in the initramfs needs root") from None

    result = work / "out"
    result.mkdir()
    shutil.copy2(kernels[0], result / "vmlinuz")
    _write_initramfs(stage, result / "initrd.img")
    image = GuestImage(
        kernel=result / "vmlinuz",
        initrd=result / "initrd.img",
        append=BASE_APPEND,
        directory=result,
        kernel_package=package,
        kernel_version=version,
        modules=tuple(order),
        inputs_hash=digest,
    )
    (result / "manifest.json").write_text(json.dumps(image.to_json(), indent=2) + "\n")
    return image


def _image_at(directory: Path) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        append=manifest["append"],
        directory=directory,
        kernel_package=manifest["kernel_package"],
        kernel_version=manifest["kernel_version"],
        modules=tuple(manifest["modules"]),
        inputs_hash=manifest["inputs_hash"],
    )
    return image if image.kernel.is_file() and image.initrd.is_file() else None


def build_guest(out: Path | None = None, *, log: bool = False) -> GuestImage:
    """Build (or reuse from the cache) the guest; with ``out``, also copy kernel, initrd, manifest there."""
    package, version = find_kernel_package()
    digest = inputs_hash(package, version)
    root = cache_root() / "guest"
    final = root / digest
    image = _image_at(final)
    if image is None:
        if log:
            print(f"guest: building {digest} from {package} {version}", file=sys.stderr)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
            built = _build_into(Path(tmp), package, version, digest)
            try:
                os.rename(built.directory, final)
            except OSError:
                if _image_at(final) is None:  # not a concurrent build that won the race
                    raise
        image = _image_at(final)
        if image is None:
            raise GuestBuildError(f"built guest at {final} is incomplete")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("vmlinuz", "initrd.img", "manifest.json"):
            dest = out / name
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            shutil.copy2(image.directory / name, dest)
        image = dataclasses.replace(image, kernel=out / "vmlinuz", initrd=out / "initrd.img", directory=out)
    return image


# --------------------------------------------------------------------------------------------------
# What the workloads produce, computed on the host


def stream_bytes(n: int, seed: int = STREAM_SEED) -> bytes:
    """The first ``n`` bytes of the guest's deterministic stream (``/blob``, ``rrserver`` answers)."""
    import numpy as np

    words = (n + 7) // 8
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype("<u8").tobytes()[:n]


def blob_bytes() -> bytes:
    """What ``GET /blob`` returns."""
    return stream_bytes(BLOB_SIZE)


DISK_RECORD_SIZE = 4096
_RECORD_MAGIC = b"HFTDWREC"
_PATTERN_XOR = 0x5555555555555555


def disk_record(seq: int, run: int) -> bytes:
    """The exact 4 KiB that diskwriter writes as record ``seq`` of run ``run``."""
    fill = struct.pack("<Q", seq ^ run ^ _PATTERN_XOR)
    return _RECORD_MAGIC + struct.pack("<QQ", seq, run) + fill * (DISK_RECORD_SIZE // 8 - 3)


def read_disk_records(disk: bytes, run: int) -> set[int]:
    """Numbers of the intact records of run ``run`` found at their place in a raw disk image."""
    found: set[int] = set()
    for offset in range(0, len(disk) - DISK_RECORD_SIZE + 1, DISK_RECORD_SIZE):
        if disk[offset : offset + 8] != _RECORD_MAGIC:
            continue
        seq, rec_run = struct.unpack_from("<QQ", disk, offset + 8)
        if (
            rec_run == run
            and seq == offset // DISK_RECORD_SIZE + 1
            and disk[offset : offset + DISK_RECORD_SIZE] == disk_record(seq, run)
        ):
            found.add(seq)
    return found


@dataclasses.dataclass
class DiskWriterReports:
    """Sans-I/O parser of diskwriter's TCP reports: ``RUN <hex>``, then one durable number per line."""

    run: int | None = None
    durable: list[int] = dataclasses.field(default_factory=list)
    finished: str | None = None  # "FULL", "DONE" or "ERROR"
    _buf: bytes = b""

    def feed(self, data: bytes) -> list[int]:
        """Take received bytes; return the record numbers newly reported durable."""
        self._buf += data
        new: list[int] = []
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            line = raw.decode("ascii", errors="replace").strip()
            if line.startswith("RUN "):
                self.run = int(line[4:], 16)
            elif line in ("FULL", "DONE", "ERROR"):
                self.finished = line
            elif line.isdigit():
                n = int(line)
                if self.durable and n != self.durable[-1] + 1:
                    raise GuestError(f"diskwriter reported {n} after {self.durable[-1]}")
                self.durable.append(n)
                new.append(n)
            else:
                raise GuestError(f"unexpected diskwriter line {line!r}")
        return new


# --------------------------------------------------------------------------------------------------
# The control channel (ttyS1)


@dataclasses.dataclass(frozen=True)
class ControlReply:
    lines: tuple[str, ...]
    rc: int

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class ControlReplyParser:
    """Sans-I/O: bytes from the guest's ttyS1 in, complete replies (ended by ``HFT-END <rc>``) out."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[ControlReply]:
        self._buf += data
        replies: list[ControlReply] = []
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            if line.startswith(CONTROL_END + " "):
                rc_text = line[len(CONTROL_END) + 1 :].strip()
                rc = int(rc_text) if rc_text.lstrip("-").isdigit() else -1
                replies.append(ControlReply(tuple(self._lines), rc))
                self._lines = []
            else:
                self._lines.append(line)
        return replies


def encode_command(verb: str, *args: str) -> bytes:
    """One command line for the guest's loop; arguments must be single words (the loop splits on blanks)."""
    words = [verb, *args]
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise GuestControlError(f"control arguments must be non-empty words without blanks: {w!r}")
    return (" ".join(words) + "\n").encode()


def _connect(
    kind: str, path: str | None, host: str | None, port: int | None, timeout: float
) -> socket.socket:
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection((str(host), int(port or 0)), timeout=timeout)


class GuestControl:
    """Blocking client of the guest's control loop, over QEMU's ttyS1 chardev socket (unix: or tcp:).

    One command at a time. On connect it resynchronises with a fresh ``ping`` token, so bytes left
    from an earlier client or the boot banner are skipped.
    """

    def __init__(self, endpoint: str, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        ep = parse_endpoint(endpoint)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = _connect(ep.kind, ep.path, ep.host, ep.port, timeout)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise GuestControlError(f"cannot connect to guest control {endpoint}: {exc}") from None
                time.sleep(0.1)
        self._parser = ControlReplyParser()
        self._pending: list[ControlReply] = []
        self._lost_sync = False
        self._sync()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_reply(self, deadline: float) -> ControlReply:
        while not self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestControlTimeout("timed out waiting for the guest's control loop")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise GuestControlError("guest control connection closed")
            self._pending.extend(self._parser.feed(data))
        return self._pending.pop(0)

    def _sync(self) -> None:
        token = secrets.token_hex(8)
        deadline = time.monotonic() + self.timeout
        self._sock.sendall(encode_command("ping", token))
        while True:
            try:
                reply = self._read_reply(min(deadline, time.monotonic() + 2.0))
            except GuestControlTimeout:
                # the loop may not be listening yet (still booting): ask again until the deadline
                if time.monotonic() > deadline:
                    raise
                self._sock.sendall(encode_command("ping", token))
                continue
            if reply.lines and reply.lines[-1] == f"PONG {token}":
                break
        self._pending.clear()
        self._drain_extra_pongs(token)
        self._lost_sync = False

    def _drain_extra_pongs(self, token: str) -> None:
        # Repeated pings that were answered late would otherwise be read as replies to later commands.
        self._sock.sendall(encode_command("ping", token + "-last"))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_reply(deadline)
            if reply.lines and reply.lines[-1] == f"PONG {token}-last":
                return

    def command(self, verb: str, *args: str, timeout: float | None = None) -> ControlReply:
        """Send one command and wait for its reply (``rc`` is the guest's exit status)."""
        line = encode_command(verb, *args)
        if self._lost_sync:
            # the reply to a timed-out command may still arrive: skip it before the next one
            self._sync()
        self._sock.sendall(line)
        try:
            return self._read_reply(time.monotonic() + (timeout or self.timeout))
        except GuestControlTimeout:
            self._lost_sync = True
            raise

    def run(self, program: str, *args: str) -> int:
        """Start ``program args`` in the background in the guest; returns its guest pid."""
        reply = self.command("run", program, *args)
        if reply.rc != 0 or not reply.lines or not reply.lines[-1].startswith("PID "):
            raise GuestControlError(f"guest refused to run {program}: {reply.text or reply.rc}")
        return int(reply.lines[-1][4:])

    def sh(self, *words: str, timeout: float | None = None) -> ControlReply:
        """Run a shell command line (words joined by blanks) in the foreground; returns output and rc."""
        return self.command("sh", *words, timeout=timeout)

    def kill(self, pid: int, signal: str = "TERM") -> None:
        reply = self.command("kill", str(pid), signal)
        if reply.rc != 0:
            raise GuestControlError(f"kill {pid} failed in the guest: {reply.text}")

    def jobs(self) -> list[tuple[int, str, str]]:
        """(pid, "running"|"exited", command) of every job started with :meth:`run`."""
        out = []
        for line in self.command("jobs").lines:
            pid, state, cmd = line.split(" ", 2)
            out.append((int(pid), state, cmd))
        return out


def wait_for_ready(
    console_log: Path, *, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> str:
    """Wait until the guest's console log shows the readiness line; return that line.

    Fails early if the guest reports a failed set-up, the kernel panics or ``proc`` (the QEMU) exits,
    with the console's tail.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = console_log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if READY_LINE in line:  # a kernel message may share the line
                return line[line.index(READY_LINE) :]
            if FAILED_LINE in line:
                raise GuestError(
                    f"guest set-up failed: {line[line.index(FAILED_LINE) + len(FAILED_LINE) :].strip()}"
                )
        if "Kernel panic" in text:
            raise GuestError(f"guest kernel panicked:\n{text[-3000:]}")
        if proc is not None and proc.poll() is not None:
            raise GuestError(
                f"QEMU exited with {proc.returncode} before the guest was ready:\n{text[-3000:]}"
            )
        time.sleep(0.1)
    raise GuestError(f"guest not ready after {timeout:.0f} s; console tail:\n{text[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Commands


def prune_cache(keep: GuestImage) -> list[Path]:
    """Remove every other cached guest build and kernel package; returns what was removed.

    Not automatic: a launcher may hold paths of an older build it is about to boot.
    """
    removed: list[Path] = []
    root = cache_root()
    for entry in sorted((root / "guest").iterdir()) if (root / "guest").is_dir() else []:
        if entry.is_dir() and entry.name != keep.inputs_hash:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    keep_deb = f"{keep.kernel_package}_{keep.kernel_version.replace(':', '%3a')}_"
    for deb in sorted((root / "debs").glob("*.deb")) if (root / "debs").is_dir() else []:
        if not deb.name.startswith(keep_deb):
            deb.unlink()
            removed.append(deb)
    return removed


@click.command("build")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also copy the result here.")
@click.option("--prune", is_flag=True, help="Remove other cached builds and kernel packages.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(out: Path | None, prune: bool, as_json: bool) -> None:
    """Build the guest (kernel + initramfs) from Debian packages, or reuse the cached build."""
    try:
        image = build_guest(out, log=not as_json)
    except GuestError as exc:
        raise click.ClickException(str(exc)) from None
    if prune:
        for path in prune_cache(image):
            click.echo(f"removed {path}", err=True)
    if as_json:
        click.echo(json.dumps(image.to_json()))
    else:
        click.echo(f"kernel  {image.kernel}")
        click.echo(f"initrd  {image.initrd}")
        click.echo(f"append  {image.append}")
        click.echo(
            f"from    {image.kernel_package} {image.kernel_version}; modules {' '.join(image.modules)}"
        )


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("workload")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--control",
    "--console",
    "control",
    required=True,
    help="The guest's control chardev (ttyS1): unix:PATH or tcp:HOST:PORT.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the guest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_command(workload: str, args: tuple[str, ...], control: str, timeout: float, as_json: bool) -> None:
    """Start WORKLOAD [ARGS...] in the running guest, in the background.

    WORKLOAD is one of the guest's programs (memdirty MIB_PER_S WORKING_SET_MIB, cpuburn [SECONDS],
    diskwriter /dev/vda [--port P], echod, rrserver, ...) or any busybox applet. Its output goes to
    /tmp/WORKLOAD.PID.log in the guest.
    """
    try:
        with GuestControl(control, timeout=timeout) as ctl:
            pid = ctl.run(workload, *args)
    except (GuestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"workload": workload, "args": list(args), "pid": pid}))
    else:
        click.echo(f"started {workload} in the guest: pid {pid}, log /tmp/{workload}.{pid}.log")
