"""``hybridft experiment run|report|train|versus``: the matrix on real pairs, its tables and plots, the
learned policy's training, and a live run beside a reference run.

A thin shell: options, the rich progress bar (the cell running and the time left), exit codes.
``run`` exits 0 only when every cell of the matrix has run without error (now or in an earlier run on
the same directory), 1 when some cell failed (recorded with its error; ``run`` again retries it),
130 after Ctrl-C (the pair is down; ``run`` again continues).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group("experiment")
def experiment() -> None:
    """Run a matrix of workloads x modes on real pairs; tables and plots of the results."""


@experiment.command("run")
@click.argument("config_path", metavar="CONFIG.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results directory (default: experiments/results/<config name>); run again on it to resume.",
)
@click.option("--no-report", is_flag=True, help="Do not write the report and plots at the end.")
def run_command(config_path: Path, out: Path | None, no_report: bool) -> None:
    """Run every cell of CONFIG.toml not yet done in --out; cells.csv and headline.json after each."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from experiments.config import Cell, ConfigError, load_config
    from experiments.results import CellRecord
    from experiments.runner import Progress as RunProgress
    from experiments.runner import RunnerError, run_experiment

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    out = (out or Path("experiments/results") / config_path.stem).resolve()
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left ~{task.fields[left]}"),
        console=console,
    )

    def left(seconds: float) -> str:
        return f"{int(seconds // 60)}:{int(seconds % 60):02d}"

    with bar:
        # the total comes with the first cell (run_experiment plans the matrix, loading a learned model once)
        task = bar.add_task("starting", total=None, left="?")

        def on_start(cell: Cell, done: int, total: int, eta: float) -> None:
            bar.update(task, description=f"[bold]{cell.id}", total=total, completed=done, left=left(eta))

        def on_done(record: CellRecord, done: int, total: int) -> None:
            verdict = (
                f"score {record.score:.4g} {record.unit}/s" if record.ok else f"[red]FAILED: {record.error}"
            )
            bar.console.log(f"{record.id}: {verdict}")
            bar.update(task, completed=done)

        progress = RunProgress(on_start, on_done, lambda text: bar.console.log(text))
        try:
            ran, missing = run_experiment(config, out, progress, config_path)
        except RunnerError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            console.print(
                f"interrupted: the pair is down; "
                f"`hybridft experiment run {config_path} --out {out}` continues"
            )
            sys.exit(130)
    if not no_report:
        from experiments.report import write_report

        try:
            report = write_report(out)
            console.print(f"report: {report}")
        except Exception as exc:  # the results are safe; a plotting problem must not hide them
            console.print(f"[red]report failed: {type(exc).__name__}: {exc}")
    click.echo(f"{ran} cells run now; results in {out} (cells.csv, headline.json)")
    if missing:
        click.echo(f"{missing} cells did not run without error (see cells.csv 'error'); run again to retry")
        sys.exit(1)


@experiment.command("report")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
def report_command(directory: Path) -> None:
    """Write DIR/report.md and the PNG plots from DIR's results."""
    from experiments.report import write_report

    click.echo(str(write_report(directory)))


@experiment.command("versus")
@click.argument(
    "probe_json", metavar="PROBE.json", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--reference",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("experiments/results/full"),
    show_default=True,
    help="A results directory whose runs of the same workload give the static modes' phase scores.",
)
@click.option("--workload", default="phased", show_default=True, help="The reference runs' workload.")
@click.option("--policy", default="auto", show_default=True, help="What the live run was (the column title).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The live pair's --workdir: its decision trace becomes a timeline plot (--plot).",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Where the timeline PNG goes.")
def versus_command(
    probe_json: Path, reference: Path, workload: str, policy: str, workdir: Path | None, plot: Path | None
) -> None:
    """A live phased run (``probe workload``'s JSON line) beside a reference run's phase scores: one row
    per phase, the live rate first, then each mode of the reference run, labelled as such."""
    import json

    from rich.console import Console
    from rich.table import Table

    from experiments.report import plot_timeline
    from experiments.results import load_cells
    from experiments.versus import ProbeError, live_phases, reference_columns, summary_rows, timeline_of

    try:
        probe = json.loads(probe_json.read_text().strip().splitlines()[-1])
        live = live_phases(probe)
    except (ValueError, IndexError, ProbeError) as exc:
        raise click.ClickException(f"{probe_json}: {exc}") from None
    records = load_cells(reference)
    columns = reference_columns(records, workload, [p.name for p in live])
    if not columns:
        raise click.ClickException(f"{reference} has no ok runs of {workload} with these phases")
    table = Table(title=f"{workload}: this run beside the reference run {reference} (units/s)")
    table.add_column("run")
    for k, phase in enumerate(live):
        table.add_column(f"phase {k}: {phase.name}", justify="right")
    table.add_column("score", justify="right")
    for k, row in enumerate(summary_rows(live, columns, f"this run: {policy}")):
        table.add_row(*row, style="bold" if k == 0 else "dim")
    Console().print(table)
    click.echo(
        "The reference columns are not measured now: they are the means over the shipped run's "
        "repetitions on the same phases; `oracle` takes the best static mode per phase, switching for free."
    )
    if workdir is not None and plot is not None and "t0" in probe:
        trace = workdir / "decisions.jsonl"
        lines = trace.read_text().splitlines() if trace.exists() else []
        timeline, kept = timeline_of(lines, float(probe["t0"]), live)
        cell_dir = plot.with_suffix("")
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "timeline.json").write_text(json.dumps(timeline))
        (cell_dir / "decisions.jsonl").write_text("".join(line + "\n" for line in kept))
        if plot_timeline(cell_dir, f"{workload}, {policy} (this run)", plot):
            click.echo(f"plot: {plot.resolve()}")
        else:
            click.echo("no decisions in the run's time: no plot")


@experiment.command("train")
@click.argument(
    "directories", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("policies/models/learned.skops"),
    show_default=True,
    help="The model file (the learned policy's default is the one shown).",
)
@click.option(
    "--settle-s", default=1.0, show_default=True, help="Seconds after a phase change before windows count."
)
@click.option("--average-s", default=1.0, show_default=True, help="Seconds each feature is averaged over.")
def train_command(directories: tuple[Path, ...], out: Path, settle_s: float, average_s: float) -> None:
    """Fit the learned policy on the auto cells' windows of DIRECTORIES, labelled by the oracle."""
    from collections import Counter

    from experiments.train import labelled_windows, train
    from policies.learned import ModelError

    try:
        model = train(list(directories), out, settle_s=settle_s, average_s=average_s)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    counts = Counter(
        item.label
        for d in directories
        for item in labelled_windows(d, settle_s=settle_s, average_s=average_s)
    )
    click.echo(
        f"{out}: {model.samples} windows from {', '.join(model.workloads)}, "
        f"labels {dict(sorted(counts.items()))}"
    )
    click.echo("an experiment runs `learned` only on other workloads (held out)")
