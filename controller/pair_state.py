"""The pair's state as the daemon sees it, and the decision of how replication ended.

Why the decision is its own object: when COLO ends while the primary lives (a ``COLO_EXIT``, a failed
checkpoint), either the secondary is lost -- the primary must go on, unprotected -- or the secondary
took over because the agent failed over (a heartbeat gap, say) -- the primary must stay stopped, as
resuming it would give two live copies of the guest.  Getting that wrong is the worst thing the
daemon can do, so the rule is a pure function of what the daemon could find out, unit-tested on its
own table like :class:`controller.agent.FailoverDecider`; the daemon only asks QEMU, the disk server
and the agent's report, and acts.

A third answer, "don't know", exists because a secondary that does not answer (hung, SIGSTOPped, a
partition) may be in the middle of taking over: the only safe move then is to keep the primary
stopped and its output held, and ask again, never to guess "lost" and resume it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Final


class PairState(StrEnum):
    """What the daemon is doing for the pair (``status`` shows the value)."""

    STARTING = "starting"  # connecting, entering COLO
    PROTECTED = "protected"  # checkpoints run; a failover would lose nothing committed
    UNPROTECTED = "unprotected"  # the secondary is lost: the primary runs alone
    PRIMARY_LOST = "primary-lost"  # the agent was told; it fails over to the secondary
    FAILED_OVER = "failed-over"  # planned failover, or the secondary took over: the primary stays stopped
    STOPPED = "stopped"  # the daemon was closed while the pair was not failed over
    UNDECIDED = "undecided"  # replication ended; whether the secondary took over is not known yet:
    # the primary stays stopped and its output held while the daemon keeps asking


class ReplicationEnd(StrEnum):
    TOOK_OVER = "took-over"  # the secondary left COLO as the secondary: the agent failed over
    LOST = "lost"  # the secondary is gone (or still a secondary that can no longer checkpoint)
    DONT_KNOW = "don't know"  # no answer from a live secondary: keep the primary stopped, ask again


class NoAnswer(Enum):
    """The secondary's QEMU did not answer ``query-colo-status`` (no connection, an error, a timeout)."""

    NO_ANSWER = "no answer"


NO_ANSWER: Final = NoAnswer.NO_ANSWER


@dataclass(frozen=True, slots=True)
class ColoStatus:
    """The secondary's reply to ``query-colo-status``: its COLO mode now and before."""

    mode: str | None
    last_mode: str | None

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> ColoStatus:
        mode, last = reply.get("mode"), reply.get("last-mode")
        return cls(mode if isinstance(mode, str) else None, last if isinstance(last, str) else None)


class ReplicationEndDecider:
    """Took over, lost, or don't know?  Fed whether the secondary's process lives, its COLO status (or
    :data:`NO_ANSWER`), whether the disk server has failed over (or :data:`NO_ANSWER`) and whether the
    agent has begun a failover (its report exists)."""

    def decide(
        self,
        *,
        secondary_alive: bool,
        colo_status: ColoStatus | NoAnswer,
        disk_failed_over: bool | NoAnswer = False,
        agent_failing_over: bool = False,
    ) -> ReplicationEnd:
        if disk_failed_over is True or agent_failing_over:
            # a failover has begun: the secondary's disk is the pair's now, whatever QEMU says
            return ReplicationEnd.TOOK_OVER
        if not secondary_alive:
            return ReplicationEnd.LOST  # a dead QEMU runs no guest: nothing to fence against
        if colo_status is NO_ANSWER:
            return ReplicationEnd.DONT_KNOW  # it may be taking over right now
        assert isinstance(colo_status, ColoStatus)
        if colo_status.mode == "none" and colo_status.last_mode == "secondary":
            return ReplicationEnd.TOOK_OVER  # it left COLO as the secondary: a failover made it primary
        # still the secondary (a disk server that does not answer cannot complete a failover either)
        return ReplicationEnd.LOST
