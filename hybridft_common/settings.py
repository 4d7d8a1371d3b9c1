"""One TOML file for everything ``pair up`` and the daemon take; command-line flags override it.

Why one file with a declared schema: an operator of a fault-tolerant VM writes the settings once, keeps them
under version control and expects a typo to be refused at start, not silently ignored while the pair runs
with a default.  Every key is declared here with its type, allowed range and default; an unknown key or a
bad value is a :class:`SettingsError` that names the key (``protection.epoch_ms``), what was given and what is
allowed.  The schema is plain data so the CLIs, the daemon and the documentation read the same table.

Layout (every section and key optional)::

    [pair]                        # what the launcher starts
    accel = "tcg"                 # kvm | tcg (default: detect)
    memory_mib = 256
    disk_mib = 64
    compare_timeout_ms = 3000
    safety_interval_ms = 10000
    passive_secondary = false
    stop_via = "auto"             # auto | qemu | qmp
    guest_run = [["diskwriter", "/dev/vda"]]
    tcp_host = "127.0.0.1"        # the two-host layout: cross-host channels on tcp (needs tls_creds)
    tls_creds = "/etc/hybridft/pair-ca/hosta"   # a directory from `hybridft certs issue`
    auto_reprotect = false        # re-protect by itself after a failover or a lost secondary

    [protection]                  # how the pair is protected
    mode = "auto"                 # mc | colo | auto (a policy decides)
    epoch_ms = 50                 # MC epoch while forced (and a policy's starting point)
    policy = "cost-model"         # with mode = "auto"

    [policy.params]               # handed to the policy, which validates its own parameters
    ...

    [controller]                  # the daemon's sampling loop and the guard every policy goes through
    sample_period_ms = 250
    ...
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridft_common.vocabulary import (
    DEFAULT_EPOCH_MS,
    EPOCH_MS_MAX,
    EPOCH_MS_MIN,
    MODE_CHOICES,
    STOP_VIA_CHOICES,
)

#: ``protection.mode`` adds ``auto`` (a policy picks MC or COLO) to the replication modes.
AUTO = "auto"
PROTECTION_MODES: tuple[str, ...] = (*MODE_CHOICES, AUTO)
DEFAULT_POLICY = "cost-model"


class SettingsError(ValueError):
    """A settings file or flag is wrong; the message names the key, the value and what is allowed."""


def _spec(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    optional: bool = False,
    help: str = "",
) -> Any:
    """A dataclass field carrying its validation rule (read by :func:`_check`)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "optional": optional, "help": help}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class PairSettings:
    accel: str | None = _spec(
        None, choices=("kvm", "tcg"), optional=True, help="accelerator (default: detect)"
    )
    memory_mib: int = _spec(256, lo=64, hi=1 << 20, help="guest RAM in MiB")
    disk_mib: int = _spec(64, lo=1, hi=1 << 24, help="guest disk size in MiB")
    compare_timeout_ms: int = _spec(3000, lo=1, hi=600_000, help="longest hold before a checkpoint")
    safety_interval_ms: int = _spec(
        10_000, lo=100, hi=3_600_000, help="COLO: a checkpoint at least this often"
    )
    passive_secondary: bool = _spec(False, help="MC: keep the secondary stopped between checkpoints")
    stop_via: str = _spec("auto", choices=STOP_VIA_CHOICES, help="who stops the VMs for a checkpoint")
    guest_run: tuple[tuple[str, ...], ...] = _spec(
        (), help="workloads the guest starts at boot: [[prog, arg, ...], ...]"
    )
    tcp_host: str | None = _spec(
        None, optional=True, help="the two-host layout: cross-host channels on tcp at this address"
    )
    tls_creds: str | None = _spec(
        None, optional=True, help="TLS credentials directory for tcp channels (hybridft certs issue)"
    )
    auto_reprotect: bool = _spec(False, help="re-protect by itself after a failover or a lost secondary")


@dataclass(frozen=True, slots=True)
class ProtectionSettings:
    mode: str = _spec("mc", choices=PROTECTION_MODES, help="mc | colo | auto (a policy decides)")
    epoch_ms: int = _spec(DEFAULT_EPOCH_MS, lo=EPOCH_MS_MIN, hi=EPOCH_MS_MAX, help="MC epoch length")
    policy: str = _spec(DEFAULT_POLICY, help="the policy that decides in auto mode")


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    sample_period_ms: int = _spec(250, lo=100, hi=2000, help="signal sampling period")
    window_s: float = _spec(5.0, lo=0.5, hi=600.0, help="seconds of signals a policy sees")
    decide_every_samples: int = _spec(1, lo=1, hi=100, help="a policy decision every N samples")
    policy_timeout_ms: int = _spec(100, lo=1, hi=10_000, help="longest a policy may take to decide")
    min_dwell_s: float = _spec(5.0, lo=0.0, hi=3600.0, help="least time in a mode before a policy switch")
    switch_budget_per_min: int = _spec(6, lo=1, hi=600, help="most policy mode switches per minute")
    hysteresis_windows: int = _spec(2, lo=1, hi=100, help="consecutive decisions a switch needs")
    checkpoint_timeout_s: float = _spec(30.0, lo=1.0, hi=600.0, help="longest a checkpoint step may take")
    shadow_probe_every_s: float = _spec(
        1.0,
        lo=0.0,
        hi=60.0,
        help="MC shadow probes: one stretched epoch every N s while a policy reads it (0: off)",
    )
    shadow_probe_epoch_ms: int = _spec(
        100, lo=10, hi=2000, help="MC shadow probes: the stretched epoch's length"
    )
    metrics_port: int | None = _spec(None, lo=1, hi=65535, optional=True, help="serve /metrics on 127.0.0.1")


