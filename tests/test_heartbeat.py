"""Heartbeat lines: what the daemon writes is what the agent reads, byte for byte the format agents
already parse, and a line that is not a heartbeat is refused with the reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.heartbeat import Heartbeat, HeartbeatError


def test_the_four_messages_on_the_wire() -> None:
    # the protocol's beat at each step, the periodic beat once the primary is lost, the primary-lost
    # message (no state), the planned failover: compact JSON lines with the keys agents know
    assert Heartbeat(1.5, 7, "sealed").encode() == b'{"t":1.5,"epoch":7,"state":"sealed"}\n'
    assert (
        Heartbeat(1.5, 7, "committed", primary_lost=True).encode()
        == b'{"t":1.5,"epoch":7,"state":"committed","primary_lost":true}\n'
    )
    lost = Heartbeat(2.0, None, None, primary_lost=True)
    assert lost.encode() == b'{"t":2.0,"epoch":null,"primary_lost":true}\n'
    assert (
        Heartbeat(3.25, 9, "committed", failover=True).encode()
        == b'{"t":3.25,"epoch":9,"state":"committed","failover":true}\n'
    )


@given(
    t=st.floats(allow_nan=False, allow_infinity=False),
    epoch=st.none() | st.integers(min_value=0, max_value=2**63),
    state=st.none() | st.sampled_from(["open", "sealed", "loaded", "committed"]),
    primary_lost=st.booleans(),
    failover=st.booleans(),
)
def test_encode_decode_round_trip(
    t: float, epoch: int | None, state: str | None, primary_lost: bool, failover: bool
) -> None:
    beat = Heartbeat(t, epoch, state, primary_lost, failover)
    line = beat.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert Heartbeat.decode(line) == beat
    assert Heartbeat.decode(line.decode()) == beat


def test_lines_written_by_hand_decode_too() -> None:
    # any key order, integer t, unknown keys ignored (a newer daemon may say more)
    beat = Heartbeat.decode(b'{"primary_lost": true, "epoch": 4, "t": 10, "why": "qmp dropped"}')
    assert beat == Heartbeat(10.0, 4, None, primary_lost=True)
    assert Heartbeat.decode('{"t": 1.0}') == Heartbeat(1.0, None, None)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{nope", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object: list"),
        (b"null", "not a JSON object: NoneType"),
        (b'{"epoch": 1, "state": "sealed"}', "no 't'"),
        (b'{"t": "now"}', "'t' must be a number, got 'now'"),
        (b'{"t": true}', "'t' must be a number, got True"),
        (b'{"t": 1, "epoch": "3"}', "'epoch' must be an integer or null, got '3'"),
        (b'{"t": 1, "epoch": true}', "'epoch' must be an integer or null, got True"),
        (b'{"t": 1, "epoch": 1.5}', "'epoch' must be an integer or null, got 1.5"),
        (b'{"t": 1, "state": 7}', "'state' must be a string or null, got 7"),
        (b'{"t": 1, "primary_lost": 1}', "'primary_lost' must be true or false, got 1"),
        (b'{"t": 1, "failover": "yes"}', "'failover' must be true or false, got 'yes'"),
    ],
)
def test_malformed_lines_are_refused_with_the_reason(line: bytes, reason: str) -> None:
    with pytest.raises(HeartbeatError) as info:
        Heartbeat.decode(line)
    assert str(info.value).startswith(reason), str(info.value)
    assert isinstance(info.value, ValueError)


def test_what_the_agent_reads_is_plain_json() -> None:
    """An agent of the previous release parsed the line with json.loads: the keys are the same."""
    message = json.loads(Heartbeat(5.0, 3, "loaded").encode())
    assert message == {"t": 5.0, "epoch": 3, "state": "loaded"}
