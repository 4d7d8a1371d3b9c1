"""The protected test guest: its image, the output its workloads produce, its control channel, its QEMU boot.

The package is split along the four things a caller needs, each its own module (their docstrings say why):

* :mod:`mc_driver.guest.image`      building the kernel + initramfs from Debian packages, cached by input hash
* :mod:`mc_driver.guest.expected`   what the workloads answer, computed on the host (the bytes a client
  checks), and the ports they listen on
* :mod:`mc_driver.guest.control`    the command loop on the guest's ttyS1 (``hybridft guest run``) and the
  readiness line on its console
* :mod:`mc_driver.guest.qemu_args`  the kernel command line and the device set QEMU boots the guest with
* :mod:`mc_driver.guest.cli`        the ``hybridft guest`` commands; :mod:`mc_driver.guest.errors` the
  errors of all of them

This facade re-exports only what packages on higher floors import (``bench/pair.py``: GuestControl,
blob_bytes; ``bench/qemu.py``: build_guest, guest_cmdline; ``experiments/probe.py``: blob_bytes;
``experiments/net_workloads.py``: the ports, TokenReplies, stream_bytes, GuestError), so they
need not know the package's layout.  Code in ``mc_driver/`` and the tests import from the real module
instead, so this list stays short and says exactly what the rest of the project depends on.
"""

from mc_driver.guest.control import GuestControl
from mc_driver.guest.errors import GuestError
from mc_driver.guest.expected import BLOBD_PORT, RR_PORT, TOKEN_PORT, TokenReplies, blob_bytes, stream_bytes
from mc_driver.guest.image import build_guest
from mc_driver.guest.qemu_args import guest_cmdline

__all__ = [
    "BLOBD_PORT",
    "RR_PORT",
    "TOKEN_PORT",
    "GuestControl",
    "GuestError",
    "TokenReplies",
    "blob_bytes",
    "build_guest",
    "guest_cmdline",
    "stream_bytes",
]
