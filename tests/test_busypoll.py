"""Busy-polling (hybridft_common.busypoll): the window's decisions without sockets, and the spin
itself, compiled and reference, on real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from hybridft_common import busypoll, fastpath
from hybridft_common.busypoll import PollCounters, PollWindow, wait_readable_python

US = 1000
MS = 1000 * US


def test_a_window_of_zero_never_spins() -> None:
    window = PollWindow(0)
    assert window.window(0) == 0
    assert window.window(10**12) == 0


def test_negative_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PollWindow(-1)


def test_hits_keep_spinning_and_are_counted() -> None:
    counters = PollCounters()
    window = PollWindow(50 * US, counters)
    now = 1_000 * MS
    for i in range(100):
        assert window.window(now) == 50 * US
        window.record(now, 20 * US)
        now += 60 * US
        if i % 2:  # misses in between, never three in a row
            assert window.window(now) == 50 * US
            window.record(now, -1)
    assert counters.as_dict() == {
        "polls": 150,
        "hits": 100,
        "spun_ns": 100 * 20 * US + 50 * 50 * US,
        "back_offs": 0,
    }


def test_three_misses_in_a_row_back_off_and_the_back_off_doubles_up_to_its_cap() -> None:
    counters = PollCounters()
    window = PollWindow(50 * US, counters)
    now = 0
    expected_back_off = PollWindow.BACK_OFF_FIRST_NS
    for round_ in range(12):
        for _ in range(PollWindow.MISSES_TO_BACK_OFF):
            assert window.window(now) == 50 * US
            window.record(now, -1)
        assert counters.back_offs == round_ + 1
        assert window.window(now) == 0
        assert window.window(now + expected_back_off - 1) == 0
        now += expected_back_off
        assert window.window(now) == 50 * US
        expected_back_off = min(2 * expected_back_off, PollWindow.BACK_OFF_MAX_NS)
    assert expected_back_off == PollWindow.BACK_OFF_MAX_NS  # the cap was reached, and held


def test_a_hit_resets_the_back_off() -> None:
    window = PollWindow(50 * US)
    now = 0
    for _ in range(2):  # two back-offs: the next would be 4x the first
        for _ in range(PollWindow.MISSES_TO_BACK_OFF):
            window.record(now, -1)
        now += 10 * PollWindow.BACK_OFF_FIRST_NS
    window.record(now, 5 * US)
    for _ in range(PollWindow.MISSES_TO_BACK_OFF):
        window.record(now, -1)
    assert window.window(now + PollWindow.BACK_OFF_FIRST_NS) == 50 * US


SPINS: list[tuple[str, Callable[[tuple[int, ...], int], int]]] = [("python", wait_readable_python)]
if fastpath.available is not None:
    SPINS.append(("compiled", fastpath.available.wait_readable))


def test_the_compiled_spin_is_tested() -> None:
    # CI builds the extension: the differential tests below must not silently run Python alone
    assert fastpath.available is not None, fastpath.describe()
    assert busypoll.wait_readable is (
        fastpath.available.wait_readable if fastpath.speedups is not None else wait_readable_python
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(("name", "spin"), SPINS)
def test_spin_times_out_on_a_quiet_socket(
    name: str, spin: Callable[[tuple[int, ...], int], int], pair: tuple[socket.socket, socket.socket]
) -> None:
    start = time.monotonic_ns()
    assert spin((pair[0].fileno(),), 2 * MS) == -1
    assert time.monotonic_ns() - start >= 2 * MS


@pytest.mark.parametrize(("name", "spin"), SPINS)
def test_spin_returns_at_once_when_data_waits(
    name: str, spin: Callable[[tuple[int, ...], int], int], pair: tuple[socket.socket, socket.socket]
) -> None:
    pair[1].send(b"x")
    waited = spin((pair[0].fileno(),), 10**9)
    assert 0 <= waited < 10**9
    assert spin((pair[0].fileno(),), 0) >= 0  # a window of 0 still looks once


@pytest.mark.parametrize(("name", "spin"), SPINS)
def test_spin_sees_data_sent_while_it_spins_and_a_hang_up(
    name: str, spin: Callable[[tuple[int, ...], int], int], pair: tuple[socket.socket, socket.socket]
) -> None:
    timer = threading.Timer(0.02, pair[1].send, args=(b"x",))
    timer.start()
    waited = spin((pair[0].fileno(),), 5 * 10**9)
    timer.join()
    assert 15 * MS <= waited < 5 * 10**9
    pair[0].recv(1)
    pair[1].close()  # a read would return b"" at once: the spin must say so, not wait
    assert spin((pair[0].fileno(),), 5 * 10**9) < 10**9


@pytest.mark.parametrize(("name", "spin"), SPINS)
def test_spin_refuses_bad_arguments(name: str, spin: Callable[[tuple[int, ...], int], int]) -> None:
    with pytest.raises(ValueError):
        spin((-1,), 1000)
    with pytest.raises(ValueError):
        spin((0,), -1)
    with pytest.raises(ValueError):
        spin((), 1000)
    with pytest.raises(ValueError):
        spin(tuple(range(busypoll.MAX_FDS + 1)), 1000)
    with pytest.raises(TypeError):
        spin([0], 1000)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "spin"), SPINS)
def test_spin_watches_every_descriptor_it_is_given(
    name: str, spin: Callable[[tuple[int, ...], int], int]
) -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        fds = tuple(a.fileno() for a, _ in pairs)
        assert spin(fds, MS) == -1
        pairs[2][1].send(b"x")  # the last one
        assert spin(fds, 10**9) >= 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_the_compiled_spin_lets_other_threads_run(pair: tuple[socket.socket, socket.socket]) -> None:
    """The GIL is released while spinning: a Python thread makes progress meanwhile (the disk
    server's journal writer is one)."""
    if fastpath.available is None:
        pytest.fail(f"the extension is not built: {fastpath.describe()}")
    counted = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    time.sleep(0.01)
    before = counted[0]
    assert fastpath.available.wait_readable((pair[0].fileno(),), 200 * MS) == -1
    during = counted[0] - before
    stop.set()
    thread.join()
    assert during > 1000, during


def test_spin_records_what_it_saw_and_does_nothing_during_a_back_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    window = PollWindow(MS)
    busypoll.spin(window, (pair[0].fileno(),))  # nothing to read: a miss
    pair[1].send(b"x")
    busypoll.spin(window, (pair[0].fileno(),))  # a hit
    assert (window.counters.polls, window.counters.hits) == (2, 1)
    pair[0].recv(1)
    for _ in range(PollWindow.MISSES_TO_BACK_OFF):
        busypoll.spin(window, (pair[0].fileno(),))
    assert window.counters.back_offs == 1
    busypoll.spin(window, (pair[0].fileno(),))  # backing off: no spin at all
    assert window.counters.polls == 2 + PollWindow.MISSES_TO_BACK_OFF
