"""The fixed micro-benchmark workloads (``colo_compare.perf_micro``) are valid comparator input:
every primary frame is released, nothing diverges, in both workloads.  (Its numbers are
instruction counts under callgrind, reported by hand, never asserted here.)"""

from __future__ import annotations

import pytest

from colo_compare import perf_micro


@pytest.mark.parametrize("kind", perf_micro.WORKLOADS)
def test_micro_workload_is_released_in_full_without_divergence(kind: str) -> None:
    result = perf_micro.run(kind, 1500, setup_only=False)
    assert result["frames"] > 1000
    assert result["released"] == result["frames"]


def test_micro_workload_sides_are_cut_differently() -> None:
    p, s, n = perf_micro.build("bulk", 1000)
    assert sum(map(len, p)) == n
    assert sum(map(len, s)) > n  # the secondary's 1000/1448 cut needs more frames
