"""The experiment runner's shell: pairs up and down, cells run, results appended, a progress bar.

The decisions are elsewhere (pure): the matrix and its pair groups (:mod:`experiments.config`), what
a cell's pair did (:mod:`experiments.meter`), results and resume (:mod:`experiments.results`), the
headline (:mod:`experiments.headline`).  This module does the I/O in a fixed order:

for every group of cells sharing one (repetition, mode) -- see :func:`experiments.config.pair_groups`:

1. ``pair down`` on the group's directory (a run killed with -9 may have left its pair), ``pair up``
   in the group's mode (auto: with the policy; unreplicated: MC, then the secondary is killed and
   the daemon runs unprotected, the baseline ``hybridft bench pair`` measures, see
   :meth:`bench.pair.PairHandle.go_unreplicated`);
2. per cell: put the pair at the cell's starting point (static: the mode and epoch; auto: MC at the
   default epoch, then ``mode auto`` with the policy, so every auto cell starts from the same point with
   a fresh policy and guard), run the workload while a thread polls the daemon, copy the decision
   trace lines of the cell into the cell's directory, append the cell's line;
3. ``pair down``.

A pair is reused by the cells of one group (``reuse_pair = true``, the default): the workloads run one
after the other on the same pair, each from an idle guest (a workload stops its guest program).  It is
fair because every mode gets the same treatment; a failed cell's pair is replaced before the next cell.

Ctrl-C (or SIGTERM) stops the run: the pair is torn down (no QEMU, namespace or socket is left), the
interrupted cell is not recorded, and ``run`` on the same directory continues with it.  While a pair
comes up or goes down the signal is held until that step ends (:func:`signals_deferred`), so a
teardown is never cut short and a pair coming up is never lost before the runner can stop it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.catalog import CatalogError, build
from experiments.config import Cell, ExperimentConfig, ModeSpec, hold_out, pair_groups
from experiments.headline import headline, write_headline
from experiments.meter import PairMeter
from experiments.results import (
    LEARNED_JSON,
    CellRecord,
    PhaseRecord,
    append_cell,
    finished_ids,
    load_cells,
    trace_lines_between,
    write_csv,
)
from experiments.workload import Workload, WorkloadResult, WorkloadTarget
from hybridft_common.processes import cpu_seconds
from hybridft_common.stats import percentile
from hybridft_common.vocabulary import DEFAULT_EPOCH_MS

EXPERIMENT_JSON = "experiment.json"
PAIR_DISK_MIB = 256  # the diskwriter's records must not fill the disk within a long cell
POLL_STATUS_S = 0.5
POLL_HISTORY_S = 2.0
SETTLE_S = 1.0  # after the pair reached the cell's starting point, before the workload starts
CELL_OVERHEAD_S = 25.0  # first guess of a cell's time beyond its seconds (pair up, warm-up), for the ETA


class RunnerError(Exception):
    """The run cannot start (the directory holds another experiment, ...)."""


class CellFailed(Exception):
    pass


# ------------------------------------------------------------------------------------------- the pair
@dataclass
class LivePair:
    """A pair brought up for one group of cells."""

    workdir: Path
    spec: ModeSpec
    handle: Any  # bench.pair.PairHandle
    cells_served: int = 0

    @property
    def target(self) -> WorkloadTarget:
        config = self.handle.config
        return WorkloadTarget(config["netns"], config["guest_ip"], config["guest_control"]["primary"])


def pair_up(workdir: Path, spec: ModeSpec) -> LivePair:
    from bench.pair import PairHandle
    from hybridft_common.settings import load_settings
    from mc_driver.pair import down, load_pair, up
    from mc_driver.pair_cli import pair_config

    down(workdir)  # whatever a killed run left in this directory
    mode = "mc" if spec.mode == "unreplicated" else spec.mode
    settings = load_settings(None).with_overrides("pair", disk_mib=PAIR_DISK_MIB)
    settings = settings.with_overrides(
        "protection", mode=mode, epoch_ms=spec.epoch_ms or DEFAULT_EPOCH_MS, policy=spec.policy
    )
    up(pair_config(workdir, settings))
    handle = PairHandle(workdir, load_pair(workdir / "pair.json"))
    live = LivePair(workdir, spec, handle)
    try:
        if spec.mode == "unreplicated":
            handle.go_unreplicated()
    except BaseException:
        pair_down(live)
        raise
    return live


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C / SIGTERM during the block are held and raised as KeyboardInterrupt after it: a teardown
    cut short would leave the namespace (or a QEMU) behind."""
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: nothing to defer
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            raise KeyboardInterrupt


