"""The daemon's sans-I/O parts: how replication ended (took over or lost), the event accounting, and
the pair states; plus QmpSession.connected, which the daemon reads instead of qemu.qmp's internals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.accounting import EventAccounting
from controller.pair_state import (
    NO_ANSWER,
    ColoStatus,
    NoAnswer,
    PairState,
    ReplicationEnd,
    ReplicationEndDecider,
)
from mc_driver.qmp import QmpSession

TOOK_OVER, LOST, DONT_KNOW = ReplicationEnd.TOOK_OVER, ReplicationEnd.LOST, ReplicationEnd.DONT_KNOW


@pytest.mark.parametrize(
    ("alive", "status", "end"),
    [
        # the secondary left COLO as the secondary: the agent failed over -> keep the primary stopped
        (True, ColoStatus("none", "secondary"), TOOK_OVER),
        # still in COLO, or never was the secondary: it did not take over
        (True, ColoStatus("secondary", "none"), LOST),
        (True, ColoStatus("none", "none"), LOST),
        (True, ColoStatus("none", "primary"), LOST),
        (True, ColoStatus(None, None), LOST),
        # no answer (no connection, an error, 2 s without a reply) from a live secondary: don't know
        (True, NO_ANSWER, DONT_KNOW),
        # a dead secondary took nothing over, whatever it said before
        (False, NO_ANSWER, LOST),
        (False, ColoStatus("none", "secondary"), LOST),
    ],
)
def test_took_over_or_lost(alive: bool, status: ColoStatus | NoAnswer, end: ReplicationEnd) -> None:
    assert ReplicationEndDecider().decide(secondary_alive=alive, colo_status=status) is end


@pytest.mark.parametrize(
    ("alive", "status", "disk", "agent", "end"),
    [
        # the disk server failed over, or the agent's report says it began: a failover happened
        (True, ColoStatus("secondary", "none"), True, False, TOOK_OVER),
        (True, NO_ANSWER, True, False, TOOK_OVER),
        (False, NO_ANSWER, True, False, TOOK_OVER),
        (True, ColoStatus("secondary", "none"), False, True, TOOK_OVER),
        # a disk server that does not answer decides nothing by itself
        (True, ColoStatus("secondary", "none"), NO_ANSWER, False, LOST),
        (True, NO_ANSWER, NO_ANSWER, False, DONT_KNOW),
    ],
)
def test_the_disk_server_and_the_agent_are_asked_too(
    alive: bool, status: ColoStatus | NoAnswer, disk: bool | NoAnswer, agent: bool, end: ReplicationEnd
) -> None:
    decided = ReplicationEndDecider().decide(
        secondary_alive=alive, colo_status=status, disk_failed_over=disk, agent_failing_over=agent
    )
    assert decided is end


def test_colo_status_from_the_qmp_reply() -> None:
    reply = {"mode": "none", "last-mode": "secondary", "reason": "request"}
    assert ColoStatus.from_reply(reply) == ColoStatus("none", "secondary")
    assert ColoStatus.from_reply({}) == ColoStatus(None, None)
    assert ColoStatus.from_reply({"mode": 3, "last-mode": None}) == ColoStatus(None, None)


def test_pair_states_keep_their_status_strings() -> None:
    assert [str(state) for state in PairState] == [
        "starting", "protected", "unprotected", "primary-lost", "failed-over", "stopped", "undecided"
    ]  # fmt: skip
    assert PairState.PRIMARY_LOST == "primary-lost"  # tools compare status["state"] with these


def test_every_primary_stop_is_matched_by_a_checkpoint() -> None:
    accounts = EventAccounting()
    accounts.seen("primary", ["RESUME", "COLO_EXIT"])
    assert accounts.checkpoint_started() == 1
    accounts.checkpoint_completed((1, 1))  # the checkpoint took its own STOP on each side
    assert (accounts.primary_stops, accounts.unrequested_stops) == (1, 0)
    assert accounts.as_dict() == {
        "primary": {"RESUME": 2, "COLO_EXIT": 1, "STOP": 1},
        "secondary": {"STOP": 1, "RESUME": 1},
    }
    # a STOP between checkpoints (QEMU's own timer, an operator's `stop`) is one nobody asked for
    accounts.seen("primary", ["STOP"])
    assert accounts.unrequested_stops == 1
    accounts.seen("secondary", ["STOP"])  # the secondary's (a passive one) do not count
    assert accounts.unrequested_stops == 1
    # a failed checkpoint that stopped nothing leaves the count where it was, never below 0
    accounts.checkpoint_started()
    accounts.checkpoint_started()
    assert accounts.unrequested_stops == 0


def test_session_connected_follows_the_connection(tmp_path: Path) -> None:
    """A minimal QMP server: greeting, capabilities.  The session is connected until it closes, or
    until the server (QEMU) goes away."""

    async def scenario() -> list[bool]:
        path = tmp_path / "qmp.sock"
        hang_up = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                         b'"package": ""}, "capabilities": []}}\r\n')  # fmt: skip
            await writer.drain()
            await reader.read(4096)  # qmp_capabilities (the client ends it with no newline)
            writer.write(b'{"return": {}}\r\n')
            await writer.drain()
            await hang_up.wait()
            writer.close()

        server = await asyncio.start_unix_server(serve, path=str(path))
        seen = [QmpSession("test").connected]  # never connected
        session = await QmpSession.connect(path, timeout=5, name="test")
        seen.append(session.connected)
        await session.close()
        seen.append(session.connected)  # closed by us
        session = await QmpSession.connect(path, timeout=5, name="test")
        seen.append(session.connected)
        hang_up.set()  # QEMU went away
        for _ in range(100):
            if not session.connected:
                break
            await asyncio.sleep(0.02)
        seen.append(session.connected)
        await session.close()
        server.close()
        return seen

    assert asyncio.run(scenario()) == [False, True, False, True, False]
