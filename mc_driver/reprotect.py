"""Re-protection: a new secondary for the VM that survived, with the guest and its clients running.

``hybridft pair reprotect`` turns a pair that lost one side back into a protected pair (ARCHITECTURE.md
§5).  Two cases, one path: after a failover the survivor is the old secondary, after a lost secondary
it is the primary.  First the survivor is made a *lone primary* (phase ``prepare``); from there adding
a secondary is the same whatever happened:

    prepare     stop the old daemon and agent and whatever is left of the dead side; after a failover,
                a fresh comparator in pass-through and the survivor's primary filters added live over
                QMP (filter-mirror to the new secondary, redirectors to and from the comparator), so its
                output goes through the comparator from now on; pair.json says "primary alone"
    secondary   a network namespace of its own (``<netns>-s<generation>``, as a second host: its own
                bridge, the secondary's tap, and a veth uplink to the clients' bridge kept off that
                bridge until a failover), its own ``disk serve`` state directory and image, the
                secondary QEMU (-incoming)
    disk-copy   on the survivor an ``nbd`` node on the new `replica` and ``blockdev-mirror``
                ``sync=full copy-mode=write-blocking``: the whole disk is copied while every new guest
                write goes to both; READY = in sync.  The disk server's epochs are sealed and committed
                as its speculation reaches its mark (nothing reads the view yet), so a disk bigger
                than its memory budget goes through
    migration   pair.json for the new layout, the agent (in the secondary's namespace), the daemon
                (which runs the initial COLO migration with the primary stopped and the disk and
                comparator at a clean epoch: the same start as ``pair up``)
    verify      the guest answers an echo through the comparator

Why a new daemon and agent rather than the running ones: the daemon's QMP sessions, pids and
service connections are fixed at its start and its start *is* the initial migration with the clean
epoch; after a failover it talks to a dead primary anyway, and the agent has already exited.  A new
pair of watchers over a rewritten pair.json is also exactly what a second failover needs (the agent
of the new layout fails over to the new secondary; the uplink veth is the "secondary tap" it moves).

Why the veth is the manifest's secondary tap: the agent swaps taps with ``ip -n NETNS`` in the clients'
namespace.  The new secondary's own tap sits on its namespace's bridge with the veth's far end; the
near end in the clients' namespace is what goes on the clients' bridge at failover.  The agent needs
no change, and across hosts the same role is the secondary host's uplink.

A failure part way leaves the survivor serving (its output through a comparator in pass-through),
cancels the mirror job, removes the new secondary's namespace, and writes the reason to
``reprotect.json`` (``hybridft status`` shows it); pair.json stays "primary alone", so a retry starts
from ``secondary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridft_common import manifest
from hybridft_common.cli import hybridft_command
from hybridft_common.manifest import PairManifest
from hybridft_common.processes import pid_alive
from hybridft_common.reprotect_state import (
    Case,
    CaseError,
    CopyProgress,
    Layout,
    Phase,
    PhaseRecord,
    ReprotectRecord,
    ReprotectState,
    decide_case,
)
from hybridft_common.settings import DEFAULT_POLICY
from hybridft_common.vocabulary import Mode
from mc_driver.accel import QemuChoice, choose_qemu
from mc_driver.guest.expected import ECHO_PORT
from mc_driver.guest.image import build_guest
from mc_driver.launch import (
    NETDEV,
    PRIMARY_MIRROR_CHARDEV,
    PairFiles,
    guest_qemu_args,
    monitor_args,
    secondary_filter_args,
)
from mc_driver.netns import NetNamespace, list_namespaces
from mc_driver.pair import (
    GUEST_IP,
    MIRROR_JOB,
    MIRROR_TARGET_NODE,
    PRIMARY_DRIVE,
    QMP_USERS,
    _stop_pid,
    accepts_connections,
    secondary_namespaces,
)
from mc_driver.qmp import QmpCommandError, QmpError, QmpSession, held_migration

log = logging.getLogger("hybridft.reprotect")

SECONDARY_TAP_IN_NS = "hfts0"  # the new secondary's tap, inside its own namespace
NS_BRIDGE = "hftbr0"
DISK_SYNC_POLL = 0.1
COPY_TIMEOUT = 3600.0
QMP_TIMEOUT = 10.0


class ReprotectError(Exception):
    """Re-protection failed; the survivor still serves, unprotected.  The message says where and why."""


def secondary_netns(pair_netns: str, generation: int) -> str:
    return f"{pair_netns}-s{generation}"


def uplink_names(generation: int) -> tuple[str, str]:
    """The veth pair of generation ``generation``: (end in the clients' namespace, end in its own)."""
    return f"hftv{generation}", f"hftu{generation}"


@dataclass(frozen=True, slots=True)
class GenFiles:
    """The new secondary's files: sockets in the work directory (so ``pair down`` removes them), its
    image and disk state in a directory of its own, as a second host would keep them."""

    files: PairFiles
    generation: int

    @property
    def prefix(self) -> str:
        return f"g{self.generation}-"

    def sock(self, name: str) -> Path:
        return self.files.sock(self.prefix + name)

    def endpoint(self, name: str) -> str:
        return f"unix:{self.sock(name)}"

    def qmp(self, user: str) -> Path:
        return self.files.workdir / f"{self.prefix}secondary-{user}.qmp"

    @property
    def host_dir(self) -> Path:
        return self.files.workdir / f"g{self.generation}"

    @property
    def image(self) -> Path:
        return self.host_dir / "replica.img"

    @property
    def disk_state(self) -> Path:
        return self.host_dir / "disk-state"

    def log(self, role: str) -> Path:
        return self.files.workdir / f"{self.prefix}{role}.log"

    @property
    def console(self) -> Path:
        return self.files.workdir / f"{self.prefix}secondary.console"


# ------------------------------------------------------------------------------------------- helpers
def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ReprotectError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _argv_value(pid: int, flag: str) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, word in enumerate(argv[:-1]):
        if word.decode(errors="replace") == flag:
            return argv[i + 1].decode(errors="replace")
    return None


def _delete_netns(name: str) -> None:
    if name in list_namespaces():
        ns = NetNamespace(name)
        ns._created = True  # adopt: close() kills what is inside and deletes it with its devices
        ns.close()


class Reprotector:
    """One re-protection attempt; :meth:`run` returns ``pair up --json``'s fields for the new layout."""

    def __init__(self, workdir: Path, mode: str, *, answer_timeout: float = 120.0,
                 on_phase: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.files = PairFiles(workdir.resolve())
        self.workdir = self.files.workdir
        if mode not in ("mc", "colo", "auto"):
            raise ReprotectError(f"mode must be mc, colo or auto, not {mode!r}")
        self.mode = mode
        self.answer_timeout = answer_timeout
        self.on_phase = on_phase
        self.record = ReprotectRecord.load(self.workdir) or ReprotectRecord()
        self.manifest = PairManifest.load(self.files.config)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.progress = CopyProgress()

    # -------------------------------------------------------------------------------- record
    def save(self) -> None:
        self.record.updated_at = time.time()
        self.record.write(self.workdir)

    def phase(self, phase: Phase) -> None:
        now = time.time()
        if self.record.phases and self.record.phases[-1].ended_at is None:
            self.record.phases[-1].ended_at = now
        self.record.phase = str(phase)
        self.record.phases.append(PhaseRecord(str(phase), now))
        self.save()
        if self.on_phase is not None:
            self.on_phase(str(phase))

    # --------------------------------------------------------------------------------- spawn
    def spawn(self, role: str, netns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir,
            )  # fmt: skip
        self.procs[role] = proc
        self.record.pids[role] = proc.pid
        self.save()
        return proc

    def check_alive(self, waiting_for: str) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise ReprotectError(f"the new {role} exited ({proc.returncode}) while {waiting_for}")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive(f"waiting for {what}")
            if time.monotonic() > deadline:
                raise ReprotectError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """One attempt, holding ``reprotect.lock``: the automatic re-protector and an operator must not
        add two secondaries to the same survivor."""
        with (self.workdir / "reprotect.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CaseError("a re-protection of this pair is already running") from None
            # the record and pair.json as they are now (the holder before us may have changed both)
            self.record = ReprotectRecord.load(self.workdir) or ReprotectRecord()
            self.manifest = PairManifest.load(self.files.config)
            return self._attempt()

    def _attempt(self) -> dict[str, Any]:
        m = self.manifest
        record = self.record
        failed_over = m.failover_report.exists()
        primary_alive = m.pids.primary > 0 and pid_alive(m.pids.primary)
        if (
            primary_alive
            and not failed_over  # after a failover the old primary's state decides nothing
            and not self._monitor_answers(Path(m.qmp.primary.ops[5:]), m.pids.primary)
        ):
            raise CaseError(
                f"the primary QEMU (pid {m.pids.primary}) runs but its ops monitor {m.qmp.primary.ops} "
                "accepts no connection: see its log in the pair's directory"
            )
        secondary_alive = m.pids.secondary > 0 and pid_alive(m.pids.secondary)
        if (
            not failed_over
            and primary_alive
            and secondary_alive
            and m.pids.daemon
            and pid_alive(m.pids.daemon)
        ):
            state = self._daemon_state()
            if state in ("protected", "starting", None):
                raise CaseError(f"the pair is {state or 'not answering'}: nothing to re-protect")
        case = decide_case(
            primary_alive=primary_alive, secondary_alive=secondary_alive, failed_over=failed_over
        )
        if record.state == ReprotectState.PROTECTED or not record.state:
            # a new loss: the generation this attempt adds
            if record.state:
                record.history.append(
                    {
                        k: getattr(record, k)
                        for k in (
                            "generation",
                            "case",
                            "mode",
                            "unprotected_seconds",
                            "initial_migration_pause_ms",
                        )
                    }
                )
            record.attempt = 0
            record.unprotected_since = self._loss_time(case)
            record.unprotected_seconds = record.protected_at = record.initial_migration_pause_ms = None
            record.case = str(case)
        if not record.layout.primary_netns:
            record.layout = Layout(m.netns, m.netns, 0)
        record.generation = max(record.generation, self._highest_generation()) + 1
        record.attempt += 1
        record.state, record.reason, record.mode = str(ReprotectState.RUNNING), "", self.mode
        record.phases, record.progress, record.pids = [], {}, {}
        self.phase(Phase.PREPARE)
        try:
            return asyncio.run(self._run(case))
        except BaseException as exc:
            reason = str(exc) or repr(exc)
            if record.phases:
                record.phases[-1].error = reason
                record.phases[-1].ended_at = time.time()
            record.state, record.reason = str(ReprotectState.FAILED), f"{record.phase}: {reason}"
            self.save()
            self._undo()
            if isinstance(exc, ReprotectError | CaseError):
                raise
            if isinstance(exc, QmpError | OSError | subprocess.SubprocessError | manifest.ManifestError):
                raise ReprotectError(f"{record.phase}: {reason}") from exc
            raise

    def _highest_generation(self) -> int:
        prefix = f"{self.manifest.netns}-s"
        gens = [int(n[len(prefix) :]) for n in secondary_namespaces(self.manifest.netns)]
        return max(gens, default=0)

    def _daemon_state(self) -> str | None:
        from hybridft_common.control import ControlError, call

        try:
            return str(call(self.manifest.daemon_control, "status", io_timeout=5).get("state"))
        except (ControlError, OSError):
            return None

    def _loss_time(self, case: Case) -> float:
        """When protection ended: the agent's detection time after a failover; the daemon's log line
        after a lost secondary (its status has no wall-clock time); else now."""
        if case is Case.FAILED_OVER:
            with contextlib.suppress(OSError, ValueError):
                report = json.loads(self.manifest.failover_report.read_text())
                if isinstance(report.get("detected_at"), int | float):
                    return float(report["detected_at"])
        with contextlib.suppress(OSError):
            found = loss_time_from_log(self.files.log("daemon").read_text(errors="replace"))
            if found is not None:
                return found
        return time.time()

    async def _run(self, case: Case) -> dict[str, Any]:
        survivor = await self._prepare(case)
        try:
            self.phase(Phase.SECONDARY)
            qemu = await self._start_secondary(survivor)
            self.phase(Phase.DISK_COPY)
            await self._copy_disk(survivor)
        finally:
            await survivor.close()
        self.phase(Phase.MIGRATION)
        result = await self._hand_over(qemu)
        self.phase(Phase.VERIFY)
        await asyncio.to_thread(self._wait_until_guest_answers)
        from hybridft_common.control import ControlError, call

        try:
            state = call(self.manifest.daemon_control, "status", io_timeout=10)
        except (ControlError, OSError) as exc:
            raise ReprotectError(f"the new daemon does not answer: {exc}") from exc
        if state.get("state") != "protected":
            raise ReprotectError(f"the new daemon says {state.get('state')}: {state.get('state_reason')}")
        now = time.time()
        record = self.record
        record.phases[-1].ended_at = now
        record.state, record.phase = str(ReprotectState.PROTECTED), "done"
        record.protected_at = now
        if record.unprotected_since is not None:
            record.unprotected_seconds = round(now - record.unprotected_since, 3)
        self.save()
        result["reprotect"] = record.summary(now)
        return result

    # ------------------------------------------------------------------------------ prepare
    async def _prepare(self, case: Case) -> QmpSession:
        """Stop the old watchers and the dead side; make the survivor a lone primary; pair.json says so."""
        m, layout = self.manifest, self.record.layout
        for role in ("agent", "daemon"):
            pid = getattr(m.pids, role)
            if pid > 0:
                await asyncio.to_thread(_stop_pid, pid, 3.0)
        if case is Case.SECONDARY_LOST:
            for pid in (m.pids.secondary, m.pids.disk):  # the dead secondary and its replica's server
                if pid > 0:
                    await asyncio.to_thread(_stop_pid, pid, 2.0)
            if layout.secondary_netns != layout.primary_netns and layout.secondary_netns != m.netns:
                await asyncio.to_thread(_delete_netns, layout.secondary_netns)
            survivor = await self._connect(m.qmp.primary.ops, m.pids.primary)
            await self._end_old_migration(survivor)
            await self._clear_mirror(survivor)
            self.manifest = dataclasses.replace(
                m, pids=dataclasses.replace(m.pids, secondary=0, disk=0, agent=0, daemon=0)
            )
            self.manifest.write(self.files.config)
            layout.secondary_netns = ""
            self.save()
            return survivor
        # failed over: the old secondary serves.  The dead primary is fenced for good.
        for pid in (m.pids.primary, layout.primary_storage_pid, m.pids.compare):
            if pid > 0:
                await asyncio.to_thread(_stop_pid, pid, 2.0)
        if layout.primary_netns != m.netns:
            await asyncio.to_thread(_delete_netns, layout.primary_netns)
        survivor = await self._connect(m.qmp.secondary.ops, m.pids.secondary)
        await self._end_old_migration(survivor)
        gen = GenFiles(self.files, self.record.generation)
        compare_args = hybridft_command(
            "compare", "serve", "--mode", "colo" if self.mode == "colo" else "mc",
            "--compare-timeout", str(m.compare_timeout_ms / 1000),
            "--primary-in", gen.endpoint("compare-primary"),
            "--secondary-in", gen.endpoint("compare-secondary"),
            "--out", gen.endpoint("compare-out"), "--control", gen.endpoint("compare-ctl"),
        )  # fmt: skip
        compare = self.spawn("compare", m.netns, compare_args, gen.log("compare"))
        for name in ("compare-ctl", "compare-primary", "compare-secondary", "compare-out"):
            self.wait_for(name, lambda n=name: accepts_connections(gen.sock(n)), 30)
        from hybridft_common.control import call

        call(gen.endpoint("compare-ctl"), "release-all", io_timeout=5)  # pass-through until COLO starts
        await self._add_primary_filters(survivor, gen)
        report = m.failover_report
        report.replace(report.with_name(f"failover-g{self.record.generation - 1}.json"))
        self.manifest = dataclasses.replace(
            m,
            taps=manifest.Sides(m.taps.secondary, m.taps.secondary),
            qmp=manifest.QmpMonitors(
                manifest.PrimaryMonitors(daemon=m.qmp.secondary.daemon, ops=m.qmp.secondary.ops),
                m.qmp.secondary,
            ),
            compare_control=gen.endpoint("compare-ctl"),
            guest_control=manifest.Sides(m.guest_control.secondary, m.guest_control.secondary),
            consoles=manifest.Sides(m.consoles.secondary, m.consoles.secondary),
            pids=manifest.Pids(primary=m.pids.secondary, compare=compare.pid),
        )
        self.manifest.write(self.files.config)
        layout.primary_netns, layout.secondary_netns = layout.secondary_netns, ""
        layout.primary_storage_pid = m.pids.disk
        # from here on pair.json describes a lone primary: a retry after a failure starts from there
        self.record.history.append({"failed_over_from": "primary", "generation": self.record.generation - 1})
        self.save()
        self.procs.pop("compare")  # it stays, serving the survivor's output
        return survivor

    @staticmethod
    def _monitor_answers(path: Path, pid: int, patience: float = 5.0) -> bool:
        """Whether a live QEMU's monitor socket takes a connection, allowing it ``patience`` seconds:
        a QEMU busy in a failing checkpoint accepts late, and a zombie (a pid without a process to
        answer) or a QEMU that removed its socket never does."""
        deadline = time.monotonic() + patience
        while not accepts_connections(path):
            if time.monotonic() > deadline or not pid_alive(pid):
                return False
            time.sleep(0.2)
        return True

    async def _connect(self, endpoint: str, pid: int) -> QmpSession:
        return await QmpSession.connect(
            endpoint[5:] if endpoint.startswith("unix:") else endpoint,
            name="survivor", timeout=QMP_TIMEOUT, alive=lambda: pid_alive(pid),
        )  # fmt: skip

    async def _end_old_migration(self, survivor: QmpSession) -> None:
        """The survivor must hold no migration of the old pair: QEMU registers one ``migration`` yank
        instance at a time, so a leftover one makes the initial migration fail ("duplicate yank
        instance").  A COLO side whose failover never completed (its COLO_EXIT was an error and no
        ``x-colo-lost-heartbeat`` followed) is failed over now; it runs already, so this changes
        nothing for the guest."""
        status = await held_migration(survivor)
        if status is None:
            return
        log.warning("the survivor still holds the old pair's migration (%s): failing it over now", status)
        with contextlib.suppress(QmpCommandError):
            await survivor.execute("x-colo-lost-heartbeat")
        deadline = time.monotonic() + 10
        while (status := await held_migration(survivor)) is not None:
            if time.monotonic() > deadline:
                raise ReprotectError(
                    f"the survivor still holds the old pair's migration (status {status!r}) and QEMU does "
                    "not end it: it cannot migrate again until it restarts (it keeps running meanwhile)"
                )
            await asyncio.sleep(0.05)

    async def _clear_mirror(self, session: QmpSession) -> None:
        """A previous mirror job and its target node (the lost secondary's, or a failed attempt's)."""
        deadline = time.monotonic() + 30
        while True:
            jobs = await session.execute("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == MIRROR_JOB), None)
            if job is None:
                break
            status = job.get("status")
            if status == "concluded":
                await session.execute("job-dismiss", id=MIRROR_JOB)
            elif status not in ("aborting", "null", "waiting", "pending"):
                with contextlib.suppress(QmpCommandError):
                    await session.execute("block-job-cancel", device=MIRROR_JOB, force=True)
            if time.monotonic() > deadline:
                raise ReprotectError(f"the old mirror job does not go away: {job}")
            await asyncio.sleep(0.05)
        nodes = await session.execute("query-named-block-nodes")
        if any(n.get("node-name") == MIRROR_TARGET_NODE for n in nodes):
            await session.execute("blockdev-del", {"node-name": MIRROR_TARGET_NODE})

    async def _add_primary_filters(self, session: QmpSession, gen: GenFiles) -> None:
        """The survivor's wiring becomes a primary's, live.  The filter-rewriter it kept from its failover
        stays first in the rx chain's order of declaration: released frames (injected by ``rin``) still
        pass it, so connections it translates keep their sequence numbers."""

        def socket_backend(path: Path, server: bool) -> dict[str, Any]:
            data: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": str(path)}}, "server": server}
            if server:
                data["wait"] = False
            else:
                data["reconnect"] = 1
            return {"type": "socket", "data": data}

        steps: list[tuple[str, dict[str, Any]]] = [
            ("chardev-add", {"id": PRIMARY_MIRROR_CHARDEV,
                             "backend": socket_backend(gen.sock("mirror"), True)}),
            ("chardev-add", {"id": "cmp_out", "backend": socket_backend(gen.sock("compare-out"), False)}),
            ("chardev-add", {"id": "cmp_pri", "backend": socket_backend(gen.sock("compare-primary"), False)}),
            # rx filters run in reverse order of declaration: the indev redirector first
            ("object-add", {"qom-type": "filter-redirector", "id": "rin", "netdev": NETDEV,
                            "queue": "rx", "indev": "cmp_out"}),
            ("object-add", {"qom-type": "filter-redirector", "id": "rout", "netdev": NETDEV,
                            "queue": "rx", "outdev": "cmp_pri"}),
            ("object-add", {"qom-type": "filter-mirror", "id": "m0", "netdev": NETDEV,
                            "queue": "tx", "outdev": PRIMARY_MIRROR_CHARDEV}),
        ]  # fmt: skip
        for command, args in steps:
            try:
                await session.execute(command, args)
            except QmpCommandError as exc:
                raise ReprotectError(
                    f"{command} {args.get('id')} on the survivor: {exc.description}"
                ) from exc

    # ---------------------------------------------------------------------------- secondary
    def _mirror_path(self) -> Path:
        """Where the primary's filter-mirror listens (the survivor's own, or the one added live)."""
        return (
            self.files.mirror
            if self.manifest.compare_control.endswith("/compare-ctl.sock")
            else (GenFiles(self.files, self._compare_generation()).sock("mirror"))
        )

    def _compare_generation(self) -> int:
        name = Path(self.manifest.compare_control[5:]).name  # g<N>-compare-ctl.sock
        return int(name[1:].split("-", 1)[0])

    def _compare_secondary(self) -> Path:
        return Path(self.manifest.compare_control[5:]).with_name(
            Path(self.manifest.compare_control[5:]).name.replace("compare-ctl", "compare-secondary")
        )

    async def _start_secondary(self, survivor: QmpSession) -> QemuChoice:
        m, gen = self.manifest, GenFiles(self.files, self.record.generation)
        netns = secondary_netns(m.netns, gen.generation)
        await asyncio.to_thread(_delete_netns, netns)  # a failed attempt's
        near, far = uplink_names(gen.generation)
        if near in _links(m.netns):
            _ip("-n", m.netns, "link", "del", near)
        ns = NetNamespace(netns, bridge=NS_BRIDGE, bridge_ip="169.254.77.1/30")
        ns.create()
        self.record.layout.secondary_netns = netns
        self.save()
        _ip("-n", m.netns, "link", "add", near, "type", "veth", "peer", "name", far, "netns", netns)
        _ip("-n", netns, "link", "set", far, "master", NS_BRIDGE)
        _ip("-n", netns, "link", "set", far, "up")
        _ip("-n", m.netns, "link", "set", near, "up")  # off the clients' bridge until a failover
        ns.add_tap(SECONDARY_TAP_IN_NS)

        blocks = await survivor.execute("query-block")
        drive = next((b for b in blocks if b.get("device") == PRIMARY_DRIVE), None)
        if drive is None or "inserted" not in drive:
            raise ReprotectError(f"the survivor has no drive {PRIMARY_DRIVE}")
        size = int(drive["inserted"]["image"]["virtual-size"])
        gen.host_dir.mkdir(parents=True, exist_ok=True)
        with gen.image.open("wb") as img:
            img.truncate(size)
        shutil.rmtree(gen.disk_state, ignore_errors=True)
        for path in (gen.sock("disk-nbd"), gen.sock("disk-ctl"), gen.sock("migrate"), gen.sock("heartbeat")):
            path.unlink(missing_ok=True)
        disk_args = hybridft_command(
            "disk", "serve", "--image", str(gen.image), "--state-dir", str(gen.disk_state),
            "--nbd", gen.endpoint("disk-nbd"), "--control", gen.endpoint("disk-ctl"),
        )  # fmt: skip
        self.spawn("disk server", netns, disk_args, gen.log("disk"))
        self.wait_for(
            "the new disk server",
            lambda: accepts_connections(gen.sock("disk-ctl")) and accepts_connections(gen.sock("disk-nbd")),
            30,
        )

        qemu = choose_qemu(build=False, force_accel=m.accel)
        if qemu.binary != m.qemu_binary:
            qemu = dataclasses.replace(qemu, binary=m.qemu_binary)
        memory = _argv_value(m.pids.primary, "-m") or "256"
        cmdline = _argv_value(m.pids.primary, "-append")
        image = build_guest()
        args = guest_qemu_args(
            qemu, image, tap=SECONDARY_TAP_IN_NS,
            disk=f"nbd+unix:///view?socket={gen.sock('disk-nbd')}", console=gen.console,
            control=gen.sock("secondary-guestctl"), cmdline=cmdline or "",
            memory_mib=int(memory.rstrip("MmGg")),
        )  # fmt: skip
        for user in QMP_USERS["secondary"]:
            gen.qmp(user).unlink(missing_ok=True)
            args += monitor_args(f"qmp-{user}", gen.qmp(user))
        gen.console.unlink(missing_ok=True)
        args += ["-msg", "timestamp=on", "-name", f"secondary-g{gen.generation}",
                 *secondary_filter_args(self._mirror_path(), self._compare_secondary()),
                 "-incoming", f"unix:{gen.sock('migrate')}"]  # fmt: skip
        self.spawn("secondary", netns, args, gen.log("secondary"))
        for user in QMP_USERS["secondary"]:
            self.wait_for(
                f"the new secondary's {user} monitor", lambda u=user: accepts_connections(gen.qmp(u)), 30
            )
        return qemu

    # ---------------------------------------------------------------------------- disk copy
    async def _copy_disk(self, survivor: QmpSession) -> None:
        gen = GenFiles(self.files, self.record.generation)
        await self._clear_mirror(survivor)
        await survivor.execute("blockdev-add", {
            "driver": "nbd", "node-name": MIRROR_TARGET_NODE, "export": "replica",
            "server": {"type": "unix", "path": str(gen.sock("disk-nbd"))},
        })  # fmt: skip
        await survivor.execute("blockdev-mirror", {
            "job-id": MIRROR_JOB, "device": PRIMARY_DRIVE, "target": MIRROR_TARGET_NODE,
            "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": False,
        })  # fmt: skip
        from hybridft_common.control import AsyncControlClient

        disk = AsyncControlClient(gen.endpoint("disk-ctl"))
        await disk.connect()
        started = time.monotonic()
        last_save = 0.0
        try:
            while True:
                self.check_alive("copying the disk")
                jobs = await survivor.execute("query-block-jobs")
                job = next((j for j in jobs if j.get("device") == MIRROR_JOB), None)
                if job is None or job.get("status") in ("aborting", "concluded", "null"):
                    raise ReprotectError(f"the disk mirror job ended: {job}")
                now = time.monotonic()
                self.progress.feed_job(now, job)
                status = await disk.call("status")
                if status.get("checkpoint_needed"):
                    # nothing reads the view yet: make the copied bytes durable, free the buffer
                    sealed = await disk.call("seal")
                    await disk.call("commit", epoch=int(sealed["epoch"]))
                if job.get("ready"):
                    break
                if now - last_save > 0.5:
                    self.record.progress = self.progress.as_dict()
                    self.save()
                    last_save = now
                if now - started > COPY_TIMEOUT:
                    raise ReprotectError(f"the disk copy is not done after {COPY_TIMEOUT:.0f} s: {job}")
                await asyncio.sleep(DISK_SYNC_POLL)
        finally:
            await disk.close()
        self.record.progress = self.progress.as_dict() | {"seconds": round(time.monotonic() - started, 3)}
        self.save()

    # ---------------------------------------------------------------------------- hand over
    async def _hand_over(self, qemu: QemuChoice) -> dict[str, Any]:
        m, gen = self.manifest, GenFiles(self.files, self.record.generation)
        near, _ = uplink_names(gen.generation)

        def monitor(user: str) -> str:
            return f"unix:{gen.qmp(user)}"

        mode = Mode.MC if self.mode == "auto" else Mode(self.mode)
        self.manifest = dataclasses.replace(
            m,
            taps=manifest.Sides(m.taps.primary, near),
            qmp=manifest.QmpMonitors(m.qmp.primary, manifest.SecondaryMonitors(
                daemon=monitor("daemon"), agent=monitor("agent"), ops=monitor("ops"))),
            disk_control=gen.endpoint("disk-ctl"),
            disk_nbd=gen.endpoint("disk-nbd"),
            heartbeat=gen.endpoint("heartbeat"),
            migrate_uri=f"unix:{gen.sock('migrate')}",
            guest_control=manifest.Sides(m.guest_control.primary, gen.endpoint("secondary-guestctl")),
            consoles=manifest.Sides(m.consoles.primary, str(gen.console)),
            mode=mode,
            pids=dataclasses.replace(
                m.pids, secondary=self.procs["secondary"].pid, disk=self.procs["disk server"].pid,
                agent=0, daemon=0),
        )  # fmt: skip
        self.manifest.write(self.files.config)
        netns = self.record.layout.secondary_netns
        config_arg = ("--config", str(self.files.config))
        agent = self.spawn("agent", netns, hybridft_command("agent", *config_arg), gen.log("agent"))
        self.manifest = dataclasses.replace(
            self.manifest, pids=dataclasses.replace(self.manifest.pids, agent=agent.pid)
        )
        self.manifest.write(self.files.config)
        self.wait_for("the agent's heartbeat socket", lambda: accepts_connections(gen.sock("heartbeat")), 30)
        daemon_args: list[str] = []
        if self.mode == "auto":
            daemon_args += ["--policy", DEFAULT_POLICY]
        primary = await self._connect(m.qmp.primary.ops, m.pids.primary)
        try:
            primary.discard_events()
            self.files.sock("daemon-ctl").unlink(missing_ok=True)
            daemon = self.spawn(
                "daemon",
                m.netns,
                hybridft_command("daemon", *config_arg, *daemon_args),
                self.files.log("daemon"),
            )
            self.manifest = dataclasses.replace(
                self.manifest, pids=dataclasses.replace(self.manifest.pids, daemon=daemon.pid)
            )
            self.manifest.write(self.files.config)
            await asyncio.to_thread(
                self.wait_for,
                "the daemon (the initial COLO migration)",
                lambda: accepts_connections(self.files.sock("daemon-ctl")),
                180,
            )
            stops = primary.take("STOP")
            resumes = primary.take("RESUME")
            if stops and resumes:
                self.record.initial_migration_pause_ms = round(
                    (resumes[-1].timestamp - stops[0].timestamp) * 1000, 1
                )
        finally:
            await primary.close()
        self.save()
        return {
            "guest_ip": GUEST_IP,
            "client_netns": m.netns,
            "primary_pid": self.manifest.pids.primary,
            "secondary_pid": self.manifest.pids.secondary,
            "daemon_pid": self.manifest.pids.daemon,
            "agent_pid": self.manifest.pids.agent,
            "disk_pid": self.manifest.pids.disk,
            "control": str(self.files.sock("daemon-ctl")),
            "config": str(self.files.config),
            "colo": True,
            "secondary_netns": netns,
        }

    def _wait_until_guest_answers(self) -> None:
        ns = NetNamespace(self.manifest.netns)
        deadline = time.monotonic() + self.answer_timeout
        last: Exception | None = None
        payload = b"hybridft-reprotect\n"
        while time.monotonic() < deadline:
            self.check_alive("waiting for the guest to answer through the comparator")
            try:
                with ns.entered():
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                with sock:
                    sock.settimeout(10)
                    sock.connect((GUEST_IP, ECHO_PORT))
                    sock.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = sock.recv(len(payload) - len(got))
                        if not chunk:
                            raise OSError("the echo connection closed early")
                        got += chunk
                if got == payload:
                    return
                last = OSError(f"echo answered {got!r}")
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise ReprotectError(f"the guest did not answer through the comparator: {last}")

    # --------------------------------------------------------------------------------- undo
    def _undo(self) -> None:
        """After a failure: the survivor serves alone again (its output through the comparator, which is
        put back into pass-through), nothing of the new secondary is left."""
        m = self.manifest
        for role in ("daemon", "agent"):
            proc = self.procs.pop(role, None)
            if proc is not None:
                _stop_pid(proc.pid, 3.0)
        with contextlib.suppress(Exception):
            asyncio.run(self._undo_qemu())
        from hybridft_common.control import ControlError, call

        with contextlib.suppress(ControlError, OSError):
            call(m.compare_control, "release-all", io_timeout=5)
        for role in ("secondary", "disk server"):
            proc = self.procs.pop(role, None)
            if proc is not None:
                _stop_pid(proc.pid, 2.0)
        netns = self.record.layout.secondary_netns
        if netns and netns != m.netns and netns != self.record.layout.primary_netns:
            _delete_netns(netns)
        self.record.layout.secondary_netns = ""
        with contextlib.suppress(manifest.ManifestError, OSError):
            current = PairManifest.load(self.files.config)
            current = dataclasses.replace(
                current, pids=dataclasses.replace(current.pids, secondary=0, disk=0, agent=0, daemon=0)
            )
            current.write(self.files.config)
        self.save()

    async def _undo_qemu(self) -> None:
        m = PairManifest.load(self.files.config)
        session = await self._connect(m.qmp.primary.ops, m.pids.primary)
        try:
            with contextlib.suppress(QmpError):
                await session.execute("migrate_cancel")
            with contextlib.suppress(QmpError):
                await self._clear_mirror(session)
            status = await session.execute("query-status")
            if not status.get("running") and status.get("status") not in ("inmigrate", "shutdown"):
                with contextlib.suppress(QmpError):
                    await session.execute("cont")
        finally:
            await session.close()


def loss_time_from_log(text: str) -> float | None:
    """The wall-clock time of the daemon's last "secondary lost" line (its log format: local time,
    ``%Y-%m-%d %H:%M:%S,mmm`` first), or None."""
    for line in reversed(text.splitlines()):
        if "secondary lost (" not in line:
            continue
        try:
            stamp, millis = line[:23].split(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        except ValueError:
            return None
    return None


def _links(netns: str) -> list[str]:
    proc = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    return [line.split(":")[1].strip().split("@")[0] for line in proc.stdout.splitlines() if ":" in line]


def reprotect(workdir: Path, mode: str = "mc", **kwargs: Any) -> dict[str, Any]:
    """Re-protect the pair in ``workdir``; returns ``pair up --json``'s fields for the new layout.
    Raises :class:`ReprotectError` (the survivor still serves; ``reprotect.json`` says why) or
    :class:`CaseError` (nothing to re-protect)."""
    return Reprotector(workdir, mode, **kwargs).run()
