"""Workload names -> factories: the one place the runner learns what ``cpu`` or ``net-rr`` means.

Why lazy.  The network and phased workloads live in modules of their own (``experiments.net_workloads``,
``experiments.phased``) that may not exist in a given checkout yet, or may fail to import; a config that
names them must still run every other cell.  So names are checked without importing anything
(:func:`name_problem`), and a factory imports its module only when its cell runs; a missing module is a
:class:`CatalogError` for that cell alone, which the runner records like any failed cell.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from experiments.workload import Workload

MEMDIRTY = re.compile(r"memdirty-(\d+)")
MEMDIRTY_RATES = (1, 4096)  # MiB/s, inclusive

#: fixed names -> (module, attribute) of the workload's class
FIXED: dict[str, tuple[str, str]] = {
    "cpu": ("experiments.guest_workloads", "Cpu"),
    "disk": ("experiments.guest_workloads", "Disk"),
    "net-rr": ("experiments.net_workloads", "NetRR"),
    "net-stream": ("experiments.net_workloads", "NetStream"),
    "net-divergent": ("experiments.net_workloads", "NetDivergent"),
    "phased": ("experiments.phased", "Phased"),
}


class CatalogError(Exception):
    """The workload cannot be built (unknown name, or its module is missing or broken)."""


def allowed_names() -> str:
    lo, hi = MEMDIRTY_RATES
    return ", ".join([*FIXED, f"memdirty-<rate MiB/s {lo}..{hi}>"])


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a workload name (None: it is one), without importing anything."""
    if name in FIXED:
        return None
    match = MEMDIRTY.fullmatch(name)
    if match:
        rate = int(match.group(1))
        lo, hi = MEMDIRTY_RATES
        return None if lo <= rate <= hi else f"memdirty rate {rate} is outside {lo}..{hi} MiB/s"
    return f"unknown workload {name!r} (allowed: {allowed_names()})"


def _load(module: str, attribute: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]
    except ModuleNotFoundError as exc:
        raise CatalogError(f"{module} is not available in this checkout ({exc})") from None
    except AttributeError:
        raise CatalogError(f"{module} has no {attribute}") from None
    except Exception as exc:  # a broken module fails its cells, not the matrix
        raise CatalogError(f"{module} does not import: {type(exc).__name__}: {exc}") from None


def build(name: str, *, phase_seconds: float) -> Workload:
    """The workload called ``name``; ``phase_seconds`` reaches a phased workload that takes it (as
    ``phase_s`` or ``phase_seconds``)."""
    problem = name_problem(name)
    if problem:
        raise CatalogError(problem)
    match = MEMDIRTY.fullmatch(name)
    if match:
        factory = _load("experiments.guest_workloads", "MemDirty")
        return factory(int(match.group(1)))  # type: ignore[no-any-return]
    factory = _load(*FIXED[name])
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    for keyword in ("phase_s", "phase_seconds"):  # experiments.phased.Phased takes phase_s
        if keyword in params:
            kwargs[keyword] = phase_seconds
    try:
        workload = factory(**kwargs)
    except Exception as exc:
        raise CatalogError(f"cannot build workload {name}: {type(exc).__name__}: {exc}") from None
    if not isinstance(workload, Workload):
        raise CatalogError(f"{FIXED[name][0]}.{FIXED[name][1]} is not a Workload (no name/unit/run)")
    return workload
