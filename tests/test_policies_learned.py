"""The learned policy: fitted on labelled windows, stored with skops, loaded only when every type is
trusted, deterministic on replay, and honest when unsure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from hybridft_common.vocabulary import Mode
from policies.base import PolicyConfigError
from policies.learned import (
    FEATURES,
    Learned,
    ModelError,
    features,
    fit_model,
    label_point,
    load_model,
    parse_label,
    save_model,
)
from policies.registry import load_policy
from policies.window import ProtectionPoint, Window


def window(div: float | None, turns: float, mode: Mode = Mode.MC, epoch: int = 50) -> Window:
    t = np.arange(12) * 0.25
    signals = {"net.turns_per_s": [turns] * 12, "mem.dirty_bytes_per_s": [8e6] * 12}
    if div is not None:
        signals["div.per_s"] = [div] * 12
    return Window(t, ProtectionPoint(mode, epoch, False), signals)


def trained(tmp_path: Path, seed: int = 1) -> Path:
    """Divergent work is best in MC at 20 ms, the rest in COLO (the shape the experiments measure)."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(300):
        div, turns = rng.uniform(0, 40), rng.uniform(0, 200)
        rows.append(features(window(div, turns), 3.0))
        labels.append("mc-20" if div > 4 else "colo")
    path = tmp_path / "model.skops"
    save_model(fit_model(rows, labels, average_s=3.0, source="synthetic"), path)
    return path


def test_labels_round_trip_and_bad_labels_are_named() -> None:
    assert label_point(Mode.COLO) == "colo" and label_point("mc", 40) == "mc-40"
    assert parse_label("mc-40") == (Mode.MC, 40) and parse_label("colo") == (Mode.COLO, None)
    for bad in ("mc", "mc-0", "mc-9999999", "mc-1x", "passive", ""):
        with pytest.raises(ModelError, match="label"):
            parse_label(bad)


def test_features_are_mode_free_and_tell_absent_from_zero() -> None:
    measured_zero = features(window(0.0, 10), 3.0)
    absent = features(window(None, 10), 3.0)
    assert measured_zero.shape == (len(FEATURES) + 1,)
    assert measured_zero[0] == absent[0] == 0.0 and measured_zero[-1] == 1.0 and absent[-1] == 0.0
    # the same workload seen in MC and in COLO gives the same row
    assert np.array_equal(features(window(3, 10, Mode.MC), 3.0), features(window(3, 10, Mode.COLO), 3.0))


def test_the_policy_picks_the_trained_point_and_names_its_signal(tmp_path: Path) -> None:
    policy = load_policy("learned", {"model": str(trained(tmp_path))})
    assert isinstance(policy, Learned)
    divergent = policy.decide(window(30.0, 100, Mode.COLO))
    assert (divergent.mode, divergent.epoch_ms, divergent.signal) == (Mode.MC, 20, "div.per_s")
    assert "P(mc-20)=" in divergent.reason
    quiet = policy.decide(window(0.2, 100, Mode.MC, epoch=20))
    assert quiet.mode is Mode.COLO and quiet.signal in (*FEATURES, "div.measured")
    # pure: the same windows give the same decisions, in any order, after a reset
    again = [policy.decide(w) for w in (window(0.2, 100), window(30.0, 100, Mode.COLO))]
    policy.reset()
    assert again == [policy.decide(w) for w in (window(0.2, 100), window(30.0, 100, Mode.COLO))]


def test_an_unsure_model_keeps_the_current_point(tmp_path: Path) -> None:
    policy = load_policy("learned", {"model": str(trained(tmp_path)), "min_confidence": 1.0})
    decision = policy.decide(window(30.0, 100, Mode.COLO, epoch=70))
    assert (decision.mode, decision.epoch_ms) == (Mode.COLO, 70) and decision.reason.startswith("unsure")


def test_a_model_file_with_an_untrusted_type_is_refused(tmp_path: Path) -> None:
    import collections

    path = tmp_path / "evil.skops"
    sio.dump({"format": 1, "pipeline": collections.Counter("abc")}, path)
    with pytest.raises(ModelError, match="may not hold"):
        load_model(path)
    with pytest.raises(PolicyConfigError, match="may not hold"):
        load_policy("learned", {"model": str(path)})


def test_missing_foreign_or_bad_model_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model file"):
        load_model(tmp_path / "none.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a skops model"):
        load_model(tmp_path / "junk.skops")
    other = tmp_path / "other.skops"
    sio.dump({"format": 99}, other)
    with pytest.raises(ModelError, match="format"):
        load_model(other)


def test_training_refuses_what_it_cannot_learn_from() -> None:
    rows = [features(window(1.0, 1.0), 3.0)] * 4
    with pytest.raises(ModelError, match="two different"):
        fit_model(rows, ["colo"] * 4, average_s=3.0)
    with pytest.raises(ModelError, match="labels"):
        fit_model(rows, ["colo", "mc-20"], average_s=3.0)
    with pytest.raises(ModelError, match="label"):
        fit_model(rows, ["colo", "mc-20", "fast", "colo"], average_s=3.0)
