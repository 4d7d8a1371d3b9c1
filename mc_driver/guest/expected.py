"""What the guest's workloads produce, computed on the host: every byte a client checks.

Why this seam exists: the COLO tests and the benchmark clients check every byte the guest sends, so the
guest's workloads are deterministic and their output is derivable here without a guest: ``GET /blob`` and
``rrserver`` answers are prefixes of one counter-based stream (:func:`stream_bytes`), and every diskwriter
record is implied by its number (:func:`read_disk_records`).  The one deliberate exception is ``tokend``,
whose answers carry the guest's clock so that two replicas never answer alike (:class:`TokenReplies`
checks their form and order, not their value).  The ports say where each service listens.  Nothing here
builds, boots or talks to a guest, so a client can import it without the image build's machinery.
"""

from __future__ import annotations

import dataclasses
import struct

from mc_driver.guest.errors import GuestError

# Where the guest's programs listen: the services init.sh starts, and diskwriter's report port
ECHO_PORT = 7
RR_PORT = 8000
HTTP_PORT = 80
BLOBD_PORT = 8080
TOKEN_PORT = 9000
DISKWRITER_PORT = 9100
# The guest's services (started at boot unless hft.services= says otherwise; see init.sh's service_port)
SERVICE_PORTS = {"echod": ECHO_PORT, "rrserver": RR_PORT, "httpd": HTTP_PORT, "blobd": BLOBD_PORT,
                 "tokend": TOKEN_PORT}  # fmt: skip
BLOB_SIZE = 8 * 1024 * 1024
STREAM_SEED = 0x4859425249444654  # "HYBRIDFT"; must match blobgen.c and rrserver.c


def stream_bytes(n: int, seed: int = STREAM_SEED) -> bytes:
    """The first ``n`` bytes of the guest's deterministic stream (``/blob``, ``rrserver`` answers)."""
    import numpy as np

    words = (n + 7) // 8
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype("<u8").tobytes()[:n]


def blob_bytes() -> bytes:
    """What ``GET /blob`` returns."""
    return stream_bytes(BLOB_SIZE)


DISK_RECORD_SIZE = 4096
_RECORD_MAGIC = b"HFTDWREC"
_PATTERN_XOR = 0x5555555555555555


def disk_record(seq: int, run: int) -> bytes:
    """The exact 4 KiB that diskwriter writes as record ``seq`` of run ``run``."""
    fill = struct.pack("<Q", seq ^ run ^ _PATTERN_XOR)
    return _RECORD_MAGIC + struct.pack("<QQ", seq, run) + fill * (DISK_RECORD_SIZE // 8 - 3)


def read_disk_records(disk: bytes, run: int) -> set[int]:
    """Numbers of the intact records of run ``run`` found at their place in a raw disk image."""
    found: set[int] = set()
    for offset in range(0, len(disk) - DISK_RECORD_SIZE + 1, DISK_RECORD_SIZE):
        if disk[offset : offset + 8] != _RECORD_MAGIC:
            continue
        seq, rec_run = struct.unpack_from("<QQ", disk, offset + 8)
        if (
            rec_run == run
            and seq == offset // DISK_RECORD_SIZE + 1
            and disk[offset : offset + DISK_RECORD_SIZE] == disk_record(seq, run)
        ):
            found.add(seq)
    return found


@dataclasses.dataclass
class DiskWriterReports:
    """Sans-I/O parser of diskwriter's TCP reports: ``RUN <hex>``, then one durable number per line."""

    run: int | None = None
    durable: list[int] = dataclasses.field(default_factory=list)
    finished: str | None = None  # "FULL", "DONE" or "ERROR"
    _buf: bytes = b""

    def feed(self, data: bytes) -> list[int]:
        """Take received bytes; return the record numbers newly reported durable."""
        self._buf += data
        new: list[int] = []
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            line = raw.decode("ascii", errors="replace").strip()
            if line.startswith("RUN "):
                self.run = int(line[4:], 16)
            elif line in ("FULL", "DONE", "ERROR"):
                self.finished = line
            elif line.isdigit():
                n = int(line)
                if self.durable and n != self.durable[-1] + 1:
                    raise GuestError(f"diskwriter reported {n} after {self.durable[-1]}")
                self.durable.append(n)
                new.append(n)
            else:
                raise GuestError(f"unexpected diskwriter line {line!r}")
        return new


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """One answer of the guest's token service: ``TOKEN <seq> <ns>``."""

    seq: int  # the service's answer number, from 1, across all its connections
    ns: int  # the guest's CLOCK_REALTIME when it answered


@dataclasses.dataclass
class TokenReplies:
    """Sans-I/O parser of one ``tokend`` connection: one ``TOKEN <seq> <ns>`` line per request line.

    Within a connection both numbers only grow (one process answers it in order): anything else is a
    :class:`GuestError`, as is a malformed line.
    """

    tokens: list[Token] = dataclasses.field(default_factory=list)
    _buf: bytes = b""

    def feed(self, data: bytes) -> list[Token]:
        """Take received bytes; return the tokens completed by them."""
        self._buf += data
        new: list[Token] = []
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            words = raw.decode("ascii", errors="replace").split(" ")
            if len(words) != 3 or words[0] != "TOKEN" or not (words[1].isdigit() and words[2].isdigit()):
                raise GuestError(f"unexpected tokend line {raw!r}")
            token = Token(int(words[1]), int(words[2]))
            last = self.tokens[-1] if self.tokens else None
            if last is not None and (token.seq <= last.seq or token.ns < last.ns):
                raise GuestError(f"tokend answered {token} after {last}")
            self.tokens.append(token)
            new.append(token)
        return new
