"""Issue 12, the fencing generation: after a failover the old primary's side (generation 0: the pair's
first daemon) is refused by the disk server and the comparator, durably.

The rule (:class:`Fence`) and its wrapper are tested directly; then the agent's real ``fail_over`` runs
against the real disk server dispatch (a :class:`DiskBuffer`) and the real comparator service (its
control dispatch and its release path), and the old daemon's requests are tried afterwards.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from colo_compare.core import Comparator
from colo_compare.serve import CompareService
from controller.agent import FailoverDecider, Timeline, fail_over
from controller.heartbeat import Heartbeat
from disk_buffer.buffer import DiskBuffer, Export
from disk_buffer.server import make_fenced_control_dispatch
from disk_buffer.store import DiskBufferError
from hybridft_common.control import AsyncControlClient, ControlError, serve_control
from hybridft_common.endpoints import parse_endpoint
from hybridft_common.fencing import Fence, GenerationFile, fenced_dispatch
from hybridft_common.vocabulary import Mode
from tests.test_failover_order import LoadingSecondary
from tests.test_manifest import manifest_for


def test_the_fence_refuses_older_generations_and_never_goes_back() -> None:
    fence = Fence()
    fence.check("seal", 0)
    assert fence.advance(2)
    fence.check("seal", 2)
    fence.check("seal", 3)
    with pytest.raises(ControlError) as refused:
        fence.check("seal", 1)
    assert refused.value.code == "fenced" and "generation 2" in refused.value.message
    with pytest.raises(ControlError):
        fence.advance(1)
    assert fence.generation == 2 and fence.refused == 2


def test_the_generation_file_is_durable_and_checked(tmp_path: Path) -> None:
    record = GenerationFile(tmp_path / "generation")
    assert record.load() == 0
    record.store(3)
    assert GenerationFile(tmp_path / "generation").load() == 3
    (tmp_path / "generation").write_text('{"generation": -1}\n')
    with pytest.raises(ValueError, match="generation"):
        record.load()


def test_the_wrapper_records_before_it_answers_and_keeps_reads_open(tmp_path: Path) -> None:
    async def scenario() -> list[Any]:
        calls: list[str] = []

        async def inner(verb: str, args: dict[str, Any]) -> dict[str, Any]:
            calls.append(verb)
            return {"args": args}

        record = GenerationFile(tmp_path / "generation")
        guarded = fenced_dispatch(inner, Fence(), record)
        out: list[Any] = [await guarded("seal", {})]  # generation 0 before any failover: fine
        out.append(await guarded("fence", {"generation": 1}))
        out.append(record.load())
        for verb in ("seal", "commit"):
            try:
                await guarded(verb, {"epoch": 3})
            except ControlError as exc:
                out.append(exc.code)
        out.append(await guarded("commit", {"epoch": 3, "generation": 1}))
        out.append((await guarded("status", {}))["generation"])
        out.append(calls)
        return out

    first, fenced, stored, seal, commit, new_commit, status_gen, calls = asyncio.run(scenario())
    assert first == {"args": {}} and fenced == {"generation": 1, "previous": 0} and stored == 1
    assert seal == commit == "fenced"
    assert new_commit == {"args": {"epoch": 3}}  # the generation argument is the wrapper's, not passed on
    assert status_gen == 1
    assert calls == ["seal", "commit", "status"]


def test_after_a_failover_the_old_primarys_side_is_refused(tmp_path: Path) -> None:
    """The agent fails over; then the old daemon (generation 0) tries to seal/commit on the disk server
    and to commit/release on the comparator; the old primary's mirror tries to write ``replica``; the
    comparator is asked to release the old primary's frames.  All refused -- and still after a restart
    of the disk server (the generation is in its state directory)."""

    async def scenario() -> dict[str, Any]:
        image = tmp_path / "replica.img"
        image.write_bytes(bytes(1 << 20))
        buffer = DiskBuffer.open(image, tmp_path / "disk-state")
        epoch = buffer.seal()
        config = manifest_for(tmp_path)
        disk_server = await serve_control(config.disk_control, make_fenced_control_dispatch(buffer))
        sock = lambda name: parse_endpoint(f"unix:{tmp_path / name}")  # noqa: E731
        comparator = CompareService(
            Comparator(Mode.COLO),
            primary_in=sock("cmp-p.sock"), secondary_in=sock("cmp-s.sock"), out=sock("cmp-o.sock"),
            control=parse_endpoint(config.compare_control),
        )  # fmt: skip
        comparator.use_fence_file(tmp_path / "compare-generation")
        compare_server = await serve_control(config.compare_control, comparator.dispatch)
        decider = FailoverDecider()
        decider.message(Heartbeat(time.time(), epoch, "sealed"), 0.0)
        result: dict[str, Any] = {}
        try:
            result["report"] = await fail_over(config, decider, LoadingSecondary(loading=True), Timeline())
            old_daemon = {"disk": AsyncControlClient(config.disk_control),
                          "compare": AsyncControlClient(config.compare_control)}  # fmt: skip
            for client in old_daemon.values():
                await client.connect()
            refusals = {}
            for service, verb, args in (("disk", "seal", {}), ("disk", "commit", {"epoch": epoch + 1}),
                                        ("disk", "rollback", {}), ("compare", "commit", {"epoch": 1}),
                                        ("compare", "release-all", {}), ("compare", "seal", {})):  # fmt: skip
                try:
                    await old_daemon[service].call(verb, **args)
                    refusals[f"{service} {verb}"] = "accepted"
                except ControlError as exc:
                    refusals[f"{service} {verb}"] = exc.code
            result["refusals"] = refusals
            result["disk_status"] = await old_daemon["disk"].call("status")  # reads stay open
            for client in old_daemon.values():
                await client.close()
            try:
                buffer.write(Export.REPLICA, 0, b"old primary")
                result["replica_write"] = "accepted"
            except DiskBufferError as exc:
                result["replica_write"] = exc.code
            released = comparator.counters.released_frames
            comparator._emit([b"\x00" * 60])  # the old primary's frame reaching the release path
            result["released_after_fence"] = comparator.counters.released_frames - released
            result["compare_fence"] = comparator.stats()["fence"]
        finally:
            disk_server.close()
            compare_server.close()
            await buffer.aclose()
        # the disk server restarts: the fence is still there
        reopened = DiskBuffer.open(image, tmp_path / "disk-state")
        try:
            restarted = make_fenced_control_dispatch(reopened)
            try:
                await restarted("seal", {})
                result["after_restart"] = "accepted"
            except ControlError as exc:
                result["after_restart"] = exc.code
        finally:
            await reopened.aclose()
        result["agent_generation"] = GenerationFile(tmp_path / "generation").load()
        result["compare_generation"] = GenerationFile(tmp_path / "compare-generation").load()
        return result

    result = asyncio.run(scenario())
    assert result["report"]["generation"] == 1 and result["report"]["resumed"], result["report"]
    assert set(result["refusals"].values()) == {"fenced"}, result["refusals"]
    assert result["disk_status"]["generation"] == 1 and result["disk_status"]["failed_over"]
    assert result["replica_write"] == "wrong-state"  # replica is read-only once failed over
    assert result["released_after_fence"] == 0 and result["compare_fence"]["frames_not_released"] == 1
    assert result["after_restart"] == "fenced"
    assert result["agent_generation"] == result["compare_generation"] == 1