def pair_down(live: LivePair) -> None:
    from mc_driver.pair import down

    with signals_deferred():
        down(live.workdir)
    for image in live.workdir.glob("*.img"):  # sparse, but nobody reads them again
        image.unlink(missing_ok=True)
    shutil.rmtree(live.workdir / "disk-state", ignore_errors=True)


def keep_evidence(live: LivePair, cell_dir: Path) -> None:
    """Before a failed cell's pair goes down: the daemon's status and the pair's logs into the cell's
    directory (the next pair in the same directory starts with fresh logs)."""
    with contextlib.suppress(Exception):
        cell_dir.mkdir(parents=True, exist_ok=True)
        logs = cell_dir / "pair-logs"
        logs.mkdir(exist_ok=True)
        for log in live.workdir.glob("*.log"):
            shutil.copyfile(log, logs / log.name)
        (cell_dir / "status-at-failure.json").write_text(json.dumps(live.handle.daemon("status"), indent=1))


def sweep_pairs(out: Path) -> list[str]:
    """``pair down`` every pair directory of this run: a run killed with -9 may have left one up, also
    one whose cells are all done (so no later group would come back to its directory)."""
    from mc_driver.pair import down

    stopped = []
    root = pair_root(out)
    if root.is_dir():
        with signals_deferred():
            for workdir in sorted(p for p in root.iterdir() if p.is_dir()):
                if down(workdir)["stopped"]:
                    stopped.append(workdir.name)
    return stopped


def start_point(live: LivePair, spec: ModeSpec) -> None:
    """Put the pair at the cell's starting point (see the module docstring)."""
    if spec.mode == "unreplicated":
        if live.handle.daemon("status")["state"] != "unprotected":
            raise CellFailed("the unreplicated pair is no longer unprotected")
        return
    if spec.mode == "auto":
        live.handle.set_mode("mc", DEFAULT_EPOCH_MS)
        reply = live.handle.daemon("mode", mode="auto", policy=spec.policy)
        if not reply.get("auto"):
            raise CellFailed(f"the daemon did not engage policy {spec.policy}: {reply}")
        return
    live.handle.set_mode(spec.mode, spec.epoch_ms if spec.mode == "mc" else None)


# ------------------------------------------------------------------------------------- one cell
@dataclass
class _Poller:
    """Polls the daemon (and the QEMUs' CPU) on a thread while the workload runs."""

    live: LivePair
    meter: PairMeter
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        next_history = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                self.meter.feed_status(now, self.live.handle.daemon("status"))
                if now >= next_history:
                    self.meter.feed_history(self.live.handle.daemon("history")["checkpoints"])
                    next_history = now + POLL_HISTORY_S
            except Exception as exc:  # recorded; the workload's own result decides the cell
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(POLL_STATUS_S)


def _cpu_seconds(pid: int) -> float | None:
    """None for a process that is gone (its cell then reports no CPU figure)."""
    import psutil

    try:
        return cpu_seconds(pid)
    except (psutil.Error, ValueError):
        return None


def _copy_trace(live: LivePair, cell_dir: Path, t0: float, t1: float) -> list[str]:
    """The decision-trace lines of the cell (monotonic ``t`` in [t0, t1]) into the cell's directory."""
    source = live.workdir / "decisions.jsonl"
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        lines = trace_lines_between(source.read_text().splitlines(), t0, t1)
    if lines:
        (cell_dir / "decisions.jsonl").write_text("\n".join(lines) + "\n")
    return lines


def run_cell(
    live: LivePair, cell: Cell, workload: Workload, config: ExperimentConfig, cell_dir: Path
) -> CellRecord:
    start_point(live, cell.spec)
    time.sleep(SETTLE_S)
    pids = live.handle.config["pids"]
    cpu0 = {side: _cpu_seconds(pids[side]) for side in ("primary", "secondary")}
    wall0, t0 = time.time(), time.monotonic()
    meter = PairMeter(wall_start=wall0)
    poller = _Poller(live, meter)
    thread = threading.Thread(target=poller.run, name="experiment-poller", daemon=True)
    marks: list[tuple[int, str, float]] = []
    thread.start()
    try:
        result = workload.run(
            live.target, config.seconds, lambda i, name, s: marks.append((i, name, time.monotonic()))
        )
    finally:
        poller.stop.set()
        thread.join(10)
    t1 = time.monotonic()
    with contextlib.suppress(Exception):
        meter.feed_status(t1, live.handle.daemon("status"))
        meter.feed_history(live.handle.daemon("history")["checkpoints"])
    cpu = {
        side: None
        if before is None or (after := _cpu_seconds(pids[side])) is None
        else (after - before) / (t1 - t0)
        for side, before in cpu0.items()
    }
    cell_dir.mkdir(parents=True, exist_ok=True)
    trace_lines = _copy_trace(live, cell_dir, t0, t1)
    _write_cell_files(cell_dir, result, meter, marks, t0, trace_lines)
    return _record(cell, result, meter, cpu, live.cells_served > 0, wall0, t1 - t0, poller.errors)


