"""Core throughput/latency benchmark: a 3-step saga on the memory and SQLite stores.

For every configuration (store x concurrency x path) it runs C worker coroutines, each
looping ``start() -> wait()`` on a fresh Orchestrator, first for a short warm-up and then for
``--seconds``, and reports completed sagas per second, p50/p99 latency (start -> finished,
per saga), durable transactions (group-commit batches), average batch size and peak RSS.

Steps are trivial ``async def`` functions (no sleeps), so this measures the framework and the
store, nothing else. Each configuration runs in a fresh child process (unless
``--in-process``), so peak RSS and allocator state belong to that configuration alone.

    .venv/bin/python bench/bench_core.py                      # the full default matrix
    .venv/bin/python bench/bench_core.py --stores sqlite --concurrency 64 --paths success
    .venv/bin/python bench/bench_core.py --json results.json  # also write JSON
    .venv/bin/python bench/bench_core.py --json - 2>/dev/null # JSON on stdout, table on stderr

No thresholds: this reports numbers, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import sagaway
from sagaway import NonRetryableError, Orchestrator, Saga, SagaStatus

# -- the sagas under test ------------------------------------------------------------------

SUCCESS = "bench_success"
COMPENSATION = "bench_compensation"


def build_saga(name: str, *, fail_last: bool) -> Saga:
    """Three compensatable steps; with ``fail_last`` the third fails non-retryably."""
    saga = Saga(name)

    @saga.step
    async def reserve(ctx: Any, data: Any) -> dict[str, int]:
        return {"reserved": 1}

    @reserve.compensation
    async def unreserve(ctx: Any, data: Any, result: Any) -> None:
        return None

    @saga.step
    async def charge(ctx: Any, data: Any) -> dict[str, int]:
        return {"charged": 1}

    @charge.compensation
    async def refund(ctx: Any, data: Any, result: Any) -> None:
        return None

    @saga.step
    async def ship(ctx: Any, data: Any) -> dict[str, int]:
        if fail_last:
            raise NonRetryableError("out of stock")
        return {"shipped": 1}

    @ship.compensation
    async def unship(ctx: Any, data: Any, result: Any) -> None:
        return None

    return saga


PATHS = {
    "success": (SUCCESS, SagaStatus.COMPLETED),
    "compensation": (COMPENSATION, SagaStatus.COMPENSATED),
}

# "sqlite" in --stores expands to both synchronous modes: FULL (the default) and NORMAL.
STORE_VARIANTS = {
    "memory": ["memory"],
    "sqlite": ["sqlite-full", "sqlite-normal"],
    "sqlite-full": ["sqlite-full"],
    "sqlite-normal": ["sqlite-normal"],
}


def store_url(variant: str, tmpdir: str) -> str:
    if variant == "memory":
        return "memory://"
    sync = variant.split("-", 1)[1].upper()
    path = Path(tmpdir) / "bench.db"
    url = f"sqlite:///{path}"  # an absolute path gives sqlite:////tmp/...
    return url if sync == "FULL" else f"{url}?synchronous={sync}"


# -- one configuration -----------------------------------------------------------------------


@dataclass
class Config:
    store: str
    concurrency: int
    path: str
    seconds: float
    warmup: float
    tmpdir: str | None = None


@dataclass
class Result:
    store: str
    synchronous: str | None
    path: str
    concurrency: int
    seconds: float
    sagas: int
    errors: int
    sagas_per_sec: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    transactions: int
    operations: int
    avg_batch: float
    transactions_per_saga: float
    peak_rss_mb: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _phase(orch: Orchestrator, saga: str, expected: SagaStatus, concurrency: int,
                 seconds: float) -> tuple[list[float], int, float]:
    """C workers loop start -> wait until ``seconds`` pass; sagas started before the end
    are waited for. Returns (latencies in seconds, errors, elapsed seconds)."""
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    begin = clock()
    deadline = begin + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        i = 0
        while clock() < deadline:
            t0 = clock()
            try:
                handle = await orch.start(saga, {"worker": w, "n": i})
                run = await handle.wait(timeout=60)
            except Exception as exc:  # count, keep going: a benchmark reports, never hangs
                errors += 1
                if errors <= 3:
                    print(f"bench: saga failed: {exc!r}", file=sys.stderr)
                continue
            finally:
                i += 1
            if run.status is not expected:
                errors += 1
                if errors <= 3:
                    print(f"bench: run {run.id} ended {run.status}, expected {expected}: "
                          f"{run.error}", file=sys.stderr)
                continue
            latencies.append(clock() - t0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, errors, clock() - begin


async def run_config(cfg: Config) -> Result:
    saga, expected = PATHS[cfg.path]
    with tempfile.TemporaryDirectory(prefix="sagaway-bench-", dir=cfg.tmpdir) as tmp:
        url = store_url(cfg.store, tmp)
        sagas = [build_saga(SUCCESS, fail_last=False), build_saga(COMPENSATION, fail_last=True)]
        async with Orchestrator(url, sagas=sagas) as orch:
            if cfg.warmup > 0:
                await _phase(orch, saga, expected, cfg.concurrency, cfg.warmup)
            gc.collect()
            # _committer is internal (the GroupCommitter); its counters are the only view of
            # how many durable transactions the runs cost. Read as deltas over the window.
            committer = orch._committer
            assert committer is not None
            batches0, ops0 = committer.batches, committer.operations
            latencies, errors, elapsed = await _phase(orch, saga, expected, cfg.concurrency,
                                                      cfg.seconds)
            batches = committer.batches - batches0
            ops = committer.operations - ops0
    latencies.sort()
    done = len(latencies)
    ms = 1000.0
    return Result(
        store=cfg.store.split("-", 1)[0],
        synchronous=cfg.store.split("-", 1)[1].upper() if "-" in cfg.store else None,
        path=cfg.path,
        concurrency=cfg.concurrency,
        seconds=round(elapsed, 3),
        sagas=done,
        errors=errors,
        sagas_per_sec=round(done / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(percentile(latencies, 50) * ms, 3),
        p99_ms=round(percentile(latencies, 99) * ms, 3),
        mean_ms=round(statistics.fmean(latencies) * ms, 3) if latencies else float("nan"),
        transactions=batches,
        operations=ops,
        avg_batch=round(ops / batches, 2) if batches else 0.0,
        transactions_per_saga=round(batches / done, 2) if done else 0.0,
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_in_child(cfg: Config) -> Result:
    """Run one configuration in a fresh interpreter, so its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(asdict(cfg))],
        capture_output=True, text=True, check=False,
    )
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench: configuration {cfg} failed (exit {proc.returncode})")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


