"""``hybridft bench pair``: what protection costs on a real pair (``pair up``), with same-run baselines.

The machine is shared and noisy, so every number has its baseline measured in the same run, on the
same guest, and ratios are reported:

1. **Checkpoint pause** (primary STOP -> RESUME, QEMU's own event timestamps read on the primary's
   ``ops`` monitor -- the same measurement for both sides of the ratio): checkpoints fired by the
   daemon's epoch protocol versus QEMU's own COLO timer (``x-checkpoint-delay`` = the interval) at the
   same interval, alternating phases, for an idle guest and for a guest dirtying memory (memdirty).
   During the QEMU-timer phases the daemon is idle (a 10-minute epoch), the comparator and disk
   server are not sealed: those phases measure QEMU's checkpoint alone, which is the floor.
2. **Traffic**: echo round-trip latency on one connection and HTTP ``GET /blob`` (8 MiB, every byte
   checked) in MC at two epoch lengths and in COLO, versus the same guest unreplicated (the secondary
   is killed at the end: the daemon releases everything, the comparator passes frames through).
3. **COLO divergences per minute** on that traffic, by the comparator's reason.
4. **Failover**: ``--kills`` fresh pairs, each kill -9 of the primary QEMU with an echo client busy;
   the time from the kill until a *new* client is served (probe connections every 50 ms) and the
   agent's own failover report.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from hybridft_common.control import ControlError, call
from hybridft_common.processes import cpu_seconds
from hybridft_common.stats import ratio, summarize
from mc_driver.traffic import recv_exact

ECHO_PORT = 7
HTTP_PORT = 80  # busybox httpd: its answers carry a Date header
BLOBD_PORT = 8080  # the guest's blobd: the same /blob with no Date/Last-Modified/ETag
MANUAL_EPOCH_MS = 600_000
HUGE_DELAY_MS = 200_000


class BenchError(Exception):
    """The benchmark could not run a phase; the message says which and why."""


def progress(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _stats_ms(values: list[float]) -> dict[str, Any]:
    """n/p50/p99/mean of milliseconds, to 0.01 ms (the report's fields: ``n``, not ``samples``)."""
    summary = summarize(values)
    return {"n": summary["samples"], "p50": summary["p50"], "p99": summary["p99"], "mean": summary["mean"]}


# ------------------------------------------------------------------------------------------- helpers
class PairHandle:
    """A running pair from ``mc_driver.pair.up`` plus the clients the benchmark needs."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        from mc_driver.netns import NetNamespace

        self.workdir = workdir
        self.config = config
        self.control = config["daemon_control"]
        self.netns = NetNamespace(config["netns"])
        self.guest_ip = config["guest_ip"]

    def daemon(self, verb: str, **args: Any) -> dict[str, Any]:
        return call(self.control, verb, io_timeout=60, **args)

    def set_mode(
        self,
        mode: str,
        epoch_ms: int | None = None,
        timeout: float = 30.0,
        passive: bool | None = None,
        stop_via: str | None = None,
    ) -> None:
        """Ask for a mode and wait until the daemon runs it (it applies at the next checkpoint)."""
        args: dict[str, Any] = {"mode": mode}
        if epoch_ms is not None:
            args["epoch_ms"] = epoch_ms
        if passive is not None:
            args["passive_secondary"] = passive
        if stop_via is not None:
            args["stop_via"] = stop_via
        self.daemon("mode", **args)
        deadline = time.monotonic() + timeout
        while True:
            status = self.daemon("status")
            if (
                status["mode"] == mode
                and status["pending_mode"] is None
                and (epoch_ms is None or status["epoch_ms"] == epoch_ms)
            ):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not switch to {mode} {epoch_ms} ms: {status['state']}")
            time.sleep(0.05)

    def go_unreplicated(self, timeout: float = 30.0) -> None:
        """Make this pair the unreplicated baseline: the same primary QEMU (build, accelerator, guest)
        with its secondary killed; returns once the daemon runs unprotected (it has released all held
        output, cancelled the disk mirror, and the comparator passes frames straight through)."""
        os.kill(self.config["pids"]["secondary"], signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.daemon("status")["state"] != "unprotected":
            if time.monotonic() > deadline:
                raise BenchError("the daemon did not go unprotected after the secondary was killed")
            time.sleep(0.05)

    def connect(self, port: int, timeout: float = 30.0) -> socket.socket:
        with self.netns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((self.guest_ip, port))
        return sock


def _pauses_from(events: list[Any]) -> list[float]:
    pauses, stop = [], None
    for event in events:
        if event.name == "STOP":
            stop = event.timestamp
        elif event.name == "RESUME" and stop is not None:
            pauses.append((event.timestamp - stop) * 1000)
            stop = None
    return pauses


async def _pause_phase(monitor: str, seconds: float, qemu_timer_ms: int | None) -> list[float]:
    """Primary STOP->RESUME pauses (ms) seen on ``monitor`` (one client per QEMU monitor) for ``seconds``;
    with ``qemu_timer_ms`` QEMU's own COLO timer fires them meanwhile."""
    from mc_driver.qmp import QmpSession

    session = await QmpSession.connect(monitor.removeprefix("unix:"), name="bench", timeout=10)
    try:
        session.discard_events()
        if qemu_timer_ms is not None:
            await session.execute("migrate-set-parameters", {"x-checkpoint-delay": qemu_timer_ms})
        try:
            await asyncio.sleep(seconds)
        finally:
            if qemu_timer_ms is not None:
                await session.execute("migrate-set-parameters", {"x-checkpoint-delay": HUGE_DELAY_MS})
        events = [e for e in session.events() if e.name in ("STOP", "RESUME")]
    finally:
        await session.close()
    return _pauses_from(events)


def _steps_p50(steps: dict[str, list[float]]) -> dict[str, float | None]:
    return {name: summarize(values)["p50"] for name, values in steps.items()}


def pause_phases(
    pair: PairHandle, interval_ms: int, seconds: float, rounds: int, passive_too: bool = False
) -> dict[str, Any]:
    """Alternate daemon-fired and QEMU-timer phases; pauses measured identically for both.

    The daemon's phases run once per way of stopping the VMs its QEMU offers (``qemu``, patch 0005,
    and ``qmp``, what stock QEMU gets); ``daemon`` is the one the daemon picked itself."""
    monitor = pair.config["qmp"]["primary"]["ops"]
    status = pair.daemon("status")
    chosen = status["stop_via"]
    vias = ["qemu", "qmp"] if status.get("seal_hook") else ["qmp"]
    daemon: dict[str, list[float]] = {via: [] for via in vias}
    qemu: list[float] = []
    steps: dict[str, dict[str, list[float]]] = {via: {} for via in vias}
    for _ in range(rounds):
        for via in vias:
            pair.set_mode("mc", interval_ms, stop_via=via)
            progress(f"pause: daemon-fired (stop via {via}) every {interval_ms} ms for {seconds} s")
            phase_start = time.time()
            daemon[via] += asyncio.run(_pause_phase(monitor, seconds, None))
            history = pair.daemon("history")["checkpoints"]
            for record in history:
                if record["started"] >= phase_start and record["outcome"] == "committed":
                    for name, ms in record["steps_ms"].items():
                        steps[via].setdefault(name, []).append(ms)
        pair.set_mode("mc", MANUAL_EPOCH_MS, stop_via=chosen)
        progress(f"pause: QEMU timer every {interval_ms} ms for {seconds} s")
        qemu += asyncio.run(_pause_phase(monitor, seconds, interval_ms))
        time.sleep(0.5)
    d, q = _stats_ms(daemon[chosen]), _stats_ms(qemu)
    extra: dict[str, Any] = {"stop_via": chosen}
    for via in vias:
        if via != chosen:
            other = _stats_ms(daemon[via])
            extra[f"daemon_stop_via_{via}"] = other | {
                "p50_ratio": ratio(other["p50"], q["p50"]),
                "p99_ratio": ratio(other["p99"], q["p99"]),
                "steps_p50_ms": _steps_p50(steps[via]),
            }
    if passive_too:
        secondary_pid = pair.config["pids"]["secondary"]
        cpu: dict[str, float] = {}
        passive: list[float] = []
        for label, flag in (("active", False), ("passive", True)):
            pair.set_mode("mc", interval_ms, passive=flag)
            progress(f"pause: daemon-fired, {label} secondary")
            before = cpu_seconds(secondary_pid)
            started = time.monotonic()
            pauses = asyncio.run(_pause_phase(monitor, seconds, None))
            cpu[label] = round(100 * (cpu_seconds(secondary_pid) - before) / (time.monotonic() - started), 1)
            if flag:
                passive = pauses
        pair.set_mode("mc", MANUAL_EPOCH_MS, passive=False)
        p = _stats_ms(passive)
        extra |= {
            "daemon_passive_secondary": p,
            "secondary_cpu_percent": cpu,
            "passive_p50_ratio": ratio(p["p50"], d["p50"]),
        }
    extra["daemon_steps_p50_ms"] = _steps_p50(steps[chosen])
    return extra | {
        "interval_ms": interval_ms,
        "daemon": d,
        "qemu_timer": q,
        "p50_ratio": ratio(d["p50"], q["p50"]),
        "p99_ratio": ratio(d["p99"], q["p99"]),
    }


def echo_latency(pair: PairHandle, count: int) -> dict[str, Any]:
    rtts = []
    with pair.connect(ECHO_PORT) as sock:
        for i in range(count):
            payload = os.urandom(63) + bytes([i & 0xFF])
            started = time.perf_counter()
            sock.sendall(payload)
            if recv_exact(sock, len(payload)) != payload:
                raise BenchError(f"echo round trip {i} came back different")
            rtts.append((time.perf_counter() - started) * 1000)
    return _stats_ms(rtts)


def http_throughput(pair: PairHandle, downloads: int, port: int = HTTP_PORT) -> dict[str, Any]:
    from mc_driver.guest import blob_bytes

    expected = blob_bytes()
    rates = []
    for _ in range(downloads):
        with pair.netns.entered():
            conn = http.client.HTTPConnection(pair.guest_ip, port, timeout=120)
            conn.connect()
        started = time.perf_counter()
        conn.request("GET", "/blob")
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        conn.close()
        if response.status != 200 or body != expected:
            raise BenchError(f"GET /blob: status {response.status}, {len(body)} bytes, content differs")
        rates.append(len(body) / elapsed / 1e6)
    return {"n": len(rates), "mb_s": summarize(rates)["p50"]}


def _divergences(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    reasons = {k: v - before["divergences"].get(k, 0) for k, v in after["divergences"].items()}
    reasons = {k: v for k, v in reasons.items() if v}
    checkpoints = after["checkpoints"]["daemon_started"] - before["checkpoints"]["daemon_started"]
    minutes = max(seconds, 1e-6) / 60
    return {
        "per_minute": round(sum(reasons.values()) / minutes, 1),
        "reasons": reasons,
        "checkpoints_per_minute": round(checkpoints / minutes, 1),
        # not to 0.01: the quick bench watches COLO for a fraction of a second, which must not read as 0
        "minutes": round(minutes, 4),
    }


def _process_cpu(pair: PairHandle) -> dict[str, float]:
    """CPU seconds so far of every process of the pair (and of this benchmark, the client)."""
    import psutil

    pids = {role: pid for role, pid in (pair.config.get("pids") or {}).items() if pid}
    pids["bench client"] = os.getpid()
    out = {}
    for role, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            out[role] = cpu_seconds(pid)
    return out


def traffic_phase(pair: PairHandle, echo_count: int, downloads: int) -> dict[str, Any]:
    """Echo latency, then HTTP throughput with the CPU each process used meanwhile (% of one core)."""
    row: dict[str, Any] = {"echo_ms": echo_latency(pair, echo_count)}
    before, started = _process_cpu(pair), time.monotonic()
    row["http"] = http_throughput(pair, downloads)
    after, wall = _process_cpu(pair), time.monotonic() - started
    row["http_cpu_percent"] = {
        role: round(100 * (after[role] - before[role]) / wall, 1) for role in after if role in before
    }
    return row


def _cpu_burner(percent: float) -> list[Any]:
    """Processes that together burn ``percent`` % of a core in 10 ms duty cycles, at the secondary
    QEMU's priority: the CPU a secondary VM takes from the primary, without a secondary."""
    import subprocess
    import sys

    procs = []
    left = percent
    while left > 1:
        duty = min(left, 100.0) / 100
        code = (
            "import time\n"
            f"d={duty}\n"
            "while True:\n"
            " t=time.perf_counter()\n"
            " while time.perf_counter()-t<0.01*d: pass\n"
            " time.sleep(0.01*(1-d))\n"
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
        left -= 100
    return procs


def _guest_control(pair: PairHandle) -> Any:
    from mc_driver.guest import GuestControl

    return GuestControl(pair.config["guest_control"]["primary"], timeout=30)


# --------------------------------------------------------------------------------------------- runs
def pause_phases_run(
    pair: PairHandle, opts: dict[str, Any], result: dict[str, Any], interval: int, seconds: float, rounds: int
) -> None:
    """The checkpoint pause phases, idle and with the guest dirtying memory."""
    result["pause_idle"] = pause_phases(pair, interval, seconds, rounds, passive_too=True)
    with _guest_control(pair) as guest:
        dirtier = guest.run("memdirty", str(opts["dirty_mib_s"]), str(opts["working_set_mib"]))
        time.sleep(2.0)  # the dirtier reaches its rate
        try:
            result["pause_dirty"] = pause_phases(pair, interval, seconds, rounds)
        finally:
            pair.set_mode("mc", opts["epoch_ms"][0])
            guest.kill(dirtier)
    result["pause_dirty"]["dirty"] = f"{opts['dirty_mib_s']} MiB/s over {opts['working_set_mib']} MiB"


def run_main_pair(workdir: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from mc_driver.pair import PairConfig, down, load_pair, up

    progress(f"pair up in {workdir}")
    up(PairConfig(workdir=workdir, mode="mc", epoch_ms=opts["epoch_ms"][0]))
    try:
        pair = PairHandle(workdir, load_pair(workdir / "pair.json"))
        result: dict[str, Any] = {}
        interval, seconds, rounds = opts["interval_ms"], opts["phase_seconds"], opts["rounds"]
        if not opts["traffic_only"]:
            pause_phases_run(pair, opts, result, interval, seconds, rounds)
        traffic: dict[str, Any] = {}
        for epoch_ms in opts["epoch_ms"]:
            pair.set_mode("mc", epoch_ms)
            progress(f"traffic: MC {epoch_ms} ms")
            traffic[f"mc {epoch_ms} ms"] = traffic_phase(pair, opts["echo_count"], opts["downloads"])
        pair.set_mode("colo")
        progress("traffic: COLO")
        before = pair.daemon("status")
        started = time.monotonic()
        traffic["colo"] = traffic_phase(pair, opts["echo_count"], opts["downloads"])
        # the divergence count, split by server: httpd stamps a Date header, blobd sends none
        divergences = {}
        for server, port in (("httpd", HTTP_PORT), ("blobd", BLOBD_PORT)):
            if server == "blobd":
                before, started = pair.daemon("status"), time.monotonic()
            while time.monotonic() - started < opts["colo_seconds"] / 2:
                echo_latency(pair, opts["echo_count"])
                http_throughput(pair, 1, port)
            if server == "blobd" and not opts["colo_seconds"]:
                break
            after = pair.daemon("status")
            divergences[server] = _divergences(before, after, time.monotonic() - started)
        result["colo_divergences"] = divergences
        result["daemon_status"] = {k: after[k] for k in ("checkpoints", "unrequested_stops", "pause_ms")}
        pair.go_unreplicated()
        progress("traffic: unreplicated (secondary killed)")
        traffic["unreplicated"] = traffic_phase(pair, opts["echo_count"], opts["downloads"])
        # COLO's second VM competes for the CPU: the unreplicated guest again, with that VM's CPU
        # share (as measured during COLO's HTTP downloads) burnt by a stand-in
        secondary_share = traffic["colo"]["http_cpu_percent"].get("secondary", 0.0)
        progress(f"traffic: unreplicated + {secondary_share}% CPU burnt (the secondary's share in COLO)")
        burners = _cpu_burner(secondary_share)
        try:
            traffic["unreplicated+cpu"] = traffic_phase(pair, opts["echo_count"], opts["downloads"])
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
        base = traffic["unreplicated"]
        for row in traffic.values():
            row["echo_p50_ratio"] = ratio(row["echo_ms"]["p50"], base["echo_ms"]["p50"])
            row["http_ratio"] = ratio(row["http"]["mb_s"], base["http"]["mb_s"])
        result["traffic"] = traffic
        result["accel"] = pair.config["accel"]
        return result
    finally:
        down(workdir)


def run_failovers(root: Path, kills: int, epoch_ms: int) -> dict[str, Any]:
    from mc_driver.pair import PairConfig, down, load_pair, up

    served: list[float] = []
    agent: list[float] = []
    errors: list[str] = []
    for i in range(kills):
        workdir = root / f"failover-{i}"
        progress(f"failover {i + 1}/{kills}")
        try:
            up(PairConfig(workdir=workdir, mode="mc", epoch_ms=epoch_ms))
            pair = PairHandle(workdir, load_pair(workdir / "pair.json"))
            busy = _BusyEcho(pair).start()
            time.sleep(1.0)
            killed = time.monotonic()
            os.kill(pair.config["pids"]["primary"], signal.SIGKILL)
            served_at = _probe_until_served(pair, killed, 60)
            busy.stop()
            if served_at is None:
                errors.append(f"kill {i}: no new client served within 60 s")
                continue
            served.append((served_at - killed) * 1000)
            report_path = Path(pair.config.get("failover_report") or workdir / "failover.json")
            deadline = time.monotonic() + 10
            while not report_path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(OSError, ValueError, KeyError):
                agent.append(float(json.loads(report_path.read_text())["seconds"]) * 1000)
            if busy.errors:
                errors.append(f"kill {i}: busy echo connection: {busy.errors[0]}")
        except Exception as exc:  # one bad run is reported, the others still count
            errors.append(f"kill {i}: {type(exc).__name__}: {exc}")
        finally:
            down(workdir)
    return {
        "kills": kills,
        "served_ms": _stats_ms(served),
        "agent_ms": _stats_ms(agent),
        "max_ms": round(max(served), 1) if served else None,
        "each_ms": [round(s, 1) for s in served],  # in kill order: an outlier's workdir is failover-<i>
        "under_1s": sum(1 for s in served if s <= 1000),
        "errors": errors,
    }


def _probe_until_served(pair: PairHandle, since: float, timeout: float) -> float | None:
    while time.monotonic() - since < timeout:
        probe = time.monotonic()
        try:
            with pair.connect(ECHO_PORT, timeout=0.05) as sock:
                sock.settimeout(5)
                sock.sendall(b"probe\n")
                if recv_exact(sock, 6) == b"probe\n":
                    return time.monotonic()
        except OSError:
            time.sleep(max(0.0, 0.05 - (time.monotonic() - probe)))
    return None


class _BusyEcho:
    """An echo connection kept busy through the kill; any wrong byte is an error."""

    def __init__(self, pair: PairHandle) -> None:
        self.pair = pair
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> _BusyEcho:
        self._sock = self.pair.connect(ECHO_PORT)
        self._sock.settimeout(30)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                payload = os.urandom(256)
                self._sock.sendall(payload)
                if recv_exact(self._sock, len(payload)) != payload:
                    self.errors.append("bytes differ")
                time.sleep(0.01)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(35)
        self._sock.close()


# -------------------------------------------------------------------------------------------- output
def render_table(result: dict[str, Any]) -> str:
    lines = [f"hybridft bench pair ({result.get('accel', '?')}; ratios are to the same-run baseline)", ""]
    for key, title in (("pause_idle", "idle"), ("pause_dirty", "memory-dirtying")):
        p = result.get(key)
        if not p:
            continue
        lines.append(
            f"checkpoint pause, {title} guest, every {p['interval_ms']} ms (primary STOP->RESUME, ms)"
        )
        chosen = p.get("stop_via", "qmp")
        lines.append(f"  {'fired by':<30}{'n':>6}{'p50':>9}{'p99':>9}{'x p50':>8}{'x p99':>8}")
        rows = [
            (
                f"daemon, stop via {chosen}",
                p["daemon"] | {"p50_ratio": p["p50_ratio"], "p99_ratio": p["p99_ratio"]},
            )
        ]
        others = {key.rsplit("_", 1)[1]: row for key, row in p.items() if key.startswith("daemon_stop_via_")}
        rows += [(f"daemon, stop via {via}", row) for via, row in others.items()]
        rows.append(("QEMU timer (baseline)", p["qemu_timer"] | {"p50_ratio": 1.0, "p99_ratio": 1.0}))
        for label, row in rows:
            lines.append(
                f"  {label:<30}{row['n']:>6}{row['p50']!s:>9}{row['p99']!s:>9}"
                f"{row['p50_ratio']!s:>8}{row['p99_ratio']!s:>8}"
            )
        lines.append(f"  daemon/QEMU ratio: p50 {p['p50_ratio']}, p99 {p['p99_ratio']} (goal <= 1.2)")
        if p.get("daemon_steps_p50_ms"):
            lines.append(
                f"  daemon steps (stop via {chosen}), p50 ms: {json.dumps(p['daemon_steps_p50_ms'])}"
            )
        for via, row in others.items():
            lines.append(f"  daemon steps (stop via {via}), p50 ms: {json.dumps(row['steps_p50_ms'])}")
        if "daemon_passive_secondary" in p:
            row, cpu = p["daemon_passive_secondary"], p["secondary_cpu_percent"]
            lines.append(
                f"  passive secondary (stopped between checkpoints): pause p50 {row['p50']} p99 {row['p99']}"
                f" (x{p['passive_p50_ratio']} of active); secondary CPU {cpu.get('passive')}% vs "
                f"{cpu.get('active')}% active"
            )
        lines.append("")
    traffic = result.get("traffic")
    if traffic:
        lines.append("traffic (echo 64 B round trips on one connection; HTTP GET /blob 8 MiB, bytes checked)")
        lines.append(
            f"  {'mode':<16}{'echo p50':>10}{'echo p99':>10}{'x base':>8}{'HTTP MB/s':>11}{'x base':>8}"
        )
        for mode, row in traffic.items():
            lines.append(
                f"  {mode:<16}{row['echo_ms']['p50']!s:>10}{row['echo_ms']['p99']!s:>10}"
                f"{row['echo_p50_ratio']!s:>8}{row['http']['mb_s']!s:>11}{row['http_ratio']!s:>8}"
            )
        lines.append("CPU during the HTTP downloads (% of one core)")
        for mode, row in traffic.items():
            cpu = row.get("http_cpu_percent") or {}
            lines.append(f"  {mode:<18}" + ", ".join(f"{role} {pct}" for role, pct in cpu.items()))
        lines.append("")
    for server, div in (result.get("colo_divergences") or {}).items():
        lines.append(
            f"COLO divergences, {server} + echo traffic: {div['per_minute']}/min over {div['minutes']} min, "
            f"reasons {json.dumps(div['reasons'])}; checkpoints {div['checkpoints_per_minute']}/min"
        )
    lines.append("")
    fo = result.get("failover")
    if fo:
        lines.append(
            f"failover over {fo['kills']} kill -9 of the primary: new client served p50 "
            f"{fo['served_ms']['p50']} ms, p99 {fo['served_ms']['p99']} ms, max {fo['max_ms']} ms, "
            f"{fo['under_1s']}/{fo['served_ms']['n']} within 1 s; agent p50 {fo['agent_ms']['p50']} ms"
        )
        for error in fo["errors"]:
            lines.append(f"  error: {error}")
    return "\n".join(lines)


@click.command("pair")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quick", is_flag=True, help="Short phases, one download, one failover (for tests).")
@click.option(
    "--kills", type=click.IntRange(0), default=None, help="Failovers to time (default 20, quick 1)."
)
@click.option(
    "--interval-ms",
    type=click.IntRange(10),
    default=100,
    show_default=True,
    help="Checkpoint interval of the pause comparison.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the pairs live (default: a temporary directory).",
)
@click.option(
    "--traffic-only",
    is_flag=True,
    help="Only the traffic phases (MC, COLO, unreplicated, + the secondary's CPU share); no failovers.",
)
def bench_pair(
    as_json: bool, quick: bool, kills: int | None, interval_ms: int, workdir: Path | None, traffic_only: bool
) -> None:
    """Checkpoint pause (daemon vs QEMU timer), MC/COLO traffic vs unreplicated, divergences, failover."""
    if traffic_only and kills is None:
        kills = 0
    opts = {
        "traffic_only": traffic_only,
        "interval_ms": interval_ms,
        "phase_seconds": 3.0 if quick else 10.0,
        "rounds": 1 if quick else 2,
        "epoch_ms": (20, 100),
        "echo_count": 20 if quick else 200,
        "downloads": 1 if quick else 3,
        "colo_seconds": 0 if quick or traffic_only else 60,
        "dirty_mib_s": 32,
        "working_set_mib": 64,
    }
    kills = (1 if quick else 20) if kills is None else kills
    with tempfile.TemporaryDirectory(prefix="hft-bench-pair-") as tmp:
        root = (workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        try:
            result = run_main_pair(root / "main", opts)
            if kills:
                result["failover"] = run_failovers(root, kills, opts["epoch_ms"][0])
        except (BenchError, ControlError, OSError) as exc:
            raise click.ClickException(f"bench pair: {exc}") from None
        except Exception as exc:
            from mc_driver.pair import PairError

            if isinstance(exc, PairError):
                raise click.ClickException(f"bench pair: {exc}") from None
            raise
    result["options"] = opts | {"kills": kills}
    click.echo(json.dumps(result) if as_json else render_table(result))
