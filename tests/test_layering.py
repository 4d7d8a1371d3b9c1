"""The package floors: no import runs up (``scripts/import-graph.py`` is the rule and the report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_package_imports_a_higher_floor() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import-graph.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 upward import(s)" in result.stdout


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # the checker must be able to fail: an upward edge is reported
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import importlib

        graph = importlib.import_module("import-graph")
    finally:
        sys.path.pop(0)
    from collections import Counter

    assert graph.violations(Counter({("disk_buffer", "controller"): 1})) == [("disk_buffer", "controller")]
    assert graph.violations(Counter({("controller", "disk_buffer"): 1})) == []
    assert graph.violations(Counter({("colo_compare", "disk_buffer"): 1})) == [
        ("colo_compare", "disk_buffer")
    ]