#: the [controller] keys ``pair up`` hands the daemon as flags (``--min-dwell-s``...); ``metrics_port`` is
#: the daemon's ``--metrics-port``
DAEMON_CONTROLLER_KEYS = (
    "sample_period_ms",
    "window_s",
    "decide_every_samples",
    "policy_timeout_ms",
    "min_dwell_s",
    "switch_budget_per_min",
    "hysteresis_windows",
    "checkpoint_timeout_s",
    "shadow_probe_every_s",
    "shadow_probe_epoch_ms",
)


@dataclass(frozen=True, slots=True)
class Settings:
    pair: PairSettings = field(default_factory=PairSettings)
    protection: ProtectionSettings = field(default_factory=ProtectionSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    policy_params: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, section: str, **values: Any) -> Settings:
        """A copy with ``values`` (flags) set in ``section``; ``None`` means "flag not given"."""
        given = {key: value for key, value in values.items() if value is not None}
        if not given:
            return self
        current = getattr(self, section)
        merged = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)} | given
        return dataclasses.replace(self, **{section: _build(type(current), merged, section)})

    def as_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("pair", "protection", "controller")}
        out["policy"] = {"params": dict(self.policy_params)}
        return out


_SECTIONS: dict[str, type] = {
    "pair": PairSettings,
    "protection": ProtectionSettings,
    "controller": ControllerSettings,
}


def _allowed(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta.get("choices"):
        text = " | ".join(meta["choices"])
    elif f.type in ("bool", bool):
        text = "true or false"
    elif meta.get("lo") is not None:
        kind = "an integer" if "int" in str(f.type) else "a number"
        text = f"{kind} {meta['lo']:g}..{meta['hi']:g}"
    elif str(f.type).startswith("tuple"):
        text = "a list of lists of strings"
    else:
        text = "a string"
    return text + (" (or absent)" if meta.get("optional") else "")


def _check(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    meta = f.metadata
    bad = SettingsError(f"{where}: {value!r} is not allowed; expected {_allowed(f)}")
    if value is None:
        if meta.get("optional"):
            return None
        raise bad
    kind = str(f.type)
    if meta.get("choices"):
        if not isinstance(value, str) or value not in meta["choices"]:
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool) or not meta["lo"] <= value <= meta["hi"]:
            raise bad
        return value
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad
        if not meta["lo"] <= value <= meta["hi"]:
            raise bad
        return float(value)
    if kind.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, list | tuple) and item and all(isinstance(word, str) for word in item)
            for item in value
        ):
            raise bad
        return tuple(tuple(item) for item in value)
    if not isinstance(value, str) or not value:
        raise bad
    return value


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"[{section}]: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}"
        )
    return cls(**{name: _check(fields[name], value, f"{section}.{name}") for name, value in values.items()})


def parse_settings(data: Mapping[str, Any]) -> Settings:
    """Validate a parsed TOML document into :class:`Settings` (see the module docstring)."""
    unknown = sorted(set(data) - {*_SECTIONS, "policy"})
    if unknown:
        raise SettingsError(
            f"unknown section [{unknown[0]}]; known sections: {', '.join([*sorted(_SECTIONS), 'policy'])}"
        )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise SettingsError(f"[{name}] must be a table, got {raw!r}")
        sections[name] = _build(cls, raw, name)
    policy = data.get("policy", {})
    if not isinstance(policy, Mapping) or set(policy) - {"params"}:
        raise SettingsError("[policy] may only hold a [policy.params] table")
    params = policy.get("params", {})
    if not isinstance(params, Mapping):
        raise SettingsError(f"[policy.params] must be a table, got {params!r}")
    return Settings(**sections, policy_params=dict(params))


def load_settings(path: Path | None) -> Settings:
    """Read a TOML settings file (None: every default)."""
    if path is None:
        return Settings()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_settings(data)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def describe_schema() -> list[tuple[str, str, Any, str]]:
    """``(key, allowed, default, help)`` rows for documentation and ``--help`` texts."""
    rows = []
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _allowed(f), f.default, str(f.metadata.get("help", ""))))
    return rows
