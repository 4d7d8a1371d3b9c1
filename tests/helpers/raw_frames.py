"""Frames built with ``struct``, not scapy: for properties that build thousands of frames per run.

Same addressing as :mod:`tests.helpers.frames` (VM 10.0.0.2 port 80 -> client 10.0.0.1), and like
offloaded guest output every checksum is zero.
"""

from __future__ import annotations

import struct

#: Ethernet header VM_MAC -> CLIENT_MAC, type IPv4.
ETH_VM_TO_CLIENT = bytes.fromhex("525400abcdef525400123456") + b"\x08\x00"


def tcp4(
    seq: int, payload: bytes = b"", flags: int = 0x18, ack: int = 1, ip_id: int = 0, dport: int = 40001
) -> bytes:
    ip = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        40 + len(payload),
        ip_id & 0xFFFF,
        0,
        64,
        6,
        0,
        bytes([10, 0, 0, 2]),
        bytes([10, 0, 0, 1]),
    )
    tcp = struct.pack(">HHIIBBHHH", 80, dport, seq & 0xFFFFFFFF, ack, 0x50, flags, 65535, 0, 0)
    return ETH_VM_TO_CLIENT + ip + tcp + payload


#: Ethernet header VM_MAC -> CLIENT_MAC, type IPv6.
ETH6_VM_TO_CLIENT = bytes.fromhex("525400abcdef525400123456") + b"\x86\xdd"


def tcp6(
    seq: int, payload: bytes = b"", flags: int = 0x18, ack: int = 1, ip_id: int = 0, dport: int = 40001
) -> bytes:
    """:func:`tcp4` over IPv6 (fd00::2 -> fd00::1); ``ip_id`` goes into the flow label."""
    ip = struct.pack(
        ">IHBB16s16s",
        (6 << 28) | (ip_id & 0xFFFFF),
        20 + len(payload),
        6,
        64,
        bytes.fromhex("fd000000000000000000000000000002"),
        bytes.fromhex("fd000000000000000000000000000001"),
    )
    tcp = struct.pack(">HHIIBBHHH", 80, dport, seq & 0xFFFFFFFF, ack, 0x50, flags, 65535, 0, 0)
    return ETH6_VM_TO_CLIENT + ip + tcp + payload
