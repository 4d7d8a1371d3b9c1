"""A small, strict pcap reader (and writer) for ``compare replay``.

Why our own: the replay path should not depend on scapy's per-packet dissection (slow, and it
forgives damaged files silently).  Classic pcap is a 24-byte header and 16-byte record headers;
both byte orders and both timestamp resolutions (micro, nano) are read.  Frames cut short by
a capture's snap length are refused: a stream cannot be compared from truncated payloads.
pcapng files are read through scapy's reader (tools only, never the live path).  Only Ethernet
captures (link type 1) make sense to the comparator; anything else is a clear error, as is a
truncated record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

LINKTYPE_ETHERNET = 1
_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class PcapError(Exception):
    """The file is not a capture the comparator can replay (the message says why)."""


def read_frames(path: str | Path) -> list[tuple[float, bytes]]:
    """All frames of an Ethernet capture as ``(timestamp, frame)``, in file order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PcapError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if data[:4] == _PCAPNG_MAGIC:
        return _read_pcapng(path)
    if len(data) < 24 or data[:4] not in _MAGICS:
        raise PcapError(f"{path}: not a pcap or pcapng file (magic {data[:4].hex() or 'missing'})")
    order, scale = _MAGICS[data[:4]]
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"{path}: link type {linktype}, but the comparator needs Ethernet frames (1)")
    rec = struct.Struct(order + "IIII")
    frames: list[tuple[float, bytes]] = []
    pos = 24
    n = len(data)
    while pos < n:
        if pos + 16 > n:
            raise PcapError(f"{path}: truncated record header at byte {pos} (record {len(frames) + 1})")
        sec, frac, incl, orig = rec.unpack_from(data, pos)
        pos += 16
        if pos + incl > n:
            raise PcapError(f"{path}: record {len(frames) + 1} claims {incl} bytes but only {n - pos} remain")
        if incl < orig:
            raise PcapError(
                f"{path}: record {len(frames) + 1} was cut by the capture's snap length ({incl} of "
                f"{orig} bytes); streams cannot be compared from truncated frames - capture with -s 0"
            )
        frames.append((sec + frac * scale, data[pos : pos + incl]))
        pos += incl
    return frames


def _read_pcapng(path: Path) -> list[tuple[float, bytes]]:
    from scapy.utils import PcapNgReader

    frames: list[tuple[float, bytes]] = []
    try:
        with PcapNgReader(str(path)) as reader:
            linktype = getattr(reader, "linktype", LINKTYPE_ETHERNET)
            for pkt in reader:
                frames.append((float(pkt.time), bytes(pkt)))
    except Exception as exc:  # a third-party parser on untrusted bytes: any failure is bad input
        raise PcapError(f"{path}: unreadable pcapng: {exc or type(exc).__name__}") from exc
    if frames and linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"{path}: link type {linktype}, but the comparator needs Ethernet frames (1)")
    return frames


def write_frames(path: str | Path, frames: Iterable[tuple[float, bytes]]) -> None:
    """Write an Ethernet pcap (microsecond timestamps, little-endian)."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
    for ts, frame in frames:
        sec = int(ts)
        usec = min(round((ts - sec) * 1e6), 999_999)
        out += struct.pack("<IIII", sec, usec, len(frame), len(frame))
        out += frame
    Path(path).write_bytes(bytes(out))
