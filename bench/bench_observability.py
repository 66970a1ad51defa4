"""What observability costs: CPU time per saga with and without the listeners attached.

Runs the core benchmark's 3-step saga (trivial async steps) on the memory store with 64
concurrent ``start() -> wait()`` loops, alternating configurations round by round:

* ``none``: no listeners;
* ``metrics``: PrometheusMetrics (watching the store) + JSON logging to /dev/null;
* ``all``: the same + a TracingListener (an SDK TracerProvider that exports nothing).

It prints sagas/s and, more telling on a shared machine, CPU microseconds per saga
(``time.process_time``), whose median over the rounds is what to compare: wall-clock
throughput moves with whatever else the machine runs, CPU per saga much less.

    .venv/bin/python bench/bench_observability.py [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchlib import SUCCESS, bench_sagas, closed_loop

MODES = ("none", "metrics", "all")


async def measure(mode: str, seconds: float) -> tuple[float, float]:
    from sagaway import Orchestrator

    listeners: list[Any] = []
    metrics = None
    if mode != "none":
        from sagaway.observability import PrometheusMetrics, TracingListener, configure_logging

        configure_logging("INFO", fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115, ASYNC230
        metrics = PrometheusMetrics()
        listeners.append(metrics)
        if mode == "all":
            from opentelemetry.sdk.trace import TracerProvider

            listeners.append(TracingListener(TracerProvider()))
    async with Orchestrator("memory://", sagas=bench_sagas(), listeners=listeners) as orch:
        if metrics is not None:
            metrics.watch(orch)

        async def one(w: int, i: int) -> str | None:
            await (await orch.start(SUCCESS, {"w": w, "i": i})).wait(timeout=60)
            return None

        await closed_loop(one, 64, 1.0)
        cpu0 = time.process_time()
        latencies, _, elapsed = await closed_loop(one, 64, seconds)
        cpu = time.process_time() - cpu0
    return len(latencies) / elapsed, cpu / len(latencies) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        rate, cpu = asyncio.run(measure(args._child, args.seconds))
        print(f"{rate:.1f} {cpu:.1f}")
        return
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            # A fresh process per measurement: no allocator or logging state carried over.
            out = subprocess.run([sys.executable, __file__, "--_child", mode, "--seconds",
                                  str(args.seconds)], check=True, capture_output=True,
                                 text=True).stdout.split()
            rate, cpu = float(out[0]), float(out[1])
            results[mode].append((rate, cpu))
            print(f"round {r + 1} {mode:8} {rate:8.0f} sagas/s {cpu:7.0f} us CPU/saga "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    base = statistics.median(c for _, c in results["none"])
    print("\nmedians:")
    for mode in MODES:
        rate = statistics.median(r for r, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode])
        print(f"  {mode:8} {rate:8.0f} sagas/s {cpu:7.0f} us CPU/saga "
              f"({(cpu - base) / base * 100:+.0f}% CPU)")


if __name__ == "__main__":
    main()
