"""Synthetic VM output for the comparator: IPv4/TCP frames built with ``struct``, no scapy.

Why its own module: the comparator benchmarks (``bench.compare``, ``bench.compare_micro``) and the
comparator service's tests all need the same traffic -- one application byte stream cut into
segments differently by the primary and the secondary, with headers that differ only in fields
that must never count as a divergence (``Look``) -- and building it must be fast enough to prebuild
hundreds of thousands of frames before a clock starts (scapy is far too slow for that).

Every frame goes from the VM (``VM_IP``, port ``sport``) to one client (``CLIENT_IP``:40001).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HDR = struct.Struct("!6s6sH BBHHHBBH4s4s HHIIHHHH")
_TS_OPT = struct.Struct("!BBBBII")
VM_MAC = bytes.fromhex("525400123456")
CLIENT_MAC = bytes.fromhex("525400abcdef")
VM_IP = bytes([10, 0, 0, 2])
CLIENT_IP = bytes([10, 0, 0, 1])
ACK, PSH, SYN, FIN = 0x10, 0x08, 0x02, 0x01


@dataclass(frozen=True, slots=True)
class Look:
    """Per-side header choices that must never count as a divergence."""

    ip_id: int = 1
    ttl: int = 64
    window: int = 65535
    checksum: int = 0
    timestamps: bool = False
    ts_base: int = 1000


def tcp_frame(
    sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes, look: Look, n: int
) -> bytes:
    """One IPv4/TCP frame VM -> client; ``n`` varies IP ID / timestamps per frame."""
    opts = _TS_OPT.pack(1, 1, 8, 10, look.ts_base + n, 77) if look.timestamps else b""
    thl = 20 + len(opts)
    total = 20 + thl + len(payload)
    header = _HDR.pack(
        CLIENT_MAC, VM_MAC, 0x0800,
        0x45, 0, total, (look.ip_id + n) & 0xFFFF, 0x4000, look.ttl, 6, look.checksum, VM_IP, CLIENT_IP,
        sport, dport, seq & 0xFFFFFFFF, ack, ((thl // 4) << 12) | flags, look.window, look.checksum, 0,
    )  # fmt: skip
    return header + opts + payload


def stream(
    sport: int, data: bytes, sizes: list[int], isn: int, look: Look, *, syn: bool = True, start: int = 0
) -> list[bytes]:
    """``data`` (stream offsets ``start``...) as segments of ``sizes`` (cycled); SYN first if asked."""
    frames = []
    if syn:
        frames.append(tcp_frame(sport, 40001, isn, 1, SYN | ACK, b"", look, 0))
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        chunk = data[pos : pos + size]
        frames.append(tcp_frame(sport, 40001, isn + 1 + start + pos, 1, ACK | PSH, chunk, look, i))
        pos += len(chunk)
    return frames


def payload_bytes(n: int, seed: int) -> bytes:
    """``n`` deterministic application bytes (a 4 KiB pattern per ``seed``, repeated)."""
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


#: the primary's headers; the secondary's differ (another IP ID, or every benign field for ``NOISY_LOOK``)
PRIMARY_LOOK = Look()
NOISY_LOOK = Look(ip_id=4242, ttl=63, window=29200, checksum=0xBEEF, timestamps=True, ts_base=999999)
PLAIN_SECONDARY_LOOK = Look(ip_id=777)
