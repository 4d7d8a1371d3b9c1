"""The fencing generation: after a failover, nothing the old primary's side sends is obeyed.

Why: a primary that was only cut off (a partition, a SIGSTOP, a daemon that hung) comes back after the
agent failed the pair over and carries on where it was -- its daemon seals and commits epochs, asks
the comparator to release held output, its mirror writes ``replica``.  Killing it is not always
possible (another host); refusing it is.  Each failover bumps a *generation* number; the agent records
the new one durably and hands it to the disk server and the comparator (``fence`` verb), which record
it durably too and from then on refuse every request that carries an older generation.  Requests carry
their sender's generation in a ``generation`` argument; one without it is of generation 0 -- the
pair's first daemon, which never learnt of a later one -- so it is refused once any failover fenced.

:class:`Fence` is the sans-I/O rule (admit or refuse, raise), :class:`GenerationFile` its durable record
(atomic replace + fsync of file and directory), :func:`fenced_dispatch` wraps a control dispatch with
both.  Read-only verbs (``status``, ``stats``) stay open: an operator of the old side may look.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridft_common.control import ControlError
from hybridft_common.manifest import write_durably

FENCE_VERB = "fence"
READ_ONLY_VERBS = frozenset({"status", "stats"})

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def request_generation(args: dict[str, Any]) -> int:
    """The generation a request carries (0 without one); a malformed one is a bad request."""
    value = args.get("generation", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError(f"'generation' must be a non-negative integer, got {value!r}", "bad-request")
    return value


@dataclass
class Fence:
    """The generation in force and the rule: a request of an older generation is refused."""

    generation: int = 0
    refused: int = 0

    def admits(self, generation: int) -> bool:
        return generation >= self.generation

    def check(self, verb: str, generation: int) -> None:
        if not self.admits(generation):
            self.refused += 1
            raise ControlError(
                f"{verb} refused: it comes from generation {generation}, but a failover moved the pair "
                f"to generation {self.generation} (the old primary's side is fenced)",
                "fenced",
            )

    def advance(self, generation: int) -> bool:
        """Move to ``generation`` (never back); True if it changed.  An older one is refused."""
        self.check(FENCE_VERB, generation)
        changed = generation > self.generation
        self.generation = generation
        return changed


class GenerationFile:
    """A generation number in a small JSON file, replaced durably; a missing file means 0."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable fencing generation ({exc})") from None
        generation = data.get("generation") if isinstance(data, dict) else None
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ValueError(f"{self.path}: no valid 'generation' in {data!r}")
        return generation

    def store(self, generation: int) -> None:
        write_durably(self.path, json.dumps({"generation": generation}) + "\n")


def fenced_dispatch(
    dispatch: Dispatch,
    fence: Fence,
    record: GenerationFile | None,
    *,
    read_only: Iterable[str] = READ_ONLY_VERBS,
    on_fence: Callable[[int], None] | None = None,
) -> Dispatch:
    """``dispatch`` behind the fence: a ``fence`` verb (``{"generation": G}``) moves the fence forward
    (recorded durably before it is answered); every other verb but the read-only ones must carry a
    generation no older than the fence's.  ``on_fence`` is called when the generation moved."""
    open_verbs = frozenset(read_only)

    async def guarded(verb: str, args: dict[str, Any]) -> dict[str, Any]:
        if verb == FENCE_VERB:
            generation = request_generation(args)
            if "generation" not in args:
                raise ControlError("fence needs 'generation'", "bad-request")
            previous = fence.generation
            fence.check(FENCE_VERB, generation)
            if generation > previous:
                if record is not None:
                    record.store(generation)  # durable before anyone is told
                fence.advance(generation)
                if on_fence is not None:
                    on_fence(generation)
            return {"generation": fence.generation, "previous": previous}
        if verb not in open_verbs:
            fence.check(verb, request_generation(args))
        args = {k: v for k, v in args.items() if k != "generation"}
        reply = await dispatch(verb, args)
        if verb == "status" and isinstance(reply, dict):
            reply = {**reply, "generation": fence.generation, "fenced_requests": fence.refused}
        return reply

    return guarded
