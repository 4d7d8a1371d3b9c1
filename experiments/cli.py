"""``hybridft experiment run|report``: the matrix on real pairs, and its tables and plots.

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
    from experiments.runner import RunnerError, planned_cells, run_experiment

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
        task = bar.add_task("starting", total=len(planned_cells(config)), left="?")

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
