"""The memory scenario: N sagas in flight at once in one worker process.

Every action of the 3-step saga awaits a slow participant (an ``asyncio.Event``, released
only once all N runs are waiting in their first step), so all N runs are held by the worker at
the same time: each with its driver task, its invocation task and its state in memory. With
all N in flight it reads the RSS (now and ``ru_maxrss``), then releases the participant and
times the drain (every run through its three steps to COMPLETED).

Run from ``bench_core.py`` (``--memory-test``, or as part of the default run) in a fresh
child process per store, so the RSS is this scenario's alone.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from benchlib import build_saga, current_rss_mb, peak_rss_mb

from sagaway import Orchestrator, SagaStatus

SAGA = "bench_inflight"


async def run_inflight(url: str, sagas: int, *, timeout: float = 300.0) -> dict[str, Any]:
    gate = asyncio.Event()
    entered = 0
    all_in = asyncio.Event()

    async def slow_participant() -> None:
        nonlocal entered
        if not gate.is_set():
            entered += 1
            if entered >= sagas:
                all_in.set()
        await gate.wait()

    saga = build_saga(SAGA, fail_last=False, participant=slow_participant)
    gc.collect()
    baseline = current_rss_mb()
    async with Orchestrator(url, sagas=[saga]) as orch:
        opened = current_rss_mb()
        t0 = time.perf_counter()
        handles = await asyncio.gather(*(orch.start(SAGA, {"n": i}) for i in range(sagas)))
        started = time.perf_counter() - t0
        try:
            await asyncio.wait_for(all_in.wait(), timeout)
        except TimeoutError:
            gate.set()
            raise SystemExit(f"bench: only {entered} of {sagas} sagas reached their first "
                             f"step within {timeout:.0f}s") from None
        in_flight_s = time.perf_counter() - t0
        held = len(orch._drivers)  # internal: the runs this worker drives right now
        rss_in_flight = current_rss_mb()
        peak_in_flight = peak_rss_mb()

        t1 = time.perf_counter()
        gate.set()
        runs = await asyncio.wait_for(
            asyncio.gather(*(h.wait() for h in handles), return_exceptions=True), timeout)
        drain = time.perf_counter() - t1
    errors = sum(1 for r in runs
                 if isinstance(r, BaseException) or r.status is not SagaStatus.COMPLETED)

    def mb(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "sagas": sagas,
        "held_by_worker": held,
        "start_seconds": round(started, 3),
        "all_in_flight_seconds": round(in_flight_s, 3),
        "baseline_rss_mb": mb(baseline),
        "opened_rss_mb": mb(opened),
        "in_flight_rss_mb": mb(rss_in_flight),
        "peak_rss_in_flight_mb": mb(peak_in_flight),
        "peak_rss_mb": mb(peak_rss_mb()),
        "drain_seconds": round(drain, 3),
        "drain_sagas_per_sec": round(sagas / drain, 1) if drain > 0 else 0.0,
        "errors": errors,
    }
