"""``hybridft bench chaos --iterations N``: the failover drill -- one fault per fresh pair, every client
byte checked.

Each iteration starts a real pair (``pair up``, the guest's diskwriter on), runs clients in the pair's
namespace -- a busy echo connection, ``GET /blob`` downloads (every byte compared with the guest's blob),
the diskwriter's durable-record reports -- and then hits ONE of the pair's processes (primary QEMU,
secondary QEMU, daemon, agent, disk server, comparator) with ``kill -9`` or ``SIGSTOP`` for a while
(a hang, a partition), at a random instant or right after a checkpoint's STOP on the primary
(mid-checkpoint).  Then it judges, from the outside only:

* **corrupt** -- a client received a byte that differs from what the guest sends (or echoes);
* **lost** -- a client connection was cut or stalled although the pair says it serves;
* **disk** -- a record the diskwriter reported durable is missing from the serving VM's disk;
* **split** -- both VMs live at once (the primary running while the secondary runs outside COLO);
* **unclear** -- the pair is neither protected nor clearly unprotected with a reason (daemon
  ``status`` or the agent's ``failover.json``).

An outcome of "kept paused" (the agent refused to resume a VM whose disk state it could not settle)
is a clear, reasoned outage: it is counted as such, not as lost bytes.

The plan of each iteration (which process, which fault, when) is :func:`plan_fault`, sans-I/O and
seeded; :func:`judge` turns what was observed into violations, also without I/O.  Components are
taken in turn so that every one is hit equally often.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from hybridft_common.control import call

COMPONENTS = ("primary", "secondary", "daemon", "agent", "disk", "compare")
FAULTS = ("kill", "stop")
MOMENTS = ("random", "mid-checkpoint")
VIOLATIONS = ("corrupt", "lost", "disk", "split", "unclear")
SETTLE_SECONDS = 30.0  # after the fault: time for the pair to reach its new state
SERVE_SECONDS = 45.0  # then: time for every client to make progress again


class ChaosError(Exception):
    """An iteration could not be run (the pair did not come up); the message says why."""


# ----------------------------------------------------------------------------------- sans-I/O core
@dataclass(frozen=True, slots=True)
class FaultPlan:
    component: str
    fault: str  # kill | stop
    moment: str  # random | mid-checkpoint
    delay: float  # seconds after traffic runs (random) or after the checkpoint's STOP (mid-checkpoint)
    stop_seconds: float  # how long a SIGSTOP lasts
    mode: str  # the pair's protection mode for this iteration


def plan_fault(rng: random.Random, index: int) -> FaultPlan:
    """Iteration ``index``'s fault: the components in turn, the rest drawn from ``rng``."""
    moment = rng.choice(MOMENTS)
    return FaultPlan(
        component=COMPONENTS[index % len(COMPONENTS)],
        fault=rng.choice(FAULTS),
        moment=moment,
        delay=rng.uniform(0.0, 0.02) if moment == "mid-checkpoint" else rng.uniform(0.0, 3.0),
        stop_seconds=round(rng.uniform(0.5, 4.0), 2),
        mode=rng.choice(("colo", "mc")),
    )


@dataclass
class Observation:
    """What an iteration saw from the outside."""

    corrupt: list[str] = field(default_factory=list)  # wrong bytes
    cut: list[str] = field(default_factory=list)  # connections cut or stalled
    served_again: bool = False  # every client made progress after the fault
    missing_records: int = 0
    durable_records: int = 0
    disk_checked: bool = False
    both_live: bool = False
    outcome: str = "unknown"  # protected | unprotected | failed-over | kept-paused | unknown
    reason: str = ""


