"""The heartbeat: the daemon's JSON lines to the agent, typed on both ends.

Why typed: the agent fails the pair over on what these lines say (``primary_lost``, ``failover``) and
decides the disk's fate on when they said it (``{"epoch": N, "state": "sealed", "t": T}``, see
``controller/agent.py``).  Four places in the daemon used to build them as bare dicts and the agent
parsed them as one; a misspelt key would have been read as "no news".  :class:`Heartbeat` is the one
definition: :meth:`Heartbeat.encode` writes a line, :meth:`Heartbeat.decode` reads one or says what
is wrong with it.  The wire format is unchanged -- one compact JSON object per line, keys ``t``,
``epoch``, ``state`` and, only when true, ``primary_lost`` / ``failover`` / ``unprotected`` (``state``
is left out of a message that has none).

:class:`HeartbeatSender` is the daemon's side of the connection.

Who may speak: only the pair's daemon.  The agent's listener accepts a unix peer of its own uid or root
(``SO_PEERCRED``) or a tcp peer with the pair's client certificate (mutual TLS), and refuses a second
connection while the daemon's lives.  That is also why a heartbeat may still *order* a failover
(``failover``, ``primary_lost``): whoever can write on this connection is the daemon, and the daemon can
force a failover anyway by falling silent; the order only makes a planned failover fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridft_common.endpoints import connect_blocking, parse_endpoint

log = logging.getLogger("hybridft.daemon")

HEARTBEAT_INTERVAL = 0.1


class HeartbeatError(ValueError):
    """A heartbeat line that is not a heartbeat (the message says what is wrong)."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One heartbeat message.

    ``t`` is the daemon's wall clock (seconds) when it was made; ``epoch`` the checkpoint it is about
    (the one running, else the last committed; None before any); ``state`` that checkpoint's phase
    (``open``, ``sealed``, ``loaded``, ``committed``), None in a message that carries none (primary
    lost).  ``primary_lost``: the daemon saw the primary go; ``failover``: a planned failover;
    ``unprotected``: the daemon declared the secondary lost and runs the primary alone -- the agent
    must stand down (a failover now would fence the only live copy for a stale one).
    """

    t: float
    epoch: int | None
    state: str | None
    primary_lost: bool = False
    failover: bool = False
    unprotected: bool = False

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"t": self.t, "epoch": self.epoch}
        if self.state is not None:
            message["state"] = self.state
        if self.primary_lost:
            message["primary_lost"] = True
        if self.failover:
            message["failover"] = True
        if self.unprotected:
            message["unprotected"] = True
        return message

    def encode(self) -> bytes:
        """One line: compact JSON and a newline."""
        return (json.dumps(self.as_dict(), separators=(",", ":")) + "\n").encode()

    @classmethod
    def decode(cls, line: bytes | str) -> Heartbeat:
        """Read one line; :class:`HeartbeatError` names what is wrong.  Unknown keys are ignored (a
        newer daemon may say more)."""
        try:
            message = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise HeartbeatError(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise HeartbeatError(f"not a JSON object: {type(message).__name__}")
        if "t" not in message:
            raise HeartbeatError("no 't'")
        t, epoch, state = message["t"], message.get("epoch"), message.get("state")
        if not _is_number(t):
            raise HeartbeatError(f"'t' must be a number, got {t!r}")
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise HeartbeatError(f"'epoch' must be an integer or null, got {epoch!r}")
        if state is not None and not isinstance(state, str):
            raise HeartbeatError(f"'state' must be a string or null, got {state!r}")
        flags = {}
        for key in ("primary_lost", "failover", "unprotected"):
            value = message.get(key, False)
            if not isinstance(value, bool):
                raise HeartbeatError(f"{key!r} must be true or false, got {value!r}")
            flags[key] = value
        return cls(float(t), epoch, state, **flags)


class HeartbeatSender:
    """JSON lines to the agent: a beat every 100 ms plus immediate messages; reconnects.

    Why a thread and not a task: a beat must not wait behind anything the event loop is doing (a slow
    QMP reply, a burst of events, a status request); a missed 500 ms makes the agent fail over.  The
    thread only formats and writes small lines on a blocking socket with a short send timeout.
    ``max_gap`` is the longest interval between two beats (> 100 ms: this process was starved).
    """

    def __init__(self, endpoint: str | None, beat: Callable[[], Heartbeat]) -> None:
        self.endpoint = endpoint
        self.beat = beat  # the periodic message
        self.sent = 0
        self.connects = 0
        self.max_gap = 0.0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect(self) -> None:
        assert self.endpoint is not None
        try:  # mutual TLS on tcp (the agent accepts only the pair's certificates)
            sock = connect_blocking(parse_endpoint(self.endpoint), 0.5)
        except OSError:
            return
        sock.settimeout(0.2)
        self._sock = sock
        self.connects += 1

    def send(self, message: Heartbeat) -> None:
        line = message.encode()
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.sendall(line)
                self.sent += 1
            except OSError:
                self._sock.close()
                self._sock = None

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            if self._sock is None:
                with self._lock:
                    self._connect()
            try:
                self.send(self.beat())
            except Exception:  # a beat must never kill the sender
                log.exception("heartbeat message failed")
            self._stop.wait(HEARTBEAT_INTERVAL)

    async def run(self) -> None:
        if self.endpoint is None:
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self.close()

    async def flush(self) -> None:
        """Lines are written synchronously: nothing to wait for."""

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
