"""The secondary takes over while the primary still lives (the agent failed over, e.g. after a heartbeat
gap): the daemon must see that the secondary left COLO *as the secondary* and keep the primary stopped
-- resuming it like after a lost secondary would leave two live copies of the guest.

Its own pair (the module-scoped fixtures of tests/helpers/daemon_harness.py: one pair per module), because
the takeover ends the pair's protection.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.daemon import Daemon
from hybridft_common.vocabulary import StopVia
from tests.helpers.daemon_harness import Harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.netns]


@pytest.fixture(scope="module")
def stop_via() -> StopVia:
    """One pair, stopping via QEMU (what ``auto`` picks on the patched build): the takeover is seen
    between checkpoints, where both ways are alike."""
    return StopVia.QEMU


def test_secondary_takeover_keeps_the_primary_stopped(harness: Harness, daemon: Daemon) -> None:
    async def run() -> tuple[dict, dict]:
        observer_p, observer_s = harness.pair.primary, harness.pair.secondary
        assert observer_p is not None and observer_s is not None
        await daemon.request_checkpoint("test", timeout=30)
        await observer_s.execute("x-colo-lost-heartbeat")  # what the agent does when it fails over
        deadline = time.monotonic() + 20
        while daemon.state == "protected":
            assert time.monotonic() < deadline, daemon.status()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # nothing resumes the primary afterwards either
        return await observer_p.execute("query-status"), await observer_s.execute("query-status")

    primary, secondary = harness.run(run(), timeout=120)
    status = daemon.status()
    assert status["state"] == "failed-over" and "took over" in status["state_reason"], status
    assert primary["running"] is False and secondary["running"] is True
    assert status["unrequested_stops"] == 0
