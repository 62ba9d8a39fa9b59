"""The daemon's event loop: pyfuse3's request loop without a scheduler.

pyfuse3 runs its request loop (`pyfuse3.main`) on trio, and it lets the
file system replace the trio module it uses (`pyfuse3.trio`: that is how
`pyfuse3.asyncio` works).  pmfs's handlers never await -- the core is
synchronous and serves one request at a time -- so the only point where
the loop ever has to wait is "until /dev/fuse is readable".  A scheduler
buys nothing there and costs a lot per request: trio's lock checkpoint,
its epoll registration and a task switch each way cost more daemon CPU
than a pmfs GETATTR itself.

`Loop` implements exactly the part of trio's API that pyfuse3's request
loop uses (`Lock`, `open_nursery`, `lowlevel.wait_readable`,
`lowlevel.notify_closing`, `lowlevel.current_task`,
`lowlevel.current_trio_token`, `ClosedResourceError`), synchronously:
`wait_readable` blocks in poll(2) on the FUSE device and a wake-up pipe,
and runs the daemon's timers and signal handlers while it waits.  A
coroutine driven by `Loop.run` therefore never suspends; if one ever did
(a handler that really awaits), `run` fails loudly instead of hanging.

Signals (SIGTERM, SIGINT, SIGHUP) are delivered through
`signal.set_wakeup_fd`, so they interrupt the wait at once; their
callbacks run between requests, never inside one.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import signal
import time

log = logging.getLogger(__name__)


class ClosedResourceError(Exception):
    """The FUSE fd is being closed (pyfuse3.terminate)."""


class _Lock:
    """pyfuse3's read lock: with one reader there is nothing to exclude."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class _Task:
    name = "pmfs-fuse"


_TASK = _Task()


class _Nursery:
    def __init__(self, loop: "Loop"):
        self.loop = loop
        self.coros: list = []

    async def __aenter__(self):
        return self

    def start_soon(self, fn, *args, name=None):
        self.coros.append(fn(*args))

    async def __aexit__(self, et, ev, tb):
        if et is not None:
            for c in self.coros:
                c.close()
            return False
        while self.coros:
            self.loop.drive(self.coros.pop(0))
        return False


class SuspendedError(RuntimeError):
    """A coroutine tried to suspend under the synchronous loop."""


class Loop:
    """A synchronous stand-in for the trio module, for pyfuse3.

    Use::

        loop = Loop()
        loop.call_every(5, flush)
        loop.on_signal(signal.SIGTERM, stop)
        loop.run(pyfuse3.main(min_tasks=1, max_tasks=1))
    """

    ClosedResourceError = ClosedResourceError
    Lock = _Lock

    def __init__(self):
        # trio.lowlevel, the sub-namespace pyfuse3 uses, is the loop itself
        self.lowlevel = self
        self._timers: list = []          # heap of (deadline, seq, fn, interval)
        self._seq = itertools.count()
        self._closing: set[int] = set()
        self._poll = select.poll()
        self._registered: set[int] = set()
        self._signals: dict[int, object] = {}
        self._old_handlers: dict = {}
        self._pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._old_wakeup = -1
        #: how long to poll for the next request before sleeping (see _spin)
        self.spin_ns = 0

    # -- what the daemon sets up -----------------------------------------
    def call_later(self, delay: float, fn) -> None:
        """Run fn() once, `delay` seconds from now (between requests)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn, None))

    def call_every(self, interval: float, fn) -> None:
        """Run fn() every `interval` seconds (between requests)."""
        heapq.heappush(self._timers,
                       (time.monotonic() + interval, next(self._seq), fn, interval))

    def on_signal(self, signum: int, fn) -> None:
        """Run fn(signum) when the signal arrives (between requests)."""
        self._signals[signum] = fn

    def run(self, coro):
        """Drive `coro` (e.g. pyfuse3.main()) to completion with this loop
        standing in for trio inside pyfuse3."""
        import pyfuse3
        saved = pyfuse3.trio
        self._install_signals()
        pyfuse3.trio = self
        try:
            return self.drive(coro)
        finally:
            pyfuse3.trio = saved
            self._remove_signals()

    @staticmethod
    def drive(coro):
        try:
            coro.send(None)
        except StopIteration as e:
            return e.value
        coro.close()
        raise SuspendedError("a coroutine suspended under pmfs's synchronous FUSE loop")

    # -- the part of trio's API pyfuse3 uses ------------------------------------
    def current_trio_token(self):
        return self

    def current_task(self):
        return _TASK

    def open_nursery(self):
        return _Nursery(self)

    def notify_closing(self, fd: int) -> None:
        self._closing.add(fd)
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    async def wait_readable(self, fd: int) -> None:
        self.wait(fd)

    # -- the wait ------------------------------------------------------------
    def wait(self, fd: int) -> None:
        """Block until `fd` is readable, running due timers and signal
        callbacks meanwhile; ClosedResourceError once notify_closing(fd)."""
        if fd not in self._registered:
            self._poll.register(fd, select.POLLIN)
            self._registered.add(fd)
        poll = self._poll.poll
        while True:
            if fd in self._closing:
                self._closing.discard(fd)
                raise ClosedResourceError()
            timeout = -1
            if self._timers:
                now = time.monotonic()
                if self._timers[0][0] <= now:
                    self._run_timers(now)
                    continue
                timeout = int((self._timers[0][0] - now) * 1000) + 1
            events = poll(0)
            if not events and self.spin_ns:
                events = self._spin(poll)
            if not events:
                events = poll(timeout)  # a signal interrupts it through the wake-up fd
            ready = False
            for efd, _ev in events:
                if efd == fd:
                    ready = True  # POLLIN, or POLLERR/POLLHUP: the read reports it
                elif efd == self._wake_r:
                    self._drain_wakeup()
            if self._pending:
                self._run_signals()
                continue  # a callback may have asked to close
            if ready:
                return

    def _spin(self, poll):
        """Poll without sleeping for up to `spin_ns`, yielding the CPU to
        anything else runnable on it meanwhile.

        On a machine whose idle CPUs halt (virtual machines above all),
        waking a sleeping daemon costs more than serving a request: a
        client that sends its next request within the spin finds the
        daemon awake.  The spin ends at the first request, so an idle
        daemon spends at most `spin_ns` of CPU after its last one.
        """
        until = time.monotonic_ns() + self.spin_ns
        clock = time.monotonic_ns
        yield_ = os.sched_yield
        while True:
            yield_()
            events = poll(0)
            if events or clock() >= until:
                return events

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _deadline, _seq, fn, interval = heapq.heappop(timers)
            if interval is not None:
                heapq.heappush(timers, (now + interval, next(self._seq), fn, interval))
            try:
                fn()
            except Exception:
                log.exception("timer callback %r failed", fn)

    def _run_signals(self) -> None:
        pending, self._pending = self._pending, []
        for signum in pending:
            fn = self._signals.get(signum)
            if fn is None:
                continue
            try:
                fn(signum)
            except Exception:
                log.exception("signal callback for %d failed", signum)

    # -- signals -------------------------------------------------------------------
    def _install_signals(self) -> None:
        if not self._signals:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in self._signals:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self._pending.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        except OSError as e:  # pragma: no cover
            if e.errno != errno.EAGAIN:
                raise

    def _remove_signals(self) -> None:
        if self._wake_r < 0:
            return
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)
        self._old_handlers.clear()
        signal.set_wakeup_fd(self._old_wakeup)
        self._poll.unregister(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
