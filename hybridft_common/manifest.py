"""``pair.json``: the typed contract between ``hybridft pair up`` and the pair's processes.

Why typed: the launcher writes the file once (and again as each process starts, with its pid); the
daemon, the agent and the operator CLI read it, and external tools (benchmarks, scripts) read it
too.  As bare dicts, a field the writer renamed was found by the reader that fell over it, at the
moment it needed it -- the agent in the middle of a failover.  :meth:`PairManifest.from_dict` checks
every field when the file is read and names the one that is missing or wrong; :meth:`to_dict` writes
exactly the keys and shapes the file has always had, so the readers that still take it as JSON keep
working.

:meth:`PairManifest.write` is atomic (temporary file, fsync, rename, fsync of the directory): a reader
never sees half a file, and after a crash the file is the old one or the new one, not an empty one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from hybridft_common.secure import open_nofollow
from hybridft_common.vocabulary import STOP_VIA_CHOICES, Mode, check_epoch_ms

PAIR_JSON = "pair.json"


class ManifestError(ValueError):
    """``pair.json`` cannot be read, or a field is missing or wrong (the message names it)."""


@dataclass(frozen=True, slots=True)
class Sides:
    """One value per VM of the pair."""

    primary: str
    secondary: str


@dataclass(frozen=True, slots=True)
class PrimaryMonitors:
    """The primary QEMU's QMP monitors, one per user (``unix:PATH`` endpoints)."""

    daemon: str
    ops: str  # operators and the agent's fencing


@dataclass(frozen=True, slots=True)
class SecondaryMonitors:
    """The secondary QEMU's QMP monitors, one per user (``unix:PATH`` endpoints)."""

    daemon: str
    agent: str
    ops: str


@dataclass(frozen=True, slots=True)
class QmpMonitors:
    primary: PrimaryMonitors
    secondary: SecondaryMonitors


@dataclass(frozen=True, slots=True)
class Pids:
    """Process ids of the pair's processes; 0 for one not started (or stopped by ``pair down``)."""

    primary: int = 0
    secondary: int = 0
    disk: int = 0
    compare: int = 0
    daemon: int = 0
    agent: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ManifestError(f"pid of {field.name} must not be negative")


@dataclass(frozen=True, slots=True)
class PairManifest:
    """Everything a pair's processes need to find each other; the fields in the file's own order."""

    workdir: Path
    netns: str
    bridge: str
    guest_ip: str
    client_ip: str
    guest_mac: str
    taps: Sides
    accel: str
    qemu_binary: Path
    accel_reason: str
    qmp: QmpMonitors
    compare_control: str
    disk_control: str
    disk_nbd: str
    daemon_control: str
    heartbeat: str
    migrate_uri: str
    guest_control: Sides
    consoles: Sides
    failover_report: Path
    mode: Mode
    epoch_ms: int
    compare_timeout_ms: int
    safety_interval_ms: int
    mirror_job: str
    passive_secondary: bool
    stop_via: str  # auto | qemu | qmp (vocabulary.STOP_VIA_CHOICES)
    pids: Pids

    def __post_init__(self) -> None:
        try:
            check_epoch_ms(self.epoch_ms)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        if self.stop_via not in STOP_VIA_CHOICES:
            choices = ", ".join(STOP_VIA_CHOICES)
            raise ManifestError(f"stop_via must be one of {choices}, not {self.stop_via!r}")
        for name in ("compare_timeout_ms", "safety_interval_ms"):
            if getattr(self, name) <= 0:
                raise ManifestError(f"{name} must be positive, got {getattr(self, name)}")

    # ------------------------------------------------------------------------------- JSON shapes
    @classmethod
    def from_dict(cls, data: object, source: str = PAIR_JSON) -> Self:
        """Check and type ``data`` (the parsed JSON); ManifestError names the first bad field."""
        try:
            return _build(cls, data, "")
        except ManifestError as exc:
            raise ManifestError(f"{source} {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, with the keys and shapes ``pair.json`` has always had."""
        return _plain(self)

    # ------------------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a ``pair.json`` (a directory means the ``pair.json`` in it)."""
        if path.is_dir():
            path = path / PAIR_JSON
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(path))

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically and durably with this manifest."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        tmp = path.with_name(f"{path.name}.tmp")
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # not through a symlink
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


# ------------------------------------------------------------------------ checking and flattening
def _build(cls: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise ManifestError(f"{where!r} must be an object" if where else "must be a JSON object")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = f"{where}.{field.name}" if where else field.name
        if field.name not in data:
            raise ManifestError(f"has no {name!r}")
        values[field.name] = _value(hints[field.name], data[field.name], name)
    try:
        return cls(**values)
    except ManifestError as exc:
        raise ManifestError(f"{where!r}: {exc}" if where else str(exc)) from None


def _value(kind: Any, raw: object, name: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(typing.cast(type, kind), raw, name)
    if kind is bool:
        if not isinstance(raw, bool):
            raise ManifestError(f"field {name!r} must be true or false, got {raw!r}")
        return raw
    if kind is int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ManifestError(f"field {name!r} must be an integer, got {raw!r}")
        return raw
    if kind is Mode:
        try:
            return Mode(raw)
        except ValueError:
            raise ManifestError(f"field {name!r} must be 'mc' or 'colo', got {raw!r}") from None
    if kind in (str, Path):
        if not isinstance(raw, str) or (kind is Path and not raw):
            what = "a path" if kind is Path else "a string"
            raise ManifestError(f"field {name!r} must be {what}, got {raw!r}")
        return kind(raw)
    raise TypeError(f"no JSON shape for {kind!r} ({name})")  # a field type this module does not know


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mode):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- other files of the pair, durably
def fsync_directory(path: Path) -> None:
    """Make the directory entries of ``path`` (a creation, a rename) survive a crash."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temporary file, fsync, rename, fsync of the directory -- after a
    crash the file is the old one or the new one, never empty or half written."""
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
