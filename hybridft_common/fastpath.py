"""Which implementation of the data plane's hot loops runs: the compiled one or the Python reference.

Why a switch: the comparator, the net-filter framing and the NBD codec have their inner loops in
C (``hybridft_common/_speedups.c``, built by ``pip install -e .``) for speed, and in Python as the
readable reference that the differential tests hold the C code to.  ``HYBRIDFT_PURE_PYTHON=1``
(read once, at import) selects the reference in every process started with it, so a suspected
fast-path bug can be checked in the field by restarting a service with the variable set.  A
missing or unloadable extension (an install without a compiler) falls back to the reference
and says so in :func:`describe` (``hybridft --version`` and status show it).

Only this module imports ``_speedups``; everything else asks :data:`speedups` (``None`` = use
the reference) and binds the compiled functions from :data:`available`, so a test can run both
implementations side by side whatever the environment says.
"""

from __future__ import annotations

import os
from types import ModuleType

PURE_PYTHON_ENV = "HYBRIDFT_PURE_PYTHON"


def _pure_requested() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "").strip().lower() not in ("", "0", "no", "false")


#: the set of functions (and their contracts) the Python code expects of ``_speedups``; the C
#: file's SPEEDUPS_INTERFACE must equal it.  Bumped whenever a function is added, removed or
#: changes what it takes or returns.
INTERFACE = 6


def _load() -> tuple[ModuleType | None, ModuleType | None, str]:
    try:
        from hybridft_common import _speedups  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, None, f"pure-python (extension not built: {exc})"
    return select(_speedups, _pure_requested())


def select(_speedups: ModuleType, pure: bool) -> tuple[ModuleType | None, ModuleType | None, str]:
    """(available, speedups, description) for a loaded extension module."""
    built = getattr(_speedups, "interface", 1)
    if built != INTERFACE:
        # an extension built from other sources (a pull without a rebuild): using it would fail
        # on a missing function, or worse, misread one whose arguments changed
        return (
            None,
            None,
            (
                f"pure-python (extension out of date: interface {built}, this code needs {INTERFACE}; "
                "rebuild it with `pip install -e .` or `make setup`)"
            ),
        )
    if pure:
        return _speedups, None, f"pure-python ({PURE_PYTHON_ENV}=1)"
    return _speedups, _speedups, "compiled"


#: the extension if it is built (whatever the environment says): the differential tests run it
#: beside the reference in one process
available: ModuleType | None
#: the extension if it is built *and* selected, else None: the hot paths use this
speedups: ModuleType | None
available, speedups, _description = _load()


def describe() -> str:
    """``compiled`` or ``pure-python (why)``: for ``--version`` and status."""
    return _description
