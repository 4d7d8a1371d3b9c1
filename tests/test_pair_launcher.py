"""The launcher without booting anything: command-line wiring, pair.json, errors, and `pair down`'s
idempotence on directories that never held (or no longer hold) a pair."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mc_driver.accel import QemuChoice
from mc_driver.guest.image import GuestImage
from mc_driver.launch import REWRITER, PairFiles, secondary_filter_args, secondary_filter_teardown
from mc_driver.netns import list_namespaces
from mc_driver.pair import (
    GUEST_TCP_TIMESTAMPS_OFF,
    PairConfig,
    PairError,
    down,
    load_pair,
    pair_json,
    primary_args,
    secondary_args,
    up,
)
from mc_driver.pair_cli import pair

QEMU = QemuChoice(Path("/opt/qemu/bin/qemu-system-x86_64"), "tcg", ("-L", "/fw"), "test", patched=True)
IMAGE = GuestImage(Path("/k"), Path("/i"), "", Path("/d"), "pkg", "6.1", ("virtio",), "hash")


def options(args: list[str]) -> dict[str, list[str]]:
    """Every ``-object``/``-chardev``/... value of a QEMU command line, by option."""
    found: dict[str, list[str]] = {}
    for flag, value in itertools.pairwise(args):
        if flag.startswith("-"):
            found.setdefault(flag, []).append(value)
    return found


def test_primary_wiring(tmp_path: Path) -> None:
    files = PairFiles(tmp_path)
    args = primary_args(PairConfig(tmp_path), files, IMAGE, QEMU)
    opts = options(args)
    assert args[0] == str(QEMU.binary) and "-S" in args and "-incoming" not in args
    chardevs = " ".join(opts["-chardev"])
    # comparator sockets: QEMU is the client, with reconnect; the mirror to the secondary is a server
    assert f"path={files.sock('compare-primary')},reconnect=1" in chardevs
    assert f"path={files.sock('compare-out')},reconnect=1" in chardevs
    assert f"path={files.sock('mirror')},server=on" in chardevs
    objects = opts["-object"]
    indev = next(i for i, o in enumerate(objects) if "indev=cmp_out" in o)
    outdev = next(i for i, o in enumerate(objects) if "outdev=cmp_pri" in o)
    assert indev < outdev, "rx filters run in reverse order: the indev redirector must be declared first"
    assert any(o.startswith("filter-mirror,") and "queue=tx" in o for o in objects)
    assert not any(o.startswith("colo-compare") for o in objects), "the comparator is external"
    # one monitor per consumer
    assert len(opts["-mon"]) == 2
    assert f"file={files.image('primary')}" in " ".join(opts["-drive"])
    assert GUEST_TCP_TIMESTAMPS_OFF in opts["-append"][0]


def test_secondary_wiring(tmp_path: Path) -> None:
    files = PairFiles(tmp_path)
    args = secondary_args(PairConfig(tmp_path, guest_tcp_timestamps=True), files, IMAGE, QEMU)
    opts = options(args)
    assert opts["-incoming"] == [f"unix:{files.sock('migrate')}"]
    assert f"nbd+unix:///view?socket={files.sock('disk-nbd')}" in opts["-drive"][0]
    assert {o.split(",")[1] for o in opts["-object"]} == {"id=f1", "id=f2", "id=rew0"}
    assert len(opts["-mon"]) == 3  # daemon, agent, ops
    assert GUEST_TCP_TIMESTAMPS_OFF not in opts["-append"][0]


def test_failover_removes_exactly_the_secondary_filters_objects_first(tmp_path: Path) -> None:
    args = secondary_filter_args(tmp_path / "mirror.sock", tmp_path / "out.sock")
    opts = options(args)
    objects = {o.split("id=", 1)[1].split(",", 1)[0] for o in opts["-object"]}
    chardevs = {c.split("id=", 1)[1].split(",", 1)[0] for c in opts["-chardev"]}
    steps = secondary_filter_teardown(keep_rewriter=False)
    assert {i for c, i in steps if c == "object-del"} == objects
    assert {i for c, i in steps if c == "chardev-remove"} == chardevs
    # a chardev still used by a redirector cannot be removed: the redirectors go first
    last_redirector = max(n for n, (c, i) in enumerate(steps) if c == "object-del" and i != REWRITER)
    assert last_redirector < min(n for n, (c, _) in enumerate(steps) if c == "chardev-remove")
    assert ("object-del", REWRITER) not in secondary_filter_teardown(keep_rewriter=True)


def test_pair_json_has_the_contract_fields(tmp_path: Path) -> None:
    files = PairFiles(tmp_path)
    data = pair_json(PairConfig(tmp_path, mode="colo", epoch_ms=20), files, QEMU, {"primary": 5}).to_dict()
    contract = ("workdir netns bridge guest_ip client_ip taps accel qemu_binary accel_reason qmp "
                "compare_control disk_control daemon_control heartbeat mode epoch_ms compare_timeout_ms "
                "safety_interval_ms mirror_job pids")  # fmt: skip
    for key in contract.split():
        assert key in data, key
    assert set(data["qmp"]["primary"]) == {"daemon", "ops"}
    assert set(data["qmp"]["secondary"]) == {"daemon", "agent", "ops"}
    assert data["pids"] == {"primary": 5, "secondary": 0, "disk": 0, "compare": 0, "daemon": 0, "agent": 0}
    assert (data["mode"], data["epoch_ms"]) == ("colo", 20)
    json.dumps(data)  # serialisable
    # the namespace name is a function of the directory, stable and not a pid pattern
    assert data["netns"] == PairFiles(tmp_path).netns and data["netns"].startswith("hftpair-")
    assert PairFiles(tmp_path / "other").netns != data["netns"]


def test_a_missing_qemu_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYBRIDFT_QEMU_BINARY", str(tmp_path / "no-such-qemu"))
    with pytest.raises(PairError, match="not an executable"):
        up(PairConfig(tmp_path, accel="tcg"))
    assert PairFiles(tmp_path).netns not in list_namespaces()
    assert not PairFiles(tmp_path).all_sockets()


def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(PairError, match="mode must be"):
        up(PairConfig(tmp_path, mode="remus"))  # type: ignore[arg-type]
    with pytest.raises(PairError, match="epoch-ms"):
        up(PairConfig(tmp_path, epoch_ms=0))
    result = CliRunner().invoke(pair, ["up", "--workdir", str(tmp_path), "--guest-run", "memdirty,,4"])
    assert result.exit_code == 2 and "no empty words" in result.output


def test_down_is_idempotent_on_empty_stale_and_garbage_directories(tmp_path: Path) -> None:
    assert down(tmp_path / "never")["stopped"] == []
    (tmp_path / "pair.json").write_text("{garbage")
    (tmp_path / "compare-ctl.sock").write_text("")  # a socket file a crash left behind
    (tmp_path / "primary-ops.qmp").write_text("")
    assert down(tmp_path)["stopped"] == []
    assert not PairFiles(tmp_path).all_sockets()
    # a pair.json whose processes are long gone (pids of exited processes)
    gone = {"workdir": str(tmp_path), "pids": {"primary": 2**22 + 7}}
    (tmp_path / "pair.json").write_text(json.dumps(gone))
    assert down(tmp_path)["stopped"] == []
    result = CliRunner().invoke(pair, ["down", "--workdir", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["stopped"] == []


def test_load_pair_errors(tmp_path: Path) -> None:
    with pytest.raises(PairError, match="cannot read"):
        load_pair(tmp_path)
    (tmp_path / "pair.json").write_text("[1]")
    with pytest.raises(PairError, match=r"not a pair\.json"):
        load_pair(tmp_path)
    (tmp_path / "pair.json").write_text(json.dumps({"workdir": "/x"}))
    assert load_pair(tmp_path / "pair.json")["workdir"] == "/x"
