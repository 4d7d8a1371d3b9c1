"""The daemon's control requests are checked by pure functions before anything changes: each bad
argument gets its own ``bad-args`` message, each good one a typed request."""

from __future__ import annotations

from typing import Any

import pytest

from controller.operating_point import PointRequest, PointSource
from controller.requests import (
    CheckpointRequest,
    parse_checkpoint_request,
    parse_mode_request,
    resolve_stop_via,
)
from hybridft_common.control import ControlError
from hybridft_common.vocabulary import Mode, StopVia


def test_a_good_mode_request_is_typed() -> None:
    assert parse_mode_request({"mode": "colo"}, seal_hook=False) == PointRequest(Mode.COLO)
    request = parse_mode_request(
        {"mode": "mc", "epoch_ms": 20, "passive_secondary": True, "stop_via": "auto"}, seal_hook=True
    )
    assert request == PointRequest(Mode.MC, 20, True, StopVia.QEMU, PointSource.OPERATOR)
    assert parse_mode_request({"mode": "mc", "stop_via": "auto"}, seal_hook=False).stop_via is StopVia.QMP
    # absent and null are alike: the field is left as it is
    assert parse_mode_request({"mode": "mc", "epoch_ms": None}, seal_hook=False).epoch_ms is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "mode must be 'mc' or 'colo', not None"),
        ({"mode": "fast"}, "mode must be 'mc' or 'colo', not 'fast'"),
        ({"mode": "mc", "epoch_ms": 0}, "epoch_ms must be an integer 1..600000, got 0"),
        ({"mode": "mc", "epoch_ms": "50"}, "epoch_ms must be an integer 1..600000, got '50'"),
        ({"mode": "mc", "epoch_ms": True}, "epoch_ms must be an integer 1..600000, got True"),
        ({"mode": "mc", "passive_secondary": "yes"}, "passive_secondary must be true or false, got 'yes'"),
        ({"mode": "mc", "stop_via": "magic"}, "stop_via must be 'auto', 'qemu' or 'qmp', not 'magic'"),
        ({"mode": "mc", "stop_via": "qemu"}, "stop_via 'qemu' needs QEMUs with x-colo-expect-seal"),
        # the first bad argument is the one named
        ({"mode": "x", "epoch_ms": 0}, "mode must be"),
        ({"mode": "mc", "epoch_ms": 0, "stop_via": "magic"}, "epoch_ms must be"),
    ],
)
def test_bad_mode_requests_name_what_is_wrong(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_mode_request(args, seal_hook=False)
    assert info.value.code == "bad-args" and info.value.message.startswith(message), info.value.message


def test_stop_via_qemu_is_fine_where_the_seal_hook_is() -> None:
    assert parse_mode_request({"mode": "mc", "stop_via": "qemu"}, seal_hook=True).stop_via is StopVia.QEMU
    assert resolve_stop_via("qmp", True) is StopVia.QMP
    with pytest.raises(ValueError, match="this pair's have none"):
        resolve_stop_via("qemu", False)


def test_checkpoint_request_timeouts() -> None:
    assert parse_checkpoint_request({}) == CheckpointRequest(30.0)
    assert parse_checkpoint_request({"timeout": 600}) == CheckpointRequest(600.0)
    assert parse_checkpoint_request({"timeout": 0.5}).timeout == 0.5
    for bad in (0, -1, 600.5, "10", True, None):
        with pytest.raises(ControlError) as info:
            parse_checkpoint_request({"timeout": bad})
        assert info.value.code == "bad-args"
        assert info.value.message == f"timeout must be seconds in (0, 600], got {bad!r}"
