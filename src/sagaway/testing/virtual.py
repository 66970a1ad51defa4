"""Virtual time: an event loop whose clock jumps ahead whenever nothing can happen.

The loop's ``time()`` is virtual. When no callback is ready and no I/O is pending, instead of
blocking in ``select`` until the next timer is due, it moves its clock to that timer and
fires it. So ``asyncio.sleep(3600)``, ``asyncio.timeout(30)``, retry backoffs, lease expiry
and the orchestrator's polling all take no real time, and (with one loop and no threads)
a run is deterministic: the same schedule gives the same timeline.

While work runs on a thread (``run_in_executor``), time stands still: the loop waits for
the thread for real, so a synchronous step never sees a timeout it did not earn.

Nothing in sagaway's runtime knows about this: it reads time through its ``clock=`` (see
:class:`VirtualClock`) and asyncio, and both are virtual here.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

__all__ = ["VirtualClock", "VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")

EPOCH = 1_700_000_000.0
"""What ``VirtualClock.now()`` reads when the loop starts (2023-11-14, a fixed date)."""

_THREAD_POLL = 0.05


class _VirtualSelector:
    """Wraps the loop's selector: polls without blocking, and advances the clock instead."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if self._loop.threads_busy:
            # A thread is working: its result arrives through the self-pipe. Wait for it in
            # real time and leave the virtual clock where it is.
            cap = _THREAD_POLL if timeout is None else min(timeout, _THREAD_POLL)
            return self._real.select(cap)
        if timeout is None:
            # No timer at all: only I/O or another thread can wake us.
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop with a virtual clock (see the module docstring)."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        self._jobs = 0
        super().__init__()
        real: Any = getattr(self, "_selector")  # noqa: B009 - the base class's private field
        setattr(self, "_selector", _VirtualSelector(real, self))  # noqa: B010

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the loop does this itself when idle)."""
        if seconds > 0:
            self._virtual_now += seconds

    @property
    def threads_busy(self) -> bool:
        return self._jobs > 0

    def run_in_executor(self, executor: Executor | None, func: Callable[..., T],  # type: ignore[override]
                        *args: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = super().run_in_executor(executor, func, *args)
        self._jobs += 1

        def done(_: asyncio.Future[T]) -> None:
            self._jobs -= 1

        future.add_done_callback(done)
        return future


class VirtualClock:
    """The orchestrator's (and the store's) clock on a :class:`VirtualTimeLoop`.

    ``now()`` is :data:`EPOCH` plus the loop's virtual time; ``sleep`` is ``asyncio.sleep``
    (virtual on that loop). Calling the object returns ``now()``, so it also fits every
    ``clock: Callable[[], float]`` argument (``MemoryStore(clock=...)``).
    """

    def __init__(self, epoch: float = EPOCH) -> None:
        self.epoch = epoch

    def now(self) -> float:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self.epoch
        return self.epoch + loop.time()

    def __call__(self) -> float:
        return self.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop`.

    Called from inside a running event loop (an ``async def`` test), it runs on a thread of
    its own, since one thread cannot run two loops.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            return runner.run(main)
    import concurrent.futures

    def in_thread() -> T:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            return runner.run(main)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sagaway-virtual") as pool:
        return pool.submit(in_thread).result()
