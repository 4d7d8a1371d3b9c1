"""The event loop every asyncio service runs on: uvloop where it is installed, else asyncio's own.

Why uvloop: the comparator, the disk server, the daemon and the agent spend a real share of each
request in the event loop itself (readiness callbacks, transport writes, timers).  uvloop (libuv,
Cython) does that work in C; measured on this machine it lowers the comparator's and the disk
server's per-frame / per-request cost (see issue 14's closing note for the numbers).  The standard
loop stays the fallback: ``HYBRIDFT_EVENT_LOOP=asyncio`` selects it (to rule uvloop out when
chasing a bug), and so does an install without uvloop.  :func:`loop_name` says which one a
process runs; ``hybridft --version`` and the services' stats report it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOP_ENV = "HYBRIDFT_EVENT_LOOP"
_CHOICES = ("uvloop", "asyncio")


def _wanted() -> str:
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or "uvloop"
    if choice not in _CHOICES:
        raise ValueError(f"{EVENT_LOOP_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` uses in this process (no import needed)."""
    if _wanted() == "uvloop" and importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return "asyncio"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the selected loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The loop actually running in this thread (for stats); :func:`loop_name` outside a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return loop_name()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def runtime_summary() -> str:
    """One line for ``--version``: the data plane's implementation and the services' event loop."""
    from hybridft_common import fastpath

    return f"data plane: {fastpath.describe()}; event loop: {loop_name()}"
