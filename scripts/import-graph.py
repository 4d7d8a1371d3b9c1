#!/usr/bin/env python3
"""Print hybridft's package import graph and check that no import runs up a floor.

    python3 scripts/import-graph.py            # edges with counts, then violations (exit 1 if any)
    python3 scripts/import-graph.py --dot      # Graphviz dot

Every ``import`` / ``from ... import`` in a package's modules counts, including imports inside
functions (a lazy import is still a dependency).  The floors are the project's layering rule: a
package may import its own floor's siblings only where listed, and any lower floor.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: lower number = lower floor; a package may import packages on a strictly lower floor
FLOORS: dict[str, int] = {
    "hybridft_common": 0,
    "colo_compare": 1,
    "disk_buffer": 1,
    "policies": 1,
    "mc_driver": 2,
    "bench": 3,
    "experiments": 3,
    "controller": 4,
}
#: same-floor imports that are allowed: the experiment runner's unreplicated baseline is bench's
SAME_FLOOR_OK: set[tuple[str, str]] = {("experiments", "bench")}


def edges() -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    target = name.split(".")[0]
                    if target in FLOORS and target != package:
                        found[(package, target)] += 1
    return found


def violations(graph: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    bad = []
    for source, target in graph:
        if FLOORS[target] > FLOORS[source] or (
            FLOORS[target] == FLOORS[source] and (source, target) not in SAME_FLOOR_OK
        ):
            bad.append((source, target))
    return sorted(bad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot")
    args = parser.parse_args()
    graph = edges()
    bad = violations(graph)
    if args.dot:
        print("digraph hybridft {")
        for (source, target), count in sorted(graph.items()):
            colour = ' color="red"' if (source, target) in bad else ""
            print(f'  "{source}" -> "{target}" [label="{count}"{colour}];')
        print("}")
        return 1 if bad else 0
    for package in sorted(FLOORS, key=lambda p: (FLOORS[p], p)):
        targets = sorted((t, c) for (s, t), c in graph.items() if s == package)
        listed = ", ".join(f"{t} ({c})" for t, c in targets) or "-"
        print(f"floor {FLOORS[package]}  {package:16} -> {listed}")
    for source, target in bad:
        print(f"UPWARD: {source} (floor {FLOORS[source]}) imports {target} (floor {FLOORS[target]})")
    print(f"{len(bad)} upward import(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
