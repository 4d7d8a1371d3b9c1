"""The fixed micro-benchmark workloads (``bench.compare_micro``) are valid comparator input:
every primary frame is released, nothing diverges, in both workloads.  (Its numbers are
instruction counts under callgrind, reported by hand, never asserted here.)"""

from __future__ import annotations

import pytest

from bench import compare_micro


@pytest.mark.parametrize("kind", compare_micro.WORKLOADS)
def test_micro_workload_is_released_in_full_without_divergence(kind: str) -> None:
    result = compare_micro.run(kind, 1500, setup_only=False)
    assert result["frames"] > 1000
    assert result["released"] == result["frames"]


def test_micro_workload_sides_are_cut_differently() -> None:
    p, s, n = compare_micro.build("bulk", 1000)
    assert sum(map(len, p)) == n
    assert sum(map(len, s)) > n  # the secondary's 1000/1448 cut needs more frames