def _write_cell_files(
    cell_dir: Path,
    result: WorkloadResult,
    meter: PairMeter,
    marks: list[tuple[int, str, float]],
    t0: float,
    trace_lines: list[str],
) -> None:
    from experiments.report import trace_points

    latencies = [v for p in result.phases for v in p.latencies_ms]
    (cell_dir / "latencies.json").write_text(json.dumps(latency_sample(latencies)))
    timeline = {
        "t0": t0,  # monotonic, like the decision trace's t
        "phases": [{"index": i, "name": name, "t": t} for i, name, t in marks],
        "modes": [{"t": t, "mode": mode, "epoch_ms": epoch} for t, mode, epoch in meter.mode_samples],
        "decisions": trace_points(trace_lines),
    }
    (cell_dir / "timeline.json").write_text(json.dumps(timeline))


LATENCIES_KEPT = 5000


def latency_sample(latencies: list[float], keep: int = LATENCIES_KEPT) -> list[float]:
    """What ``latencies.json`` keeps for the CDF plot: every value, or ``keep`` evenly spaced order
    statistics of them (the CDF's shape survives; the cell's p50/p99 are computed from all values)."""
    ordered = sorted(latencies)
    if len(ordered) > keep:
        step = (len(ordered) - 1) / (keep - 1)
        ordered = [ordered[round(i * step)] for i in range(keep)]
    return [round(v, 3) for v in ordered]


def _record(
    cell: Cell,
    result: WorkloadResult,
    meter: PairMeter,
    cpu: dict[str, float | None],
    reused: bool,
    wall0: float,
    wall_s: float,
    poll_errors: list[str],
) -> CellRecord:
    errors = [*result.errors, *(e for p in result.phases for e in p.errors)]
    if not result.phases and not errors:
        errors.append("the workload reported no phase")
    latencies = [v for p in result.phases for v in p.latencies_ms]
    figures = meter.summary()
    if poll_errors and not meter.statuses:
        errors.append(f"the daemon did not answer: {poll_errors[0]}")
    return CellRecord(
        id=cell.id,
        workload=cell.workload,
        mode=cell.spec.mode,
        policy=cell.spec.policy,
        epoch_ms=cell.spec.epoch_ms,
        rep=cell.rep,
        ok=not errors,
        error="; ".join(errors[:5]) or None,
        unit=result.unit,
        score=result.score if result.phases else None,
        seconds=sum(p.seconds for p in result.phases) if result.phases else None,
        phases=tuple(PhaseRecord(p.name, p.start_s, p.end_s, p.work, p.score) for p in result.phases),
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p99_ms=percentile(latencies, 0.99),
        cpu_primary=cpu["primary"],
        cpu_secondary=cpu["secondary"] if cell.spec.mode != "unreplicated" else None,
        pair_reused=reused,
        wall_s=round(wall_s, 3),
        started=wall0,
        **figures,
    )


def failed_record(cell: Cell, error: str, *, reused: bool = False) -> CellRecord:
    return CellRecord(
        id=cell.id,
        workload=cell.workload,
        mode=cell.spec.mode,
        policy=cell.spec.policy,
        epoch_ms=cell.spec.epoch_ms,
        rep=cell.rep,
        ok=False,
        error=error,
        pair_reused=reused,
        started=time.time(),
    )


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Progress:
    """What the progress display needs; the CLI passes a rich-backed one."""

    on_start: Callable[[Cell, int, int, float], None] = lambda cell, done, total, eta: None
    on_done: Callable[[CellRecord, int, int], None] = lambda record, done, total: None
    on_note: Callable[[str], None] = lambda text: None


