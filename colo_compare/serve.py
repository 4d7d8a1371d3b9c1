"""``hybridft compare serve``: the live comparator between a QEMU pair and its client.

QEMU's filter chardevs are *clients* with ``reconnect=1``; this process LISTENS on three data
addresses and a control address::

    --primary-in    the primary's guest output   (filter-redirector queue=rx outdev=...)
    --secondary-in  the secondary's guest output (filter-redirector queue=rx outdev=...)
    --out           released frames back into the primary's netdev (filter-redirector indev=...)
    --control       JSON-lines control (controller/control.py): mode, seal, commit, release-all,
                    stats, next-request

The shell only moves bytes: each readable socket is drained in batches straight into a
:class:`~colo_compare.transport.FrameDecoder`, every batch goes to the sans-I/O core
(:class:`~colo_compare.core.Comparator`) in one call, and the actions that come back are applied
(released frames encoded in one buffer and written to ``--out`` in order; checkpoint requests
queued for ``next-request``).

Why these choices
-----------------
* **Seal drains synchronously.** The daemon seals after ``stop`` returned on both QEMUs; QEMU
  writes filter output with a blocking ``write_all`` from its main loop, so by then every frame of
  the epoch is in our socket buffers.  ``seal`` therefore reads both sockets until ``EAGAIN``
  *before* calling ``Comparator.seal()`` — no timing guess, no frame of epoch N left for N+1.
* **Back-pressure without deadlock.** A QEMU whose filter chardev is full busy-waits in its main
  loop (holding the BQL): it then neither reads our ``--out`` socket nor answers QMP.  Pausing the
  primary's input because ``--out`` is backed up would deadlock us with the very QEMU that must
  drain it, and would hang the daemon's ``stop``.  So: a large ``--out`` backlog pauses the
  *secondary's* input (fewer releases in COLO; another process), the core's queue budget asks for
  checkpoints (``queue-full``), and only a hard memory ceiling (``--max-buffer``, far above the
  budget: the daemon is not checkpointing at all) pauses the primary, loudly.
* **Every byte a peer makes us keep is in the ceiling.** ``--max-buffer`` counts the primary's held
  frames, the output waiting for ``--out`` *and* the secondary's bytes the core keeps for comparison
  (the secondary's stream ahead of the primary's, or after a divergence).  Those secondary bytes
  may take at most half of the ceiling: beyond that the secondary's input pauses (like for a slow
  ``--out``), so a flooding or runaway secondary costs half the ceiling, never the primary's frames;
  the commit that re-anchors the streams drops them and resumes it.  The seal still drains a paused
  input (what QEMU wrote before ``stop`` is the epoch's), which the kernel's socket buffer bounds.
* **Who may connect.** A unix data address is a 0600 socket and its peers must be our uid or root
  (``SO_PEERCRED``); a ``tcp:`` one is mutual TLS with the address's ``tls-creds`` (QEMU's chardev
  ``tls-creds``), terminated here and relayed into the same socket code as a unix connection.  ``--out``
  carries the clients' output, so while its connection lives a second one is refused (it would take
  that output, and QEMU's redirector would never read again): only a dead connection is replaced.
  A TLS input reaches the seal's synchronous drain through the relay, so over TCP a frame still in
  flight at a seal counts in the next epoch (held longer, never released early).
* **Reconnects.** A new connection on an input address replaces the old one (QEMU reconnects after a
  restart or after we closed a connection for bad framing).  Bad framing closes only that
  connection and is logged; the core and the other connections carry on.  Released frames with no
  ``--out`` connection wait (bounded by the same ceiling) and are written when QEMU reconnects.
* **stats** answers at the daemon's sampling rate (4 Hz): besides the human-oriented ``core`` and
  ``transport`` parts, ``signals`` is :class:`~colo_compare.signals.CompareStats` (``as_dict``),
  built from the core's counters plus the hold latency this shell measures (it owns the clock).
  Nothing in it grows with traffic: hold samples live in a bounded ring.  ``stats`` with
  ``signals_only: true`` answers that part alone (no per-flow sums, one bounded sort).
* **next-request** is a long-poll: the daemon keeps one control connection parked on it and learns
  of a divergence within a loop iteration.  Requests are coalesced (one answer carries the first
  request and how many followed), and a ``seal`` clears them: checkpoint N resolves every request
  raised before its seal.  Use a separate control connection for it (each connection answers in
  order).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

from colo_compare.core import CheckpointRequest, Comparator, DropSecondary, Release, frames_bytes
from colo_compare.signals import HOLD_SAMPLE, CompareStats, HoldWindow
from colo_compare.transport import (
    FrameDecoder,
    FrameSocketReader,
    FrameSocketWriter,
    encode_frames,
    listen_socket,
    tune_socket,
)
from hybridft_common import eventloop, fastpath
from hybridft_common.busypoll import PollCounters, PollWindow, spin
from hybridft_common.control import ControlError, serve_control
from hybridft_common.endpoints import HANDSHAKE_TIMEOUT, Endpoint, parse_endpoint
from hybridft_common.fencing import Fence, GenerationFile, fenced_dispatch
from hybridft_common.secure import ChannelError, check_peer
from hybridft_common.vocabulary import Mode

log = logging.getLogger("hybridft.compare")

ROLES = ("primary", "secondary", "out")
MAX_PENDING_REQUESTS = 4096  # beyond this (no daemon polling) requests are only counted


class Core(Protocol):
    """What the shell needs from a core: the Comparator, or the forward-only relay."""

    @property
    def mode(self) -> Mode: ...
    @property
    def secondary_buffered_bytes(self) -> int: ...
    def feed_primary(self, frames: list[bytes], now: float) -> list[Any]: ...
    def feed_secondary(self, frames: list[bytes], now: float) -> list[Any]: ...
    def poll(self, now: float) -> list[Any]: ...
    def seal(self) -> int: ...
    def commit(self, epoch: int) -> list[Any]: ...
    def release_all(self) -> list[Any]: ...
    def set_mode(self, mode: Mode) -> None: ...
    def stats(self) -> dict[str, int | float | str]: ...


@dataclass(slots=True)
class PendingRequest:
    request: CheckpointRequest
    epoch: int  # the open epoch when it was raised
    at: float  # monotonic time it was raised


@dataclass(slots=True)
class ServiceCounters:
    connections: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # peers refused: wrong uid, no TLS, second out
    framing_errors: Counter[str] = field(default_factory=Counter)
    primary_frames: int = 0
    primary_bytes: int = 0
    secondary_frames: int = 0
    released_frames: int = 0
    released_bytes: int = 0
    requests_raised: int = 0
    requests_delivered: int = 0
    primary_pauses: int = 0
    secondary_pauses: int = 0
    vnet_headers_missing: int = 0
    core_errors: int = 0
    vnet_hdr_len: int | None = None  # as last seen from the primary


class CompareService:
    """The asyncio shell: listeners, per-role connections, control verbs, back-pressure."""

    def __init__(
        self,
        core: Core,
        *,
        primary_in: Endpoint,
        secondary_in: Endpoint,
        out: Endpoint,
        control: Endpoint,
        vnet_hdr: bool = False,
        poll_interval: float = 0.05,
        out_high_water: int = 16 << 20,
        max_buffer: int = 1 << 30,
        poll_us: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_us < 0:
            raise ValueError("poll_us cannot be negative")
        self.core = core
        self.endpoints = {"primary": primary_in, "secondary": secondary_in, "out": out}
        self.control_endpoint = control
        self.vnet_hdr = vnet_hdr
        self.poll_interval = poll_interval
        self.out_high_water = out_high_water
        self.max_buffer = max_buffer
        self.clock = clock
        self.counters = ServiceCounters()
        self.readers: dict[str, FrameSocketReader | None] = {"primary": None, "secondary": None}
        self.writer: FrameSocketWriter | None = None
        self._out_waiting: list[bytes] = []  # encoded batches released while no --out connection
        self._out_waiting_bytes = 0
        self._vnet: dict[int, tuple[bytes, bytes]] = {}  # id(frame) -> (frame, virtio header)
        # hold latency, sampled (every HOLD_SAMPLE-th frame of a batch): id -> (frame, arrival)
        self._hold_pending: dict[int, tuple[bytes, float]] = {}
        self._hold = HoldWindow()  # the transport figures summarise all of it, the signals a window
        self._requests: list[PendingRequest] = []
        self._requests_overflow = 0
        self._request_event = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._relays: set[asyncio.Task[None]] = set()  # per TLS connection: handshake, relay
        self._control: asyncio.Server | None = None
        self._out_pending_tls = 0  # --out TLS handshakes under way (a second one is refused meanwhile)
        self._secondary_paused_for_out = False
        self._secondary_paused_for_memory = False
        self._primary_paused_for_memory = False
        self._closed = asyncio.Event()
        self._loop_name = "not started"
        # the fencing generation (hybridft_common.fencing): once a failover fenced the pair, requests
        # of an older generation are refused and nothing more is released to --out
        self.fence = Fence()
        self.fence_record: GenerationFile | None = None
        self.fenced_frames = 0
        self._guarded = fenced_dispatch(self._dispatch, self.fence, None, on_fence=self._on_fence)
        # spinning for the next input once a batch is handled (hybridft_common.busypoll)
        self.poll_us = poll_us
        self.poll_counters = PollCounters()
        self._poll = PollWindow(poll_us * 1000, self.poll_counters) if poll_us else None
        self._poll_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # every tcp address's credentials first: a missing one refuses the start before anything listens
        contexts = {
            role: self.endpoints[role].creds().server_context()
            for role in ROLES
            if self.endpoints[role].kind == "tcp"
        }
        self._loop_name = eventloop.running_loop_name()
        for role in ROLES:
            lsock = listen_socket(self.endpoints[role])
            self._listeners.append(lsock)
            self._tasks.append(loop.create_task(self._accept_loop(role, lsock, contexts.get(role))))
        self._control = await serve_control(self.control_endpoint, self.dispatch)
        self._tasks.append(loop.create_task(self._poll_loop()))
        log.info(
            "comparator listening: primary-in %s, secondary-in %s, out %s, control %s (mode %s%s)",
            *(self.endpoints[r] for r in ROLES), self.control_endpoint, self.core.mode,
            ", vnet_hdr" if self.vnet_hdr else "",
        )  # fmt: skip

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        for relay in list(self._relays):
            relay.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._control is not None:
            self._control.close()
        for reader in self.readers.values():
            if reader is not None:
                reader.close("service stopping")
        if self.writer is not None:
            self.writer.flush_blocking(2.0)
            self.writer.close("service stopping")
        for lsock in self._listeners:
            lsock.close()
        self._closed.set()

    # -- connections ------------------------------------------------------------------------------
    async def _accept_loop(self, role: str, lsock: socket.socket, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(lsock)
            except OSError as exc:
                log.warning("%s: accept failed: %s", role, exc)
                await asyncio.sleep(0.1)
                continue
            try:
                check_peer(conn)
            except ChannelError as exc:
                self.counters.refused[role] += 1
                log.warning("%s: connection refused: %s", role, exc.message)
                conn.close()
                continue
            if role == "out" and self._out_alive():
                self.counters.refused[role] += 1
                log.warning("out: a second connection refused while the first lives (it would take "
                            "the clients' output)")  # fmt: skip
                conn.close()
                continue
            if tls is not None:
                relay = loop.create_task(self._accept_tls(role, conn, tls))
                self._relays.add(relay)
                relay.add_done_callback(self._relays.discard)
                continue
            self._attach(role, conn)

    def _attach(self, role: str, conn: socket.socket) -> None:
        tune_socket(conn)
        self.counters.connections[role] += 1
        log.info("%s: connected (connection #%d)", role, self.counters.connections[role])
        if role == "out":
            self._attach_out(conn)
        else:
            self._attach_input(role, conn)

    def _out_alive(self) -> bool:
        """Is the ``--out`` connection there and not closed by its peer (a dead QEMU's EOF may still
        wait unread: peek for it, so a restarted QEMU's reconnect is not refused)."""
        writer = self.writer
        if writer is None or writer.closed:
            return bool(self._out_pending_tls)
        try:
            peeked = writer.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            peeked = b""
        if not peeked:
            writer.close("peer closed")
            return bool(self._out_pending_tls)
        return True

    async def _accept_tls(self, role: str, conn: socket.socket, tls: ssl.SSLContext) -> None:
        """Finish the TLS handshake of a tcp connection, then relay its plaintext through a socketpair
        whose other end goes to the same code as a unix connection."""
        loop = asyncio.get_running_loop()
        if role == "out":
            self._out_pending_tls += 1
        try:
            try:
                reader = asyncio.StreamReader(limit=1 << 20)
                transport, protocol = await loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader), conn, ssl=tls,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                )  # fmt: skip
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.counters.refused[role] += 1
                log.warning("%s: TLS connection refused: %r", role, exc)
                conn.close()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            inner, outer = socket.socketpair()
            self._attach(role, inner)
        finally:
            if role == "out":
                self._out_pending_tls -= 1
        outer.setblocking(False)
        plain_reader, plain_writer = await asyncio.open_unix_connection(sock=outer)
        pumps = [
            loop.create_task(_pump(reader, plain_writer)),
            loop.create_task(_pump(plain_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            plain_writer.close()
            writer.close()

    def _attach_input(self, role: str, conn: socket.socket) -> None:
        old = self.readers[role]
        if old is not None and not old.closed:
            old.drain_now()  # whatever the old connection still holds came first
            old.close("replaced by a new connection")
        on_frames = self._on_primary if role == "primary" else self._on_secondary
        reader = FrameSocketReader(
            conn, FrameDecoder(self.vnet_hdr), on_frames, lambda why, r=role: self._input_closed(r, why)
        )
        self.readers[role] = reader
        if role == "primary" and self._primary_paused_for_memory:
            reader.paused = True
        if role == "secondary" and (self._secondary_paused_for_out or self._secondary_paused_for_memory):
            reader.paused = True
        reader.start()

    def _input_closed(self, role: str, why: str) -> None:
        if why.startswith("bad framing"):
            self.counters.framing_errors[role] += 1
            log.error("%s: %s; connection closed (QEMU will reconnect)", role, why)
        else:
            log.info("%s: %s", role, why)

    def _attach_out(self, conn: socket.socket) -> None:
        if self.writer is not None and not self.writer.closed:
            self.writer.close("replaced by a new connection")
        loop = asyncio.get_running_loop()
        fd = conn.fileno()

        def closed(why: str) -> None:
            loop.remove_reader(fd)
            # released frames the kernel never took wait for the next connection (a record cut
            # in the middle is lost with the connection: TCP retransmits it)
            unsent, lost = writer.take_unsent()
            if unsent:
                self._out_waiting[:0] = unsent
                self._out_waiting_bytes += sum(map(len, unsent))
            log.info("out: %s (%d bytes kept for the next connection, %d lost)",
                     why, sum(map(len, unsent)), lost)  # fmt: skip

        writer = FrameSocketWriter(conn, closed, on_drained=self._out_drained)
        self.writer = writer
        # QEMU never writes on this connection: watch it only to notice the peer going away
        loop.add_reader(fd, self._out_readable, writer)
        waiting, self._out_waiting, self._out_waiting_bytes = self._out_waiting, [], 0
        for chunk in waiting:
            writer.write(chunk)
        self._check_pressure()

    def _out_readable(self, writer: FrameSocketWriter) -> None:
        try:
            data = writer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            log.info("out: %s", exc)
        if not data:
            writer.close("peer closed")
        # bytes from QEMU's indev redirector side are not expected; ignore them

    def _out_drained(self) -> None:
        self._check_pressure()

    # -- data path --------------------------------------------------------------------------------
    def _on_primary(self, frames: list[bytes], headers: list[bytes]) -> None:
        # The secondary's output first: what it already sent for these frames is then stored when
        # they arrive, and a matching frame is released at once instead of being held until the
        # event loop comes round to the secondary's socket.  Measured (bench compare, two
        # interleaved runs each): hold p50 at 50 % load 171-187 -> 50-117 us, in bulk 2.6-4.0 ms
        # -> 0.19-0.27 ms; one extra recv (EAGAIN) per primary read when nothing waits.
        secondary = self.readers["secondary"]
        if secondary is not None and self.core.mode is Mode.COLO:
            secondary.read_if_ready()
        try:
            self._feed_primary(frames, headers)
        except Exception:
            self.counters.core_errors += 1
            log.exception("the core failed on a batch of %d primary frames", len(frames))
        if self._poll is not None and not self._poll_scheduled:
            self._schedule_poll()

    def _on_secondary(self, frames: list[bytes], headers: list[bytes]) -> None:
        self.counters.secondary_frames += len(frames)
        try:
            self._apply(self.core.feed_secondary(frames, self.clock()))
        except Exception:
            self.counters.core_errors += 1
            log.exception("the core failed on a batch of %d secondary frames", len(frames))
        if self.core.secondary_buffered_bytes > self.secondary_ceiling:
            self._check_pressure()
        if self._poll is not None and not self._poll_scheduled:
            self._schedule_poll()

    def _schedule_poll(self) -> None:
        # after this wakeup's other callbacks: the other input may be readable already, and the
        # event loop reads it before anything spins
        self._poll_scheduled = True
        assert self._loop is not None
        self._loop.call_soon(self._poll_for_next)

    def _poll_for_next(self) -> None:
        """A batch is handled: spin for the next input on either side instead of letting the event
        loop sleep, while :class:`PollWindow` says it pays.  In COLO a held frame waits for the
        secondary's copy, which typically comes right after the primary's: a sleep and a wakeup
        between the two are then on the frame's path.

        Not while released output waits in the writer (the loop must send it first).  The spin
        holds up this event loop for at most the window: the control socket, timers and an input
        relayed from TLS (its relay runs in this loop, so a spin cannot see its data) wait that
        long at worst, and missed spins back off.
        """
        self._poll_scheduled = False
        poll, writer = self._poll, self.writer
        if poll is None or (writer is not None and writer.backlog):
            return
        fds = tuple(
            reader.fileno
            for reader in self.readers.values()
            if reader is not None and not reader.closed and not reader.paused
        )
        if not fds:
            return
        try:
            spin(poll, fds)
        except OSError as exc:
            log.debug("polling skipped: %s", exc)

    @property
    def secondary_ceiling(self) -> int:
        """The most secondary bytes the core may keep before the secondary's input pauses."""
        return self.max_buffer // 2

    def _feed_primary(self, frames: list[bytes], headers: list[bytes]) -> None:
        c = self.counters
        c.primary_frames += len(frames)
        c.primary_bytes += frames_bytes(frames)
        now = self.clock()
        pending = self._hold_pending
        if len(pending) > 1 << 16:  # frames the core copied would never be popped: bound it
            pending.clear()
        for frame in frames[::HOLD_SAMPLE]:
            pending[id(frame)] = (frame, now)
        if self.vnet_hdr:
            vnet = self._vnet
            for frame, header in zip(frames, headers, strict=True):
                vnet[id(frame)] = (frame, header)
            c.vnet_hdr_len = len(headers[0])
        self._apply(self.core.feed_primary(frames, now))
        if self.buffered_bytes() > self.max_buffer:
            self._check_pressure()

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Release:
                self._emit(action.frames)
            elif kind is CheckpointRequest:
                self.counters.requests_raised += 1
                if len(self._requests) < MAX_PENDING_REQUESTS:
                    self._requests.append(PendingRequest(action, self._open_epoch(), self.clock()))
                else:  # nobody is polling: keep memory bounded, keep the count
                    self._requests_overflow += 1
                self._request_event.set()
            elif kind is DropSecondary:
                pass
            else:  # a core newer than this shell: say so rather than lose it
                log.warning("unknown action from the core: %r", action)

    def _open_epoch(self) -> int:
        return int(getattr(self.core, "epoch", 0))

    def _emit(self, frames: list[bytes]) -> None:
        if not frames:
            return
        if self.fence.generation > 0:  # a failover happened: the primary's output must not reach clients
            self.fenced_frames += len(frames)
            return
        c = self.counters
        c.released_frames += len(frames)
        c.released_bytes += frames_bytes(frames)
        pending = self._hold_pending
        if pending:
            # only every HOLD_SAMPLE-th frame is sampled: find the sampled ones with one C-level
            # set intersection instead of a dict probe per released frame
            sampled = pending.keys() & set(map(id, frames))
            # (an id in ``pending`` is that of a live frame: the entry keeps it alive, so a
            # matching id in ``frames`` is the very same object)
            if sampled:
                now = self.clock()
                hold = self._hold
                for fid in sampled:
                    hold.add(now, (now - pending.pop(fid)[1]) * 1e6)
        if self.vnet_hdr:
            headers = []
            vnet = self._vnet
            for frame in frames:
                entry = vnet.pop(id(frame), None)
                if entry is None or entry[0] is not frame:
                    # the core copied the frame: send it with an empty header (checksums as they are)
                    c.vnet_headers_missing += 1
                    headers.append(b"")
                else:
                    headers.append(entry[1])
            data = encode_frames(frames, headers)
        else:
            data = encode_frames(frames)
        writer = self.writer
        if writer is not None and not writer.closed:
            writer.write(data)
            if writer.backlog > self.out_high_water:
                self._check_pressure()
        else:
            self._out_waiting.append(data)
            self._out_waiting_bytes += len(data)
            self._check_pressure()

    def held_bytes(self) -> int:
        """Primary bytes inside the core (it never drops one: in minus released)."""
        return self.counters.primary_bytes - self.counters.released_bytes

    def buffered_bytes(self) -> int:
        """Everything ``--max-buffer`` bounds: held primary frames, secondary bytes kept for
        comparison, output waiting to be sent."""
        return self.held_bytes() + self.core.secondary_buffered_bytes + self.out_backlog()

    def out_backlog(self) -> int:
        writer = self.writer
        live = writer.backlog if writer is not None and not writer.closed else 0
        return live + self._out_waiting_bytes

    def _check_pressure(self) -> None:
        backlog = self.out_backlog()
        kept = self.core.secondary_buffered_bytes
        was_paused = self._secondary_paused_for_out or self._secondary_paused_for_memory
        if backlog > self.out_high_water:
            self._secondary_paused_for_out = True
        elif backlog <= self.out_high_water // 2:
            self._secondary_paused_for_out = False
        if kept > self.secondary_ceiling and not self._secondary_paused_for_memory:
            self._secondary_paused_for_memory = True
            log.warning(
                "the secondary sent %d bytes the comparator must keep (over half of --max-buffer "
                "%d): pausing its input until a checkpoint commits", kept, self.max_buffer,
            )  # fmt: skip
        elif kept <= self.secondary_ceiling // 2 and self._secondary_paused_for_memory:
            self._secondary_paused_for_memory = False
            log.info("the secondary's kept bytes are down to %d: its input may resume", kept)
        paused = self._secondary_paused_for_out or self._secondary_paused_for_memory
        secondary = self.readers["secondary"]
        if paused and not was_paused:
            self.counters.secondary_pauses += 1
            if secondary is not None:
                secondary.pause()
        elif was_paused and not paused and secondary is not None:
            secondary.resume()
        total = self.held_bytes() + kept + backlog
        primary = self.readers["primary"]
        if total > self.max_buffer and not self._primary_paused_for_memory:
            self._primary_paused_for_memory = True
            self.counters.primary_pauses += 1
            log.error(
                "%d bytes held or waiting exceed --max-buffer %d: pausing the primary's input "
                "(its QEMU will block) until a checkpoint commits or the output drains",
                total, self.max_buffer,
            )  # fmt: skip
            if primary is not None:
                primary.pause()
        elif total <= self.max_buffer // 2 and self._primary_paused_for_memory:
            self._primary_paused_for_memory = False
            if primary is not None:
                primary.resume()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self._apply(self.core.poll(self.clock()))
            except Exception:
                self.counters.core_errors += 1
                log.exception("the core's poll failed")
            self._check_pressure()

    # -- control ----------------------------------------------------------------------------------
    def use_fence_file(self, path: Path) -> None:
        """Record the fencing generation durably in ``path`` (and start from the one it holds)."""
        self.fence_record = GenerationFile(path)
        self.fence.generation = self.fence_record.load()
        record = self.fence_record
        self._guarded = fenced_dispatch(self._dispatch, self.fence, record, on_fence=self._on_fence)

    def _on_fence(self, generation: int) -> None:
        log.warning("fenced at generation %d: the old primary's output is no longer released", generation)

    async def dispatch(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._guarded(verb, args)
        except ControlError:
            raise
        except Exception as exc:  # a bug in the core must not kill the control connection silently
            log.exception("control verb %s failed", verb)
            raise ControlError(f"internal error in {verb}: {exc!r}", "internal") from None

    async def _dispatch(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        if verb == "mode":
            return self._verb_mode(args)
        if verb == "seal":
            return self._verb_seal()
        if verb == "commit":
            return self._verb_commit(args)
        if verb == "release-all":
            # the secondary is lost: everything held goes out, and no pending request matters now
            before = self.counters.released_frames
            self._apply(self.core.release_all())
            self._requests.clear()
            self._requests_overflow = 0
            self._request_event.clear()
            self._check_pressure()
            return {"released_frames": self.counters.released_frames - before}
        if verb == "stats":
            only = args.get("signals_only", False)
            if not isinstance(only, bool):
                raise ControlError(f"'signals_only' must be true or false, got {only!r}", "bad-args")
            if only:  # the daemon's 4 Hz sample: the typed part alone, cheapest
                signals = self.signals()
                return {"signals": signals.as_dict() if signals is not None else None}
            return self.stats()
        if verb == "next-request":
            return await self._verb_next_request(args)
        raise ControlError(
            f"unknown verb {verb!r} (mode, seal, commit, release-all, stats, next-request)", "bad-verb"
        )

    def _verb_mode(self, args: dict[str, Any]) -> dict[str, Any]:
        raw = args.get("mode")
        try:
            mode = Mode(raw)
        except ValueError:
            raise ControlError(f"mode must be 'colo' or 'mc', not {raw!r}", "bad-args") from None
        shadow = args.get("shadow")
        set_shadow = getattr(self.core, "set_shadow", None)
        if shadow is not None:  # optional: shadow-compare MC epochs (off for a passive secondary)
            if not isinstance(shadow, bool):
                raise ControlError(f"'shadow' must be true or false, got {shadow!r}", "bad-args")
            if set_shadow is None:
                raise ControlError("this core compares nothing: no shadow to set", "bad-args")
        self.core.set_mode(mode)
        reply: dict[str, Any] = {"mode": str(self.core.mode), "next_mode": str(mode)}
        if shadow is not None:
            set_shadow(shadow)  # type: ignore[misc]
            reply["next_shadow"] = shadow
        log.info("mode %s%s requested (takes effect at the next seal)", mode,
                 "" if shadow is None else f", shadow {'on' if shadow else 'off'}")  # fmt: skip
        return reply

    def _verb_seal(self) -> dict[str, Any]:
        # both VMs are stopped: everything they sent is in our socket buffers; read it all first
        for role in ("primary", "secondary"):
            reader = self.readers[role]
            if reader is not None and not reader.closed:
                reader.drain_now()
        epoch = self.core.seal()
        dropped = len(self._requests) + self._requests_overflow
        self._requests.clear()
        self._requests_overflow = 0
        self._request_event.clear()
        return {"epoch": epoch, "requests_cleared": dropped}

    def _verb_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = args.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ControlError(f"commit needs an integer 'epoch', got {epoch!r}", "bad-args")
        before = self.counters.released_frames
        try:
            actions = self.core.commit(epoch)
        except ValueError as exc:
            raise ControlError(str(exc), "bad-epoch") from None
        self._apply(actions)
        self._check_pressure()
        return {"epoch": epoch, "released_frames": self.counters.released_frames - before}

    async def _verb_next_request(self, args: dict[str, Any]) -> dict[str, Any]:
        timeout = args.get("timeout", 1.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 <= timeout <= 3600:
            raise ControlError(f"'timeout' must be seconds between 0 and 3600, got {timeout!r}", "bad-args")
        if not self._requests and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._request_event.wait(), timeout)
        if not self._requests:
            return {"request": None}
        pending, self._requests = self._requests, []
        overflow, self._requests_overflow = self._requests_overflow, 0
        self._request_event.clear()
        self.counters.requests_delivered += 1
        first = pending[0]
        req = first.request
        return {
            "request": {"reason": req.reason, "proto": req.proto, "flow": req.flow, "offset": req.offset},
            "epoch": first.epoch,
            "age": max(0.0, self.clock() - first.at),
            "coalesced": len(pending) - 1 + overflow,
            "reasons": dict(Counter(p.request.reason for p in pending)),
        }

    def _hold_summary(self) -> dict[str, float | int]:
        """Hold latency (arrival of a primary frame -> its release) over the latest samples."""
        held = self._hold.summary()
        if not held.samples:
            return {"samples": 0}
        return {
            "samples": held.samples,
            "p50": round(held.p50_us or 0.0, 1),
            "p99": round(held.p99_us or 0.0, 1),
            "max": round(held.max_us or 0.0, 1),
        }

    def signals(self) -> CompareStats | None:
        """The controller's signals: the core's, with the hold latency of the last signals.HOLD_WINDOW_S
        seconds; None for a core that compares nothing (the forward-only relay)."""
        core_signals = getattr(self.core, "signals", None)
        if core_signals is None:
            return None
        now = self.clock()
        return dataclasses.replace(core_signals(now), hold=self._hold.summary(now))

    def stats(self) -> dict[str, Any]:
        c = self.counters
        connected = {}
        for role in ("primary", "secondary"):
            reader = self.readers[role]
            connected[role] = reader is not None and not reader.closed
        connected["out"] = self.writer is not None and not self.writer.closed
        signals = self.signals()
        return {
            "signals": signals.as_dict() if signals is not None else None,
            "fence": {
                "generation": self.fence.generation,
                "refused_requests": self.fence.refused,
                "frames_not_released": self.fenced_frames,
            },
            "core": self.core.stats(),
            "transport": {
                "connected": connected,
                "connections": dict(c.connections),
                "framing_errors": dict(c.framing_errors),
                "primary_frames": c.primary_frames,
                "secondary_frames": c.secondary_frames,
                "released_frames": c.released_frames,
                "released_bytes": c.released_bytes,
                "held_bytes": self.held_bytes(),
                "secondary_buffered_bytes": self.core.secondary_buffered_bytes,
                "out_backlog_bytes": self.out_backlog(),
                "primary_paused": self._primary_paused_for_memory,
                "secondary_paused": self._secondary_paused_for_out or self._secondary_paused_for_memory,
                "secondary_paused_for_memory": self._secondary_paused_for_memory,
                "primary_pauses": c.primary_pauses,
                "secondary_pauses": c.secondary_pauses,
                "requests_pending": len(self._requests),
                "requests_raised": c.requests_raised,
                "vnet_headers_missing": c.vnet_headers_missing,
                "core_errors": c.core_errors,
                "hold_us": self._hold_summary(),
                "vnet_hdr_len": c.vnet_hdr_len,
            },
            "runtime": {
                "event_loop": self._loop_name,
                "fastpath": fastpath.describe(),
                "busy_poll": {"window_us": self.poll_us, **self.poll_counters.as_dict()},
            },
        }


async def run_service(service: CompareService, ready: Callable[[], None] | None = None) -> None:
    """Start ``service`` and run until SIGINT/SIGTERM."""
    await service.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    await stop.wait()
    log.info("stopping")
    await service.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy ``source`` to ``sink`` until EOF or an error (the TLS relay's two directions)."""
    try:
        while data := await source.read(256 << 10):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


def _endpoint(ctx: click.Context, param: click.Parameter, value: str) -> Endpoint:
    try:
        return parse_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--primary-in", required=True, callback=_endpoint, help="Listen: the primary's output."),
        click.option(
            "--secondary-in", required=True, callback=_endpoint, help="Listen: the secondary's output."
        ),
        click.option("--out", required=True, callback=_endpoint, help="Listen: released frames to QEMU."),
        click.option("--control", required=True, callback=_endpoint, help="Listen: control socket."),
        click.option("--tls-creds", type=click.Path(file_okay=False), default=None,
                     help="TLS credentials directory for tcp: addresses (see `hybridft certs`)."),
        click.option("--vnet-hdr", is_flag=True, help="QEMU filters have vnet_hdr_support=on."),
        click.option("--max-buffer", type=click.IntRange(1), default=1024, show_default=True,
                     help="MiB held (both sides' frames) + waiting before the primary's input pauses; "
                          "the secondary's input pauses when its kept bytes pass half of it."),
        click.option("--out-high-water", type=click.IntRange(1), default=16, show_default=True,
                     help="MiB of unsent output before the secondary's input pauses."),
        click.option("--poll-us", type=click.IntRange(0, 10_000), default=0, show_default=True,
                     help="Microseconds to spin for the next input once a batch is handled, instead of "
                          "sleeping: a wakeup saved per burst, paid in CPU (spinning backs off while it "
                          "does not pay); 0 turns it off."),
        click.option("--log-level", default="info", show_default=True,
                     type=click.Choice(["debug", "info", "warning", "error"])),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("serve")
@common_options
@click.option("--mode", type=click.Choice(["colo", "mc"]), default="colo", show_default=True)
@click.option("--compare-timeout", type=click.FloatRange(min=0.001), default=3.0, show_default=True,
              help="Seconds a primary frame may wait before a checkpoint is requested.")  # fmt: skip
@click.option("--queue-budget", type=click.IntRange(1), default=64, show_default=True,
              help="MiB of held frames before a queue-full checkpoint is requested.")  # fmt: skip
@click.option("--shadow/--no-shadow", default=True, show_default=True,
              help="In MC epochs, compare the secondary's output as COLO would, only counting "
                   "(--no-shadow for a passive secondary).")  # fmt: skip
@click.option("--fence-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Record the fencing generation here (durably); without it, in memory only.")  # fmt: skip
def serve_command(
    primary_in: Endpoint,
    secondary_in: Endpoint,
    out: Endpoint,
    control: Endpoint,
    tls_creds: str | None,
    vnet_hdr: bool,
    max_buffer: int,
    out_high_water: int,
    poll_us: int,
    log_level: str,
    mode: str,
    compare_timeout: float,
    queue_budget: int,
    shadow: bool,
    fence_file: Path | None,
) -> None:
    """Listen for QEMU's filter chardevs and compare the primary's output with the secondary's.

    \b
    QEMU side (primary), chardevs are clients with reconnect=1:
      -chardev socket,id=cmp_out,path=OUT,reconnect=1
      -chardev socket,id=cmp_pri,path=PRIMARY_IN,reconnect=1
      -object filter-redirector,id=rin,netdev=hn0,queue=rx,indev=cmp_out
      -object filter-redirector,id=rout,netdev=hn0,queue=rx,outdev=cmp_pri
    (declare the indev redirector first: rx filters run in reverse order)
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    core = Comparator(
        Mode(mode), compare_timeout=compare_timeout, queue_budget_bytes=queue_budget << 20, shadow=shadow
    )
    service = CompareService(
        core,
        primary_in=primary_in.with_creds(tls_creds),
        secondary_in=secondary_in.with_creds(tls_creds),
        out=out.with_creds(tls_creds),
        control=control.with_creds(tls_creds),
        vnet_hdr=vnet_hdr,
        poll_interval=min(0.05, compare_timeout / 4),
        max_buffer=max_buffer << 20,
        out_high_water=out_high_water << 20,
        poll_us=poll_us,
    )
    if fence_file is not None:
        try:
            service.use_fence_file(fence_file)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        eventloop.run(run_service(service, ready=lambda: print("ready", flush=True)), "compare")
    except ChannelError as exc:
        raise click.ClickException(exc.message) from None
