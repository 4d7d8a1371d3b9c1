"""How QEMU boots the guest: its kernel command line and its device set.

Why this seam exists: both pair launchers (:mod:`mc_driver.pair`, :mod:`mc_driver.qemu_pair`) and the
guest tests boot the same guest with the same devices, differing only in the paths of the tap, disk,
console and control socket; the ``hft.*`` kernel parameters are the interface to ``init.sh``.  These are
pure functions of their arguments: no build, no process.

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

from collections.abc import Sequence
from pathlib import Path

from mc_driver.guest.expected import SERVICE_PORTS
from mc_driver.guest.image import BASE_APPEND, GuestImage

DEFAULT_GUEST_IP = "10.77.0.2/24"
DEFAULT_MAC = "52:54:00:12:34:56"


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

    ``services`` defaults to all of them (:data:`~mc_driver.guest.expected.SERVICE_PORTS`; ``[]`` starts
    none; any can be started and stopped later over the control channel); each ``run`` entry is a
    program with arguments started at boot (e.g. ``[("memdirty", "32", "64")]``).
    """
    for value, what in ((ip, "ip"), (gateway or "", "gateway")):
        if any(c.isspace() for c in value):
            raise ValueError(f"{what} {value!r} contains blanks")
    parts = [base, f"hft.ip={ip}"]
    if gateway:
        parts.append(f"hft.gw={gateway}")
    if services is not None:
        allowed = set(SERVICE_PORTS)
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