def check_directory(out: Path, config: ExperimentConfig, config_path: Path | None) -> None:
    """A directory holds one experiment: a resumed run must ask for the same cell length."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXPERIMENT_JSON
    identity = config.identity()
    if path.exists():
        recorded = json.loads(path.read_text())
        old = recorded.get("identity", {})
        if old != identity:
            raise RunnerError(
                f"{out} holds an experiment with {old}, this config asks for {identity}: use another --out"
            )
        return
    path.write_text(
        json.dumps({"identity": identity, "config": str(config_path) if config_path else None}) + "\n"
    )


def pair_root(out: Path) -> Path:
    """Where the run's pairs live: a short path derived from ``out`` (unix socket paths are limited to
    107 bytes, and a killed run's pair is found again from it by the next run's ``pair down``)."""
    digest = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"hftx-{digest}"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM tears down like Ctrl-C (the handler raises KeyboardInterrupt in the main thread)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def refresh_outputs(out: Path) -> list[CellRecord]:
    records = load_cells(out)
    write_csv(out, records)
    write_headline(out, headline(records))
    return records


def planned_cells(config: ExperimentConfig, out: Path | None = None) -> list[Cell]:
    """The matrix minus the ``learned`` cells on the workloads its model was trained on (held out, see
    :func:`experiments.config.hold_out`); with ``out``, what was held out and why goes to
    ``out/learned.json`` for the report.  A model that cannot be loaded holds nothing out: its cells
    then fail with the loader's error, recorded like any failed cell."""
    cells = config.cells()
    if not any(c.spec.mode == "auto" and c.spec.policy == "learned" for c in cells):
        return cells
    from policies.learned import DEFAULT_MODEL, ModelError, load_model

    try:
        model = load_model(DEFAULT_MODEL)
    except ModelError:
        return cells
    kept, left_out = hold_out(cells, {"learned": model.workloads})
    if out is not None:
        record = {
            "model": str(DEFAULT_MODEL),
            "source": model.source,
            "samples": model.samples,
            "trained_on": list(model.workloads),
            "held_out_cells": [c.id for c in left_out],
        }
        (out / LEARNED_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return kept


def run_experiment(
    config: ExperimentConfig, out: Path, progress: Progress | None = None, config_path: Path | None = None
) -> tuple[int, int]:
    """Run every cell not yet finished in ``out``; returns (cells run now, cells of the matrix still not
    ok).  KeyboardInterrupt propagates after the pair is down."""
    progress = progress or Progress()
    check_directory(out, config, config_path)
    cells = planned_cells(config, out)
    done = finished_ids(load_cells(out))
    todo = [c for c in cells if c.id not in done]
    if len(todo) < len(cells):
        progress.on_note(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already done")
    sweep_pairs(out)
    total, ran = len(todo), 0
    durations: list[float] = []
    with _sigterm_as_interrupt():
        for group in pair_groups(todo, config.reuse_pair):
            spec = group[0].spec
            pair_dir = pair_root(out) / f"{spec.label}-r{group[0].rep}"
            live: LivePair | None = None
            try:
                for cell in group:
                    per_cell = statistics_mean(durations) or config.seconds + CELL_OVERHEAD_S
                    progress.on_start(cell, ran, total, per_cell * (total - ran))
                    started = time.monotonic()
                    cell_dir = out / "cells" / cell.id
                    try:
                        # before any pair: a workload that cannot be built fails alone, pair untouched
                        workload = build(cell.workload, phase_seconds=config.phase_seconds)
                    except CatalogError as exc:
                        workload, record = None, failed_record(cell, str(exc))
                    try:
                        if workload is not None:
                            if live is None:
                                with signals_deferred():  # Ctrl-C lands once the pair is ours to stop
                                    live = pair_up(pair_dir, spec)
                            record = run_cell(live, cell, workload, config, cell_dir)
                            live.cells_served += 1
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:
                        reused = live is not None and live.cells_served > 0
                        record = failed_record(cell, f"{type(exc).__name__}: {exc}", reused=reused)
                    if not record.ok and live is not None:
                        keep_evidence(live, cell_dir)
                        pair_down(live)  # a failed cell's pair is not trusted for the next cell
                        live = None
                    append_cell(out, record)
                    ran += 1
                    durations.append(time.monotonic() - started)
                    refresh_outputs(out)
                    progress.on_done(record, ran, total)
            finally:
                if live is not None:
                    pair_down(live)
    records = refresh_outputs(out)
    ok = finished_ids(records)
    return ran, sum(1 for c in cells if c.id not in ok)


def statistics_mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
