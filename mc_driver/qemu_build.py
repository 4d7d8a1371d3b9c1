"""Build the patched QEMU 7.2 that makes COLO usable under TCG (``hybridft qemu build``).

Why a build at all: where ``/dev/kvm`` cannot boot Linux (``kvm_pvm``), guests run under TCG, and Debian's
QEMU 7.2 COLO is broken there (a BQL deadlock on the second checkpoint, then lost TCG writes that leave the
Secondary with stale RAM).  ``mc_driver/patches/`` holds the fixes; this module turns Debian's own source
package into a binary with them applied.

Why this shape:

- The source is Debian's package of exactly the version installed (``apt-get source qemu=VERSION``; its
  ``dpkg-source -x`` applies Debian's stable series), so the patched binary differs from the stock one only by
  the project's patches and the smaller configuration.
- The result is cached outside the repository under ``/var/cache/hybridft/qemu/<key>/`` where ``key`` hashes
  every input (source version, patch contents in series order, configure arguments, this builder's
  revision).  Same inputs -> no rebuild; any change -> a new directory, the old build stays usable.
- Each build keeps its log (``build.log``) and writes ``result.json`` last, so a half-finished build is never
  mistaken for a good one.  A lock file serialises concurrent builders.
- Steps that need root (deb-src line, build dependencies) are idempotent and only run when something is
  missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

BUILDER_REVISION = "1"
CACHE_ROOT = Path(os.environ.get("HYBRIDFT_QEMU_CACHE", "/var/cache/hybridft/qemu"))
PATCH_DIR = Path(__file__).resolve().parent / "patches"
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/hybridft-deb-src.sources")
BUILD_DEPS = (
    "dpkg-dev",
    "ninja-build",
    "meson",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "libfdt-dev",
    "pkg-config",
    "flex",
    "bison",
    "libaio-dev",
    "zlib1g-dev",
    "python3-venv",
    "gcc",
    "make",
    "patch",
)
CONFIGURE_ARGS = (
    "--target-list=x86_64-softmmu",
    "--enable-replication",
    "--enable-linux-aio",
    "--disable-docs",
    "--disable-gtk",
    "--disable-sdl",
    "--disable-opengl",
    "--disable-vnc",
    "--disable-spice",
    "--disable-xen",
    "--disable-slirp",
    "--disable-capstone",
    "--disable-curses",
    "--disable-guest-agent",
    "--disable-tools",
    "--disable-werror",
    "--meson=/usr/bin/meson",
)
# The binary needs these to find SeaBIOS and the option ROMs (it is not installed under /usr).
FIRMWARE_ARGS = ("-L", "/usr/share/seabios", "-L", "/usr/share/qemu", "-L", "/usr/lib/ipxe/qemu")
DEB_SRC_TEXT = """\
# Added by hybridft (mc_driver/qemu_build.py): Debian source packages, to build the patched QEMU 7.2.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class QemuBuildError(RuntimeError):
    """The patched QEMU could not be built; the message names the step and the log to read."""


@dataclass(frozen=True, slots=True)
class Patch:
    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class BuildInputs:
    """Everything the binary depends on; ``key`` names its cache directory."""

    source_version: str
    patches: tuple[Patch, ...]
    configure_args: tuple[str, ...]

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (BUILDER_REVISION, self.source_version, *self.configure_args):
            digest.update(part.encode() + b"\0")
        for patch in self.patches:
            digest.update(patch.name.encode() + b"\0" + patch.path.read_bytes() + b"\0")
        return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class BuildResult:
    binary: str
    source_version: str
    patches: list[str]
    key: str
    log: str
    built: bool  # False when the cached build was reused
    seconds: float


def read_series(patch_dir: Path = PATCH_DIR, exclude: Sequence[str] = ()) -> tuple[Patch, ...]:
    """The patches named in ``series`` (one file name per line, ``#`` comments), minus ``exclude``.

    ``exclude`` entries match a file name or its 4-digit prefix (``0002``), so an experiment can build
    the series with one fix reverted.
    """
    series = patch_dir / "series"
    if not series.is_file():
        raise QemuBuildError(f"no patch series at {series}")
    patches: list[Patch] = []
    matched: set[str] = set()
    for raw in series.read_text().splitlines():
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        path = patch_dir / name
        if not path.is_file():
            raise QemuBuildError(f"{series} names {name}, which does not exist")
        hits = {e for e in exclude if name == e or name.startswith(e + "-")}
        if hits:
            matched |= hits
            continue
        patches.append(Patch(name, path))
    unknown = set(exclude) - matched
    if unknown:
        raise QemuBuildError(f"--exclude {', '.join(sorted(unknown))}: no such patch in {series}")
    return tuple(patches)


