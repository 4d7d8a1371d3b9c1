"""Which implementation of the data plane's hot loops runs: the compiled one or the Python reference.

Why a switch: the comparator, the net-filter framing and the NBD codec have their inner loops in
C (``hybridft_common/_speedups.c``, built by ``pip install -e .``) for speed, and in Python as the
readable reference that the differential tests hold the C code to.  ``HYBRIDFT_PURE_PYTHON=1``
(read once, at import) selects the reference in every process started with it, so a suspected
fast-path bug can be checked in the field by restarting a service with the variable set.  A
missing or unloadable extension (an install without a compiler) falls back to the reference
and says so in :func:`describe` (``hybridft --version`` and status show it).

Only this module imports ``_speedups``; everything else asks :data:`speedups` (``None`` = use
the reference).
"""

from __future__ import annotations

import os
from types import ModuleType

PURE_PYTHON_ENV = "HYBRIDFT_PURE_PYTHON"


def _pure_requested() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "").strip().lower() not in ("", "0", "no", "false")


def _load() -> tuple[ModuleType | None, str]:
    if _pure_requested():
        return None, f"pure-python ({PURE_PYTHON_ENV}=1)"
    try:
        from hybridft_common import _speedups  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"pure-python (extension not built: {exc})"
    return _speedups, "compiled"


speedups, _description = _load()


def load_compiled() -> ModuleType:
    """The extension regardless of the environment variable (the differential tests run both);
    raises ImportError when it is not built."""
    from hybridft_common import _speedups  # type: ignore[attr-defined]

    return _speedups


def describe() -> str:
    """``compiled`` or ``pure-python (why)``: for ``--version`` and status."""
    return _description
