"""Clients of the test guest's services, for anything that must see the guest's traffic flow.

Why its own module: the checkpoint verification (``mc_driver.verify``), the benchmarks
(``bench.pair``) and the pair tests all talk to the guest the same way -- read exactly what was
sent, keep an echo connection busy while checkpoints happen and check every byte -- so the socket
helpers live once, beside the QEMU side that starts the guest.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading

from mc_driver.netns import NetNamespace


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class EchoTraffic:
    """A thread keeping one TCP connection to the guest's echo service busy, checking every byte.

    The socket is created inside the namespace (``NetNamespace.entered``) and then used from the thread.
    Errors are collected, not raised: the caller decides (a COLO test must see zero).
    """

    def __init__(
        self, netns: NetNamespace, host: str, port: int = 7, chunk: int = 1024, timeout: float = 60.0
    ) -> None:
        # A round trip waits for both VMs (colo-compare releases the primary's answer only when the
        # secondary produced the same); on a heavily loaded host that takes seconds, so the timeout only
        # catches a dead service, while wrong or lost bytes are always errors.
        self.netns, self.host, self.port, self.chunk, self.timeout = netns, host, port, chunk, timeout
        self.round_trips = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-traffic", daemon=True)

    def start(self) -> EchoTraffic:
        with self.netns.entered():
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.settimeout(self.timeout)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                payload = secrets.token_bytes(self.chunk)
                self._sock.sendall(payload)
                if recv_exact(self._sock, len(payload)) != payload:
                    self.errors.append(f"echo round trip {self.round_trips}: bytes differ")
                self.round_trips += 1
                self._stop.wait(0.01)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(f"echo after {self.round_trips} round trips: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        with contextlib.suppress(OSError):
            self._sock.close()
