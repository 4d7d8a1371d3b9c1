"""Which QEMU binary and accelerator a protected VM runs with, and why (``hybridft qemu which``).

Real KVM hosts run Debian's stock QEMU 7.2 with KVM: COLO works there unpatched.  Where ``/dev/kvm`` is
missing, or is provided by ``kvm_pvm`` (a software nested-virtualisation layer that runs firmware but
fails to boot a Linux kernel: emulation failures on ``cmpxchg16b``/``xrstor``, MSR errors with ``-cpu
host``), guests run under TCG, and TCG needs the project's patched QEMU (see ``qemu_build.py``).  The
choice is always reported with its reason, so nobody mistakes a TCG run for a KVM one.

``HYBRIDFT_ACCEL=kvm|tcg`` overrides the detection (the reason then says so); ``HYBRIDFT_QEMU_BINARY``
replaces the patched build (experiments with one fix reverted, a development tree).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

STOCK_QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")


#: What stock QEMU 7.2 lacks of the project's patches that is not TCG-specific.  The default on a KVM
#: host stays stock QEMU (a distribution binary, no build on the host), so ``hybridft qemu which``,
#: ``pair up`` and the pair's manifest say this every time that choice is made.
STOCK_KVM_WARNING = (
    "stock QEMU 7.2 lacks three fixes of the patched build that are not TCG-specific: 0009 (when the "
    "daemon force-cancels the primary's disk mirror after losing the secondary, a guest write in flight "
    "can corrupt the primary QEMU's heap and abort it: 3 of 40 lost-secondary runs here), 0004 "
    "(failover of a TCP handshake that a checkpoint cut) and 0010 (at a failover QEMU resumes the "
    "secondary before its disk is decided: for a few milliseconds it can read blocks of an epoch it "
    "never loaded); to run the patched build with KVM, "
    "`hybridft qemu build` and set HYBRIDFT_QEMU_BINARY to the binary it prints"
)


class NoUsableQemu(RuntimeError):
    """No QEMU/accelerator combination can run the protected VM here; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class QemuChoice:
    binary: Path
    accel: str  # "kvm" or "tcg"
    firmware_args: tuple[str, ...]
    reason: str
    cpu: str = "qemu64"
    patched: bool = False
    notes: tuple[str, ...] = field(default=())

    def accel_args(self) -> list[str]:
        """``-accel``/``-cpu`` arguments for this choice."""
        return ["-accel", self.accel, "-cpu", self.cpu]

    def reason_with_warnings(self) -> str:
        """The reason, then each note as a warning: one line for the pair's manifest and ``pair up``."""
        return "; ".join((self.reason, *(f"warning: {note}" for note in self.notes)))


@dataclass(frozen=True, slots=True)
class KvmProbe:
    usable: bool
    reason: str


def probe_kvm() -> KvmProbe:
    """Is there a KVM that boots Linux guests?  ``kvm_pvm`` counts as no (see the module docstring)."""
    if not KVM_DEVICE.exists():
        return KvmProbe(False, f"{KVM_DEVICE} does not exist (no KVM on this host)")
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR)
    except OSError as exc:
        return KvmProbe(False, f"{KVM_DEVICE} cannot be opened: {exc.strerror}")
    os.close(fd)
    if KVM_PVM_MODULE.exists():
        return KvmProbe(
            False,
            f"{KVM_DEVICE} is provided by kvm_pvm ({KVM_PVM_MODULE} exists), which runs firmware but cannot "
            "boot a Linux kernel (emulation failures on cmpxchg16b/xrstor)",
        )
    return KvmProbe(True, f"{KVM_DEVICE} is a hardware KVM")


def _stock_binary() -> Path:
    found = shutil.which(STOCK_QEMU, path="/usr/bin:/usr/local/bin:" + os.environ.get("PATH", ""))
    if not found:
        raise NoUsableQemu(f"{STOCK_QEMU} is not installed (apt-get install qemu-system-x86)")
    return Path(found)


def _override_binary() -> str | None:
    """``HYBRIDFT_QEMU_BINARY`` (checked), taken to be a patched build, or None."""
    override = os.environ.get("HYBRIDFT_QEMU_BINARY")
    if override and not os.access(override, os.X_OK):
        raise NoUsableQemu(f"HYBRIDFT_QEMU_BINARY={override} is not an executable")
    return override or None