def judge(obs: Observation) -> list[str]:
    """The violations among :data:`VIOLATIONS` that ``obs`` shows."""
    found = []
    if obs.corrupt:
        found.append("corrupt")
    service_expected = obs.outcome in ("protected", "unprotected", "failed-over")
    if service_expected and (obs.cut or not obs.served_again):
        found.append("lost")
    if obs.missing_records:
        found.append("disk")
    if obs.both_live:
        found.append("split")
    if obs.outcome == "unknown" or (obs.outcome != "protected" and not obs.reason):
        found.append("unclear")
    return found


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per component: iterations, outcomes, violations."""
    per: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = per.setdefault(
            result["plan"]["component"], {"iterations": 0, "outcomes": Counter(), "violations": Counter()}
        )
        entry["iterations"] += 1
        entry["outcomes"][result.get("outcome", "error")] += 1
        for violation in result.get("violations", []):
            entry["violations"][violation] += 1
        if result.get("error"):
            entry["violations"]["error"] += 1
    return {
        name: {
            "iterations": e["iterations"],
            "outcomes": dict(e["outcomes"]),
            "violations": dict(e["violations"]),
        }
        for name, e in sorted(per.items())
    }


# ------------------------------------------------------------------------------------------ clients
class Clients:
    """Echo, blob and diskwriter clients in the pair's namespace; every byte is checked.  A cut
    connection is recorded and reopened (so that service after the fault is measured too)."""

    def __init__(self, netns: Any, guest_ip: str) -> None:
        from mc_driver.guest.expected import DiskWriterReports, blob_bytes

        self.netns = netns
        self.guest_ip = guest_ip
        self.blob = blob_bytes()
        self.stop = threading.Event()
        self.corrupt: list[str] = []
        self.cut: list[str] = []
        self.echo_rounds = 0
        self.blobs = 0
        self.reports = DiskWriterReports()
        self.threads: list[threading.Thread] = []
        # when each client last made progress, and its longest wait for progress since :meth:`mark`:
        # how long the fault stalled it (a stall, unlike a cut, leaves no exception behind)
        self.last_progress: dict[str, float] = {}
        self.longest_stall: dict[str, float] = {}
        self.marked_at: float | None = None
        self._stall_lock = threading.Lock()  # the client threads and the drill's thread

    def connect(self, port: int, timeout: float) -> socket.socket:
        with self.netns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((self.guest_ip, port))
        return sock

    def start(self) -> Clients:
        for loop in (self._echo, self._blob, self._disk):
            thread = threading.Thread(target=self._forever, args=(loop,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def mark(self) -> None:
        """Start measuring stalls: just before the fault is injected, so that a SIGSTOP's whole
        length counts."""
        with self._stall_lock:
            now = time.monotonic()
            self.marked_at = now
            self.longest_stall = {name: 0.0 for name in ("echo", "blob", "disk")}
            for name in self.longest_stall:
                self.last_progress[name] = now

    def _progressed(self, name: str) -> None:
        with self._stall_lock:
            now = time.monotonic()
            if self.marked_at is not None:  # mark() gave every client both entries
                self.longest_stall[name] = max(self.longest_stall[name], now - self.last_progress[name])
            self.last_progress[name] = now

    def stalls(self) -> dict[str, float]:
        """Per client, the longest time without progress since :meth:`mark`, the wait still open
        included (seconds, rounded)."""
        with self._stall_lock:
            if self.marked_at is None:
                return {}
            now = time.monotonic()
            return {
                name: round(max(longest, now - self.last_progress[name]), 2)
                for name, longest in self.longest_stall.items()
            }

    def _forever(self, loop: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                loop()
            except (OSError, ConnectionError) as exc:
                if self.stop.is_set():
                    return
                after = ""
                if self.marked_at is not None:
                    after = f" ({time.monotonic() - self.marked_at:.1f} s after the fault was armed)"
                self.cut.append(f"{loop.__name__}: {type(exc).__name__}: {exc}{after}")
                self.stop.wait(0.5)
            except AssertionError as exc:
                self.corrupt.append(f"{loop.__name__}: {exc}")
                self.stop.wait(0.5)
            except Exception as exc:  # a parser's error (a report out of sequence): wrong bytes, named
                self.corrupt.append(f"{loop.__name__}: {type(exc).__name__}: {exc}")
                self.stop.wait(0.5)
            if loop is self._disk:
                return  # the diskwriter serves one connection: its reports are what they are

    def _echo(self) -> None:
        from mc_driver.guest.expected import ECHO_PORT
        from mc_driver.traffic import recv_exact

        rng = random.Random()
        with self.connect(ECHO_PORT, 30.0) as sock:
            while not self.stop.is_set():
                chunk = rng.randbytes(rng.randint(1, 8192))
                sock.sendall(chunk)
                if recv_exact(sock, len(chunk)) != chunk:
                    raise AssertionError(f"echo: a {len(chunk)}-byte chunk came back different")
                self.echo_rounds += 1
                self._progressed("echo")

    def _blob(self) -> None:
        from mc_driver.guest.expected import BLOB_SIZE, BLOBD_PORT

        with self.connect(BLOBD_PORT, 30.0) as sock:
            sock.sendall(b"GET /blob HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed in the headers")
                head += chunk
            header, _, body = head.partition(b"\r\n\r\n")
            if not header.startswith(b"HTTP/1.1 200"):
                raise AssertionError(f"blob: unexpected header {header[:80]!r}")
            received = bytearray(body)
            if self.blob[: len(received)] != received:
                raise AssertionError("blob: first bytes differ")
            while len(received) < BLOB_SIZE:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"blob cut after {len(received)} bytes")
                if self.blob[len(received) : len(received) + len(chunk)] != chunk:
                    raise AssertionError(f"blob: bytes differ at offset {len(received)}")
                received += chunk
                self._progressed("blob")
            self.blobs += 1

    def _disk(self) -> None:
        from mc_driver.guest.expected import DISKWRITER_PORT

        with self.connect(DISKWRITER_PORT, 30.0) as sock:
            sock.settimeout(1.0)
            while not self.stop.is_set():
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    if self.reports.finished == "ERROR":
                        raise ConnectionError("diskwriter: a write or fdatasync failed in the guest (ERROR)")
                    raise ConnectionError("diskwriter closed its connection")
                if self.reports.feed(data):
                    self._progressed("disk")

    def progress(self) -> tuple[int, int, int]:
        return self.echo_rounds, self.blobs, len(self.reports.durable)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=35)


# ------------------------------------------------------------------------------------------- faults
def _qmp_path(config: dict[str, Any], side: str) -> str:
    return str(config["qmp"][side]["ops"])[len("unix:") :]


async def _wait_checkpoint_stop(config: dict[str, Any], mode: str, timeout: float) -> bool:
    """Wait for the primary's next checkpoint STOP (asking the daemon for one in COLO)."""
    from mc_driver.qmp import QmpError, QmpSession

    try:
        session = await QmpSession.connect(_qmp_path(config, "primary"), name="chaos", timeout=5)
    except QmpError:
        return False
    try:
        session.discard_events()
        if mode == "colo":
            threading.Thread(target=_ask_checkpoint, args=(config["daemon_control"],), daemon=True).start()
        await session.wait_event("STOP", timeout=timeout)
        return True
    except QmpError:
        return False
    finally:
        await session.close()


