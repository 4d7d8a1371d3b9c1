"""Prometheus metrics of the daemon (prometheus-client), in a registry of its own.

Why a private registry: tests and benchmarks run several daemons in one process; the default global
registry would refuse the second set of metric names.  The daemon exposes the exposition text on its
control socket (verb ``metrics``) and, if asked, over HTTP (``--metrics-port``).

What is measured and why:

* ``hybridft_checkpoint_pause_seconds{mode}`` -- the guest-visible pause of each checkpoint (primary
  STOP -> RESUME, QEMU's own timestamps), by the mode it ran under: the cost side of every mode decision;
* ``hybridft_checkpoints_total{reason,mode}`` -- why checkpoints happen (timer, safety-interval,
  compare:<why>, operator, mode switch...), per mode; in COLO a high ``compare:*`` rate is what makes MC
  the better mode;
* ``hybridft_checkpoint_failures_total{recovery}`` -- failed checkpoints by what was done (rollback...);
* ``hybridft_divergences_total{reason}`` -- comparator requests as delivered (including coalesced ones);
* ``hybridft_mode`` -- 1 for the current mode; ``hybridft_protected`` -- 0 once running unprotected;
* ``hybridft_unrequested_stops`` -- primary STOP events the daemon did not cause (must stay 0);
* ``hybridft_signal{name}`` -- every signal of the autopilot's latest sample (``cpu.primary``,
  ``div.per_s``, ... as in ``status --json``'s ``signals``), one gauge family with the signal's name as a
  label so a new signal needs no new metric.  A signal left out of a sample (its source failed, or it
  is a per-reason rate with no event in that interval) is removed, never shown as 0 or as a stale value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

PAUSE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
MODES = ("mc", "colo")


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pause = Histogram(
            "hybridft_checkpoint_pause_seconds",
            "Primary STOP->RESUME of each checkpoint (QEMU event timestamps), by mode.",
            ["mode"],
            buckets=PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.checkpoints = Counter(
            "hybridft_checkpoints",
            "Checkpoints by trigger reason and mode.",
            ["reason", "mode"],
            registry=self.registry,
        )
        self.failures = Counter(
            "hybridft_checkpoint_failures",
            "Failed checkpoints by recovery.",
            ["recovery"],
            registry=self.registry,
        )
        self.divergences = Counter(
            "hybridft_divergences",
            "Comparator checkpoint requests by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.mode = Gauge("hybridft_mode", "1 for the pair's current mode.", ["mode"], registry=self.registry)
        self.protected = Gauge(
            "hybridft_protected", "1 while a secondary holds the checkpoints.", registry=self.registry
        )
        self.unrequested_stops = Gauge(
            "hybridft_unrequested_stops",
            "Primary STOP events the daemon did not cause.",
            registry=self.registry,
        )
        self.epoch = Gauge("hybridft_last_committed_epoch", "Last committed epoch.", registry=self.registry)
        self.signal = Gauge(
            "hybridft_signal",
            "The autopilot's latest sample of each signal (names as in status --json 'signals').",
            ["name"],
            registry=self.registry,
        )
        self._signal_names: set[str] = set()

    def set_signals(self, values: Mapping[str, float | None]) -> None:
        """One sample's signals: measured ones set, the rest (None, NaN, left out) removed."""
        measured = {
            name: float(value)
            for name, value in values.items()
            if value is not None and math.isfinite(float(value))
        }
        for name in self._signal_names - measured.keys():
            self.signal.remove(name)
        for name, value in measured.items():
            self.signal.labels(name=name).set(value)
        self._signal_names = set(measured)

    def set_mode(self, mode: str) -> None:
        for name in MODES:
            self.mode.labels(mode=name).set(1 if name == mode else 0)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