def _run(cmd: Sequence[str], log: Path | None = None, cwd: Path | None = None, step: str = "") -> str:
    env = _build_env()
    if log is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise QemuBuildError(
                f"{step or cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise QemuBuildError(f"{step or cmd[0]} failed ({proc.returncode}); see {log}")
    return ""


def _build_env() -> dict[str, str]:
    """System python3 and tools first: pyenv's python confuses QEMU's configure/meson."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYENV")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    env["DEBIAN_FRONTEND"] = "noninteractive"
    env["LC_ALL"] = "C"
    return env


def installed_qemu_version() -> str | None:
    """The Debian version of the installed qemu-system-x86 (the source we build), if installed."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${source:Version}", "qemu-system-x86"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or None


def _source_version() -> str:
    version = installed_qemu_version()
    if version:
        return version
    _ensure_deb_src()
    out = _run(["apt-cache", "showsrc", "qemu"], step="apt-cache showsrc qemu")
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise QemuBuildError("cannot tell which QEMU source version to build (no qemu-system-x86, no deb-src)")


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise QemuBuildError(f"{what} needs root (run `make setup` as root)")


def _ensure_deb_src() -> None:
    if DEB_SRC_FILE.exists() and DEB_SRC_FILE.read_text() == DEB_SRC_TEXT:
        return
    _need_root(f"adding {DEB_SRC_FILE}")
    DEB_SRC_FILE.write_text(DEB_SRC_TEXT)
    _run(["apt-get", "update", "-q"], step="apt-get update")


def _missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for package in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in proc.stdout:
            missing.append(package)
    return missing


def _ensure_build_deps(log: Path) -> None:
    missing = _missing_packages(BUILD_DEPS)
    if missing:
        _need_root(f"installing {' '.join(missing)}")
        _run(["apt-get", "install", "-y", "-q", *missing], log=log, step="apt-get install build deps")


def _unpack_source(version: str, dest: Path, log: Path) -> Path:
    """Debian's source of ``version`` unpacked (Debian's patches applied) under ``dest``; returns the tree."""
    download = CACHE_ROOT / "sources" / version.replace(":", "_")
    dsc = next(download.glob("qemu_*.dsc"), None) if download.is_dir() else None
    if dsc is None:
        _ensure_deb_src()
        download.mkdir(parents=True, exist_ok=True)
        upstream_version = version
        _run(
            ["apt-get", "source", "-q", "--download-only", f"qemu={upstream_version}"],
            log=log,
            cwd=download,
            step=f"apt-get source qemu={upstream_version}",
        )
        dsc = next(download.glob("qemu_*.dsc"), None)
        if dsc is None:
            raise QemuBuildError(f"apt-get source left no .dsc in {download}; see {log}")
    tree = dest / "qemu"
    if tree.exists():
        shutil.rmtree(tree)
    _run(["dpkg-source", "-x", str(dsc), str(tree)], log=log, step="dpkg-source -x")
    return tree


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir(inputs: BuildInputs) -> Path:
    return CACHE_ROOT / inputs.key


def cached_result(inputs: BuildInputs) -> BuildResult | None:
    """The finished build for ``inputs``, or None. ``result.json`` is written only after success."""
    result_file = build_dir(inputs) / "result.json"
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None
    if not Path(data.get("binary", "")).is_file():
        return None
    data["built"] = False
    data["seconds"] = 0.0
    return BuildResult(**data)


def build(
    force: bool = False, exclude: Sequence[str] = (), jobs: int | None = None, progress: bool = False
) -> BuildResult:
    """Build (or reuse) the patched QEMU; returns where the binary is and how it was made."""
    inputs = BuildInputs(_source_version(), read_series(exclude=exclude), CONFIGURE_ARGS)
    with _locked(CACHE_ROOT / ".lock"):
        if not force and (cached := cached_result(inputs)) is not None:
            return cached
        started = time.monotonic()
        workdir = build_dir(inputs)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        log = workdir / "build.log"

        def step(text: str) -> None:
            with log.open("a") as out:
                out.write(f"\n### {text}\n")
            if progress:
                click.echo(f"qemu build: {text}", err=True)

        step(f"inputs: source {inputs.source_version}, patches {[p.name for p in inputs.patches]}")
        _ensure_build_deps(log)
        step("unpacking Debian's source package")
        tree = _unpack_source(inputs.source_version, workdir, log)
        for patch in inputs.patches:
            step(f"applying {patch.name}")
            _run(
                ["patch", "-p1", "--forward", "--batch", "-i", str(patch.path)],
                log=log,
                cwd=tree,
                step=f"applying {patch.name}",
            )
        out_dir = tree / "build"
        out_dir.mkdir()
        step("configure")
        _run(["../configure", *inputs.configure_args], log=log, cwd=out_dir, step="configure")
        step("ninja qemu-system-x86_64 (a few minutes)")
        _run(
            ["ninja", f"-j{jobs or os.cpu_count() or 2}", "qemu-system-x86_64"],
            log=log,
            cwd=out_dir,
            step="ninja",
        )
        binary = out_dir / "qemu-system-x86_64"
        version = _run([str(binary), *FIRMWARE_ARGS, "--version"], step="qemu --version")
        step(f"built: {version.splitlines()[0] if version else '?'}")
        result = BuildResult(
            binary=str(binary),
            source_version=inputs.source_version,
            patches=[p.name for p in inputs.patches],
            key=inputs.key,
            log=str(log),
            built=True,
            seconds=round(time.monotonic() - started, 1),
        )
        data = asdict(result)
        del data["built"], data["seconds"]
        tmp = workdir / "result.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(workdir / "result.json")
        return result


def patched_qemu(exclude: Sequence[str] = ()) -> Path:
    """The patched ``qemu-system-x86_64``, building it first if its inputs changed."""
    return Path(build(exclude=exclude).binary)


@click.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a build with the same inputs exists.")
@click.option("--exclude", multiple=True, metavar="PATCH", help="Leave out a patch (name or 4-digit prefix).")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(force: bool, exclude: tuple[str, ...], jobs: int | None, as_json: bool) -> None:
    """Build the patched QEMU 7.2 (cached under /var/cache/hybridft/qemu, rebuilt when inputs change)."""
    try:
        result = build(force=force, exclude=exclude, jobs=jobs, progress=not as_json)
    except QemuBuildError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(asdict(result)))
        return
    how = f"built in {result.seconds:.0f} s" if result.built else "cached"
    click.echo(f"patched QEMU {result.source_version} ({how}): {result.binary}")
    click.echo(f"  patches: {', '.join(result.patches) or '(none)'}")
    click.echo(f"  log: {result.log}")
