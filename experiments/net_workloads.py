"""The network workloads: small deterministic RPCs, divergent tokens and bulk downloads, every byte checked.

Why these three: they are the characters a replication mode is judged on.  ``net-rr`` (``rrserver``) is
request/response with answers identical on both VMs -- COLO releases them as soon as the secondary agrees,
MC holds each one up to an epoch.  ``net-divergent`` (``tokend``) answers every request with the guest's
nanosecond clock, so the two VMs never agree and COLO must checkpoint on every answer (what TLS, session
ids and timestamps do to a real service).  ``net-stream`` (``blobd``'s ``/blob``) is bulk data, where
throughput rather than turn latency matters.

Each workload implements :class:`experiments.workload.Workload`: it starts its guest service over the
control channel (never the guest's network, so starting it adds no compared packets), runs closed-loop
clients inside the pair's network namespace until the time is up, stops the service again whatever
happens, and reports the completed units and every request's latency.  Clients check every byte:

* an ``rrserver`` answer to ``N\\n`` is the first ``N`` bytes of the project's stream
  (:func:`mc_driver.guest.expected.stream_bytes`), compared exactly;
* a ``tokend`` answer must be one well-formed ``TOKEN <seq> <ns>`` line whose ``seq`` and ``ns`` grow
  within the connection (:class:`mc_driver.guest.expected.TokenReplies`), and over all connections of a
  phase the answer numbers must be distinct and contiguous (:class:`TokenLedger`: a lost or repeated
  answer -- a replication bug -- shows as a gap or a duplicate).  The workload must be the service's only
  client for that;
* a ``/blob`` body is compared chunk by chunk with :func:`mc_driver.guest.blob_bytes`, so the bytes of a
  download cut short by the phase's end are checked as well.

A wrong answer is an error and its connection is replaced (its stream can no longer be trusted); so is
a refused, reset or timed-out connection.  Errors are collected, never raised: the runner decides.

The per-phase machinery (:class:`NetPhaseDriver`) is shared with :mod:`experiments.phased`, which
strings these workloads together.  The sans-I/O parts (:func:`rr_request`, :func:`check_rr_answer`,
:class:`TokenLedger`, :func:`parse_http_head`, :class:`BlobChecker`) are plain functions and classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from experiments.workload import PhaseListener, PhaseResult, WorkloadResult, WorkloadTarget
from mc_driver.guest import (
    BLOBD_PORT,
    RR_PORT,
    TOKEN_PORT,
    GuestControl,
    GuestError,
    TokenReplies,
    blob_bytes,
    stream_bytes,
)
from mc_driver.netns import NetNamespace
from mc_driver.traffic import recv_exact

__all__ = [
    "BlobChecker",
    "HttpHead",
    "NetDivergent",
    "NetPhaseDriver",
    "NetRR",
    "NetStream",
    "TokenLedger",
    "WorkloadCheckError",
    "check_rr_answer",
    "parse_http_head",
    "rr_request",
]

#: errors kept per client and phase; more are counted, not listed (a dead service fails every request)
MAX_ERRORS_KEPT = 20
#: pause before a client reconnects after an error, s (a refused port must not spin the CPU)
RECONNECT_PAUSE_S = 0.2


class WorkloadCheckError(Exception):
    """A byte the client received is not what the guest's service must send."""


# --- sans-I/O checks ---------------------------------------------------------------------------------


def rr_request(size: int) -> bytes:
    """The ``rrserver`` request for ``size`` answer bytes."""
    if size < 0:
        raise ValueError(f"rrserver answer size must be >= 0, got {size}")
    return f"{size}\n".encode()


def check_rr_answer(size: int, answer: bytes, expected: bytes | None = None) -> None:
    """Raise :class:`WorkloadCheckError` unless ``answer`` is ``rrserver``'s answer to ``size``."""
    want = stream_bytes(size) if expected is None else expected
    if len(answer) != size:
        raise WorkloadCheckError(f"rrserver answered {len(answer)} bytes to a request for {size}")
    if answer != want:
        at = next(i for i, (a, b) in enumerate(zip(answer, want, strict=True)) if a != b)
        raise WorkloadCheckError(
            f"rrserver answer to {size}: byte {at} is {answer[at]:#04x}, not {want[at]:#04x}"
        )


