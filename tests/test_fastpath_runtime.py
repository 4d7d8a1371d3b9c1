"""Which data-plane implementation and event loop a process runs, and how to choose them.

``HYBRIDFT_PURE_PYTHON=1`` must select the Python reference in every hot path (read at import, so
checked in a fresh interpreter); ``HYBRIDFT_EVENT_LOOP`` must override each service's default loop;
``hybridft --version`` says both.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from hybridft_common import eventloop, fastpath
from hybridft_common.cli import hybridft_command

_PROBE = """
from colo_compare import core, transport
from disk_buffer import nbd
from hybridft_common import fastpath
print(fastpath.describe())
print(core.Comparator._feed_colo_primary.__name__, core.Comparator._advance_tcp.__name__)
print(transport.FrameDecoder._parse.__name__, transport.encode_frames.__name__)
print(nbd.RequestParser.next_request.__name__)
"""


def _probe(pure: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop(fastpath.PURE_PYTHON_ENV, None)
    if pure is not None:
        env[fastpath.PURE_PYTHON_ENV] = pure
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return done.stdout.splitlines()


def test_compiled_by_default_when_built() -> None:
    assert fastpath.available is not None, "the extension is not built: run `pip install -e .`"
    lines = _probe(None)
    assert lines[0] == "compiled"
    assert lines[1:] == [
        "_feed_colo_primary_compiled _advance_tcp_compiled",
        "_parse_compiled encode_frames_compiled",
        "next_request_compiled",
    ]


@pytest.mark.parametrize("value", ["1", "yes"])
def test_pure_python_env_selects_every_reference(value: str) -> None:
    lines = _probe(value)
    assert lines[0] == "pure-python (HYBRIDFT_PURE_PYTHON=1)"
    assert lines[1:] == [
        "_feed_colo_primary_python _advance_tcp_python",
        "_parse_python encode_frames_python",
        "next_request_python",
    ]


def test_pure_python_env_zero_keeps_the_compiled_path() -> None:
    assert _probe("0")[0] == "compiled"


@pytest.mark.parametrize("service", sorted(eventloop.DEFAULT_LOOP))
@pytest.mark.parametrize("override", [None, "asyncio", "uvloop"])
def test_each_service_runs_its_loop(
    service: str, override: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if override is None:
        monkeypatch.delenv(eventloop.EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(eventloop.EVENT_LOOP_ENV, override)
    want = override or eventloop.DEFAULT_LOOP[service]

    async def which() -> str:
        await asyncio.sleep(0)
        return eventloop.running_loop_name()

    assert eventloop.loop_name(service) == want
    assert eventloop.run(which(), service) == want


def test_bad_loop_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.EVENT_LOOP_ENV, "trio")
    with pytest.raises(ValueError, match="HYBRIDFT_EVENT_LOOP"):
        eventloop.loop_name("compare")


def test_version_names_the_data_plane_and_the_loops() -> None:
    env = dict(os.environ)
    env.pop(fastpath.PURE_PYTHON_ENV, None)
    env[eventloop.EVENT_LOOP_ENV] = "asyncio"
    done = subprocess.run(
        [*hybridft_command(), "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert "data plane: compiled" in done.stdout
    assert "event loops: compare asyncio, disk asyncio, daemon asyncio, agent asyncio" in done.stdout


def test_the_built_extension_has_the_interface_the_code_expects() -> None:
    assert fastpath.available is not None, "the compiled fast path is not built: run `pip install -e .`"
    assert fastpath.available.interface == fastpath.INTERFACE


def test_an_extension_built_from_other_sources_is_refused() -> None:
    """A pull without a rebuild leaves an older _speedups: the reference runs, and says why."""
    import types

    old = types.ModuleType("hybridft_common._speedups")  # an older build had no interface number
    available, speedups, why = fastpath.select(old, pure=False)
    assert available is None and speedups is None
    assert "out of date" in why and "pip install -e ." in why
    old.interface = fastpath.INTERFACE  # type: ignore[attr-defined]
    assert fastpath.select(old, pure=False) == (old, old, "compiled")
    assert fastpath.select(old, pure=True)[:2] == (old, None)
