"""The capture pair behind ``hybridft compare demo`` (built with scapy; tools only).

What the two VMs "sent" while answering the same client (10.0.0.1 / fd00::1):

* ARP reply announcing the VM.
* HTTP connection A (:80 -> :40001): a 12 kB page.  The primary sends 1448-byte segments with
  TCP timestamps; the secondary sends 2896-byte (TSO-sized) and odd-sized segments, reorders two,
  retransmits one and acknowledges the request with a separate pure ACK at another moment.
  ISNs, IP IDs and TTL differ.  Same bytes: no divergence.
* HTTP connection B (:80 -> :40002): a small page whose ``Date`` header is one second later on
  the secondary - the one real divergence (what COLO's checkpoint exists for).
* DNS over UDP (:53 -> :5353), three answers; ICMP echo replies; an IPv6 TCP connection (an SSH
  banner and key exchange bytes) segmented differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VM, CLIENT = "10.0.0.2", "10.0.0.1"
VM6, CLIENT6 = "fd00::2", "fd00::1"
VM_MAC, CLIENT_MAC = "52:54:00:12:34:56", "52:54:00:ab:cd:ef"
T0 = 1_764_118_923.0


@dataclass
class DemoPair:
    primary: list[tuple[float, bytes]]
    secondary: list[tuple[float, bytes]]
    #: the planted divergence, exactly as replay reports it
    expected: dict[str, Any]


def http_response(body_len: int, date: str) -> bytes:
    body = b"".join(
        b"line %05d of a page both VMs render identically....\n" % i for i in range(body_len // 53 + 1)
    )[:body_len]
    return (
        b"HTTP/1.1 200 OK\r\nServer: demo/1.0\r\nDate: " + date.encode() + b"\r\n"
        b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _Vm:
    """Builds one VM's output frames (its own ISNs, IP IDs, TTL, segmentation)."""

    def __init__(self, *, ip_id: int, ttl: int, timestamps: bool) -> None:
        self.ip_id = ip_id
        self.ttl = ttl
        self.timestamps = timestamps
        self.frames: list[tuple[float, bytes]] = []

    def emit(self, t: float, pkt: Any) -> None:
        self.frames.append((T0 + t, bytes(pkt)))

    def ip(self, src: str, dst: str) -> Any:
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6

        self.ip_id = (self.ip_id + 1) & 0xFFFF
        if ":" in src:
            return IPv6(src=src, dst=dst, hlim=self.ttl)
        return IP(src=src, dst=dst, id=self.ip_id, ttl=self.ttl)

    def tcp(
        self,
        t: float,
        seq: int,
        ack: int,
        flags: str,
        payload: bytes = b"",
        *,
        src: str = VM,
        dst: str = CLIENT,
        sport: int = 80,
        dport: int = 40001,
    ) -> None:
        from scapy.layers.inet import TCP
        from scapy.layers.l2 import Ether

        opts = [("Timestamp", (int(t * 1000) + self.ip_id, 4242))] if self.timestamps else []
        pkt = (
            Ether(src=VM_MAC, dst=CLIENT_MAC)
            / self.ip(src, dst)
            / TCP(
                sport=sport,
                dport=dport,
                seq=seq & 0xFFFFFFFF,
                ack=ack & 0xFFFFFFFF,
                flags=flags,
                window=64240 if self.timestamps else 65160,
                options=opts,
            )
            / payload
        )
        self.emit(t, pkt)

    def stream(
        self,
        t: float,
        step: float,
        isn: int,
        ack: int,
        data: bytes,
        sizes: list[int],
        *,
        order: list[int] | None = None,
        retransmit: int | None = None,
        **kw: Any,
    ) -> float:
        """Send ``data`` after a SYN/ACK sent at ``t``; returns the time after the FIN."""
        self.tcp(t, isn, ack, "SA", **kw)
        t += step
        segs = []
        pos = 0
        i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            segs.append((pos, data[pos : pos + n]))
            pos += n
            i += 1
        idx = order if order is not None else list(range(len(segs)))
        for j in idx:
            off, chunk = segs[j]
            self.tcp(t, isn + 1 + off, ack, "PA", chunk, **kw)
            t += step
        if retransmit is not None:
            off, chunk = segs[retransmit]
            self.tcp(t + 0.2, isn + 1 + off, ack, "PA", chunk, **kw)
            t += 0.2
        self.tcp(t, isn + 1 + len(data), ack, "FA", **kw)
        return t + step


