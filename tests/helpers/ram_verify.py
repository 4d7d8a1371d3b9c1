"""``hybridft verify`` against a running real pair, for the real-pair tests (no new pair start)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from hybridft_common.cli import hybridft_command

GUEST_RAM_FLOOR = 250 << 20  # the 256 MiB guest's RAM bar the BIOS ROM and the legacy holes


def ram_identical(workdir: Path, mode: str) -> dict[str, Any]:
    """The daemon holds its next checkpoint on both sides and compares all RAM: assert identical."""
    proc = subprocess.run(
        [*hybridft_command(), "verify", "--workdir", str(workdir), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    result = json.loads(proc.stdout)
    assert result["mode"] == mode, result
    assert result["identical"] and result["differing_pages"] == 0, result
    assert proc.returncode == 0
    assert result["pages"] * 4096 > GUEST_RAM_FLOOR, result
    return result
