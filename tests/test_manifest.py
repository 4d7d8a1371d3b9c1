"""pair.json as a typed manifest: what ``pair up`` writes is byte for byte the file external tools
already read, it reads back to the same value, and a missing or wrong field is refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from hybridft_common.manifest import ManifestError, PairManifest
from hybridft_common.vocabulary import Mode
from mc_driver.accel import QemuChoice
from mc_driver.pair import PairConfig, PairFiles, load_pair, pair_json

QEMU = QemuChoice(Path("/opt/qemu/bin/qemu-system-x86_64"), "tcg", ("-L", "/fw"), "test", patched=True)
WORKDIR = Path("/run/hft-pair")


def manifest_for(workdir: Path, **changes: Any) -> PairManifest:
    """The manifest ``pair up`` writes for ``workdir`` (with ``changes``), for tests that need a pair.json."""
    manifest = pair_json(PairConfig(workdir), PairFiles(workdir), QEMU, {})
    return dataclasses.replace(manifest, **changes)


def expected_json(workdir: Path) -> dict[str, Any]:
    """pair.json as the launcher has always written it, key for key in the file's order."""
    w = str(workdir)
    return {
        "workdir": w,
        "netns": PairFiles(workdir).netns,
        "bridge": "hftbr0",
        "guest_ip": "10.77.0.2",
        "client_ip": "10.77.0.1",
        "guest_mac": "52:54:00:12:34:56",
        "taps": {"primary": "hftp0", "secondary": "hfts0"},
        "accel": "tcg",
        "qemu_binary": "/opt/qemu/bin/qemu-system-x86_64",
        "accel_reason": "test",
        "qmp": {
            "primary": {"daemon": f"unix:{w}/primary-daemon.qmp", "ops": f"unix:{w}/primary-ops.qmp"},
            "secondary": {
                "daemon": f"unix:{w}/secondary-daemon.qmp",
                "agent": f"unix:{w}/secondary-agent.qmp",
                "ops": f"unix:{w}/secondary-ops.qmp",
            },
        },
        "compare_control": f"unix:{w}/compare-ctl.sock",
        "disk_control": f"unix:{w}/disk-ctl.sock",
        "disk_nbd": f"unix:{w}/disk-nbd.sock",
        "daemon_control": f"unix:{w}/daemon-ctl.sock",
        "heartbeat": f"unix:{w}/heartbeat.sock",
        "migrate_uri": f"unix:{w}/migrate.sock",
        "guest_control": {
            "primary": f"unix:{w}/primary-guestctl.sock",
            "secondary": f"unix:{w}/secondary-guestctl.sock",
        },
        "consoles": {"primary": f"{w}/primary.console", "secondary": f"{w}/secondary.console"},
        "failover_report": f"{w}/failover.json",
        "mode": "colo",
        "epoch_ms": 20,
        "compare_timeout_ms": 3000,
        "safety_interval_ms": 10000,
        "mirror_job": "hft-mirror",
        "passive_secondary": True,
        "stop_via": "qmp",
        "pids": {"primary": 5, "secondary": 0, "disk": 0, "compare": 0, "daemon": 0, "agent": 9},
    }


def written(tmp_path: Path) -> tuple[PairManifest, Path]:
    config = PairConfig(WORKDIR, mode=Mode.COLO, epoch_ms=20, passive_secondary=True, stop_via="qmp")
    manifest = pair_json(config, PairFiles(WORKDIR), QEMU, {"primary": 5, "agent": 9})
    path = tmp_path / "pair.json"
    manifest.write(path)
    return manifest, path


def test_the_launcher_writes_todays_pair_json_exactly(tmp_path: Path) -> None:
    manifest, path = written(tmp_path)
    expected = expected_json(WORKDIR)
    assert path.read_text() == json.dumps(expected, indent=1) + "\n"
    assert list(manifest.to_dict()) == list(expected)
    assert not list(tmp_path.glob("*.tmp")), "the temporary file of the atomic write was left behind"


def test_round_trip(tmp_path: Path) -> None:
    manifest, path = written(tmp_path)
    assert PairManifest.from_dict(json.loads(path.read_text())) == manifest
    assert PairManifest.load(path) == manifest == PairManifest.load(tmp_path)  # a directory: its pair.json
    assert manifest.mode is Mode.COLO and manifest.workdir == WORKDIR and manifest.pids.agent == 9
    assert manifest.qmp.secondary.agent == f"unix:{WORKDIR}/secondary-agent.qmp"
    # the readers that stay on plain JSON (benchmarks) see the same thing
    assert load_pair(path) == manifest.to_dict()
    # a rewrite replaces the file whole
    changed = dataclasses.replace(manifest, pids=dataclasses.replace(manifest.pids, daemon=77))
    changed.write(path)
    assert PairManifest.load(path).pids.daemon == 77


@pytest.mark.parametrize(
    "dotted", ["heartbeat", "stop_via", "pids", "qmp.secondary.agent", "pids.daemon", "consoles.secondary"]
)
def test_a_missing_field_is_named(tmp_path: Path, dotted: str) -> None:
    data = expected_json(WORKDIR)
    *parents, last = dotted.split(".")
    holder = data
    for key in parents:
        holder = holder[key]
    del holder[last]
    with pytest.raises(ManifestError) as info:
        PairManifest.from_dict(data)
    assert str(info.value) == f"pair.json has no {dotted!r}"
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        PairManifest.load(path)
    assert str(info.value) == f"{path} has no {dotted!r}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epoch_ms", "50", "field 'epoch_ms' must be an integer, got '50'"),
        ("epoch_ms", True, "field 'epoch_ms' must be an integer, got True"),
        ("epoch_ms", 0, "epoch_ms must be an integer 1..600000, got 0"),
        ("mode", "remus", "field 'mode' must be 'mc' or 'colo', got 'remus'"),
        ("passive_secondary", "yes", "field 'passive_secondary' must be true or false, got 'yes'"),
        ("stop_via", "magic", "stop_via must be one of auto, qmp, qemu, not 'magic'"),
        ("heartbeat", 7, "field 'heartbeat' must be a string, got 7"),
        ("workdir", "", "field 'workdir' must be a path, got ''"),
        ("taps", ["hftp0", "hfts0"], "'taps' must be an object"),
        ("pids", {"primary": -1, "secondary": 0, "disk": 0, "compare": 0, "daemon": 0, "agent": 0},
         "'pids': pid of primary must not be negative"),
        ("safety_interval_ms", 0, "safety_interval_ms must be positive, got 0"),
    ],
)  # fmt: skip
def test_a_wrong_field_is_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        PairManifest.from_dict(expected_json(WORKDIR) | {key: value})
    assert str(info.value) == f"pair.json {message}"


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"cannot read .*missing\.json: No such file"):
        PairManifest.load(tmp_path / "missing.json")
    bad = tmp_path / "pair.json"
    bad.write_text("{garbage")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        PairManifest.load(bad)
    bad.write_text("[1]")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        PairManifest.load(bad)
