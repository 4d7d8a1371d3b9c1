"""The event loop each asyncio service runs on: uvloop where it measured faster, else asyncio's own.

Why a choice per service: uvloop (libuv, Cython) does the event loop's own work (readiness
callbacks, transport writes, timers) in C, which should lower per-request cost -- but measured on
this machine (issue 14's closing note has the numbers) it did not help every service: the
comparator, whose sockets are driven by ``add_reader``/``add_writer`` callbacks, held frames
longer under uvloop at the same load, so it keeps the standard loop.  :data:`DEFAULT_LOOP` records
what each service runs by default; ``HYBRIDFT_EVENT_LOOP=uvloop|asyncio`` overrides it for every
service of the process (to rule uvloop in or out when chasing a bug), and an install without
uvloop falls back to asyncio.  :func:`loop_name` says which one a service runs; ``hybridft
--version`` and the services' stats/status report it.
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

#: the loop each service runs unless HYBRIDFT_EVENT_LOOP says otherwise (measured, see above)
DEFAULT_LOOP: dict[str, str] = {
    "compare": "asyncio",
    "disk": "uvloop",
    "daemon": "asyncio",
    "agent": "asyncio",
}


def _wanted(service: str) -> str:
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or DEFAULT_LOOP[service]
    if choice not in _CHOICES:
        raise ValueError(f"{EVENT_LOOP_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def loop_name(service: str) -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` gives ``service`` in this process."""
    if _wanted(service) == "uvloop" and importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return "asyncio"


def loop_factory(service: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name(service) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], service: str) -> T:
    """``asyncio.run(main)`` on ``service``'s loop (a key of :data:`DEFAULT_LOOP`)."""
    with asyncio.Runner(loop_factory=loop_factory(service)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The loop actually running in this thread (for stats), ``none`` outside a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def runtime_summary() -> str:
    """One line for ``--version``: the data plane's implementation and the services' event loop."""
    from hybridft_common import fastpath

    try:
        loops = ", ".join(f"{service} {loop_name(service)}" for service in DEFAULT_LOOP)
    except ValueError as exc:  # a bad HYBRIDFT_EVENT_LOOP: say so rather than fail --version
        loops = str(exc)
    return f"data plane: {fastpath.describe()}; event loops: {loops}"
