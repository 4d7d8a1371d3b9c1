"""The TOML settings file: every key typed and ranged, typos named, flags override."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridft_common.settings import Settings, SettingsError, describe_schema, load_settings, parse_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hybridft.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None)
    assert settings == Settings()
    assert settings.protection.mode == "mc" and settings.protection.epoch_ms == 50
    assert settings.controller.sample_period_ms == 250


def test_a_full_file_is_read_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[pair]
accel = "tcg"
memory_mib = 512
passive_secondary = true
guest_run = [["diskwriter", "/dev/vda"], ["memdirty", "32"]]

[protection]
mode = "auto"
epoch_ms = 100
policy = "gilbert"

[policy.params]
passive_limit_ms = 400

[controller]
sample_period_ms = 500
min_dwell_s = 2
""",
    )
    settings = load_settings(path)
    assert settings.pair.accel == "tcg" and settings.pair.memory_mib == 512
    assert settings.pair.guest_run == (("diskwriter", "/dev/vda"), ("memdirty", "32"))
    assert settings.protection.mode == "auto" and settings.protection.policy == "gilbert"
    assert settings.policy_params == {"passive_limit_ms": 400}
    assert settings.controller.sample_period_ms == 500
    assert settings.controller.min_dwell_s == 2.0 and isinstance(settings.controller.min_dwell_s, float)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[pair]\nmemory = 256\n", ["[pair]", "'memory'", "memory_mib"]),
        ("[protection]\nepoch_ms = 0\n", ["protection.epoch_ms", "0", "1..600000"]),
        ("[protection]\nmode = 'remus'\n", ["protection.mode", "'remus'", "mc | colo | auto"]),
        ("[controller]\nsample_period_ms = 50\n", ["controller.sample_period_ms", "100..2000"]),
        ("[controller]\nsample_period_ms = true\n", ["controller.sample_period_ms"]),
        ("[pair]\npassive_secondary = 'yes'\n", ["pair.passive_secondary", "true or false"]),
        ("[pair]\nguest_run = ['diskwriter']\n", ["pair.guest_run", "list of lists"]),
        ("[pairs]\n", ["[pairs]", "known sections"]),
        ("[policy]\nname = 'x'\n", ["[policy.params]"]),
    ],
)
def test_a_mistake_is_named_with_what_is_allowed(tmp_path: Path, text: str, names: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    for name in names:
        assert name in message


def test_unparsable_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[pair\n"))
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


def test_flags_override_the_file_and_are_checked_too() -> None:
    settings = parse_settings({"protection": {"mode": "colo", "epoch_ms": 80}})
    assert settings.with_overrides("protection", mode=None, epoch_ms=None) is settings  # no flag given
    changed = settings.with_overrides("protection", epoch_ms=120)
    assert (changed.protection.mode, changed.protection.epoch_ms) == ("colo", 120)
    with pytest.raises(SettingsError, match=r"protection\.epoch_ms"):
        settings.with_overrides("protection", epoch_ms=700_000)


def test_the_schema_documents_every_key() -> None:
    rows = {key: (allowed, default) for key, allowed, default, _help in describe_schema()}
    assert rows["protection.epoch_ms"] == ("an integer 1..600000", 50)
    assert rows["pair.accel"][0] == "kvm | tcg (or absent)"
    assert "controller.metrics_port" in rows
