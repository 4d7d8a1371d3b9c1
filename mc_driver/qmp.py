"""A thin typed layer over ``qemu.qmp.QMPClient`` for the COLO pair and its tools.

Why a layer at all: every user of QMP here needs the same three things and they are easy to get subtly
wrong with the raw client --

- **connect with retry**: QEMU creates its monitor socket some time after ``exec``; a connect that races it
  must retry until a deadline, and must notice when the QEMU process died meanwhile;
- **errors you can catch by kind**: :class:`QmpConnectError`, :class:`QmpCommandError` (QEMU answered with an
  error: its class and description kept), :class:`QmpTimeout`, :class:`QmpDisconnected`, all under
  :class:`QmpError`;
- **no lost events**: one listener is registered for the whole session *before* the handshake finishes,
  so an event that arrives between "fire a checkpoint" and "start waiting for STOP" is still seen.
  Events keep QEMU's own timestamp (host wall clock at emission), which is what checkpoint pauses are
  measured with -- never the time Python got round to reading them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, StateError

# qemu.qmp logs every disconnect at ERROR level; the session reports those itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QmpError(Exception):
    """Base of every error this module raises."""


class QmpConnectError(QmpError):
    """The monitor socket could not be reached before the deadline (or the QEMU process exited)."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class QmpTimeout(QmpError):
    """A command or an awaited event did not arrive in time."""


class QmpDisconnected(QmpError):
    """The connection to QEMU is gone (QEMU exited or closed the monitor)."""


@dataclass(frozen=True, slots=True)
class Event:
    """A QMP event: its name, data, QEMU's emission time (epoch seconds) and when we received it."""

    name: str
    data: Mapping[str, Any]
    timestamp: float
    received: float = field(compare=False)


def _to_event(message: Mapping[str, Any]) -> Event:
    stamp = message.get("timestamp") or {}
    ts = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    return Event(str(message["event"]), dict(message.get("data") or {}), ts, time.time())


class QmpSession:
    """One QMP connection: ``execute`` commands, ``wait_event`` for events (none are lost)."""

    def __init__(self, name: str = "qemu") -> None:
        self.name = name
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._backlog: list[Event] = []

    @classmethod
    async def connect(
        cls,
        path: str | Path,
        *,
        timeout: float = 30.0,
        name: str = "qemu",
        alive: Callable[[], bool] | None = None,
    ) -> QmpSession:
        """Connect to the monitor socket at ``path``, retrying until ``timeout``.

        ``alive`` (e.g. ``lambda: proc.poll() is None``) stops the retry early when QEMU has exited.
        """
        session = cls(name)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if alive is not None and not alive():
                raise QmpConnectError(f"{name}: QEMU exited before its monitor {path} accepted a connection")
            try:
                await session._client.connect(str(path))
                return session
            except (ConnectError, OSError, StateError) as exc:
                last = exc
                with contextlib.suppress(Exception):
                    await session._client.disconnect()
            if time.monotonic() > deadline:
                raise QmpConnectError(f"{name}: cannot connect to QMP at {path}: {last}")
            await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        """The connection to QEMU is up (qemu.qmp's own state; False once QEMU went away or it closed)."""
        runstate = self._client.runstate
        return runstate is not None and runstate.name == "RUNNING"

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run ``command``; ``arguments`` or keyword arguments (``_`` in names stays ``_``).

        Raises :class:`QmpCommandError` if QEMU refuses, :class:`QmpDisconnected` if it went away.
        """
        args = dict(arguments or {}) | kwargs
        try:
            return await self._client.execute(command, args or None)
        except ExecuteError as exc:
            error = exc.error.error
            raise QmpCommandError(command, error.class_, error.desc) from exc
        except (StateError, EOFError, ConnectionError) as exc:
            raise QmpDisconnected(f"{self.name}: {command}: connection lost ({exc})") from exc
        except QMPError as exc:
            raise QmpDisconnected(f"{self.name}: {command}: {exc}") from exc

    async def hmp(self, command_line: str) -> str:
        """A human-monitor command (e.g. ``info mtree -f``) through QMP; returns its text."""
        return str(await self.execute("human-monitor-command", {"command-line": command_line}))

    def _drain_listener(self) -> None:
        self._backlog.extend(_to_event(message) for message in self._listener.clear())

    def events(self) -> list[Event]:
        """Take every event received so far (and forget them)."""
        self._drain_listener()
        taken, self._backlog = self._backlog, []
        return taken

    def pending(self, names: str | Iterable[str]) -> list[Event]:
        """Queued events named ``names``, oldest first, left in the queue."""
        wanted = {names} if isinstance(names, str) else set(names)
        self._drain_listener()
        return [e for e in self._backlog if e.name in wanted]

    def take(self, names: str | Iterable[str]) -> list[Event]:
        """Remove and return the queued events named ``names``, oldest first."""
        taken = self.pending(names)
        self.discard_events(names)
        return taken

    async def wait_event(
        self,
        names: str | Iterable[str],
        *,
        timeout: float,
        predicate: Callable[[Event], bool] | None = None,
    ) -> Event:
        """The first unconsumed event named ``names`` (matching ``predicate``); others stay queued.

        Events already received count, so call this after firing whatever causes the event.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        while True:
            self._drain_listener()
            for index, event in enumerate(self._backlog):
                if event.name in wanted and (predicate is None or predicate(event)):
                    del self._backlog[index]
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"{self.name}: no {'/'.join(sorted(wanted))} event within {timeout:.1f} s")
            if self._client.runstate is not None and self._client.runstate.name == "IDLE":
                raise QmpDisconnected(
                    f"{self.name}: disconnected while waiting for {'/'.join(sorted(wanted))}"
                )
            try:
                message = await asyncio.wait_for(self._listener.get(), timeout=min(left, 0.5))
            except TimeoutError:
                continue
            self._backlog.append(_to_event(message))

    def discard_events(self, names: str | Iterable[str] | None = None) -> None:
        """Drop queued events (all, or only those named)."""
        self._drain_listener()
        if names is None:
            self._backlog.clear()
            return
        wanted = {names} if isinstance(names, str) else set(names)
        self._backlog = [e for e in self._backlog if e.name not in wanted]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def held_migration(session: Any) -> str | None:
    """The ``query-migrate`` status of a migration this QEMU still holds, or None once it holds none.

    QEMU registers one ``migration`` yank instance while a migration (outgoing or incoming) lives and
    removes it last, after its own end-of-migration work (an incoming side's ``vm_start`` included), so
    its absence means the migration is really over and a new ``migrate`` can start.  ``session``: a
    :class:`QmpSession` or anything with its ``execute``."""
    instances = await session.execute("query-yank")
    if not any(instance.get("type") == "migration" for instance in instances or []):
        return None
    return str((await session.execute("query-migrate") or {}).get("status", "unknown"))
