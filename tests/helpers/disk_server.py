"""``hybridft disk serve`` as a child process: the one way the tests build its command line and start it.

Every test that needs a real server (the CLI tests, the kill -9 and model tests, the QEMU and daemon
tests) goes through :func:`disk_serve_argv` / :func:`start_disk_serve`, so a change of the server's
options or of its ready line is made here once.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd as libnbd

from hybridft_common.cli import hybridft_command

DEFAULT_IMAGE_SIZE = 16 << 20


@dataclass(frozen=True)
class DiskServeReady:
    """The server's ready line: the endpoints it actually bound (a ``tcp:...:0`` request gets a port)."""

    nbd: str
    control: str

    @classmethod
    def parse(cls, line: str) -> DiskServeReady:
        """``ready nbd=<endpoint> control=<endpoint>``"""
        words = line.split()
        assert words and words[0] == "ready", f"not a ready line: {line!r}"
        fields = dict(word.split("=", 1) for word in words[1:])
        return cls(nbd=fields["nbd"], control=fields["control"])


def disk_serve_argv(
    image: Path, state_dir: Path, *, nbd: str, control: str, extra: Sequence[str] = ()
) -> list[str]:
    """argv of ``hybridft disk serve`` (run with this interpreter, so PYTHONPATH picks the tree)."""
    return hybridft_command(
        "disk", "serve", "--image", str(image), "--state-dir", str(state_dir),
        "--nbd", nbd, "--control", control, *extra,
    )  # fmt: skip


def start_disk_serve(
    image: Path,
    state_dir: Path,
    *,
    nbd: str,
    control: str,
    extra: Sequence[str] = (),
    stderr: int | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[str], DiskServeReady]:
    """Start the server and wait for its ready line; fail with what it said if it does not come.

    ``stderr``: None inherits the test's (pytest captures it), ``subprocess.PIPE`` keeps it for the
    caller (who must read it: :meth:`DiskServerProcess.stop` does), a path is a log file.
    """
    argv = disk_serve_argv(image, state_dir, nbd=nbd, control=control, extra=extra)
    if isinstance(stderr, Path):
        with open(stderr, "wb") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    else:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.startswith("ready"):
        return proc, DiskServeReady.parse(line)
    proc.kill()
    _out, err = proc.communicate(timeout=10)
    if isinstance(stderr, Path):
        err = stderr.read_text(errors="replace")
    raise AssertionError(f"disk serve did not start: {line!r} (exit {proc.returncode}) {(err or '')[-3000:]}")


class DiskServerProcess:
    """``hybridft disk serve`` on unix sockets under ``directory``; waits for its ready line."""

    def __init__(
        self, directory: Path, image: Path | None = None, *extra: str, size: int = DEFAULT_IMAGE_SIZE
    ) -> None:
        self.directory = directory
        self.image = image or directory / "replica.raw"
        if not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(size)
        self.state_dir = directory / "state"
        self.nbd_socket = directory / "nbd.sock"
        self.control_socket = directory / "control.sock"
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    @property
    def control(self) -> str:
        return f"unix:{self.control_socket}"

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def start(self) -> None:
        self.proc, _ready = start_disk_serve(
            self.image,
            self.state_dir,
            nbd=f"unix:{self.nbd_socket}",
            control=self.control,
            extra=self.extra,
            stderr=subprocess.PIPE,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _out, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            hybridft_command("disk", "ctl", "--control", self.control, *args),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"disk ctl {args} failed: {result.stderr}")
        return result

    def ctl_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.ctl(*args, "--json").stdout)

    def connect(self, export: str) -> libnbd.NBD:
        h = libnbd.NBD()
        h.set_export_name(export)
        h.connect_unix(str(self.nbd_socket))
        return h