def demo_pair() -> DemoPair:
    from scapy.layers.inet import ICMP, UDP
    from scapy.layers.l2 import ARP, Ether

    primary = _Vm(ip_id=100, ttl=64, timestamps=True)
    secondary = _Vm(ip_id=30000, ttl=64, timestamps=False)
    both = (primary, secondary)

    # ARP
    for vm, dt in zip(both, (0.0, 0.0003), strict=True):
        vm.emit(
            dt,
            Ether(src=VM_MAC, dst=CLIENT_MAC)
            / ARP(op=2, hwsrc=VM_MAC, psrc=VM, hwdst=CLIENT_MAC, pdst=CLIENT),
        )

    # HTTP connection A: identical page, different packets
    page = http_response(12000, "Thu, 26 Nov 2026 01:02:03 GMT")
    client_isn, request_len = 3_000_000_000, 78
    ack = client_isn + 1 + request_len
    primary.tcp(0.010, 0x1000, client_isn + 1, "SA", dport=40001)
    t = 0.011
    primary.tcp(t, 0x1001, ack, "A", dport=40001)  # ACK of the request, on its own
    pos = 0
    while pos < len(page):
        primary.tcp(t, 0x1001 + pos, ack, "PA", page[pos : pos + 1448], dport=40001)
        pos += 1448
        t += 0.0002
    primary.tcp(t, 0x1001 + len(page), ack, "FA", dport=40001)
    # the secondary: other ISN, 2896/1448/700-byte segments, reordering, a retransmission, and the
    # request's ACK folded into the data (no separate pure ACK)
    s_isn = 0xFFFFF000  # also wraps around 2**32 inside the page
    secondary.tcp(0.0102, s_isn, client_isn + 1, "SA", dport=40001)
    sizes = [2896, 1448, 700, 2896, 1448]
    segs = []
    pos = i = 0
    while pos < len(page):
        n = sizes[i % len(sizes)]
        segs.append((pos, page[pos : pos + n]))
        pos += n
        i += 1
    order = list(range(len(segs)))
    order[1], order[2] = order[2], order[1]
    t = 0.0115
    for j in order:
        off, chunk = segs[j]
        secondary.tcp(t, s_isn + 1 + off, ack, "PA", chunk, dport=40001)
        t += 0.0003
    off, chunk = segs[3]
    secondary.tcp(t + 0.2, s_isn + 1 + off, ack, "PA", chunk, dport=40001)  # retransmission
    secondary.tcp(t + 0.2001, s_isn + 1 + len(page), ack, "FA", dport=40001)

    # HTTP connection B: the Date header differs by one second - the one real divergence
    page_p = http_response(1800, "Thu, 26 Nov 2026 01:02:03 GMT")
    page_s = http_response(1800, "Thu, 26 Nov 2026 01:02:04 GMT")
    primary.stream(0.300, 0.0002, 77_000, 5_000_001 + 80, page_p, [1448], dport=40002)
    secondary.stream(0.3004, 0.0003, 99_000_000, 5_000_001 + 80, page_s, [1000], dport=40002)
    diff_at = next(k for k, (a, b) in enumerate(zip(page_p, page_s, strict=True)) if a != b)

    # DNS answers over UDP and ICMP echo replies
    for n in range(3):
        answer = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x07example\x03org\x00" + bytes([n])
        for vm, dt in zip(both, (0.0, 0.0004), strict=True):
            vm.emit(
                0.5 + n * 0.01 + dt,
                Ether(src=VM_MAC, dst=CLIENT_MAC) / vm.ip(VM, CLIENT) / UDP(sport=53, dport=5353) / answer,
            )
    for n in range(1, 5):
        for vm, dt in zip(both, (0.0, 0.0002), strict=True):
            vm.emit(
                0.6 + n * 0.1 + dt,
                Ether(src=VM_MAC, dst=CLIENT_MAC)
                / vm.ip(VM, CLIENT)
                / ICMP(type=0, id=0x1234, seq=n)
                / (b"ping-payload-%02d" % n),
            )

    # IPv6: an SSH banner and key exchange bytes
    ssh = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n" + bytes((i * 31) & 0xFF for i in range(3000))
    kw6 = {"src": VM6, "dst": CLIENT6, "sport": 22, "dport": 50000}
    primary.stream(1.2, 0.0002, 123_456, 777_001, ssh, [1428], **kw6)
    secondary.stream(1.2003, 0.0002, 3_999_999_000, 777_001, ssh, [500, 1000], retransmit=1, **kw6)

    expected = {
        "proto": "tcp",
        "src": VM,
        "sport": 80,
        "dst": CLIENT,
        "dport": 40002,
        "offset": diff_at,
        "reason": "payload",
    }
    return DemoPair(
        sorted(primary.frames, key=lambda x: x[0]), sorted(secondary.frames, key=lambda x: x[0]), expected
    )
