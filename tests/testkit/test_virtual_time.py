"""The virtual-time loop: long waits take no real time; threads hold time still."""

from __future__ import annotations

import asyncio
import time

import pytest

from sagaway.testing import VirtualClock, run_virtual


def test_an_hour_of_sleep_and_a_timeout_take_no_real_time() -> None:
    async def main() -> tuple[float, float, bool]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        slept = loop.time() - start
        timed_out = False
        try:
            async with asyncio.timeout(30):
                await asyncio.sleep(31)
        except TimeoutError:
            timed_out = True
        return slept, loop.time() - start, timed_out

    t0 = time.perf_counter()
    slept, total, timed_out = run_virtual(main())
    assert time.perf_counter() - t0 < 1.0
    assert slept == pytest.approx(3600)
    assert total == pytest.approx(3630)
    assert timed_out


def test_timers_fire_in_order_at_their_virtual_times() -> None:
    async def main() -> list[tuple[str, float]]:
        clock = VirtualClock()
        fired: list[tuple[str, float]] = []
        start = clock.now()

        async def at(name: str, delay: float) -> None:
            await clock.sleep(delay)
            fired.append((name, round(clock.now() - start, 6)))

        await asyncio.gather(at("c", 30), at("a", 0.5), at("b", 10))
        return fired

    assert run_virtual(main()) == [("a", 0.5), ("b", 10.0), ("c", 30.0)]


def test_time_stands_still_while_a_thread_works() -> None:
    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # A 0.2 s real job under a 0.01 s virtual timeout: virtual time must not run on
        # while the thread works, or the timeout would fire.
        async with asyncio.timeout(0.01):
            result = await loop.run_in_executor(None, lambda: (time.sleep(0.2), "done")[1])
        return result, loop.time() - start

    result, elapsed = run_virtual(main())
    assert result == "done"
    assert elapsed < 0.01


async def test_run_virtual_works_from_inside_a_running_loop() -> None:
    async def main() -> float:
        await asyncio.sleep(100)
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(100)
