"""The guest's control channel: a command loop on its second serial port, and its readiness line.

Why this seam exists: ``hybridft guest run`` and every test drive the guest through a command loop on
ttyS1, never through the guest's network, so starting a workload adds no packets to the streams COLO
compares.  The same device set is used for the COLO secondary (whose ttyS1 nobody reads).  The protocol
(see ``mc_driver/guest_src/init.sh``): one command a line, every reply ended by ``HFT-END <rc>``; the
parser is sans-I/O (:class:`ControlReplyParser`), :class:`GuestControl` is its blocking socket shell.
:func:`wait_for_ready` reads the other channel, the console (ttyS0), for the boot's verdict.  Besides
one-off workloads (``run``) the loop starts and stops the guest's services (``start``/``stop``), so a host
script can change what the guest serves while a pair runs.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import subprocess
import time
from pathlib import Path

from hybridft_common.endpoints import parse_endpoint
from mc_driver.guest.errors import GuestControlError, GuestControlTimeout, GuestError

READY_LINE = "HYBRIDFT-GUEST-READY"
FAILED_LINE = "HYBRIDFT-GUEST-FAILED"
CONTROL_READY_LINE = "HFT-CONTROL-READY"
CONTROL_END = "HFT-END"


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


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceState:
    """One of the guest's services as the ``services`` command reports it."""

    name: str
    port: int
    pid: int | None  # None: stopped

    @property
    def running(self) -> bool:
        return self.pid is not None


def parse_services(lines: tuple[str, ...] | list[str]) -> dict[str, ServiceState]:
    """The ``services`` reply: ``<name> <port> running <pid>`` or ``<name> <port> stopped`` per line."""
    states: dict[str, ServiceState] = {}
    for line in lines:
        words = line.split()
        if len(words) == 4 and words[2] == "running" and words[1].isdigit() and words[3].isdigit():
            states[words[0]] = ServiceState(words[0], int(words[1]), int(words[3]))
        elif len(words) == 3 and words[2] == "stopped" and words[1].isdigit():
            states[words[0]] = ServiceState(words[0], int(words[1]), None)
        else:
            raise GuestControlError(f"unexpected services line {line!r}")
    return states


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

    def start_service(self, name: str) -> int:
        """Start one of the guest's services (see ``init.sh``); returns its pid once it listens.

        A service that already runs is left alone (its pid is returned).
        """
        reply = self.command("start", name)
        if reply.rc != 0 or not reply.lines or not reply.lines[-1].startswith("PID "):
            raise GuestControlError(f"guest could not start {name}: {reply.text or reply.rc}")
        return int(reply.lines[-1][4:])

    def stop_service(self, name: str) -> None:
        """Stop a service and every connection it serves; returns once its port refuses connections."""
        reply = self.command("stop", name)
        if reply.rc != 0:
            raise GuestControlError(f"guest could not stop {name}: {reply.text or reply.rc}")

    def services(self) -> dict[str, ServiceState]:
        """Every service the guest knows, running or not."""
        reply = self.command("services")
        if reply.rc != 0:
            raise GuestControlError(f"guest could not list its services: {reply.text or reply.rc}")
        return parse_services(reply.lines)


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