class TokenLedger:
    """The answer numbers ``tokend`` gave over every connection of a phase (thread-safe).

    ``tokend`` numbers its answers from 1 across all its connections, so with the workload as its only
    client the numbers seen must be distinct and contiguous; :meth:`problems` says where they are not.
    """

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._lock = threading.Lock()

    def add(self, seq: int) -> None:
        with self._lock:
            self._seqs.append(seq)

    def __len__(self) -> int:
        return len(self._seqs)

    def problems(self) -> list[str]:
        with self._lock:
            seqs = sorted(self._seqs)
        out: list[str] = []
        duplicates = sorted({a for a, b in itertools.pairwise(seqs) if a == b})
        if duplicates:
            out.append(f"tokend answer numbers repeated: {duplicates[:10]}")
        distinct = sorted(set(seqs))
        gaps = [(a, b) for a, b in itertools.pairwise(distinct) if b != a + 1]
        if gaps:
            shown = ", ".join(f"{a + 1}..{b - 1}" for a, b in gaps[:10])
            out.append(f"tokend answer numbers missing: {shown}")
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class HttpHead:
    status: int
    length: int
    keep_alive: bool


def parse_http_head(head: bytes) -> HttpHead:
    """An HTTP/1.1 response head (without its blank line) with a Content-Length; else WorkloadCheckError."""
    lines = head.split(b"\r\n")
    words = lines[0].split(b" ", 2)
    if len(words) < 2 or not words[0].startswith(b"HTTP/1.") or not words[1].isdigit():
        raise WorkloadCheckError(f"not an HTTP status line: {lines[0][:80]!r}")
    length: int | None = None
    keep_alive = words[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise WorkloadCheckError(f"malformed HTTP header line {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        if key == b"content-length":
            if not value.isdigit() or length is not None:
                raise WorkloadCheckError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif key == b"connection":
            keep_alive = value.lower() != b"close"
    if length is None:
        raise WorkloadCheckError("HTTP answer without Content-Length")
    return HttpHead(int(words[1]), length, keep_alive)


class BlobChecker:
    """Checks a ``/blob`` body chunk by chunk against the expected bytes; counts what was checked."""

    def __init__(self, expected: bytes) -> None:
        self.expected = memoryview(expected)
        self.offset = 0

    @property
    def done(self) -> bool:
        return self.offset == len(self.expected)

    def feed(self, chunk: bytes) -> None:
        end = self.offset + len(chunk)
        if end > len(self.expected):
            raise WorkloadCheckError(f"/blob body longer than {len(self.expected)} bytes")
        if self.expected[self.offset : end] != chunk:
            want = bytes(self.expected[self.offset : end])
            at = next(i for i, (a, b) in enumerate(zip(chunk, want, strict=True)) if a != b)
            raise WorkloadCheckError(f"/blob byte {self.offset + at} differs")
        self.offset = end


# --- clients -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _in_namespace(netns: str | None) -> Iterator[None]:
    if netns is None:
        yield
    else:
        with NetNamespace(netns).entered():
            yield


class Conversation(Protocol):
    """One client connection's protocol: ``exchange`` does one request and returns its units of work."""

    def exchange(self, sock: socket.socket) -> float: ...


@dataclasses.dataclass
class ClientTally:
    """What one client thread measured in a phase."""

    work: float = 0.0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    errors_dropped: int = 0

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)
        else:
            self.errors_dropped += 1


class _ClientThread(threading.Thread):
    """Closed loop on one connection until ``deadline`` (monotonic): request, answer, check, repeat."""

    def __init__(
        self,
        name: str,
        target: WorkloadTarget,
        port: int,
        conversation: Callable[[], Conversation],
        deadline: float,
        timeout_s: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.target, self.port = target, port
        self.conversation, self.deadline, self.timeout_s, self.stop = conversation, deadline, timeout_s, stop
        self.tally = ClientTally()

    def run(self) -> None:
        sock: socket.socket | None = None
        talk: Conversation | None = None
        try:
            while time.monotonic() < self.deadline and not self.stop.is_set():
                try:
                    if sock is None:
                        with _in_namespace(self.target.netns):
                            sock = socket.create_connection(
                                (self.target.guest_ip, self.port), timeout=self.timeout_s
                            )
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        talk = self.conversation()
                    assert talk is not None
                    started = time.monotonic()
                    work = talk.exchange(sock)
                    self.tally.latencies_ms.append((time.monotonic() - started) * 1000)
                    self.tally.work += work
                except (OSError, WorkloadCheckError, GuestError) as exc:
                    self.tally.error(f"{self.name} port {self.port}: {exc}")
                    if sock is not None:
                        sock.close()
                    sock, talk = None, None
                    self.stop.wait(RECONNECT_PAUSE_S)
        finally:
            if sock is not None:
                sock.close()


class _RRConversation:
    def __init__(self, sizes: Sequence[int], expected: dict[int, bytes], offset: int) -> None:
        self.sizes, self.expected, self.i = sizes, expected, offset

    def exchange(self, sock: socket.socket) -> float:
        size = self.sizes[self.i % len(self.sizes)]
        self.i += 1
        sock.sendall(rr_request(size))
        check_rr_answer(size, recv_exact(sock, size), self.expected[size])
        return 1.0


class _TokenConversation:
    def __init__(self, ledger: TokenLedger) -> None:
        self.ledger = ledger
        self.replies = TokenReplies()

    def exchange(self, sock: socket.socket) -> float:
        sock.sendall(b"token please\n")
        while True:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("tokend closed the connection")
            new = self.replies.feed(data)  # GuestError on a malformed or out-of-order answer
            if len(new) > 1:
                raise WorkloadCheckError(f"tokend sent more than one answer to one request: {new}")
            if new:
                self.ledger.add(new[0].seq)
                return 1.0


class _BlobConversation:
    def __init__(self, host: str, expected: bytes, tally: Callable[[float], None]) -> None:
        self.host, self.expected, self.count_bytes = host, expected, tally

    def exchange(self, sock: socket.socket) -> float:
        sock.sendall(f"GET /blob HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("blobd closed the connection before its answer's head")
            data += chunk
            if len(data) > 16384 and b"\r\n\r\n" not in data:
                raise WorkloadCheckError("HTTP answer head over 16 KiB")
        head, _, rest = data.partition(b"\r\n\r\n")
        parsed = parse_http_head(head)
        if parsed.status != 200 or parsed.length != len(self.expected):
            raise WorkloadCheckError(f"/blob answered {parsed.status} with {parsed.length} bytes")
        checker = BlobChecker(self.expected)
        checked = 0
        while True:
            if rest:
                checker.feed(rest)
                self.count_bytes(len(rest))  # checked bytes count even if the download is cut short
                checked += len(rest)
            if checker.done:
                break
            rest = sock.recv(min(1 << 20, len(self.expected) - checker.offset))
            if not rest:
                raise ConnectionError(f"blobd closed the connection after {checker.offset} body bytes")
        if not parsed.keep_alive:
            raise ConnectionResetError("blobd closes after each answer")  # reconnect (not a check error)
        return 0.0  # the bytes were counted as they arrived


# --- one phase ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class NetPhaseDriver:
    """How to drive one network workload for one phase: its service, port, clients and final check."""

    name: str
    service: str
    port: int
    clients: int
    timeout_s: float
    make: Callable[[WorkloadTarget, threading.Lock, list[float]], Callable[[int], Callable[[], Conversation]]]
    finish: Callable[[], list[str]] = list

    def drive(self, target: WorkloadTarget, start_s: float, clock0: float, end_at: float) -> PhaseResult:
        """Run the clients from now until ``end_at`` (monotonic); times relative to ``clock0``."""
        stop = threading.Event()
        lock = threading.Lock()
        streamed: list[float] = [0.0]  # bytes counted as they arrive (net-stream), under lock
        factory = self.make(target, lock, streamed)
        threads = [
            _ClientThread(f"{self.name}-{i}", target, self.port, factory(i), end_at, self.timeout_s, stop)
            for i in range(self.clients)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join(max(0.0, end_at - time.monotonic()) + self.timeout_s + 5)
        finally:
            stop.set()
        end_s = time.monotonic() - clock0
        errors: list[str] = []
        latencies: list[float] = []
        work = streamed[0]
        for thread in threads:
            if thread.is_alive():
                errors.append(f"{thread.name}: no answer {self.timeout_s:g} s after the phase ended")
            tally = thread.tally
            work += tally.work
            latencies += tally.latencies_ms
            errors += tally.errors
            if tally.errors_dropped:
                errors.append(f"{thread.name}: {tally.errors_dropped} more errors")
        errors += self.finish()
        return PhaseResult(self.name, start_s, end_s, work, tuple(latencies), tuple(errors))


class NetWorkload:
    """The shared :meth:`run` of the single-phase network workloads (subclasses say how to drive)."""

    name: str
    unit: str

    def driver(self) -> NetPhaseDriver:
        raise NotImplementedError

    def run(
        self, target: WorkloadTarget, seconds: float, on_phase: PhaseListener | None = None
    ) -> WorkloadResult:
        driver = self.driver()
        clock0 = time.monotonic()
        try:
            with GuestControl(target.guest_control) as ctl:
                try:
                    ctl.start_service(driver.service)
                    start_s = time.monotonic() - clock0
                    if on_phase is not None:
                        on_phase(0, self.name, start_s)
                    phase = driver.drive(target, start_s, clock0, clock0 + seconds)
                finally:
                    ctl.stop_service(driver.service)
        except GuestError as exc:
            return WorkloadResult(self.name, self.unit, (), (f"guest: {exc}",))
        return WorkloadResult(self.name, self.unit, (phase,))


class NetRR(NetWorkload):
    """Several closed-loop clients of ``rrserver``, each cycling through small answer sizes."""

    name = "net-rr"
    unit = "requests"

    def __init__(
        self,
        clients: int = 4,
        sizes: Sequence[int] = (64, 256, 1024),
        timeout_s: float = 30.0,
        port: int = RR_PORT,
    ) -> None:
        if clients < 1 or not sizes or min(sizes) < 1:
            raise ValueError("net-rr needs >= 1 client and answer sizes >= 1")
        self.clients, self.sizes, self.timeout_s, self.port = clients, tuple(sizes), timeout_s, port
        self._expected = {size: stream_bytes(size) for size in self.sizes}

    def driver(self) -> NetPhaseDriver:
        def make(
            _target: WorkloadTarget, _lock: threading.Lock, _streamed: list[float]
        ) -> Callable[[int], Callable[[], Conversation]]:
            # each client starts at another size, so the sizes are in flight together
            return lambda i: lambda: _RRConversation(self.sizes, self._expected, i)

        return NetPhaseDriver(self.name, "rrserver", self.port, self.clients, self.timeout_s, make)


class NetDivergent(NetWorkload):
    """Closed-loop clients of ``tokend``: every answer differs between the two VMs."""

    name = "net-divergent"
    unit = "requests"

    def __init__(self, clients: int = 4, timeout_s: float = 30.0, port: int = TOKEN_PORT) -> None:
        if clients < 1:
            raise ValueError("net-divergent needs >= 1 client")
        self.clients, self.timeout_s, self.port = clients, timeout_s, port

    def driver(self) -> NetPhaseDriver:
        ledger = TokenLedger()

        def make(
            _target: WorkloadTarget, _lock: threading.Lock, _streamed: list[float]
        ) -> Callable[[int], Callable[[], Conversation]]:
            return lambda _i: lambda: _TokenConversation(ledger)

        return NetPhaseDriver(
            self.name, "tokend", self.port, self.clients, self.timeout_s, make, ledger.problems
        )


class NetStream(NetWorkload):
    """Bulk downloads of ``blobd``'s 8 MiB ``/blob`` on keep-alive connections; work is checked bytes."""

    name = "net-stream"
    unit = "bytes"

    def __init__(self, clients: int = 1, timeout_s: float = 60.0, port: int = BLOBD_PORT) -> None:
        if clients < 1:
            raise ValueError("net-stream needs >= 1 client")
        self.clients, self.timeout_s, self.port = clients, timeout_s, port
        self._blob: bytes | None = None

    def driver(self) -> NetPhaseDriver:
        if self._blob is None:
            self._blob = blob_bytes()
        blob = self._blob

        def make(
            target: WorkloadTarget, lock: threading.Lock, streamed: list[float]
        ) -> Callable[[int], Callable[[], Conversation]]:
            def count(n: float) -> None:
                with lock:
                    streamed[0] += n

            return lambda _i: lambda: _BlobConversation(target.guest_ip, blob, count)

        return NetPhaseDriver(self.name, "blobd", self.port, self.clients, self.timeout_s, make)
