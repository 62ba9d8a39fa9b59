"""pmfs/fuseloop.py: the synchronous stand-in for trio under pyfuse3's
request loop (the FUSE tests run every mount on it; these test the loop
itself on pipes)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyfuse3
import pytest

from pmfs.fuseloop import ClosedResourceError, Loop, SuspendedError
from pmfs.mount import parse_options
from pmfs.cli import UsageError


async def _reader_loop(loop: Loop, fd: int, got: list, stop_after: int):
    """What pyfuse3's _session_loop does: lock, wait until readable, read."""
    while True:
        async with loop.Lock():
            try:
                await loop.lowlevel.wait_readable(fd)
            except loop.ClosedResourceError:
                return "closed"
        got.append(os.read(fd, 100))
        if len(got) >= stop_after:
            return "done"


def test_wait_readable_blocks_until_data_and_runs_timers():
    loop = Loop()
    r, w = os.pipe()
    ticks = []
    loop.call_every(0.02, lambda: ticks.append(time.monotonic()))
    loop.call_later(0.05, lambda: os.write(w, b"a"))
    loop.call_later(0.15, lambda: os.write(w, b"b"))
    got = []
    t0 = time.monotonic()
    assert Loop.drive(_reader_loop(loop, r, got, 2)) == "done"
    assert got == [b"a", b"b"]
    assert time.monotonic() - t0 >= 0.14
    assert len(ticks) >= 4  # the periodic timer ran while the loop waited
    os.close(r), os.close(w)


def test_nursery_runs_started_tasks_to_completion():
    loop = Loop()
    r, w = os.pipe()
    os.write(w, b"x")
    out = []

    async def main():
        async with loop.open_nursery() as n:
            n.start_soon(_reader_loop, loop, r, out, 1, name="t")
        return "finished"

    assert Loop.drive(main()) == "finished"
    assert out == [b"x"]
    assert loop.lowlevel.current_task().name
    assert loop.lowlevel.current_trio_token() is loop
    os.close(r), os.close(w)


def test_notify_closing_ends_the_wait():
    loop = Loop()
    r, w = os.pipe()
    loop.call_later(0.02, lambda: loop.notify_closing(r))
    assert Loop.drive(_reader_loop(loop, r, [], 1)) == "closed"
    os.close(r), os.close(w)


def test_signal_callback_runs_between_requests_and_can_close():
    loop = Loop()
    r, w = os.pipe()
    seen = []

    def on_term(sig):
        seen.append(sig)
        loop.notify_closing(r)

    loop.on_signal(signal.SIGUSR1, on_term)
    threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
    old = signal.getsignal(signal.SIGUSR1)

    # run() installs the handler (and the wake-up fd) for the duration and
    # stands in for trio inside pyfuse3 meanwhile
    saved = pyfuse3.trio
    assert loop.run(_reader_loop(loop, r, [], 1)) == "closed"
    assert seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is old  # restored
    assert pyfuse3.trio is saved
    os.close(r), os.close(w)


def test_spinning_finds_data_without_sleeping():
    loop = Loop()
    loop.spin_ns = 50_000_000  # 50 ms: the write below lands inside the spin
    r, w = os.pipe()
    threading.Timer(0.01, lambda: os.write(w, b"s")).start()
    got = []
    t0 = time.monotonic()
    Loop.drive(_reader_loop(loop, r, got, 1))
    assert got == [b"s"] and time.monotonic() - t0 < 1
    os.close(r), os.close(w)


def test_a_coroutine_that_really_suspends_is_an_error():
    class Suspend:
        def __await__(self):
            yield "suspended"

    async def bad():
        await Suspend()

    with pytest.raises(SuspendedError):
        Loop.drive(bad())


def test_a_failing_timer_is_logged_and_the_loop_goes_on(caplog):
    loop = Loop()
    r, w = os.pipe()
    loop.call_later(0.01, lambda: 1 / 0)
    loop.call_later(0.03, lambda: os.write(w, b"z"))
    got = []
    Loop.drive(_reader_loop(loop, r, got, 1))
    assert got == [b"z"]
    assert "timer callback" in caplog.text
    os.close(r), os.close(w)


def test_closed_resource_error_is_the_loops_own():
    assert Loop.ClosedResourceError is ClosedResourceError


def test_spin_option():
    assert parse_options(["spin=0"]).spin_us == 0
    assert parse_options(["spin=200"]).spin_us == 200
    assert parse_options([]).spin_us == 50
    for bad in ("spin=x", "spin=-1"):
        with pytest.raises(UsageError):
            parse_options([bad])
