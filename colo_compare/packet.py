"""Frame classification for the comparator's slow path, and printable flow names.

The comparator's hot path (``colo_compare.core``) parses plain IPv4/IPv6 TCP frames inline with
one ``struct.unpack_from`` per frame.  Everything else - IPv4 options, IPv6 extension headers,
UDP, ICMP, ARP, fragments, malformed frames - comes here.  The classification decides which
comparison rule a frame falls under:

========== ======================================================================================
class      rule
========== ======================================================================================
tcp        reassembled byte stream per 5-tuple (see ``core``)
udp        per-flow (5-tuple) sequence of datagrams; the UDP payload is compared, the checksum and
           the IP header (ID, TTL, checksum, TOS) are not
icmp       per (addresses, type, echo identifier) sequence of messages; the ICMP message minus its
           checksum is compared (identifier 0 for non-echo types)
other      ARP, IPv4 fragments, VLAN-tagged and any other EtherType, IPv4/IPv6 protocols other than
           TCP/UDP/ICMP: per (MACs, EtherType, IP protocol, addresses) sequence of frames compared
           whole, except that the IPv4 identification and header checksum are zeroed first
malformed  a frame whose headers lie (shorter than Ethernet, IHL < 5, total/payload length beyond
           the frame, TCP data offset < 5 or beyond the IP payload, truncated L4 header): counted
           and compared *whole*, byte for byte, in one per-side sequence - never dropped
========== ======================================================================================

Classifications are plain tuples (no per-frame objects beyond what is returned); keys are bytes
or tuples of bytes so they hash quickly and never alias a caller's buffer.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

ETH_IPV4: Final = 0x0800
ETH_IPV6: Final = 0x86DD
ETH_ARP: Final = 0x0806

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMP: Final = 1
PROTO_ICMPV6: Final = 58

#: IPv6 extension headers we walk over (hop-by-hop, routing, destination options)
_IPV6_EXT: Final = frozenset({0, 43, 60})
_IPV6_FRAGMENT: Final = 44

_TCP_FIXED = struct.Struct(">IIH")

KIND_TCP: Final = "tcp"
KIND_UDP: Final = "udp"
KIND_ICMP: Final = "icmp"
KIND_OTHER: Final = "other"
KIND_MALFORMED: Final = "malformed"

#: the key of the single per-side sequence that malformed frames are compared in
MALFORMED_KEY: Final = ("malformed",)

# A classification is one of:
#   ("tcp", key, seq, ack, flags, payload_start, ip_end)   key = src+dst addresses + ports (12/36 bytes)
#   ("udp", key, compared_bytes)                            key = ("udp", addresses + ports)
#   ("icmp", key, compared_bytes)                           key = ("icmp", addresses, type, ident)
#   ("other", key, compared_bytes)                          key = ("other", macs, ethertype, ...)
#   ("malformed", MALFORMED_KEY, whole_frame, why)
Classification = tuple


def _malformed(frame: bytes, why: str) -> Classification:
    return (KIND_MALFORMED, MALFORMED_KEY, bytes(frame), why)


def _other(frame: bytes, ethertype: int, extra: bytes = b"") -> Classification:
    key = ("other", bytes(frame[0:12]), ethertype, extra)
    return (KIND_OTHER, key, bytes(frame))


def classify(frame: bytes) -> Classification:
    """Classify one Ethernet frame (see the module docstring for the rules).  Never raises."""
    n = len(frame)
    if n < 14:
        return _malformed(frame, "shorter than an Ethernet header")
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETH_IPV4:
        return _classify_ipv4(frame, n)
    if ethertype == ETH_IPV6:
        return _classify_ipv6(frame, n)
    return _other(frame, ethertype)


def _classify_ipv4(frame: bytes, n: int) -> Classification:
    if n < 34:
        return _malformed(frame, "truncated IPv4 header")
    vihl = frame[14]
    if vihl >> 4 != 4:
        return _malformed(frame, f"IPv4 EtherType but IP version {vihl >> 4}")
    ihl = (vihl & 15) * 4
    if ihl < 20:
        return _malformed(frame, "IPv4 IHL < 5")
    total = (frame[16] << 8) | frame[17]
    ip_end = 14 + total
    if total < ihl or ip_end > n:
        return _malformed(frame, "IPv4 total length inconsistent with the frame")
    proto = frame[23]
    addrs = bytes(frame[26:34])
    l4 = 14 + ihl
    fragmented = (frame[20] & 0x3F) or frame[21]
    if fragmented or proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
        # compared whole minus IPv4 identification and header checksum
        whole = bytearray(frame[:ip_end])
        whole[18:20] = b"\0\0"
        whole[24:26] = b"\0\0"
        key = ("other", bytes(frame[0:12]), ETH_IPV4, bytes((proto,)) + addrs)
        return (KIND_OTHER, key, bytes(whole))
    return _classify_l4(frame, proto, addrs, l4, ip_end)


def _classify_ipv6(frame: bytes, n: int) -> Classification:
    if n < 54:
        return _malformed(frame, "truncated IPv6 header")
    if frame[14] >> 4 != 6:
        return _malformed(frame, f"IPv6 EtherType but IP version {frame[14] >> 4}")
    plen = (frame[18] << 8) | frame[19]
    ip_end = 54 + plen
    if ip_end > n:
        return _malformed(frame, "IPv6 payload length beyond the frame")
    nh = frame[20]
    addrs = bytes(frame[22:54])
    off = 54
    while nh in _IPV6_EXT:
        if off + 8 > ip_end:
            return _malformed(frame, "truncated IPv6 extension header")
        nh, hlen = frame[off], (frame[off + 1] + 1) * 8
        off += hlen
        if off > ip_end:
            return _malformed(frame, "IPv6 extension header beyond the payload")
    if nh == _IPV6_FRAGMENT or nh not in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
        key = ("other", bytes(frame[0:12]), ETH_IPV6, bytes((nh,)) + addrs)
        return (KIND_OTHER, key, bytes(frame[:ip_end]))
    return _classify_l4(frame, nh, addrs, off, ip_end)


def _classify_l4(frame: bytes, proto: int, addrs: bytes, l4: int, ip_end: int) -> Classification:
    if proto == PROTO_TCP:
        if l4 + 20 > ip_end:
            return _malformed(frame, "truncated TCP header")
        seq, ack, offflags = _TCP_FIXED.unpack_from(frame, l4 + 4)
        doff = (offflags >> 12) * 4
        if doff < 20 or l4 + doff > ip_end:
            return _malformed(frame, "bad TCP data offset")
        return (KIND_TCP, addrs + bytes(frame[l4 : l4 + 4]), seq, ack, offflags & 0x3F, l4 + doff, ip_end)
    if proto == PROTO_UDP:
        if l4 + 8 > ip_end:
            return _malformed(frame, "truncated UDP header")
        ulen = (frame[l4 + 4] << 8) | frame[l4 + 5]
        if ulen < 8 or l4 + ulen > ip_end:
            return _malformed(frame, "UDP length inconsistent with the IP payload")
        return (KIND_UDP, ("udp", addrs + bytes(frame[l4 : l4 + 4])), bytes(frame[l4 + 8 : l4 + ulen]))
    # ICMP / ICMPv6
    if l4 + 4 > ip_end:
        return _malformed(frame, "truncated ICMP header")
    icmp_type = frame[l4]
    echo = icmp_type in (0, 8) if proto == PROTO_ICMP else icmp_type in (128, 129)
    ident = bytes(frame[l4 + 4 : l4 + 6]) if echo and l4 + 6 <= ip_end else b""
    compared = bytes(frame[l4 : l4 + 2]) + bytes(frame[l4 + 4 : ip_end])
    return (KIND_ICMP, ("icmp", addrs, icmp_type, ident), compared)


# ---------------------------------------------------------------------------------------------
# printable names


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def describe(key: bytes | tuple) -> dict[str, object]:
    """A flow key as ``{"proto", "src", "sport", "dst", "dport"}`` (the sending VM's side first).

    Ports are ``None`` for ICMP and other frames; for non-IP frames src/dst are MAC addresses.
    """
    if isinstance(key, bytes | bytearray):
        half = (len(key) - 4) // 2
        return {
            "proto": "tcp",
            "src": _addr(key[:half]),
            "sport": int.from_bytes(key[2 * half : 2 * half + 2], "big"),
            "dst": _addr(key[half : 2 * half]),
            "dport": int.from_bytes(key[2 * half + 2 : 2 * half + 4], "big"),
        }
    kind = key[0]
    if kind == "udp":
        d = describe(key[1])
        d["proto"] = "udp"
        return d
    if kind == "icmp":
        addrs = key[1]
        half = len(addrs) // 2
        return {
            "proto": "icmp",
            "src": _addr(addrs[:half]),
            "sport": None,
            "dst": _addr(addrs[half:]),
            "dport": None,
        }
    if kind == "other":
        macs, ethertype, extra = key[1], key[2], key[3]
        if ethertype in (ETH_IPV4, ETH_IPV6) and len(extra) in (9, 33):
            half = (len(extra) - 1) // 2
            return {
                "proto": "other",
                "src": _addr(extra[1 : 1 + half]),
                "sport": None,
                "dst": _addr(extra[1 + half :]),
                "dport": None,
            }
        return {
            "proto": "other",
            "src": _mac(macs[6:12]),
            "sport": None,
            "dst": _mac(macs[0:6]),
            "dport": None,
        }
    return {"proto": "other", "src": "?", "sport": None, "dst": "?", "dport": None}


def flow_name(key: bytes | tuple) -> str:
    """A printable flow name such as ``10.0.0.2:80->10.0.0.1:40001`` or ``[fe80::1]:80->[...]:...``."""
    d = describe(key)

    def end(host: object, port: object) -> str:
        h = str(host)
        if port is None:
            return h
        return f"[{h}]:{port}" if ":" in h and h.count(":") > 1 else f"{h}:{port}"

    name = f"{end(d['src'], d['sport'])}->{end(d['dst'], d['dport'])}"
    if isinstance(key, tuple):
        if key[0] == "icmp":
            ident = int.from_bytes(key[3], "big") if key[3] else 0
            name += f" type {key[2]} id {ident}"
        elif key[0] == "other":
            name += f" ethertype 0x{key[2]:04x}"
            if key[3] and key[2] in (ETH_IPV4, ETH_IPV6):
                name += f" proto {key[3][0]}"
        elif key[0] == "malformed":
            name = "malformed frames"
    return name


def proto_of(key: bytes | tuple) -> str:
    """``tcp``/``udp``/``icmp``/``other`` for a flow key (malformed frames count as ``other``)."""
    if isinstance(key, bytes | bytearray):
        return "tcp"
    return key[0] if key[0] in ("udp", "icmp") else "other"
