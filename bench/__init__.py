"""The benchmarks, in one place: ``hybridft bench compare|disk|qemu|pair``.

Why a package of their own: a benchmark drives several packages at once (the comparator, the disk
buffer, QEMU, a whole pair), so it sits above all of them (floor 3, beside ``experiments``; it never
imports ``controller``).  Each module is named for what it measures and keeps its same-run baseline
beside it, since the machines are shared and noisy:

* ``compare`` -- the comparator against a forward-only relay, end to end;
* ``compare_micro`` -- a fixed workload through the comparator core, for instruction counting;
* ``disk`` -- the NBD disk buffer against qemu-nbd on the same image;
* ``qemu`` -- the COLO checkpoint pause per QEMU binary;
* ``pair`` -- a protected pair: pause, traffic, divergences, failover;
* ``cli`` -- the ``hybridft bench`` group.

Every percentile, summary and ratio comes from ``hybridft_common.stats``.
"""