def _kvm_choice(reason: str) -> QemuChoice:
    """Stock QEMU with KVM; or ``HYBRIDFT_QEMU_BINARY`` with KVM (the patched build carries fixes that
    are not TCG-specific, e.g. patch 0004 for failover of a handshake a checkpoint cut)."""
    from mc_driver import qemu_build

    override = _override_binary()
    if override:
        return QemuChoice(
            Path(override),
            "kvm",
            qemu_build.FIRMWARE_ARGS,
            f"{reason}: using KVM with HYBRIDFT_QEMU_BINARY={override} (taken to be a patched build)",
            cpu="host",
            patched=True,
        )
    return QemuChoice(
        _stock_binary(),
        "kvm",
        (),
        f"{reason}: using stock QEMU with KVM",
        cpu="host",
        notes=(STOCK_KVM_WARNING,),
    )


def _patched_choice(reason: str, build: bool) -> QemuChoice:
    from mc_driver import qemu_build

    override = _override_binary()
    if override:
        return QemuChoice(
            binary=Path(override),
            accel="tcg",
            firmware_args=qemu_build.FIRMWARE_ARGS,
            reason=f"{reason}: using TCG with HYBRIDFT_QEMU_BINARY={override} (taken to be a patched build)",
            patched=True,
        )
    if build:
        try:
            binary = qemu_build.patched_qemu()
        except qemu_build.QemuBuildError as exc:
            raise NoUsableQemu(f"TCG needs the patched QEMU, and building it failed: {exc}") from exc
    else:
        inputs = qemu_build.BuildInputs(
            qemu_build._source_version(), qemu_build.read_series(), qemu_build.CONFIGURE_ARGS
        )
        cached = qemu_build.cached_result(inputs)
        if cached is None:
            raise NoUsableQemu(
                f"{reason}; the patched QEMU for TCG is not built yet: run `hybridft qemu build`"
            )
        binary = Path(cached.binary)
    return QemuChoice(
        binary=binary,
        accel="tcg",
        firmware_args=qemu_build.FIRMWARE_ARGS,
        reason=f"{reason}: using TCG with the patched QEMU 7.2 (COLO under stock TCG deadlocks/loses writes)",
        cpu="qemu64",
        patched=True,
    )


def choose_qemu(build: bool = True, force_accel: str | None = None) -> QemuChoice:
    """Pick stock QEMU + KVM where KVM boots Linux, else the patched build + TCG; says why.

    ``build=False`` never starts a build (raises NoUsableQemu if one is needed); ``force_accel`` (or
    ``HYBRIDFT_ACCEL``) overrides detection.
    """
    forced = force_accel or os.environ.get("HYBRIDFT_ACCEL") or None
    if forced not in (None, "kvm", "tcg"):
        raise NoUsableQemu(f"HYBRIDFT_ACCEL/--accel must be kvm or tcg, not {forced!r}")
    probe = probe_kvm()
    if forced == "tcg":
        return _patched_choice("TCG requested explicitly", build)
    if forced == "kvm":
        if not KVM_DEVICE.exists():
            raise NoUsableQemu(f"KVM requested but {probe.reason}")
        note = "" if probe.usable else f" (warning: {probe.reason})"
        return _kvm_choice(f"KVM requested explicitly{note}")
    if probe.usable:
        return _kvm_choice(probe.reason)
    return _patched_choice(probe.reason, build)


@click.command("which")
@click.option("--json", "as_json", is_flag=True, help="Print the choice as JSON.")
@click.option("--build/--no-build", default=False, help="Build the patched QEMU if it is needed and missing.")
def which_command(as_json: bool, build: bool) -> None:
    """Which QEMU binary and accelerator would run the protected VM, and why."""
    try:
        choice = choose_qemu(build=build)
    except NoUsableQemu as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        data = asdict(choice)
        data["binary"] = str(choice.binary)
        click.echo(json.dumps(data))
        return
    click.echo(f"binary:   {choice.binary}{' (patched)' if choice.patched else ''}")
    click.echo(f"accel:    {choice.accel} (-cpu {choice.cpu})")
    click.echo(f"firmware: {' '.join(choice.firmware_args) or '(built in)'}")
    click.echo(f"reason:   {choice.reason}")
    for note in choice.notes:
        click.echo(f"warning:  {note}")
