"""Decisions, typed parameters and their validation."""

from __future__ import annotations

import math

import pytest

from hybridft_common.errors import HybridftError
from hybridft_common.vocabulary import Mode
from policies.base import (
    Decision,
    Failure,
    PolicyConfigError,
    decision_problems,
    describe_outcome,
    param_infos,
    parse_params,
)
from policies.cost_model import CostModelParams
from policies.gilbert import GilbertParams
from policies.static import StaticMC
from policies.threshold import ThresholdParams


def test_decision_validates_itself() -> None:
    d = Decision("mc", 40, "why", "div.per_s", True)  # type: ignore[arg-type]
    assert d.mode is Mode.MC and d.point.epoch_ms == 40 and d.point.passive_secondary
    for bad in (
        dict(mode="remus", epoch_ms=40, reason="r"),
        dict(mode=Mode.MC, epoch_ms=0, reason="r"),
        dict(mode=Mode.MC, epoch_ms=40.0, reason="r"),
        dict(mode=Mode.MC, epoch_ms=True, reason="r"),
        dict(mode=Mode.MC, epoch_ms=40, reason=""),
        dict(mode=Mode.MC, epoch_ms=40, reason="r", signal=3),
        dict(mode=Mode.MC, epoch_ms=40, reason="r", passive_secondary="yes"),
    ):
        with pytest.raises(ValueError, match="bad decision"):
            Decision(**bad)  # type: ignore[arg-type]


def test_decision_json_round_trip() -> None:
    d = Decision(Mode.COLO, 50, "div.per_s=0 < 0.5", "div.per_s")
    assert Decision.from_json(d.to_json()) == d
    with pytest.raises(ValueError):
        Decision.from_json({"mode": "mc"})


def test_describe_outcome_is_stable_text() -> None:
    d = Decision(Mode.MC, 40, "r")
    assert describe_outcome(d) is d
    assert describe_outcome(ValueError("boom")) == Failure("raised ValueError: boom")
    assert describe_outcome("mc").error.startswith("nonsense: not a Decision: str")
    tampered = Decision(Mode.MC, 40, "r")
    object.__setattr__(tampered, "mode", "mc-ish")
    assert decision_problems(tampered) == ["mode 'mc-ish' is not one of ['mc', 'colo']"]
    assert describe_outcome(tampered) == Failure("nonsense: mode 'mc-ish' is not one of ['mc', 'colo']")
    assert describe_outcome(Failure("recorded")) == Failure("recorded")


def test_params_defaults_and_cli_strings() -> None:
    p = parse_params(GilbertParams, {})
    assert (p.passive_limit_ms, p.passive_count, p.passive_time_ms, p.min_colo_checkpoints) == (
        400.0,
        100,
        250,
        5,
    )
    p = parse_params(GilbertParams, {"passive_limit_ms": "300", "passive_count": "20", "history_weight": 0.5})
    assert p.passive_limit_ms == 300.0 and isinstance(p.passive_limit_ms, float)
    assert p.passive_count == 20 and isinstance(p.passive_count, int)
    c = parse_params(CostModelParams, {"allow_passive": "no", "calibrate": "TRUE", "max_epoch_ms": 500.0})
    assert c.allow_passive is False and c.calibrate is True and c.max_epoch_ms == 500


@pytest.mark.parametrize(
    "params, key, allowed",
    [
        ({"passive_limt_ms": 1}, "passive_limt_ms", "history_weight"),  # the allowed keys are listed
        ({"passive_count": 0}, "passive_count", "an integer in 1..1000000"),
        ({"passive_count": "many"}, "passive_count", "an integer in 1..1000000"),
        ({"passive_count": 2.5}, "passive_count", "an integer"),
        ({"passive_count": True}, "passive_count", "an integer"),
        ({"passive_limit_ms": -1}, "passive_limit_ms", "a number in 0.0..3600000.0"),
        ({"passive_limit_ms": math.nan}, "passive_limit_ms", "a number"),
        ({"history_weight": 1.0}, "history_weight", "0.0..0.999"),
    ],
)
def test_bad_params_name_the_key_and_the_range(params: dict, key: str, allowed: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        parse_params(GilbertParams, params, "gilbert")
    assert info.value.key == key
    assert allowed in str(info.value)
    assert key in str(info.value)
    assert isinstance(info.value, HybridftError) and info.value.code == "policy-config"


def test_bool_params_refuse_other_words() -> None:
    with pytest.raises(PolicyConfigError, match="true or false"):
        parse_params(CostModelParams, {"allow_passive": "maybe"})


def test_cross_field_checks() -> None:
    with pytest.raises(PolicyConfigError, match="div_low=3 must not exceed div_high=2") as info:
        parse_params(ThresholdParams, {"div_low": 3})
    assert info.value.key == "div_low"
    with pytest.raises(PolicyConfigError, match="min_epoch_ms"):
        parse_params(CostModelParams, {"min_epoch_ms": 100, "max_epoch_ms": 50})


def test_policy_constructor_validates() -> None:
    assert StaticMC({"epoch_ms": "30"}).params.epoch_ms == 30
    with pytest.raises(PolicyConfigError, match="static-mc"):
        StaticMC({"epoch": 30})


def test_param_infos() -> None:
    infos = {info.name: info for info in param_infos(GilbertParams)}
    assert infos["passive_count"].kind == "int" and infos["passive_count"].default == 100
    assert infos["passive_count"].allowed == "an integer in 1..1000000"
    assert "colo-passive-count" in infos["passive_count"].help
