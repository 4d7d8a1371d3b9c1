"""Accelerator choice (mc_driver/accel.py): expectations come from this host's real state, not constants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mc_driver import accel
from mc_driver.accel import NoUsableQemu, choose_qemu, probe_kvm

pytestmark = pytest.mark.qemu

HYBRIDFT = str(Path(".venv/bin/hybridft").resolve())


def _host_kvm_boots_linux() -> bool:
    return Path("/dev/kvm").exists() and not Path("/sys/module/kvm_pvm").exists()


def test_probe_matches_the_host() -> None:
    probe = probe_kvm()
    assert probe.usable == _host_kvm_boots_linux()
    if Path("/sys/module/kvm_pvm").exists():
        assert "kvm_pvm" in probe.reason


def test_choice_follows_the_host_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDFT_ACCEL", raising=False)
    monkeypatch.delenv("HYBRIDFT_QEMU_BINARY", raising=False)
    choice = choose_qemu(build=True)
    assert choice.binary.is_file() and os.access(choice.binary, os.X_OK)
    if _host_kvm_boots_linux():
        assert (choice.accel, choice.patched) == ("kvm", False)
    else:
        assert (choice.accel, choice.patched) == ("tcg", True)
        assert "TCG" in choice.reason and "patched" in choice.reason
    assert choice.accel_args()[:2] == ["-accel", choice.accel]


def test_override_and_bad_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HYBRIDFT_QEMU_BINARY", raising=False)
    monkeypatch.setenv("HYBRIDFT_ACCEL", "tcg")
    forced = choose_qemu(build=True)
    assert forced.accel == "tcg" and forced.patched and "requested explicitly" in forced.reason
    monkeypatch.setenv("HYBRIDFT_ACCEL", "xen")
    with pytest.raises(NoUsableQemu, match="kvm or tcg"):
        choose_qemu(build=False)
    monkeypatch.setenv("HYBRIDFT_ACCEL", "tcg")
    monkeypatch.setenv("HYBRIDFT_QEMU_BINARY", str(tmp_path / "missing"))
    with pytest.raises(NoUsableQemu, match="not an executable"):
        choose_qemu(build=False)


def test_the_patched_binary_can_run_with_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Patch 0004 is not TCG-specific: HYBRIDFT_QEMU_BINARY is honoured with KVM too."""
    device = tmp_path / "kvm"
    device.touch()
    monkeypatch.setattr(accel, "KVM_DEVICE", device)
    monkeypatch.setenv("HYBRIDFT_ACCEL", "kvm")
    monkeypatch.setenv("HYBRIDFT_QEMU_BINARY", sys.executable)  # any executable stands in for it
    choice = choose_qemu(build=False)
    assert (choice.binary, choice.accel, choice.patched) == (Path(sys.executable), "kvm", True)
    assert "-L" in choice.firmware_args and "HYBRIDFT_QEMU_BINARY" in choice.reason
    monkeypatch.delenv("HYBRIDFT_QEMU_BINARY")
    stock = choose_qemu(build=False)
    assert (stock.accel, stock.patched, stock.firmware_args) == ("kvm", False, ())
    # the stock choice says what it lacks, and how to run the patched build with KVM instead
    assert stock.notes == (accel.STOCK_KVM_WARNING,) and choice.notes == ()
    assert "0009" in stock.notes[0] and "HYBRIDFT_QEMU_BINARY" in stock.notes[0]
    assert stock.reason_with_warnings() == f"{stock.reason}; warning: {accel.STOCK_KVM_WARNING}"
    assert choice.reason_with_warnings() == choice.reason


def test_kvm_missing_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    probe = probe_kvm()
    assert not probe.usable and "does not exist" in probe.reason
    monkeypatch.setenv("HYBRIDFT_ACCEL", "kvm")
    with pytest.raises(NoUsableQemu, match="KVM requested"):
        choose_qemu(build=False)


def test_which_command_json_and_table() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRIDFT_ACCEL", "HYBRIDFT_QEMU_BINARY")}
    proc = subprocess.run(
        [HYBRIDFT, "qemu", "which", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["accel"] == ("kvm" if _host_kvm_boots_linux() else "tcg")
    assert Path(data["binary"]).is_file() and data["reason"]
    table = subprocess.run([HYBRIDFT, "qemu", "which"], capture_output=True, text=True, env=env, check=False)
    assert table.returncode == 0 and "reason:" in table.stdout and data["binary"] in table.stdout


def test_which_warns_about_stock_qemu_with_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The table says what stock QEMU lacks whenever it is the choice (here a KVM host is faked)."""
    from click.testing import CliRunner

    device = tmp_path / "kvm"
    device.touch()
    monkeypatch.setattr(accel, "KVM_DEVICE", device)
    monkeypatch.setenv("HYBRIDFT_ACCEL", "kvm")
    monkeypatch.delenv("HYBRIDFT_QEMU_BINARY", raising=False)
    result = CliRunner().invoke(accel.which_command, [])
    assert result.exit_code == 0, result.output
    assert "using stock QEMU with KVM" in result.output
    assert f"warning:  {accel.STOCK_KVM_WARNING}" in result.output
    monkeypatch.setenv("HYBRIDFT_QEMU_BINARY", sys.executable)
    patched = CliRunner().invoke(accel.which_command, [])
    assert patched.exit_code == 0 and accel.STOCK_KVM_WARNING not in patched.output
