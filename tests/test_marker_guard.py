"""The marker guard (tests/helpers/marker_guard.py) traces QEMU processes and namespaces to the test
that started them, and fails an unmarked test -- so ``make test-fast`` can trust the markers.

A copy of ``sleep`` named ``qemu-system-x86_64`` stands in for QEMU (the guard goes by process name),
and a file in a stand-in ``/run/netns`` for a namespace: no QEMU and no root needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.marker_guard import ENV, Check, find_violations

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    sleep = shutil.which("sleep")
    assert sleep is not None
    fake = tmp_path / "qemu-system-x86_64"
    shutil.copy(sleep, fake)
    return fake


@pytest.fixture
def reaped() -> Iterator[list[int]]:
    """Pids to kill after the test (fake QEMUs left running on purpose)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_qemu_process_is_traced_to_the_test_that_started_it(fake_qemu: Path) -> None:
    proc = subprocess.Popen([fake_qemu, "30"], env={**os.environ, ENV: "tests/test_x.py::test_y"})
    try:
        deadline = time.monotonic() + 10
        found: list[str] = []
        while not found and time.monotonic() < deadline:  # until the child has exec'd
            found = find_violations(Check("tests/test_x.py::test_y", qemu=True, netns=False))
            time.sleep(0.01)
        assert len(found) == 1 and f"pid {proc.pid}" in found[0] and "qemu-system-x86_64 30" in found[0]
        # another test's id, or a test marked qemu, or one whose id is a prefix: nothing
        assert find_violations(Check("tests/test_x.py::test_z", qemu=True, netns=True)) == []
        assert find_violations(Check("tests/test_x.py::test_y", qemu=False, netns=False)) == []
        assert find_violations(Check("tests/test_x.py::test", qemu=True, netns=False)) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_namespace_is_traced_to_its_creator(tmp_path: Path) -> None:
    mine = f"hft-{os.getpid()}-7"
    for name in (mine, "hft-1-0", "other-ns"):  # pid 1 does not carry the test's id
        (tmp_path / name).touch()
    check = Check("tests/test_x.py::test_y", qemu=False, netns=True)
    assert find_violations(check, netns_dir=tmp_path) == [
        f"created network namespace {mine} without the netns marker"
    ]
    assert find_violations(Check(check.nodeid, qemu=True, netns=False), netns_dir=tmp_path) == []


def test_an_unmarked_test_that_starts_qemu_errors(
    pytester: pytest.Pytester,
    fake_qemu: Path,
    reaped: list[int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pidfile = tmp_path / "pids"
    pytester.makeini("[pytest]\nmarkers =\n    qemu: starts QEMU\n    netns: creates namespaces\n")
    pytester.makepyfile(
        test_inner=f"""
        import subprocess

        import pytest


        def start_qemu():
            proc = subprocess.Popen([{str(fake_qemu)!r}, "30"])
            with open({str(pidfile)!r}, "a") as f:
                f.write(f"{{proc.pid}}\\n")


        def test_unmarked_starts_qemu():
            start_qemu()


        @pytest.mark.qemu
        def test_marked_starts_qemu():
            start_qemu()


        def test_unmarked_quiet():
            pass
        """
    )
    env_path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + (os.pathsep + env_path if env_path else ""))
    try:
        result = pytester.runpytest_subprocess("-p", "tests.helpers.marker_guard", "-p", "no:cacheprovider",
                                               timeout=120)  # fmt: skip
    finally:
        reaped.extend(int(line) for line in (pidfile.read_text() if pidfile.exists() else "").split())
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_unmarked_starts_qemu*", "*started QEMU without the qemu marker*"]
    )
    assert len(reaped) == 2
