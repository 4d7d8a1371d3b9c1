"""An experiment's TOML file, checked whole before anything starts, and the matrix it expands to.

Why strict: an experiment runs for an hour; a typo (``repetitons``) or an epoch of 0 found after
forty minutes costs the forty minutes.  So every key is known, every value has a stated range, and
the error names the key, what was given and what is allowed.  Pure: text in, frozen dataclasses out.

The file::

    seconds = 20            # measured seconds per cell (after the workload's warm-up)
    repetitions = 2
    phase_seconds = 10      # a phased workload changes character every this many seconds
    reuse_pair = true       # one pair per (repetition, mode) for all its workloads; false: one per cell
    workloads = ["cpu", "memdirty-64", "disk", "net-rr", "phased"]

    [modes]
    unreplicated = true     # the baseline every score is normalised to
    mc = [20, 100]          # MC at each of these epoch lengths (ms)
    colo = true
    auto = ["gilbert"]      # auto with each of these policies

The matrix: every workload x every mode x every repetition, ordered so that one pair serves the
cells of one (repetition, mode) group in a row (see :func:`pair_groups`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.catalog import name_problem
from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN

MODES = ("unreplicated", "mc", "colo", "auto")
TOP_KEYS = ("seconds", "repetitions", "phase_seconds", "reuse_pair", "workloads", "modes")
SECONDS_RANGE = (1.0, 3600.0)
REPETITIONS_RANGE = (1, 100)


class ConfigError(ValueError):
    """The experiment file is wrong; the message names the key, the value and what is allowed."""


@dataclass(frozen=True, slots=True, order=True)
class ModeSpec:
    """One way to run the pair: a static mode (MC with its epoch), COLO, auto with a policy, or none."""

    mode: str  # unreplicated | mc | colo | auto
    epoch_ms: int | None = None  # mc only
    policy: str | None = None  # auto only

    @property
    def label(self) -> str:
        if self.mode == "mc":
            return f"mc-{self.epoch_ms}"
        if self.mode == "auto":
            return f"auto-{self.policy}"
        return self.mode

    @property
    def static(self) -> bool:
        """A replicated mode that never switches (a candidate for best static and the oracle)."""
        return self.mode in ("mc", "colo")


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    spec: ModeSpec
    rep: int

    @property
    def id(self) -> str:
        """Stable across runs (resume keys on it) and usable as a directory name."""
        return f"{self.workload}__{self.spec.label}__rep{self.rep}"


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    workloads: tuple[str, ...]
    modes: tuple[ModeSpec, ...]
    repetitions: int = 1
    seconds: float = 20.0
    phase_seconds: float = 10.0
    reuse_pair: bool = True

    def cells(self) -> list[Cell]:
        """Every cell, grouped by (repetition, mode) so a reused pair serves its group in a row."""
        return [
            Cell(workload, spec, rep)
            for rep in range(1, self.repetitions + 1)
            for spec in self.modes
            for workload in self.workloads
        ]

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same experiment (a resumed DIR must match it)."""
        return {"seconds": self.seconds, "phase_seconds": self.phase_seconds}


def hold_out(cells: list[Cell], trained_on: Mapping[str, Collection[str]]) -> tuple[list[Cell], list[Cell]]:
    """(cells to run, cells left out): an auto cell whose policy learned from its workload is left out.

    ``trained_on`` maps a policy name to the workloads its model was trained on (``learned``: the
    model file's record).  A policy scored on the workloads it was fitted to measures its memory, not
    its judgement, so the runner evaluates it on the other workloads only and the report says so."""
    kept, left_out = [], []
    for cell in cells:
        seen = trained_on.get(cell.spec.policy or "", ()) if cell.spec.mode == "auto" else ()
        (left_out if cell.workload in seen else kept).append(cell)
    return kept, left_out


