"""Busy-polling a connection for its peer's next message: one sleep and wakeup fewer per round trip.

Why: a server that answers a request and then blocks in ``epoll_wait`` is put to sleep, and when
the next request comes its CPU must be woken and the server rescheduled.  On a virtual machine a
sleeping vCPU is halted, and waking it goes through the hypervisor.  Measured on this project's
2-vCPU test machines (``qemu-nbd``, a 4 KiB random-write client at queue depth 1, fio's libnbd
engine): 17 µs per request when the client and the server happen to share a CPU, 72 µs when they
sit on different CPUs, where each request costs two cross-CPU wakeups.  A server that, having
answered, spins on the socket's readiness for a few tens of microseconds sees the next request
without sleeping, and the round trip loses one of its two wakeups.  QEMU does the same in its
iothreads (``poll-max-ns``, 32 µs by default), and for the same reason.

The price is CPU, and :class:`PollWindow` bounds it: it spins at most ``max_ns`` per idle period,
and after :attr:`PollWindow.MISSES_TO_BACK_OFF` spins in a row that ended without a message it
stops spinning for a back-off period (10 ms, doubling up to 1 s while spinning keeps failing).
A client that sends rarely therefore costs at most a few spins per back-off period; a client
that sends often costs the gaps between its messages, which the server would otherwise have
spent asleep on a CPU nobody else was using at that moment (on a loaded host the scheduler
still preempts the spinning thread: spinning is ordinary CPU time, not a lock).

The split follows the rest of the data plane: :class:`PollWindow` is the decision (plain
arithmetic on times and outcomes, tested without sockets); :func:`wait_readable` is the spin,
in C where the extension is built (the GIL is released while spinning, so the service's other
threads, the disk buffer's journal writer above all, run meanwhile) and in Python as the
reference that ``HYBRIDFT_PURE_PYTHON=1`` selects.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from hybridft_common.fastpath import speedups

#: what ``hybridft disk serve --poll-us`` spins by default: above the 30-40 µs this machine's
#: clients take to send their next request once answered (fio at queue depth 1), so the spin
#: catches it; QEMU's iothreads default to 32 µs
DEFAULT_POLL_US = 50


@dataclass(slots=True)
class PollCounters:
    """What polling did, for a service's status (one object may be shared by many windows)."""

    polls: int = 0  # spins started
    hits: int = 0  # spins that ended with the socket readable
    spun_ns: int = 0  # time spent spinning, hits and misses
    back_offs: int = 0  # times spinning was suspended after MISSES_TO_BACK_OFF misses in a row

    def as_dict(self) -> dict[str, int]:
        return {"polls": self.polls, "hits": self.hits, "spun_ns": self.spun_ns, "back_offs": self.back_offs}


class PollWindow:
    """How long to spin for one connection's next message, from how the last spins went.

    ``window(now_ns)`` is the spin to do now (0: none, block as usual); ``record(now_ns,
    waited_ns)`` is what it gave (``waited_ns`` >= 0: readable after that long; -1: the whole
    window passed).  Times are ``time.monotonic_ns()`` values.
    """

    MISSES_TO_BACK_OFF = 3
    BACK_OFF_FIRST_NS = 10_000_000
    BACK_OFF_MAX_NS = 1_000_000_000

    def __init__(self, max_ns: int, counters: PollCounters | None = None) -> None:
        if max_ns < 0:
            raise ValueError(f"a poll window cannot be negative ({max_ns} ns)")
        self.max_ns = max_ns
        self.counters = counters if counters is not None else PollCounters()
        self._misses_in_row = 0
        self._back_off_ns = self.BACK_OFF_FIRST_NS
        self._resume_at = 0  # no spinning before this time (a back-off)

    def window(self, now_ns: int) -> int:
        if not self.max_ns or now_ns < self._resume_at:
            return 0
        return self.max_ns

    def record(self, now_ns: int, waited_ns: int) -> None:
        c = self.counters
        c.polls += 1
        if waited_ns >= 0:
            c.hits += 1
            c.spun_ns += waited_ns
            self._misses_in_row = 0
            self._back_off_ns = self.BACK_OFF_FIRST_NS
            return
        c.spun_ns += self.max_ns
        self._misses_in_row += 1
        if self._misses_in_row >= self.MISSES_TO_BACK_OFF:
            c.back_offs += 1
            self._misses_in_row = 0
            self._resume_at = now_ns + self._back_off_ns
            self._back_off_ns = min(2 * self._back_off_ns, self.BACK_OFF_MAX_NS)


#: the most descriptors one spin watches (the C code's array)
MAX_FDS = 16


def wait_readable_python(fds: tuple[int, ...], max_ns: int) -> int:
    """Spin until one of ``fds`` is readable (or has an error or hang-up to report, which a read
    would return at once) or ``max_ns`` passed: nanoseconds waited, or -1 if the time ran out."""
    if type(fds) is not tuple:
        raise TypeError("fds must be a tuple of file descriptors")
    if not 1 <= len(fds) <= MAX_FDS:
        raise ValueError(f"between 1 and {MAX_FDS} file descriptors")
    if any(fd < 0 for fd in fds):
        raise ValueError("bad file descriptor")
    if max_ns < 0:
        raise ValueError("max_ns cannot be negative")
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    start = time.monotonic_ns()
    deadline = start + max_ns
    while True:
        if poller.poll(0):
            return time.monotonic_ns() - start
        if time.monotonic_ns() >= deadline:
            return -1


wait_readable: Callable[[tuple[int, ...], int], int] = (
    wait_readable_python if speedups is None else speedups.wait_readable
)


def spin(window: PollWindow, fds: tuple[int, ...]) -> None:
    """One spin on ``fds`` as long as ``window`` allows now (none during a back-off), recorded in
    it.  The services' shells call this once their batch is handled; ``OSError`` (a descriptor
    closed under them) is theirs to handle."""
    max_ns = window.window(time.monotonic_ns())
    if max_ns:
        waited = wait_readable(fds, max_ns)
        window.record(time.monotonic_ns(), waited)
