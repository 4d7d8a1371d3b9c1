"""``hybridft bench reprotect``: what healing costs on a real pair -- time unprotected, the guest's pause
in the initial migration, and the clients' throughput while the disk is copied against before.

For each disk size (``--disk-mib``, default 1 GiB and 8 GiB; the 256 MiB guest): ``pair up`` in MC,
clients in the pair's namespace (a blob downloader and an echo connection, every byte checked),
throughput measured before any failure (the same-run baseline), then ``--cycles`` times: kill -9 of
the primary QEMU -> the agent fails over -> ``--baseline-s`` of the survivor serving alone -> ``pair
reprotect`` (alternately MC and COLO) -> a checkpoint in MC and one in COLO through the new daemon.  Per
cycle: time unprotected (the agent's detection to protected again, so it includes the baseline wait),
the disk copy's time and rate, the primary's STOP->RESUME around the initial migration, and the
downloads' throughput during the copy as a ratio to the survivor's alone just before it.  The client must
see no error in any cycle.

``--auto-failovers`` then runs a pair with ``--auto-reprotect`` through that many kills of the primary
with no operator action: each must end protected again by itself.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from hybridft_common.control import ControlError, call
from hybridft_common.stats import ratio, summarize
from hybridft_common.vocabulary import Mode
from mc_driver.traffic import EchoTraffic

BLOBD_PORT = 8080


class BenchError(Exception):
    """The benchmark could not run a step (not a measured result)."""


def progress(message: str) -> None:
    click.echo(f"[bench reprotect] {message}", err=True)


@dataclass
class Downloader:
    """Downloads ``GET /blob`` again and again on fresh connections, checks every byte, and keeps
    (wall time, total bytes) samples for throughput over any interval."""

    netns: Any
    guest_ip: str
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[tuple[float, int]] = field(default_factory=list)
    total: int = 0
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Downloader:
        self.thread = threading.Thread(target=self._guard, daemon=True)
        self.thread.start()
        return self

    def _guard(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        import socket

        from mc_driver.guest.expected import BLOB_SIZE, blob_bytes

        blob = blob_bytes()
        while not self.stop.is_set():
            with self.netns.entered():
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                sock.settimeout(120)
                sock.connect((self.guest_ip, BLOBD_PORT))
                sock.sendall(b"GET /blob HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed in the headers")
                    head += chunk
                _, _, body = head.partition(b"\r\n\r\n")
                got = len(body)
                if blob[:got] != body:
                    raise AssertionError("blob bytes differ at the start")
                while got < BLOB_SIZE:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError(f"blob cut after {got} bytes")
                    if blob[got : got + len(chunk)] != chunk:
                        raise AssertionError(f"blob bytes differ at offset {got}")
                    got += len(chunk)
                    self.total += len(chunk)
                    self.samples.append((time.time(), self.total))

    def rate(self, start: float, end: float) -> float | None:
        """Bytes per second received between two wall-clock times."""
        inside = [(t, b) for t, b in self.samples if start <= t <= end]
        if len(inside) < 2 or end - start <= 0:
            return None
        before = [b for t, b in self.samples if t < start]
        first = before[-1] if before else inside[0][1]
        return (inside[-1][1] - first) / (end - start)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=180)


def _wait(what: str, predicate: Any, timeout: float, clients: list[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for client in clients:
            if client.errors:
                raise BenchError(f"client error while waiting for {what}: {client.errors}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def _daemon(workdir: Path, verb: str, **args: Any) -> dict[str, Any]:
    config = json.loads((workdir / "pair.json").read_text())
    return call(config["daemon_control"], verb, io_timeout=60, **args)


def _checkpoint_in(workdir: Path, mode: str) -> None:
    _daemon(workdir, "mode", mode=mode)
    deadline = time.monotonic() + 60
    while (status := _daemon(workdir, "status"))["mode"] != mode or status["pending_mode"]:
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon did not switch to {mode}")
        time.sleep(0.05)
    _daemon(workdir, "checkpoint", timeout=30)


def _ram_identical(workdir: Path) -> dict[str, Any]:
    """Both VMs' RAM at one held checkpoint (the daemon's ``verify``, patch 0007); a difference ends the
    benchmark: its other figures would describe a pair that does not protect the guest."""
    verdict = _daemon(workdir, "verify", timeout=60)
    if not verdict.get("identical"):
        raise BenchError(f"RAM differs after re-protection: {verdict}")
    return verdict


def _up(workdir: Path, disk_mib: int, *, auto: bool) -> dict[str, Any]:
    from mc_driver.pair import PairConfig, up

    return up(PairConfig(workdir=workdir, mode=Mode.MC, disk_mib=disk_mib, auto_reprotect=auto))


def run_disk(root: Path, disk_mib: int, cycles: int, baseline_s: float) -> dict[str, Any]:
    from mc_driver.netns import NetNamespace
    from mc_driver.pair import down
    from mc_driver.reprotect import reprotect

    workdir = root / f"disk{disk_mib}"
    progress(f"{disk_mib} MiB disk: pair up")
    answer = _up(workdir, disk_mib, auto=False)
    ns = NetNamespace(answer["client_netns"])
    try:
        downloads = Downloader(ns, answer["guest_ip"]).start()
        echo = EchoTraffic(ns, answer["guest_ip"]).start()
        clients = [downloads, echo]
        _wait("the first download bytes", lambda: downloads.total > 0, 120, clients)
        t0 = time.time()
        time.sleep(baseline_s)
        before = downloads.rate(t0, time.time())
        rows = []
        for cycle in range(cycles):
            mode = "mc" if cycle % 2 == 0 else "colo"
            config = json.loads((workdir / "pair.json").read_text())
            progress(f"{disk_mib} MiB disk, cycle {cycle + 1}/{cycles}: kill -9 of the primary")
            os.kill(config["pids"]["primary"], signal.SIGKILL)
            _wait("the failover", lambda: (workdir / "failover.json").exists(), 120, clients)
            t1 = time.time()
            time.sleep(baseline_s)  # the survivor alone, before the copy: the copy's own baseline
            alone = downloads.rate(t1, time.time())
            result = reprotect(workdir, mode)
            summary = result["reprotect"]
            copy = next(p for p in summary["phases"] if p["name"] == "disk-copy")
            during = downloads.rate(copy["started_at"], copy["ended_at"])
            _checkpoint_in(workdir, "mc")
            ram = [_ram_identical(workdir)]
            _checkpoint_in(workdir, "colo")
            ram.append(_ram_identical(workdir))
            _checkpoint_in(workdir, mode)
            rows.append({
                "cycle": cycle + 1, "mode": mode, "unprotected_s": summary["unprotected_seconds"],
                "copy_s": summary["progress"].get("seconds"),
                "copy_rate_mib_s": None if not summary["progress"].get("seconds") else round(
                    summary["progress"]["bytes_total"] / summary["progress"]["seconds"] / (1 << 20), 1),
                "migration_pause_ms": summary["initial_migration_pause_ms"],
                "throughput_during_copy_mib_s": None if during is None else round(during / (1 << 20), 2),
                "unprotected_before_copy_mib_s": None if alone is None else round(alone / (1 << 20), 2),
                "throughput_ratio": ratio(during, alone),
                "ram_identical_in": [r["mode"] for r in ram], "ram_check_s": [r["seconds"] for r in ram],
            })  # fmt: skip
            progress(f"  {rows[-1]}")
        downloads.finish()
        echo.stop()
        errors = downloads.errors + echo.errors
        if errors:
            raise BenchError(f"client errors: {errors}")
    finally:
        down(workdir)
    return {
        "disk_mib": disk_mib,
        "throughput_before_mib_s": None if before is None else round(before / (1 << 20), 2),
        "echo_round_trips": echo.round_trips,
        "downloaded_mib": round(downloads.total / (1 << 20), 1),
        "cycles": rows,
        "unprotected_s": summarize([r["unprotected_s"] for r in rows if r["unprotected_s"] is not None]),
        "migration_pause_ms": summarize(
            [r["migration_pause_ms"] for r in rows if r["migration_pause_ms"] is not None]
        ),
    }


def _healed(workdir: Path, generation: int) -> bool:
    """Re-protected past ``generation`` (by the automatic re-protector)."""
    record = workdir / "reprotect.json"
    if not record.exists():
        return False
    data = json.loads(record.read_text())
    return data.get("generation", 0) > generation and data.get("state") == "protected"


def run_auto(root: Path, failovers: int) -> dict[str, Any]:
    from mc_driver.netns import NetNamespace
    from mc_driver.pair import down

    workdir = root / "auto"
    progress("--auto-reprotect: pair up")
    answer = _up(workdir, 64, auto=True)
    ns = NetNamespace(answer["client_netns"])
    rows = []
    try:
        echo = EchoTraffic(ns, answer["guest_ip"]).start()
        for n in range(failovers):
            config = json.loads((workdir / "pair.json").read_text())
            record = workdir / "reprotect.json"
            generation = json.loads(record.read_text())["generation"] if record.exists() else 0
            progress(f"auto: kill -9 of the primary ({n + 1}/{failovers})")
            killed = time.time()
            os.kill(config["pids"]["primary"], signal.SIGKILL)

            _wait("protection again, with no operator action",
                  lambda gen=generation: _healed(workdir, gen), 600, [echo])  # fmt: skip
            data = json.loads(record.read_text())
            status = _daemon(workdir, "status")
            if status["state"] != "protected":
                raise BenchError(f"the daemon says {status['state']} after the automatic re-protection")
            rows.append({"failover": n + 1, "attempts": data["attempt"],
                         "unprotected_s": data["unprotected_seconds"],
                         "kill_to_protected_s": round(data["protected_at"] - killed, 3)})  # fmt: skip
            progress(f"  {rows[-1]}")
        echo.stop()
        if echo.errors:
            raise BenchError(f"echo errors: {echo.errors}")
    finally:
        down(workdir)
    return {"failovers": rows, "echo_round_trips": echo.round_trips}


def render_table(result: dict[str, Any]) -> str:
    lines = [
        "hybridft bench reprotect (256 MiB guest; kill -9 of the primary -> failover -> reprotect)",
        "tput before = blob downloads from the survivor alone before the copy, tput copy = during the "
        "copy (MiB/s), ratio = copy / before",
        "",
    ]
    header = (f"  {'disk':>6} {'cyc':>4} {'mode':>5} {'unprot s':>9} {'copy s':>7} {'MiB/s':>7} "
              f"{'pause ms':>9} {'tput before':>12} {'tput copy':>10} {'ratio':>6}")  # fmt: skip
    for disk in result["disks"]:
        lines.append(
            f"disk {disk['disk_mib']} MiB: protected (MC) {disk['throughput_before_mib_s']} MiB/s, "
            f"{disk['downloaded_mib']} MiB downloaded, {disk['echo_round_trips']} echo round trips, "
            "every byte checked"
        )
        lines.append(header)
        for row in disk["cycles"]:
            lines.append(
                f"  {disk['disk_mib']:>6} {row['cycle']:>4} {row['mode']:>5} {row['unprotected_s']!s:>9} "
                f"{row['copy_s']!s:>7} {row['copy_rate_mib_s']!s:>7} {row['migration_pause_ms']!s:>9} "
                f"{row['unprotected_before_copy_mib_s']!s:>12} {row['throughput_during_copy_mib_s']!s:>10} "
                f"{row['throughput_ratio']!s:>6}"
            )
        lines.append("")
    auto = result.get("auto")
    if auto:
        lines.append("--auto-reprotect, no operator action:")
        for row in auto["failovers"]:
            lines.append(
                f"  failover {row['failover']}: protected again {row['kill_to_protected_s']} s after the "
                f"kill (unprotected {row['unprotected_s']} s, attempt {row['attempts']})"
            )
    return "\n".join(lines)


@click.command("reprotect")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quick", is_flag=True, help="One 1 GiB disk, one cycle, one automatic failover.")
@click.option("--disk-mib", "disks", type=click.IntRange(1), multiple=True, help="Disk sizes [1024, 8192].")
@click.option("--cycles", type=click.IntRange(1), default=5, show_default=True,
              help="Failover + re-protection cycles per disk (disks over 4 GiB: --big-cycles).")  # fmt: skip
@click.option("--big-cycles", type=click.IntRange(1), default=1, show_default=True,
              help="Cycles for disks over 4 GiB (each copies the whole disk).")  # fmt: skip
@click.option("--auto-failovers", type=click.IntRange(0), default=3, show_default=True)
@click.option("--baseline-s", type=click.FloatRange(1), default=5.0, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def bench_reprotect(as_json: bool, quick: bool, disks: tuple[int, ...], cycles: int, big_cycles: int,
                    auto_failovers: int, baseline_s: float, workdir: Path | None) -> None:  # fmt: skip
    """Time unprotected, migration pause and client throughput during the disk copy, per disk size;
    and --auto-reprotect across several failovers."""
    from mc_driver.pair import PairError
    from mc_driver.reprotect import ReprotectError

    sizes = disks or ((1024,) if quick else (1024, 8192))
    if quick:
        cycles, big_cycles, auto_failovers = 1, 1, min(auto_failovers, 1)
    result: dict[str, Any] = {"disks": []}
    with tempfile.TemporaryDirectory(prefix="hft-bench-reprotect-") as tmp:
        root = (workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        try:
            for size in sizes:
                n = big_cycles if size > 4096 else cycles
                result["disks"].append(run_disk(root, size, n, baseline_s))
            if auto_failovers:
                result["auto"] = run_auto(root, auto_failovers)
        except (BenchError, ControlError, OSError, PairError, ReprotectError) as exc:
            raise click.ClickException(f"bench reprotect: {exc}") from None
    click.echo(json.dumps(result) if as_json else render_table(result))