# -- machine, table, JSON ---------------------------------------------------------------------


def machine_info(tmpdir: str | None) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "sagaway": sagaway.__version__,
        "tmpdir": tmpdir or tempfile.gettempdir(),
        # Other work on the machine skews every number; the 1-minute load shows it.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def render(console: Console, machine: dict[str, Any], results: list[Result]) -> None:
    console.print(
        f"[bold]sagaway {machine['sagaway']}[/] core benchmark — {machine['cpu_count']} CPU "
        f"({machine['cpu_model']}), Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"db in {machine['tmpdir']}, load {machine['loadavg_1m']}"
    )
    table = Table(title="3-step saga, trivial async steps")
    for name, justify in [
        ("store", "left"), ("sync", "left"), ("path", "left"), ("conc", "right"),
        ("sagas", "right"), ("sagas/s", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
        ("txns", "right"), ("avg batch", "right"), ("txns/saga", "right"),
        ("peak RSS MB", "right"), ("errors", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in results:
        table.add_row(
            r.store, r.synchronous or "-", r.path, str(r.concurrency), str(r.sagas),
            f"{r.sagas_per_sec:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
            str(r.transactions), f"{r.avg_batch:.1f}", f"{r.transactions_per_saga:.2f}",
            f"{r.peak_rss_mb:.0f}", str(r.errors),
        )
    console.print(table)


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default="memory,sqlite",
                        help="memory, sqlite (= sqlite-full and sqlite-normal), sqlite-full, "
                             "sqlite-normal (default: memory,sqlite)")
    parser.add_argument("--concurrency", default="1,64",
                        help="sagas in flight at once, comma-separated (default: 1,64)")
    parser.add_argument("--paths", default="success,compensation",
                        help="success, compensation (default: both)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured duration per configuration (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up per configuration, not measured (default: 1)")
    parser.add_argument("--tmpdir", default=None,
                        help="where the SQLite file goes (default: the system temp dir); "
                             "must be a real disk for FULL to mean anything, not tmpfs")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write results as JSON to PATH; '-' prints JSON to stdout "
                             "(the table then goes to stderr)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every configuration in this process (for profilers); "
                             "peak RSS is then cumulative")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        result = asyncio.run(run_config(Config(**json.loads(args._child))))
        print(json.dumps(asdict(result)))
        return

    stores: list[str] = []
    for name in csv_list(args.stores):
        if name not in STORE_VARIANTS:
            parser.error(f"unknown store {name!r}; choose from {', '.join(STORE_VARIANTS)}")
        stores += [v for v in STORE_VARIANTS[name] if v not in stores]
    paths = csv_list(args.paths)
    for p in paths:
        if p not in PATHS:
            parser.error(f"unknown path {p!r}; choose from {', '.join(PATHS)}")
    try:
        levels = [int(c) for c in csv_list(args.concurrency)]
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,64")
    if not levels or min(levels) < 1:
        parser.error("--concurrency values must be >= 1")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")

    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    if console.width < 150:  # the table has 13 columns; don't squeeze it into 80
        console.width = 150
    machine = machine_info(args.tmpdir)
    results: list[Result] = []
    for store in stores:
        for path in paths:
            for c in levels:
                cfg = Config(store, c, path, args.seconds, args.warmup, args.tmpdir)
                console.print(f"[dim]running {store} {path} c={c} …[/]")
                results.append(asyncio.run(run_config(cfg)) if args.in_process
                               else run_in_child(cfg))
    render(console, machine, results)

    if args.json:
        doc = {
            "machine": machine,
            "settings": {"seconds": args.seconds, "warmup": args.warmup,
                         "in_process": args.in_process, "steps": 3},
            "results": [asdict(r) for r in results],
        }
        text = json.dumps(doc, indent=2)
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