def _ask_checkpoint(control: str) -> None:
    with contextlib.suppress(Exception):
        call(control, "checkpoint", io_timeout=30)


def inject(config: dict[str, Any], plan: FaultPlan) -> str:
    """Hit the planned process; returns what was done (for the log)."""
    if plan.moment == "mid-checkpoint" and not asyncio.run(_wait_checkpoint_stop(config, plan.mode, 15.0)):
        return "no checkpoint seen"
    time.sleep(plan.delay)
    pid = int(config["pids"][plan.component])
    if plan.fault == "kill":
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 {plan.component} ({pid})"
    os.kill(pid, signal.SIGSTOP)
    time.sleep(plan.stop_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    return f"SIGSTOP {plan.component} ({pid}) for {plan.stop_seconds} s"


# ------------------------------------------------------------------------------------------ outcome
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _daemon_status(config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return call(config["daemon_control"], "status", io_timeout=5)
    except Exception:
        return None


async def _vm_state(config: dict[str, Any], side: str) -> tuple[bool, str | None] | None:
    """(running, COLO mode) of one QEMU over its ops monitor, or None when it does not answer."""
    from mc_driver.qmp import QmpError, QmpSession

    try:
        session = await asyncio.wait_for(QmpSession.connect(_qmp_path(config, side), timeout=2), 3)
    except (QmpError, TimeoutError, OSError):
        return None
    try:
        status = await asyncio.wait_for(session.execute("query-status"), 3)
        colo = await asyncio.wait_for(session.execute("query-colo-status"), 3)
        return bool(status.get("running")), colo.get("mode")
    except (QmpError, TimeoutError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), 3)


def outcome_of(status: dict[str, Any] | None, report: dict[str, Any] | None) -> tuple[str, str]:
    """The pair's state after the fault, as the operator would read it, and the reason given."""
    if report is not None and "resumed" in report:
        if not report["resumed"]:
            return "kept-paused", str(report.get("kept_paused") or "")
        return "failed-over", f"failover: {report.get('reason')}"
    if status is not None:
        if status.get("protected"):
            return "protected", ""
        state = str(status.get("state"))
        if state in ("unprotected", "failed-over", "undecided", "primary-lost"):
            return ("unprotected" if state != "undecided" else "kept-paused"), str(
                status.get("state_reason") or ""
            )
        if state == "protected":  # checkpoints run but the agent is gone
            return "unprotected", str(status.get("state_reason") or "")
    return "unknown", ""


def _records_on_disk(image: Path, run: int, upto: int) -> set[int]:
    from mc_driver.guest.expected import DISK_RECORD_SIZE, read_disk_records

    with image.open("rb") as disk:
        return read_disk_records(disk.read((upto + 1) * DISK_RECORD_SIZE), run)


# ---------------------------------------------------------------------------------------- iteration
def run_iteration(workdir: Path, plan: FaultPlan, boot_timeout: float = 180.0) -> dict[str, Any]:
    from mc_driver.launch import PairFiles
    from mc_driver.netns import NetNamespace
    from mc_driver.pair import PairConfig, down, up

    result: dict[str, Any] = {"plan": asdict(plan)}
    started = time.monotonic()
    try:
        up(PairConfig(workdir, mode=plan.mode, boot_timeout=boot_timeout,
                      guest_run=(("diskwriter", "/dev/vda", "--rate", "20"),)))  # fmt: skip
    except Exception as exc:
        down(workdir)
        result["error"] = f"pair up: {type(exc).__name__}: {exc}"
        return result
    clients: Clients | None = None
    obs = Observation()
    try:
        config = json.loads((workdir / "pair.json").read_text())
        clients = Clients(NetNamespace(config["netns"]), config["guest_ip"]).start()
        deadline = time.monotonic() + 90
        while clients.blobs < 1 or not clients.reports.durable:
            if time.monotonic() > deadline or clients.corrupt or clients.cut:
                raise ChaosError(f"no traffic before the fault: {clients.corrupt or clients.cut}")
            time.sleep(0.05)
        clients.mark()
        result["fault"] = inject(config, plan)
        fault_at = time.monotonic()
        # settle: the daemon's or the agent's verdict
        status, report = None, None
        while time.monotonic() - fault_at < SETTLE_SECONDS:
            report = _read_json(Path(config["failover_report"]))
            status = _daemon_status(config)
            obs.outcome, obs.reason = outcome_of(status, report)
            if report is not None and "resumed" in report:
                break
            if obs.outcome in ("unprotected",) or (
                obs.outcome == "protected" and time.monotonic() - fault_at > 5
            ):
                break
            time.sleep(0.25)
        # service: every client makes progress again (unless the pair is down on purpose)
        base = clients.progress()
        settled_at = time.monotonic()
        serve_deadline = settled_at + SERVE_SECONDS
        while time.monotonic() < serve_deadline:
            now = clients.progress()
            if now[0] > base[0] and now[1] > base[1] and now[2] > base[2] + 2:
                obs.served_again = True
                break
            time.sleep(0.1)
        result["settled_after"] = round(settled_at - fault_at, 2)
        result["served_after"] = round(time.monotonic() - fault_at, 2) if obs.served_again else None
        report = _read_json(Path(config["failover_report"]))
        status = _daemon_status(config)
        obs.outcome, obs.reason = outcome_of(status, report)
        states = {side: asyncio.run(_vm_state(config, side)) for side in ("primary", "secondary")}
        primary, secondary = states["primary"], states["secondary"]
        obs.both_live = bool(primary and primary[0] and secondary and secondary[0] and secondary[1] == "none")
        result["vm_states"] = {k: list(v) if v else None for k, v in states.items()}
        result["daemon_state"] = None if status is None else [status.get("state"), status.get("state_reason")]
        result["failover"] = (
            None
            if report is None
            else {
                k: report.get(k)
                for k in ("reason", "resumed", "kept_paused", "disk", "generation", "seconds", "errors")
            }
        )
        serving = "secondary" if report is not None and report.get("resumed") else "primary"
        result["serving"] = serving
    except ChaosError as exc:
        result["error"] = str(exc)
    finally:
        if clients is not None:
            result["stalls"] = clients.stalls()
            clients.finish()
            obs.corrupt, obs.cut = list(clients.corrupt), list(clients.cut)
        pids = {}
        with contextlib.suppress(Exception):
            pids = json.loads((workdir / "pair.json").read_text())["pids"]
        for pid in pids.values():  # a SIGSTOPped process must not hold up pair down
            with contextlib.suppress(OSError):
                if pid:
                    os.kill(int(pid), signal.SIGCONT)
        down(workdir)
    if "error" not in result and clients is not None and obs.outcome != "kept-paused":
        reports = clients.reports
        if reports.run is not None and reports.durable:
            files = PairFiles(workdir.resolve())
            image = files.image(result["serving"])
            on_disk = _records_on_disk(image, reports.run, max(reports.durable))
            obs.disk_checked = True
            obs.durable_records = len(reports.durable)
            obs.missing_records = len(set(reports.durable) - on_disk)
    result["observation"] = asdict(obs)
    result["outcome"] = obs.outcome
    result["violations"] = [] if "error" in result else judge(obs)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def run_chaos(iterations: int, seed: int, root: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(seed)
    results = []
    for index in range(iterations):
        plan = plan_fault(rng, index)
        progress(
            f"iteration {index + 1}/{iterations}: {plan.fault} {plan.component} ({plan.moment}, {plan.mode})"
        )
        result = run_iteration(root / f"chaos-{index}", plan)
        result["index"] = index
        progress(f"  -> {result.get('outcome')} {result.get('violations')} {result.get('error') or ''}")
        results.append(result)
    violations = Counter(v for r in results for v in r.get("violations", []))
    return {
        "iterations": iterations,
        "seed": seed,
        "per_component": summarize(results),
        "violations": dict(violations),
        "errors": sum(1 for r in results if r.get("error")),
        "results": results,
    }


def render_table(summary: dict[str, Any]) -> str:
    lines = [f"hybridft bench chaos: {summary['iterations']} iterations (seed {summary['seed']})", ""]
    lines.append(f"{'component':<10} {'runs':>4}  {'outcomes':<48} violations")
    for name, entry in summary["per_component"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(entry["outcomes"].items()))
        violations = ", ".join(f"{k} {v}" for k, v in sorted(entry["violations"].items())) or "none"
        lines.append(f"{name:<10} {entry['iterations']:>4}  {outcomes:<48} {violations}")
    lines.append("")
    lines.append(
        f"violations: {summary['violations'] or 'none'}; iterations that could not run: {summary['errors']}"
    )
    return "\n".join(lines)


@click.command("chaos")
@click.option(
    "--iterations",
    type=click.IntRange(1),
    default=6,
    show_default=True,
    help="Fresh pairs, one fault each (the components in turn).",
)
@click.option("--seed", type=int, default=None, help="Seed of the plan (default: random, printed).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the pairs live (default: a temporary directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_chaos(iterations: int, seed: int | None, workdir: Path | None, as_json: bool) -> None:
    """The failover drill: kill -9 or SIGSTOP one of the pair's processes per iteration; check every
    client byte, every acknowledged disk record, split brain, and that status says why."""
    seed = seed if seed is not None else random.randrange(1 << 31)

    def progress(message: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)

    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hft-chaos-")))
        summary = run_chaos(iterations, seed, root, progress)
    click.echo(json.dumps(summary, default=str) if as_json else render_table(summary))
    if summary["violations"]:
        raise SystemExit(1)