def pair_groups(cells: list[Cell], reuse_pair: bool) -> list[list[Cell]]:
    """Consecutive cells that share one pair: same repetition and mode (each cell alone without reuse)."""
    groups: list[list[Cell]] = []
    for cell in cells:
        if reuse_pair and groups and (groups[-1][0].rep, groups[-1][0].spec) == (cell.rep, cell.spec):
            groups[-1].append(cell)
        else:
            groups.append([cell])
    return groups


def _number(key: str, value: object, lo: float, hi: float, *, integer: bool = False) -> Any:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:  # type: ignore[operator]
        raise ConfigError(f"{key} = {value!r}: must be {kind} in {lo:g}..{hi:g}")
    return value


def _known_policies() -> list[str]:
    from policies.registry import list_policies

    return [info.name for info in list_policies() if info.error is None]


def _modes(table: object) -> tuple[ModeSpec, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"[modes] must be a table with keys {', '.join(MODES)}")
    unknown = sorted(set(table) - set(MODES))
    if unknown:
        raise ConfigError(f"unknown key modes.{unknown[0]} (allowed: {', '.join(MODES)})")
    specs: list[ModeSpec] = []
    for flag in ("unreplicated", "colo"):
        value = table.get(flag, False)
        if not isinstance(value, bool):
            raise ConfigError(f"modes.{flag} = {value!r}: must be true or false")
        if value and flag == "unreplicated":
            specs.append(ModeSpec("unreplicated"))
    epochs = table.get("mc", [])
    if not isinstance(epochs, list):
        raise ConfigError(f"modes.mc = {epochs!r}: must be a list of epoch lengths in ms")
    for epoch in epochs:
        _number("modes.mc epoch", epoch, EPOCH_MS_MIN, EPOCH_MS_MAX, integer=True)
    if len(set(epochs)) != len(epochs):
        raise ConfigError(f"modes.mc = {epochs!r}: an epoch length is listed twice")
    specs += [ModeSpec("mc", epoch_ms=e) for e in epochs]
    if table.get("colo", False):
        specs.append(ModeSpec("colo"))
    policies = table.get("auto", [])
    if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
        raise ConfigError(f"modes.auto = {policies!r}: must be a list of policy names")
    if policies:
        known = _known_policies()
        for policy in policies:
            if policy not in known:
                raise ConfigError(f"modes.auto: unknown policy {policy!r} (allowed: {', '.join(known)})")
    if len(set(policies)) != len(policies):
        raise ConfigError(f"modes.auto = {policies!r}: a policy is listed twice")
    specs += [ModeSpec("auto", policy=p) for p in policies]
    if not specs:
        raise ConfigError("[modes] selects no mode (set unreplicated/colo = true, or list mc / auto)")
    return tuple(specs)


def parse_config(data: dict[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from the TOML's table, or :class:`ConfigError`."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (allowed: {', '.join(TOP_KEYS)})")
    workloads = data.get("workloads")
    if not isinstance(workloads, list) or not workloads or not all(isinstance(w, str) for w in workloads):
        raise ConfigError(f"workloads = {workloads!r}: must be a non-empty list of workload names")
    for name in workloads:
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"workloads: {problem}")
    if len(set(workloads)) != len(workloads):
        raise ConfigError(f"workloads = {workloads!r}: a workload is listed twice")
    if "modes" not in data:
        raise ConfigError("missing [modes] table")
    reuse = data.get("reuse_pair", True)
    if not isinstance(reuse, bool):
        raise ConfigError(f"reuse_pair = {reuse!r}: must be true or false")
    return ExperimentConfig(
        workloads=tuple(workloads),
        modes=_modes(data["modes"]),
        repetitions=_number("repetitions", data.get("repetitions", 1), *REPETITIONS_RANGE, integer=True),
        seconds=float(_number("seconds", data.get("seconds", 20.0), *SECONDS_RANGE)),
        phase_seconds=float(_number("phase_seconds", data.get("phase_seconds", 10.0), *SECONDS_RANGE)),
        reuse_pair=reuse,
    )


def load_config(path: Path) -> ExperimentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
