"""Scapy frame builders shared by the comparator tests (and usable by the transport's tests).

Everything here builds *VM output*: frames a server VM at ``VM`` sends to a client at ``CLIENT``
(TCP/UDP from port 80/53 to 40001...).  ``stream_frames`` turns one application byte stream
into the frames one VM would send under a chosen segmentation and ISN, so tests can give the
primary and the secondary the same bytes packetised differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, IPv6
from scapy.layers.l2 import ARP, Ether

VM = "10.0.0.2"
CLIENT = "10.0.0.1"
VM6 = "fd00::2"
CLIENT6 = "fd00::1"
VM_MAC = "52:54:00:12:34:56"
CLIENT_MAC = "52:54:00:ab:cd:ef"


def _ip(src: str, dst: str, *, ip_id: int = 1, ttl: int = 64):  # type: ignore[no-untyped-def]
    if ":" in src:
        return IPv6(src=src, dst=dst, hlim=ttl)
    return IP(src=src, dst=dst, id=ip_id, ttl=ttl)


def tcp_frame(
    seq: int,
    payload: bytes = b"",
    *,
    ack: int | None = 1000,
    flags: str = "PA",
    src: str = VM,
    dst: str = CLIENT,
    sport: int = 80,
    dport: int = 40001,
    ip_id: int = 1,
    ttl: int = 64,
    window: int = 65535,
    options: list | None = None,
    zero_checksum: bool = False,
) -> bytes:
    """One TCP frame from the VM; ``ack=None`` clears the ACK flag."""
    if ack is None:
        flags = flags.replace("A", "")
    tcp = TCP(
        sport=sport,
        dport=dport,
        seq=seq & 0xFFFFFFFF,
        ack=(ack or 0) & 0xFFFFFFFF,
        flags=flags,
        window=window,
        options=options or [],
    )
    if zero_checksum:
        tcp.chksum = 0
    pkt = Ether(src=VM_MAC, dst=CLIENT_MAC) / _ip(src, dst, ip_id=ip_id, ttl=ttl) / tcp / payload
    return bytes(pkt)


def stream_frames(
    data: bytes,
    sizes: Iterable[int],
    *,
    isn: int,
    ack: int = 1000,
    syn: bool = True,
    fin: bool = True,
    src: str = VM,
    dst: str = CLIENT,
    sport: int = 80,
    dport: int = 40001,
    ip_id: int = 1,
    ttl: int = 64,
    timestamps: bool = False,
) -> list[bytes]:
    """SYN/ACK (optional), ``data`` cut into segments of ``sizes`` (cycled), FIN (optional).

    Sequence numbers start at ``isn`` (the SYN's sequence number) and wrap at 2**32.
    """
    kw = {"src": src, "dst": dst, "sport": sport, "dport": dport, "ttl": ttl}
    frames: list[bytes] = []
    if syn:
        frames.append(tcp_frame(isn, ack=ack, flags="SA", ip_id=ip_id, **kw))
    seq = isn + 1
    pos = 0
    sizes = list(sizes) or [len(data) or 1]
    i = 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        i += 1
        chunk = data[pos : pos + n]
        opts = [("Timestamp", (1000 + i * 7 + ip_id, 55))] if timestamps else None
        frames.append(tcp_frame(seq + pos, chunk, ack=ack, ip_id=ip_id + i, options=opts, **kw))
        pos += len(chunk)
    if fin:
        frames.append(tcp_frame(seq + pos, ack=ack, flags="FA", ip_id=ip_id + i + 1, **kw))
    return frames


def udp_frame(
    payload: bytes,
    *,
    src: str = VM,
    dst: str = CLIENT,
    sport: int = 53,
    dport: int = 40002,
    ip_id: int = 1,
    ttl: int = 64,
    zero_checksum: bool = False,
) -> bytes:
    udp = UDP(sport=sport, dport=dport)
    if zero_checksum:
        udp.chksum = 0
    return bytes(Ether(src=VM_MAC, dst=CLIENT_MAC) / _ip(src, dst, ip_id=ip_id, ttl=ttl) / udp / payload)


def icmp_echo_reply(
    ident: int,
    seqno: int,
    payload: bytes = b"ping",
    *,
    src: str = VM,
    dst: str = CLIENT,
    ip_id: int = 1,
    ttl: int = 64,
) -> bytes:
    if ":" in src:
        icmp = ICMPv6EchoReply(id=ident, seq=seqno, data=payload)
        return bytes(Ether(src=VM_MAC, dst=CLIENT_MAC) / IPv6(src=src, dst=dst, hlim=ttl) / icmp)
    return bytes(
        Ether(src=VM_MAC, dst=CLIENT_MAC)
        / IP(src=src, dst=dst, id=ip_id, ttl=ttl)
        / ICMP(type=0, id=ident, seq=seqno)
        / payload
    )


def arp_reply(*, ip: str = VM, to_ip: str = CLIENT) -> bytes:
    arp = ARP(op=2, hwsrc=VM_MAC, psrc=ip, hwdst=CLIENT_MAC, pdst=to_ip)
    return bytes(Ether(src=VM_MAC, dst=CLIENT_MAC) / arp)


def cut(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes (cycled)."""
    out = []
    pos = i = 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out
