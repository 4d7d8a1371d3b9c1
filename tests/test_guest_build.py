"""Building the guest: package choice, module order, command line, cache, CLI; control-reply parsing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import main
from mc_driver.guest.control import (
    ControlReply,
    ControlReplyParser,
    ServiceState,
    encode_command,
    parse_services,
    wait_for_ready,
)
from mc_driver.guest.errors import GuestBuildError, GuestControlError, GuestError
from mc_driver.guest.image import (
    BASE_APPEND,
    MODULES,
    GuestImage,
    build_guest,
    find_kernel_package,
    modinfo_depends,
    module_load_order,
    newest_kernel_package,
    prune_cache,
)
from mc_driver.guest.qemu_args import guest_cmdline


def test_newest_kernel_package_compares_abi_numbers_not_strings() -> None:
    out = "\n".join(
        [
            "linux-image-6.1.0-9-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud",
            "linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud",
            "linux-image-6.1.0-100-cloud-amd64-dbg - debug symbols",
            "linux-image-6.1.0-13-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud",
        ]
    )
    assert newest_kernel_package(out) == "linux-image-6.1.0-56-cloud-amd64-unsigned"
    assert newest_kernel_package("") is None


def test_module_order_puts_dependencies_first() -> None:
    depends = {
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_net": ["virtio", "virtio_ring", "net_failover"],
        "net_failover": ["failover"],
        "failover": [],
    }
    order = module_load_order(["virtio_net", "virtio"], depends)
    assert sorted(order) == sorted(depends)
    for mod, deps in depends.items():
        assert all(order.index(d) < order.index(mod) for d in deps)
    with pytest.raises(GuestBuildError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(GuestBuildError, match=r"missing_mod.*not found"):
        module_load_order(["a"], {"a": ["missing_mod"]})


def test_modinfo_depends_reads_the_modinfo_string() -> None:
    ko = b"\x7fELF junk\x00license=GPL\x00depends=virtio,net-failover\x00vermagic=6.1\x00"
    assert modinfo_depends(ko) == ["virtio", "net_failover"]
    assert modinfo_depends(b"\x00depends=\x00name=x\x00") == []


def test_guest_cmdline_builds_and_validates() -> None:
    line = guest_cmdline(
        "10.0.0.5/16", gateway="10.0.0.1", services=["echod"], run=[("memdirty", "32", "64")]
    )
    assert line.startswith(BASE_APPEND)
    assert "hft.ip=10.0.0.5/16" in line and "hft.gw=10.0.0.1" in line
    assert "hft.services=echod" in line and "hft.run=memdirty,32,64" in line
    assert "hft.services=none" in guest_cmdline(services=[])
    assert "hft.services=tokend,rrserver" in guest_cmdline(services=["tokend", "rrserver"])
    with pytest.raises(ValueError, match="unknown services"):
        guest_cmdline(services=["sshd"])
    with pytest.raises(ValueError, match="blanks"):
        guest_cmdline("10.0.0.5/16 init=/bin/sh")
    with pytest.raises(ValueError, match="bad boot workload"):
        guest_cmdline(run=[("memdirty", "1,2")])


def test_control_reply_parser_splits_replies_at_end_markers() -> None:
    p = ControlReplyParser()
    assert p.feed(b"garbage from boot\nPONG ab") == []
    assert p.feed(b"c\nHFT-END 0\nPID 12\nHFT-E") == [ControlReply(("garbage from boot", "PONG abc"), 0)]
    assert p.feed(b"ND 0\nHFT-END 127\n") == [ControlReply(("PID 12",), 0), ControlReply((), 127)]
    assert p.feed(b"\xff\xfe\r\nHFT-END x\n")[0].rc == -1
    assert encode_command("run", "memdirty", "8", "16") == b"run memdirty 8 16\n"
    with pytest.raises(GuestControlError):
        encode_command("sh", "echo hi")


def test_build_is_cached_and_copied_to_out(tmp_path: Path) -> None:
    image = build_guest()
    assert image.kernel.stat().st_size > 5_000_000
    assert image.initrd.stat().st_size > 1_000_000
    assert image.append == BASE_APPEND
    assert set(MODULES) <= set(image.modules)
    assert image.modules.index("virtio_ring") < image.modules.index("virtio_net")
    files = subprocess.run(
        ["busybox", "cpio", "-t"], stdin=image.initrd.open("rb"), capture_output=True, text=True
    )
    listed = set(files.stdout.split())
    for needed in ("init", "bin/busybox", "bin/httpd", "bin/memdirty", "bin/echod", "dev/console"):
        assert needed in listed
    assert "lib/modules/virtio_net.ko" in listed
    start = time.monotonic()
    again = build_guest(tmp_path / "out")
    assert time.monotonic() - start < 10  # cached: no rebuild
    assert again.inputs_hash == image.inputs_hash
    assert again.kernel == tmp_path / "out" / "vmlinuz"
    assert again.kernel.read_bytes() == image.kernel.read_bytes()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs_hash"] == image.inputs_hash


def test_build_command_prints_paths_and_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["guest", "build", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert Path(info["kernel"]) == tmp_path / "vmlinuz" and Path(info["initrd"]).is_file()
    text = CliRunner().invoke(main, ["guest", "build"])
    assert text.exit_code == 0 and "kernel" in text.output and "initrd" in text.output


def test_run_command_without_a_guest_is_a_clear_error(tmp_path: Path) -> None:
    sock = tmp_path / "nothing.sock"
    result = CliRunner().invoke(
        main, ["guest", "run", "memdirty", "8", "16", "--control", f"unix:{sock}", "--timeout", "0.3"]
    )
    assert result.exit_code == 1
    assert "cannot connect to guest control" in result.output
    bad = CliRunner().invoke(main, ["guest", "run", "x", "--control", "nonsense"])
    assert bad.exit_code == 1 and "bad address" in bad.output


def test_wait_for_ready_reads_the_console_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(
        "[    0.9] acpi: something\n[    3.1] random: crng init HYBRIDFT-GUEST-READY ip=10.77.0.2/24\n"
    )
    assert wait_for_ready(log, timeout=1) == "HYBRIDFT-GUEST-READY ip=10.77.0.2/24"
    log.write_text("[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    with pytest.raises(GuestError, match="panicked"):
        wait_for_ready(log, timeout=5)
    log.write_text("hft-init: bad hft.gw=x\nHYBRIDFT-GUEST-FAILED bad hft.gw=x\n")
    with pytest.raises(GuestError, match=r"set-up failed: bad hft\.gw=x"):
        wait_for_ready(log, timeout=5)
    log.write_text("booting...\n")
    with pytest.raises(GuestError, match=r"(?s)not ready after .*booting"):
        wait_for_ready(log, timeout=0.3)


def test_prune_removes_only_other_builds_and_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "hybridft"
    for name in ("aaaa", "bbbb"):
        (root / "guest" / name).mkdir(parents=True)
    (root / "debs").mkdir()
    current = root / "debs" / "linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb"
    old = root / "debs" / "linux-image-6.1.0-55-cloud-amd64-unsigned_6.1.190-1_amd64.deb"
    current.write_bytes(b"x")
    old.write_bytes(b"x")
    keep = GuestImage(
        kernel=root / "guest" / "aaaa" / "vmlinuz",
        initrd=root / "guest" / "aaaa" / "initrd.img",
        append=BASE_APPEND,
        directory=root / "guest" / "aaaa",
        kernel_package="linux-image-6.1.0-56-cloud-amd64-unsigned",
        kernel_version="6.1.192-2",
        modules=MODULES,
        inputs_hash="aaaa",
    )
    assert prune_cache(keep) == [root / "guest" / "bbbb", old]
    assert (root / "guest" / "aaaa").is_dir() and current.exists()


def test_kernel_package_answer_is_remembered_only_for_the_same_apt_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    memo = tmp_path / "hybridft" / "kernel-package.json"
    memo.parent.mkdir(parents=True)
    memo.write_text(json.dumps({"apt_state": "stale", "package": "bogus", "version": "0"}))
    package, version = find_kernel_package()  # asks apt: the memo is for another apt state
    assert newest_kernel_package(package) == package and version != "0"
    saved = json.loads(memo.read_text())
    assert (saved["package"], saved["version"]) == (package, version)
    saved["package"] = "remembered"
    memo.write_text(json.dumps(saved))
    assert find_kernel_package() == ("remembered", version)  # same apt state: no apt call


def test_compressed_modules_are_read_through(tmp_path: Path) -> None:
    import lzma

    from mc_driver.guest.image import _module_bytes, _module_name

    raw = b"\x7fELF\x00depends=virtio_ring\x00"
    (tmp_path / "virtio.ko.xz").write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ))
    (tmp_path / "net-failover.ko").write_bytes(raw)
    assert modinfo_depends(_module_bytes(tmp_path / "virtio.ko.xz")) == ["virtio_ring"]
    assert _module_name(tmp_path / "virtio.ko.xz") == "virtio"
    assert _module_name(tmp_path / "net-failover.ko") == "net_failover"


def test_services_reply_is_parsed_into_states() -> None:
    states = parse_services(("echod 7 running 112", "tokend 9000 stopped"))
    assert states == {"echod": ServiceState("echod", 7, 112), "tokend": ServiceState("tokend", 9000, None)}
    assert states["echod"].running and not states["tokend"].running
    for bad in ("echod 7 running", "echod seven stopped", "echod 7 sleeping 3"):
        with pytest.raises(GuestControlError, match="unexpected services line"):
            parse_services([bad])
