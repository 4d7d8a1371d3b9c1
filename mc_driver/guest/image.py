"""The guest image: a tiny Linux built from Debian packages, cached by the hash of its inputs.

Why this shape:

* **Only Debian packages, nothing installed on the host.** The kernel is Debian's cloud kernel package,
  fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache; userland is
  busybox-static plus a few static C programs compiled here (``mc_driver/guest_src/*.c``). A fresh Debian
  machine can build the exact same guest without any image download.
* **Cached by content.** The output lives in ``~/.cache/hybridft/guest/<hash>/`` where the hash covers
  every input: the C sources and init script, the kernel package name and version, the module list,
  the busybox binary and this file. A cached build costs one ``apt-cache`` query (< 1 s).
* **A seam of its own.** Building is slow, needs root (``/dev/console`` in the initramfs) and apt; what a
  test checks the guest against (:mod:`mc_driver.guest.expected`), how it is driven
  (:mod:`mc_driver.guest.control`) and how QEMU boots it (:mod:`mc_driver.guest.qemu_args`) need none of
  that, and none of them is an input of the image.

The guest (``init.sh``) loads the virtio modules, sets ``eth0`` from ``hft.ip=``, writes the 8 MiB blob,
starts ``echod`` (TCP 7), ``rrserver`` (TCP 8000), busybox ``httpd`` (TCP 80; it sends a ``Date:``
header, so two replicas answering the same request in different seconds differ: expected COLO
divergences), ``blobd`` (TCP 8080: the same ``/blob`` with no time-dependent header, keep-alive) and
``tokend`` (TCP 9000: one line with the guest's clock per request line, so that replicas differ on every
answer), prints ``HYBRIDFT-GUEST-READY`` on ttyS0 and serves the control loop on ttyS1.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mc_driver.guest.errors import GuestBuildError

SRC_DIR = Path(__file__).parent.with_name("guest_src")
PROGRAMS = ("memdirty", "cpuburn", "diskwriter", "echod", "rrserver", "blobgen", "blobd", "tokend")
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

# no_timer_check: under TCG on a loaded host Linux's IO-APIC timer check can time out and panic the
# guest at boot ("IO-APIC + timer doesn't work!"), seen here while a QEMU build shared the CPUs.
BASE_APPEND = "console=ttyS0,115200 rdinit=/init panic=-1 quiet loglevel=5 mitigations=off no_timer_check"


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
