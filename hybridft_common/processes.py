"""Whether a process runs, read from ``/proc``: one answer for every service and command.

Why its own module: ``kill(pid, 0)`` also finds a zombie -- a process that died and was not reaped
yet.  QEMU, the daemon and the agent outlive the command that started them, and where PID 1 does
not reap orphans (containers, this project's CI) a killed QEMU stays a zombie indefinitely.  A
failover, a re-protection or ``pair down`` that took it for running would wait for it, fence it or
refuse to go on.  So "alive" here means running, and :func:`pid_exists` is kept for the one caller
that must still reach a zombie (to signal its process group and reap it).
"""

from __future__ import annotations


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (``R``, ``S``, ``Z``, ...), or None if there is no such
    process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # the command name (in parentheses) may hold spaces and parentheses: split after the last
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_exists(pid: int) -> bool:
    """A process with this pid exists, a zombie included."""
    return process_state(pid) is not None


def pid_alive(pid: int) -> bool:
    """A process with this pid runs: not gone, not a zombie."""
    return process_state(pid) not in (None, "Z", "X")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used; psutil's error if it is gone."""
    import psutil  # only the measuring callers pay for it

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
