"""The daemon's settings: what it connects to and how the pair starts out.

Why a module of its own: the settings come from the pair's manifest (``pair.json``, written by
``hybridft pair up``), from command-line overrides (:mod:`controller.daemon_cli`) and, in tests,
straight from code; none of that is the daemon's business once it runs.  The operating point it
starts with (mode, epoch length, passive secondary, stop way) is read from here once and from then on
belongs to the epoch protocol (:mod:`controller.operating_point`).

The ``[controller]`` section of the settings file (:class:`hybridft_common.settings.ControllerSettings`:
sampling, the policy's window and time limit, and the guard's dwell, budget and hysteresis) travels here
as the daemon's flags; its defaults are that schema's, so the file, the flags and a config built in code
run the same guard.  :meth:`DaemonConfig.autopilot_config` validates them against the schema (a bad value
is named with its allowed range) and builds what the autopilot and its guard run with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from controller.autopilot import AutopilotConfig
from hybridft_common.endpoints import parse_endpoint
from hybridft_common.manifest import ManifestError, PairManifest
from hybridft_common.settings import ControllerSettings, Settings, SettingsError
from hybridft_common.vocabulary import DEFAULT_EPOCH_MS, Mode
from mc_driver.launch import PRIMARY_REDIRECTORS
from policies.guard import GuardConfig

_CONTROLLER = ControllerSettings()  # the schema's defaults
#: DaemonConfig field -> [controller] key (settings.DAEMON_CONTROLLER_KEYS: what ``pair up`` passes)
CONTROLLER_KEYS = {
    "sample_period_ms": "sample_period_ms",
    "window_s": "window_s",
    "decide_every_samples": "decide_every_samples",
    "policy_timeout_ms": "policy_timeout_ms",
    "min_dwell_s": "min_dwell_s",
    "switch_budget_per_min": "switch_budget_per_min",
    "hysteresis_windows": "hysteresis_windows",
    "checkpoint_timeout": "checkpoint_timeout_s",
    "shadow_probe_every_s": "shadow_probe_every_s",
    "shadow_probe_epoch_ms": "shadow_probe_epoch_ms",
}


class DaemonError(Exception):
    """The daemon cannot start (config, connections, COLO start); the message says what."""


@dataclass(slots=True)
class DaemonConfig:
    """Endpoints are ``unix:PATH``/``tcp:HOST:PORT`` strings, except the two QMP monitors (paths); a
    service left None is not wired (its checkpoint steps are skipped)."""

    primary_qmp: str
    secondary_qmp: str
    control: str
    compare_control: str | None = None
    disk_control: str | None = None
    heartbeat: str | None = None
    mode: Mode = Mode.MC
    epoch_ms: int = DEFAULT_EPOCH_MS
    safety_interval_ms: int = 10_000
    mirror_job: str | None = None
    primary_pid: int | None = None
    secondary_pid: int | None = None
    passive_secondary: bool = False
    start_colo: bool = True
    migrate_uri: str | None = None
    checkpoint_timeout: float = _CONTROLLER.checkpoint_timeout_s
    metrics_port: int | None = None
    stop_via: str = "auto"  # auto | qemu | qmp: who stops the VMs for a checkpoint (epoch.StopVia)
    policy: str | None = None  # start in auto with this policy (None: the mode above stays forced)
    policy_params: dict[str, object] = field(default_factory=dict)
    # [controller]: the autopilot's sampling and the guard every policy goes through (see the settings)
    sample_period_ms: int = _CONTROLLER.sample_period_ms
    window_s: float = _CONTROLLER.window_s
    decide_every_samples: int = _CONTROLLER.decide_every_samples
    policy_timeout_ms: int = _CONTROLLER.policy_timeout_ms
    min_dwell_s: float = _CONTROLLER.min_dwell_s
    switch_budget_per_min: int = _CONTROLLER.switch_budget_per_min
    hysteresis_windows: int = _CONTROLLER.hysteresis_windows
    shadow_probe_every_s: float = _CONTROLLER.shadow_probe_every_s
    shadow_probe_epoch_ms: int = _CONTROLLER.shadow_probe_epoch_ms
    drive: str = "disk0"  # the guest disk's device on the primary (query-blockstats), as pair up names it
    trace_path: str | None = None  # the policy decision trace (JSON lines); None: not written
    # the agent's failover.json: once it exists the agent has begun a failover (same host only)
    failover_report: str | None = None
    # the primary's redirectors to and from the comparator: deleted when the secondary is lost and the
    # comparator does not answer, or the primary's output would go nowhere
    primary_redirectors: tuple[str, ...] = ()

    def controller_settings(self) -> ControllerSettings:
        """This config's ``[controller]`` values, checked against the settings schema (DaemonError
        naming the key and its allowed range)."""
        values = {key: getattr(self, name) for name, key in CONTROLLER_KEYS.items()}
        try:
            return Settings().with_overrides("controller", **values).controller
        except SettingsError as exc:
            raise DaemonError(str(exc)) from None

    def autopilot_config(self) -> AutopilotConfig:
        """What the autopilot and its guard run with (validated: :meth:`controller_settings`)."""
        ctl = self.controller_settings()
        guard = GuardConfig(
            min_dwell_s=ctl.min_dwell_s,
            switches_per_minute=ctl.switch_budget_per_min,
            confirm_windows=ctl.hysteresis_windows,
            time_limit_s=ctl.policy_timeout_ms / 1000,
        )
        return AutopilotConfig(
            period_s=ctl.sample_period_ms / 1000,
            window_s=ctl.window_s,
            decide_every_samples=ctl.decide_every_samples,
            guard=guard,
            trace_path=Path(self.trace_path) if self.trace_path else None,
        )

    @classmethod
    def from_manifest(cls, manifest: PairManifest) -> DaemonConfig:
        """The daemon's settings from the pair's manifest (ValueError for a QMP endpoint not on unix:)."""
        return cls(
            primary_qmp=_unix_path(manifest.qmp.primary.daemon),
            secondary_qmp=_unix_path(manifest.qmp.secondary.daemon),
            control=manifest.daemon_control,
            compare_control=manifest.compare_control,
            disk_control=manifest.disk_control,
            heartbeat=manifest.heartbeat,
            mode=manifest.mode,
            epoch_ms=manifest.epoch_ms,
            safety_interval_ms=manifest.safety_interval_ms,
            mirror_job=manifest.mirror_job,
            primary_pid=manifest.pids.primary or None,
            secondary_pid=manifest.pids.secondary or None,
            passive_secondary=manifest.passive_secondary,
            stop_via=manifest.stop_via,
            migrate_uri=manifest.migrate_uri,
            trace_path=str(Path(manifest.workdir) / "decisions.jsonl"),
            failover_report=str(manifest.failover_report),
            primary_redirectors=PRIMARY_REDIRECTORS,
        )

    @classmethod
    def from_pair_json(cls, path: Path) -> DaemonConfig:
        """Read ``pair.json`` (written by ``pair up``); a missing or wrong field is a clear error."""
        try:
            return cls.from_manifest(PairManifest.load(path))
        except ManifestError as exc:
            raise DaemonError(str(exc)) from None
        except ValueError as exc:
            raise DaemonError(f"{path}: {exc}") from None


def _unix_path(endpoint: str) -> str:
    ep = parse_endpoint(endpoint)
    if ep.kind != "unix" or not ep.path:
        raise ValueError(f"QMP endpoints must be unix:PATH, got {endpoint!r}")
    return ep.path
