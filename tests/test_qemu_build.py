"""The patch series and the cached build of the patched QEMU (mc_driver/qemu_build.py, mc_driver/patches/)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mc_driver import qemu_build
from mc_driver.qemu_build import PATCH_DIR, BuildInputs, QemuBuildError, read_series
from mc_driver.qmp import QmpSession

pytestmark = pytest.mark.qemu


def test_series_names_every_patch_once_in_order() -> None:
    names = [p.name for p in read_series()]
    on_disk = sorted(p.name for p in PATCH_DIR.glob("*.patch"))
    assert names == on_disk  # nothing forgotten, nothing extra, numbered order
    assert len(names) >= 3


@pytest.mark.parametrize("patch", sorted(PATCH_DIR.glob("*.patch")), ids=lambda p: p.name[:4])
def test_each_patch_is_upstream_style(patch: Path) -> None:
    text = patch.read_text()
    subject = re.search(r"^Subject: \[PATCH[^\]]*\] (.+)$", text, re.MULTILINE)
    assert subject, "git format-patch header with a Subject"
    assert re.match(r"^[\w/-]+: ", subject.group(1)), "subject starts with the subsystem"
    message = text.split("\n\n", 1)[1].split("\n---\n", 1)[0]
    paragraphs = [p for p in message.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 3, "a message explaining the bug, how it shows and why the fix is right"
    assert max(len(line) for line in message.splitlines()) <= 76
    assert "\ndiff --git " in text


def test_exclude_drops_one_patch_and_rejects_unknown_names() -> None:
    full = read_series()
    without = read_series(exclude=["0002"])
    assert [p.name for p in without] == [p.name for p in full if not p.name.startswith("0002-")]
    with pytest.raises(QemuBuildError, match="no such patch"):
        read_series(exclude=["0099"])


def test_cache_key_covers_patch_contents_version_and_configure(tmp_path: Path) -> None:
    for patch in PATCH_DIR.glob("*.patch"):
        shutil.copy(patch, tmp_path / patch.name)
    shutil.copy(PATCH_DIR / "series", tmp_path / "series")
    base = BuildInputs("1:7.2+dfsg-7", read_series(tmp_path), qemu_build.CONFIGURE_ARGS)
    base_key = base.key  # the key hashes the patch files' contents as they are now
    first = sorted(tmp_path.glob("*.patch"))[0]
    first.write_text(first.read_text() + "\n")
    edited = BuildInputs("1:7.2+dfsg-7", read_series(tmp_path), qemu_build.CONFIGURE_ARGS)
    other_version = BuildInputs("1:7.2+dfsg-8", base.patches, qemu_build.CONFIGURE_ARGS)
    other_args = BuildInputs("1:7.2+dfsg-7", base.patches, (*qemu_build.CONFIGURE_ARGS, "--enable-debug"))
    assert base.key != base_key  # same inputs object, edited file: a different key
    keys = {base_key, edited.key, other_version.key, other_args.key}
    assert len(keys) == 4


def test_bad_series_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("# comment\n0001-missing.patch\n")
    with pytest.raises(QemuBuildError, match=r"0001-missing\.patch, which does not exist"):
        read_series(tmp_path)
    with pytest.raises(QemuBuildError, match="no patch series"):
        read_series(tmp_path / "nowhere")


def test_patched_qemu_is_cached_and_has_the_hold_hook(tmp_path: Path) -> None:
    """The real build (built by `make setup`); a second call reuses it; the binary carries the patches."""
    result = qemu_build.build()
    again = qemu_build.build()
    assert again.built is False and again.binary == result.binary and again.key == result.key
    binary = qemu_build.patched_qemu()
    assert str(binary) == result.binary
    assert Path(result.log).is_file()
    version = subprocess.run(
        [str(binary), *qemu_build.FIRMWARE_ARGS, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "7.2" in version
    # The hold hook's QAPI event is compiled into the QMP schema only with patch 0003. The schema is read
    # over a QMP socket, not `-qmp stdio`: QEMU writes stdio without blocking, so a reply larger than the
    # pipe (64 KiB) can be cut short when the `quit` that follows is handled first.
    events = asyncio.run(_schema_events(binary, tmp_path / "qmp.sock"))
    assert "X_COLO_CHECKPOINT_HELD" in events
    assert "COLO_EXIT" in events


async def _schema_events(binary: Path, sock: Path) -> set[str]:
    cmd = [str(binary), *qemu_build.FIRMWARE_ARGS, "-machine", "none", "-nodefaults", "-display", "none",
           "-S", "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        session = await QmpSession.connect(sock, timeout=60, alive=lambda: proc.poll() is None)
        async with session:
            schema = await session.execute("query-qmp-schema")
        return {entry["name"] for entry in schema if entry.get("meta-type") == "event"}
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_build_command_json_reports_the_cached_build() -> None:
    proc = subprocess.run(
        [str(Path(".venv/bin/hybridft").resolve()), "qemu", "build", "--json"],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["built"] is False
    assert Path(data["binary"]).is_file()
    assert data["patches"] == [p.name for p in read_series()]
