"""A client that checks every byte: ``python -m experiments.probe blob|echo HOST ...``.

Run inside the pair's network namespace (``ip netns exec NS ...``).  The guest's answers are
deterministic (``mc_driver.guest.blob_bytes``), so the probe can say "correct" rather than "200 OK":
a replication bug that corrupts, drops or duplicates a byte fails the probe.  Prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import click


@click.group()
def main() -> None:
    """Byte-checking probes against the guest's services."""


@main.command("blob")
@click.argument("host")
@click.option("--port", default=8080, show_default=True, help="80: busybox httpd (Date header); 8080: blobd.")
@click.option("--count", default=1, show_default=True)
@click.option("--timeout", default=30.0, show_default=True)
def blob(host: str, port: int, count: int, timeout: float) -> None:
    """GET /blob COUNT times and compare each body with the guest's fixed 8 MiB."""
    from mc_driver.guest import blob_bytes

    expected = hashlib.sha256(blob_bytes()).hexdigest()
    results = []
    for _ in range(count):
        start = time.monotonic()
        body = _http_get(host, port, "/blob", timeout)
        seconds = time.monotonic() - start
        results.append(
            {
                "bytes": len(body),
                "ok": hashlib.sha256(body).hexdigest() == expected,
                "seconds": round(seconds, 3),
                "mbit_s": round(len(body) * 8 / seconds / 1e6, 1),
            }
        )
    ok = all(r["ok"] for r in results)
    click.echo(json.dumps({"probe": "blob", "ok": ok, "runs": results}))
    sys.exit(0 if ok else 1)


@main.command("echo")
@click.argument("host")
@click.option("--port", default=7, show_default=True)
@click.option("--rounds", default=100, show_default=True)
@click.option("--size", default=1000, show_default=True)
@click.option("--timeout", default=30.0, show_default=True)
def echo(host: str, port: int, rounds: int, size: int, timeout: float) -> None:
    """Send ROUNDS random messages on one connection; every echo must match exactly."""
    latencies = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        for _ in range(rounds):
            message = os.urandom(size)
            start = time.monotonic()
            sock.sendall(message)
            got = bytearray()
            while len(got) < size:
                chunk = sock.recv(size - len(got))
                if not chunk:
                    raise click.ClickException("echo connection closed early")
                got += chunk
            latencies.append(time.monotonic() - start)
            if bytes(got) != message:
                click.echo(json.dumps({"probe": "echo", "ok": False, "error": "mismatch"}))
                sys.exit(1)
    latencies.sort()
    click.echo(
        json.dumps(
            {
                "probe": "echo",
                "ok": True,
                "rounds": rounds,
                "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1e3, 2),
            }
        )
    )


@main.command("workload")
@click.argument("name")
@click.option(
    "--workdir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The pair's --workdir (its pair.json says where the guest and its clients are).",
)
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(1, 3600))
@click.option(
    "--phase-seconds",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="For a phased workload: how long each phase lasts.",
)
def workload(name: str, workdir: Path, seconds: float, phase_seconds: float) -> None:
    """Drive one of the experiment runner's workloads (``hybridft experiment``'s names: net-rr,
    net-divergent, phased, ...) against a running pair for SECONDS, every byte checked; run from the host
    (the clients enter the pair's namespace themselves).  Prints one JSON line; exit 1 on any wrong byte."""
    from experiments.catalog import CatalogError, build
    from experiments.workload import WorkloadTarget
    from hybridft_common.manifest import ManifestError, PairManifest

    try:
        manifest = PairManifest.load(workdir / "pair.json")
        driven = build(name, phase_seconds=phase_seconds)
    except (CatalogError, ManifestError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    target = WorkloadTarget(manifest.netns, manifest.guest_ip, manifest.guest_control.primary)
    t0 = time.monotonic()  # the daemon's trace clock: `experiment versus` places the phases on it
    result = driven.run(target, seconds)
    errors = list(result.errors) + [e for phase in result.phases for e in phase.errors]
    click.echo(
        json.dumps(
            {
                "probe": "workload",
                "workload": name,
                "ok": not errors,
                "t0": t0,
                "phases": [
                    {"name": ph.name, "start_s": round(ph.start_s, 3), "seconds": round(ph.seconds, 2),
                     result.unit: ph.work, "per_s": round(ph.score, 1)}
                    for ph in result.phases
                ],
                "errors": errors[:5],
            }
        )
    )  # fmt: skip
    sys.exit(0 if not errors else 1)


def _http_get(host: str, port: int, path: str, timeout: float) -> bytes:
    """One GET; the body is read by Content-Length (blobd keeps the connection alive)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        head, sep, rest = bytes(data).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if not sep or not status.startswith(b"HTTP/1.") or b" 200 " not in status + b" ":
            raise click.ClickException(f"bad HTTP answer: {head[:120]!r}")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = bytearray(rest)
        while length is None or len(body) < length:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            body += chunk
    if length is not None and len(body) != length:
        raise click.ClickException(f"body has {len(body)} bytes, Content-Length says {length}")
    return bytes(body)


if __name__ == "__main__":
    main()
