"""Re-protection's sans-I/O parts: which side survives, copy progress, back-off, the record file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridft_common.reprotect_state import (
    AutoReprotect,
    Backoff,
    Case,
    CaseError,
    CopyProgress,
    Layout,
    PhaseRecord,
    ReprotectRecord,
    decide_case,
    format_summary,
)


@pytest.mark.parametrize(
    ("primary", "secondary", "failed_over", "expected"),
    [
        (True, False, False, Case.SECONDARY_LOST),
        (True, True, False, Case.SECONDARY_LOST),  # alive but out of COLO: the daemon said unprotected
        (False, True, True, Case.FAILED_OVER),
        (True, True, True, Case.FAILED_OVER),  # a fenced (stopped) old primary does not count
    ],
)
def test_the_survivor_is_decided_from_liveness_and_the_failover_report(
    primary: bool, secondary: bool, failed_over: bool, expected: Case
) -> None:
    assert decide_case(primary_alive=primary, secondary_alive=secondary, failed_over=failed_over) is expected


NOTHING_SURVIVES = [(False, False, False), (False, True, False), (True, False, True), (False, False, True)]


@pytest.mark.parametrize(("primary", "secondary", "failed_over"), NOTHING_SURVIVES)
def test_nothing_to_reprotect_is_an_error(primary: bool, secondary: bool, failed_over: bool) -> None:
    with pytest.raises(CaseError):
        decide_case(primary_alive=primary, secondary_alive=secondary, failed_over=failed_over)


def test_copy_progress_rate_and_time_left_over_the_window() -> None:
    progress = CopyProgress(window_s=2.0)
    progress.feed(0.0, 0, 1000)
    assert progress.rate is None and progress.seconds_left is None
    progress.feed(1.0, 100, 1000)
    assert progress.rate == pytest.approx(100.0)
    assert progress.seconds_left == pytest.approx(9.0)
    for t in range(2, 10):
        progress.feed(float(t), 100 + (t - 1) * 50, 1000)  # slower now: the window forgets the start
    assert progress.rate == pytest.approx(50.0)
    progress.feed(10.0, 1000, 1000)
    assert progress.seconds_left == 0.0
    shown = progress.as_dict()
    assert shown["bytes_done"] == 1000 and shown["bytes_total"] == 1000 and shown["seconds_left"] == 0.0


def test_a_ready_mirror_counts_as_copied_with_a_write_in_flight() -> None:
    # seen on the real pair: READY while a guest write was counted in len but not yet in offset
    progress = CopyProgress()
    progress.feed_job(0.0, {"offset": 4096, "len": 67125248, "ready": False})
    assert progress.done == 4096
    progress.feed_job(1.0, {"offset": 67121152, "len": 67125248, "ready": True})
    assert progress.done == progress.total == 67125248 and progress.seconds_left == 0.0


def test_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    backoff = Backoff(first=5, cap=30)
    assert backoff.next_delay() == 0.0
    delays = []
    for _ in range(5):
        backoff.failed()
        delays.append(backoff.next_delay())
    assert delays == [5, 10, 20, 30, 30]
    backoff.succeeded()
    assert backoff.next_delay() == 0.0


def test_the_record_round_trips_and_summarises(tmp_path: Path) -> None:
    record = ReprotectRecord(
        generation=2, attempt=1, state="failed", case="failed-over", phase="disk-copy",
        phases=[PhaseRecord("prepare", 1.0, 2.0),
                PhaseRecord("disk-copy", 2.0, 3.0, "the new secondary exited")],
        progress={"bytes_done": 10, "bytes_total": 100, "rate_bytes_s": 5 << 20, "seconds_left": 18.0},
        reason="disk-copy: the new secondary exited", unprotected_since=100.0,
        layout=Layout("ns", "ns-s2", 42), pids={"secondary": 7},
    )  # fmt: skip
    record.write(tmp_path)
    loaded = ReprotectRecord.load(tmp_path)
    assert loaded == record
    summary = loaded.summary(now=130.0)
    assert summary["unprotected_seconds"] == 30.0 and summary["reason"] == record.reason
    text = format_summary(summary)
    assert "10 of 100 bytes" in text and "5.0 MiB/s" in text and "18.0 s left" in text
    assert "the new secondary exited" in text


def test_a_missing_or_broken_record_reads_as_none(tmp_path: Path) -> None:
    assert ReprotectRecord.load(tmp_path) is None
    (tmp_path / "reprotect.json").write_text("{not json")
    assert ReprotectRecord.load(tmp_path) is None


def test_auto_reprotection_is_due_after_a_loss_and_backs_off_after_failures() -> None:
    auto = AutoReprotect(Backoff(first=5, cap=20))
    assert not auto.due(0.0, failed_over=False, daemon_state="protected", record_state="")
    assert not auto.due(0.0, failed_over=False, daemon_state="primary-lost", record_state="")  # agent acts
    assert not auto.due(0.0, failed_over=False, daemon_state=None, record_state="protected")
    assert auto.due(0.0, failed_over=True, daemon_state="primary-lost", record_state="")
    assert auto.due(0.0, failed_over=False, daemon_state="unprotected", record_state="")
    assert auto.attempt_failed(1.0) == 5
    assert not auto.due(5.9, failed_over=False, daemon_state=None, record_state="failed")
    assert auto.due(6.0, failed_over=False, daemon_state=None, record_state="failed")
    assert (
        auto.attempt_failed(6.0) == 10 and auto.attempt_failed(16.0) == 20 and auto.attempt_failed(36.0) == 20
    )
    auto.attempt_succeeded()
    assert auto.due(37.0, failed_over=True, daemon_state=None, record_state="protected")


def test_the_loss_time_is_the_daemons_last_secondary_lost_line() -> None:
    import time

    from mc_driver.reprotect import loss_time_from_log

    log = (
        "2026-12-05 20:35:13,026 hybridft.daemon ERROR secondary lost (the secondary QEMU exited): ...\n"
        "2026-12-05 20:40:01,500 hybridft.daemon ERROR secondary lost (mirror job BLOCK_JOB_ERROR): ...\n"
        "2026-12-05 20:41:00,000 hybridft.daemon INFO something else\n"
    )
    found = loss_time_from_log(log)
    assert found == time.mktime(time.strptime("2026-12-05 20:40:01", "%Y-%m-%d %H:%M:%S")) + 0.5
    assert loss_time_from_log("no such line\n") is None
