"""A forward-only relay: the comparator's transport and shell with no comparison at all.

It exists as the benchmark's baseline (``hybridft bench compare`` runs it in the same run as the
comparator): same sockets, same decoder, same batching, same encoder, same control socket — the
only difference is that :class:`ForwardRelay` releases every primary frame at once and drops every
secondary frame.  The ratio comparator/relay is therefore the cost of comparing, not of Python
sockets.  It also makes a usable pass-through when protection is off.

Run it with ``python -m colo_compare.relay`` and the address options of ``compare serve``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import click

from colo_compare.core import Action, DropSecondary, Release
from colo_compare.serve import CompareService, common_options, run_service
from hybridft_common import eventloop
from hybridft_common.endpoints import Endpoint
from hybridft_common.vocabulary import Mode


class ForwardRelay:
    """A core with the Comparator's interface that compares nothing."""

    def __init__(self) -> None:
        self._epoch = 1
        self._pending: list[int] = []
        self._frames_in = self._frames_out = self._secondary = 0

    @property
    def mode(self) -> Mode:
        return Mode.COLO

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def secondary_buffered_bytes(self) -> int:
        return 0  # every secondary frame is dropped at once

    def feed_primary(self, frames: Sequence[bytes], now: float) -> list[Action]:
        self._frames_in += len(frames)
        self._frames_out += len(frames)
        return [Release(list(frames))] if frames else []

    def feed_secondary(self, frames: Sequence[bytes], now: float) -> list[Action]:
        self._secondary += len(frames)
        return [DropSecondary(len(frames))] if frames else []

    def poll(self, now: float) -> list[Action]:
        return []

    def seal(self) -> int:
        self._pending.append(self._epoch)
        self._epoch += 1
        return self._epoch - 1

    def commit(self, epoch: int) -> list[Action]:
        if not self._pending or self._pending[0] != epoch:
            raise ValueError(f"commit({epoch}): the oldest sealed epoch is {self._pending[:1] or None}")
        self._pending.pop(0)
        return []

    def release_all(self) -> list[Action]:
        return []

    def set_mode(self, mode: Mode) -> None:
        Mode(mode)  # validates; a relay has one behaviour

    def stats(self) -> dict[str, int | float | str]:
        return {
            "mode": "relay",
            "epoch": self._epoch,
            "primary_frames": self._frames_in,
            "released_frames": self._frames_out,
            "dropped_secondary_frames": self._secondary,
        }


@click.command("relay")
@common_options
def relay_command(
    primary_in: Endpoint,
    secondary_in: Endpoint,
    out: Endpoint,
    control: Endpoint,
    tls_creds: str | None,
    vnet_hdr: bool,
    max_buffer: int,
    out_high_water: int,
    poll_us: int,
    log_level: str,
) -> None:
    """Forward the primary's frames to --out unchanged; discard the secondary's."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = CompareService(
        ForwardRelay(),  # type: ignore[arg-type]
        primary_in=primary_in.with_creds(tls_creds),
        secondary_in=secondary_in.with_creds(tls_creds),
        out=out.with_creds(tls_creds),
        control=control.with_creds(tls_creds),
        vnet_hdr=vnet_hdr,
        max_buffer=max_buffer << 20,
        out_high_water=out_high_water << 20,
        poll_us=poll_us,
    )
    eventloop.run(run_service(service, ready=lambda: print("ready", flush=True)), "compare")


if __name__ == "__main__":
    relay_command()
