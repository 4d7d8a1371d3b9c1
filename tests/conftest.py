"""Suite-wide settings, shared fixtures and the plugins that hold the rest.

Hypothesis deadlines are timing assertions: on a loaded 2-core CI machine a correct example can take
longer than 200 ms, and speed goals belong in benchmarks (``hybridft bench``), not in tests.  So the
suite runs hypothesis without deadlines; everything else about the properties is unchanged.

Plugins: ``tests.helpers.daemon_harness`` (a real COLO pair, its services and the daemon, as
fixtures), ``tests.helpers.marker_guard`` (fails a test that starts QEMU or a network namespace
without the ``qemu`` / ``netns`` marker), ``pytester`` (to test the guard).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers.scratch import RAM_DIR

pytest_plugins = ["tests.helpers.daemon_harness", "tests.helpers.marker_guard", "pytester"]

settings.register_profile("hybridft", deadline=None)
settings.load_profile("hybridft")


@pytest.fixture
def crash_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for state that tests kill -9 and recover: on tmpfs when there is one (RAM_DIR)."""
    if not RAM_DIR.is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="hft-crash-", dir=RAM_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
