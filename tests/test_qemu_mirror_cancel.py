"""Patch 0009: force-cancelling a write-blocking mirror while a guest write is being copied to the target.

The daemon does exactly that when the secondary is lost (``block-job-cancel force=true`` on the primary's
``hft-mirror`` while the guest keeps writing), and QEMU 7.2 then wrote into freed heap memory:
``mirror_run()`` freed the job's in-flight bitmap before the drain that waits for the active write, whose
settle step then cleared its chunk in the freed bitmap.  The primary aborted a moment later
("malloc(): unsorted double linked list corrupted"), about one lost-secondary re-protection run in ten.

Here the race is made certain instead of rare, in one QEMU with no guest: the mirror's target is a
``throttle`` node whose write limit holds a second write for seconds, the writes come from HMP ``qemu-io``
on the source's BlockBackend (``aio_write`` returns at once), and the cancel arrives while the held write is
being copied.  A write into freed memory does not crash by itself, so QEMU runs under valgrind's memcheck,
which reports it; the test fails on any invalid access whose stack is in ``block/mirror.c``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mc_driver.accel import choose_qemu
from mc_driver.qemu_build import FIRMWARE_ARGS
from mc_driver.qmp import QmpSession

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VALGRIND = shutil.which("valgrind")
DISK = 64 << 20
GRANULARITY = 64 << 10  # the mirror's default for a target without a cluster size (the pair's NBD too)
# bytes per second the throttled target accepts: the first write passes (the bucket is empty) and fills
# the bucket, the second then waits about PRIME / BPS seconds -- long enough for the cancel to arrive
BPS = 4096
PRIME = 16 << 10


@pytest.fixture(scope="module")
def qemu_binary() -> Path:
    return choose_qemu(build=True, force_accel="tcg").binary


def qemu_args(binary: Path, qmp: Path) -> list[str]:
    return [
        str(binary), *FIRMWARE_ARGS, "-nodefaults", "-display", "none", "-machine", "none", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-object", f"throttle-group,id=tg0,x-bps-write={BPS}",
        "-blockdev", f"null-co,node-name=target-null,size={DISK}",
        "-blockdev", "throttle,node-name=target,throttle-group=tg0,file=target-null",
        "-drive", f"if=none,id=drive0,node-name=source,driver=null-co,size={DISK},read-zeroes=on",
    ]  # fmt: skip


def mirror_errors(log: str) -> list[str]:
    """memcheck's invalid-access reports whose stack or allocation history passes through block/mirror.c.

    Each report is a header at the left margin (``==PID== Invalid write of size 8``) followed by indented
    lines (its stack, `` Address ... free'd``, the stacks of the free and the allocation)."""
    blocks: list[list[str]] = []
    for line in log.splitlines():
        body = line.split("== ", 1)[1] if line.startswith("==") and "== " in line else line
        if not body.strip():
            continue
        if body[0] != " " or not blocks:
            blocks.append([body])
        else:
            blocks[-1].append(body)
    return ["\n".join(b) for b in blocks if b[0].startswith("Invalid ") and any("mirror.c" in x for x in b)]


async def cancel_during_active_write(qmp: Path, alive: Callable[[], bool]) -> float:
    """Mirror drive0 write-blocking into the throttled target, hold one guest write in the copy, force-cancel.
    Returns the seconds from the cancel to BLOCK_JOB_CANCELLED: the job ends only once the held write is
    done, so a short time would mean the write was not held and the test proved nothing."""
    session = await QmpSession.connect(qmp, timeout=180, alive=alive)  # valgrind starts QEMU slowly
    try:
        await session.execute("blockdev-mirror", {
            "job-id": "m0", "device": "drive0", "target": "target", "sync": "none",
            "copy-mode": "write-blocking", "auto-dismiss": False,
        })  # fmt: skip
        await session.wait_event("BLOCK_JOB_READY", timeout=120)
        # an active write (copied to the target before it completes) that fills the throttle's bucket...
        await session.hmp(f'qemu-io drive0 "aio_write -P 0x11 0 {PRIME}"')
        await asyncio.sleep(0.5)
        # ...and one at chunk 30 (where the pair's diskwriter was) that the throttle holds in its copy
        await session.hmp(f'qemu-io drive0 "aio_write -P 0x22 {30 * GRANULARITY} 4k"')
        jobs = await session.execute("query-block-jobs")
        assert jobs and jobs[0]["ready"], jobs
        cancelled_at = time.monotonic()
        await session.execute("block-job-cancel", {"device": "m0", "force": True})
        await session.wait_event("BLOCK_JOB_CANCELLED", timeout=120)
        waited = time.monotonic() - cancelled_at
        # the QMP traffic that aborted the primary came here: commands allocate, the heap is checked
        for _ in range(5):
            await session.execute("query-block-jobs")
        await session.execute("job-dismiss", {"id": "m0"})
        await session.execute("blockdev-del", {"node-name": "target"})
        await session.execute("quit")
        return waited
    finally:
        await session.close()


def test_force_cancel_during_an_active_write_touches_no_freed_memory(
    qemu_binary: Path, tmp_path: Path
) -> None:
    qmp, log = tmp_path / "qmp.sock", tmp_path / "valgrind.log"
    # never a silent skip: `make setup` installs valgrind, and without it this test proves nothing
    assert VALGRIND is not None, "needs valgrind to see the write into freed memory: run `make setup`"
    proc = subprocess.Popen(
        [VALGRIND, "--tool=memcheck", "--error-limit=no", "--num-callers=30", f"--log-file={log}",
         *qemu_args(qemu_binary, qmp)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        waited = asyncio.run(cancel_during_active_write(qmp, lambda: proc.poll() is None))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nthe job ended {waited:.2f} s after the cancel (the held write's copy)")
    text = log.read_text(errors="replace")
    errors = mirror_errors(text)
    assert not errors, f"{len(errors)} invalid accesses in block/mirror.c, the first:\n{errors[0]}"
    assert proc.returncode == 0, (proc.returncode, out.decode(errors="replace")[-2000:], text[-3000:])
    assert waited > 1.0, f"the job ended {waited:.2f} s after the cancel: no write was held in its copy"
