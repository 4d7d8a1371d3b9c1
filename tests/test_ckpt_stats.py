"""The typed reader of patch 0006's per-checkpoint figures (mc_driver/ckpt_stats.py); no QEMU needed."""

from __future__ import annotations

from typing import Any

import pytest

from mc_driver.ckpt_stats import (
    DONE_EVENT,
    LOADED_EVENT,
    CheckpointStats,
    CheckpointStatsError,
    CheckpointStatsTotals,
    SecondaryCheckpointStats,
)

# The example of X_COLO_CHECKPOINT_DONE in patch 0006's qapi/migration.json.
DONE = {
    "checkpoint": 12, "ram-pages": 813, "ram-zero-pages": 20, "ram-bytes": 3309312, "device-bytes": 99214,
    "run-us": 1000212, "pause-us": 8401, "ram-save-us": 3012,
}  # fmt: skip
LOADED = {"checkpoint": 12, "flushed-pages": 1002, "device-bytes": 99214, "pause-us": 6311}


def test_done_event_parses_every_member() -> None:
    stats = CheckpointStats.from_event(DONE_EVENT, DONE, timestamp=2032141960.417172)
    assert stats == CheckpointStats(
        checkpoint=12, ram_pages=813, ram_zero_pages=20, ram_bytes=3309312, device_bytes=99214,
        run_us=1000212, pause_us=8401, ram_save_us=3012, timestamp=2032141960.417172,
    )  # fmt: skip
    assert stats.dirty_bytes == 813 * 4096
    assert stats.dirty_bytes_per_s == pytest.approx(813 * 4096 / 1.000212)
    assert stats.pause_s == pytest.approx(0.008401)


def test_zero_run_has_no_rate() -> None:
    assert CheckpointStats.from_data(DONE | {"run-us": 0}).dirty_bytes_per_s == 0.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({k: v for k, v in DONE.items() if k != "ram-bytes"}, r"missing ram-bytes .*without patch 0006"),
        (DONE | {"ram-pages": "813"}, r"ram-pages is '813', not an integer"),
        (DONE | {"ram-pages": 8.5}, r"ram-pages is 8.5, not an integer"),
        (DONE | {"pause-us": True}, r"pause-us is True, not an integer"),
        (DONE | {"ram-bytes": -1}, r"ram-bytes is -1, a negative count"),
        (DONE | {"checkpoint": 0}, r"checkpoint is 0; they count from 1"),
        (DONE | {"ram-zero-pages": 814}, r"ram-zero-pages 814 > ram-pages 813"),
        (DONE | {"ram-save-us": 9000}, r"ram-save-us 9000 > pause-us 8401"),
        (DONE | {"dirty-rate": 5}, r"unknown members dirty-rate"),
        ([1, 2], r"data is list, not an object"),
    ],
    ids=[
        "missing",
        "string",
        "float",
        "bool",
        "negative",
        "zeroth",
        "zero>pages",
        "save>pause",
        "extra",
        "list",
    ],
)
def test_malformed_done_event_is_a_clear_error(data: Any, message: str) -> None:
    with pytest.raises(CheckpointStatsError, match=rf"^{DONE_EVENT}: {message}"):
        CheckpointStats.from_data(data)


def test_wrong_event_name_is_refused() -> None:
    with pytest.raises(CheckpointStatsError, match=f"expected {DONE_EVENT}, got STOP"):
        CheckpointStats.from_event("STOP", DONE)
    with pytest.raises(CheckpointStatsError, match=f"expected {LOADED_EVENT}, got {DONE_EVENT}"):
        SecondaryCheckpointStats.from_event(DONE_EVENT, LOADED)


def test_loaded_event_parses_and_checks() -> None:
    stats = SecondaryCheckpointStats.from_event(LOADED_EVENT, LOADED, timestamp=1.5)
    assert stats == SecondaryCheckpointStats(12, 1002, 99214, 6311, 1.5)
    with pytest.raises(CheckpointStatsError, match=rf"^{LOADED_EVENT}: missing flushed-pages"):
        SecondaryCheckpointStats.from_data({k: v for k, v in LOADED.items() if k != "flushed-pages"})
    with pytest.raises(CheckpointStatsError, match="checkpoint is 0"):
        SecondaryCheckpointStats.from_data(LOADED | {"checkpoint": 0})


def test_query_reply_with_and_without_a_last_checkpoint() -> None:
    sums = {"ram-pages": 9120, "ram-bytes": 37230016, "device-bytes": 1190568, "pause-us": 101020}
    totals = CheckpointStatsTotals.from_reply(sums | {"checkpoints": 12, "last": DONE})
    assert totals.checkpoints == 12 and totals.ram_pages == 9120 and totals.pause_us == 101020
    assert totals.last == CheckpointStats.from_data(DONE)
    empty = {"checkpoints": 0, "ram-pages": 0, "ram-bytes": 0, "device-bytes": 0, "pause-us": 0}
    assert CheckpointStatsTotals.from_reply(empty).last is None


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"checkpoints": 12}, r"missing device-bytes, pause-us, ram-bytes, ram-pages"),
        ({"checkpoints": 3, "last": None}, r"3 checkpoints but last is None"),
        ({"checkpoints": 0, "last": DONE}, r"0 checkpoints but last is"),
        ({"checkpoints": 11, "last": DONE}, r"last is checkpoint 12 of 11"),
        ({"checkpoints": 12, "last": DONE | {"ram-pages": -3}}, r"ram-pages is -3"),
    ],
    ids=["missing", "no-last", "last-without-count", "count-mismatch", "bad-last"],
)
def test_malformed_query_reply_is_a_clear_error(reply: dict[str, Any], message: str) -> None:
    base = {"ram-pages": 9120, "ram-bytes": 37230016, "device-bytes": 1190568, "pause-us": 101020}
    data = reply if "missing" in message else base | reply
    with pytest.raises(CheckpointStatsError, match=message):
        CheckpointStatsTotals.from_reply(data)
