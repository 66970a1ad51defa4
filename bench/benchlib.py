"""Shared pieces of the benchmarks: the saga under test, the load loop, statistics, process
memory, machine facts, PostgreSQL schema helpers and child processes.

Imported by ``bench_core.py``, ``inflight.py`` and ``dbos_compare.py`` (run as scripts, so
``bench/`` is on ``sys.path``). Nothing here imports a database driver at module level.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sagaway
from sagaway import NonRetryableError, Saga, SagaStatus

# -- the saga under test ---------------------------------------------------------------------

SUCCESS = "bench_success"
COMPENSATION = "bench_compensation"

PATHS = {
    "success": (SUCCESS, SagaStatus.COMPLETED),
    "compensation": (COMPENSATION, SagaStatus.COMPENSATED),
}

Participant = Callable[[], Awaitable[None]]


def build_saga(name: str, *, fail_last: bool, participant: Participant | None = None) -> Saga:
    """Three compensatable steps (reserve, charge, ship); with ``fail_last`` the third fails
    non-retryably. With ``participant``, every action first awaits it (a slow service)."""
    saga = Saga(name)

    async def call() -> None:
        if participant is not None:
            await participant()

    @saga.step
    async def reserve(ctx: Any, data: Any) -> dict[str, int]:
        await call()
        return {"reserved": 1}

    @reserve.compensation
    async def unreserve(ctx: Any, data: Any, result: Any) -> None:
        return None

    @saga.step
    async def charge(ctx: Any, data: Any) -> dict[str, int]:
        await call()
        return {"charged": 1}

    @charge.compensation
    async def refund(ctx: Any, data: Any, result: Any) -> None:
        return None

    @saga.step
    async def ship(ctx: Any, data: Any) -> dict[str, int]:
        await call()
        if fail_last:
            raise NonRetryableError("out of stock")
        return {"shipped": 1}

    @ship.compensation
    async def unship(ctx: Any, data: Any, result: Any) -> None:
        return None

    return saga


def bench_sagas() -> list[Saga]:
    return [build_saga(SUCCESS, fail_last=False), build_saga(COMPENSATION, fail_last=True)]


# -- the load loop ---------------------------------------------------------------------------

# One unit of work: run one saga (or workflow) to its end, return None if it ended as
# expected, else a description of what went wrong.
OneSaga = Callable[[int, int], Awaitable[str | None]]


async def closed_loop(one: OneSaga, concurrency: int, seconds: float
                      ) -> tuple[list[float], int, float]:
    """C workers each loop ``one()`` until ``seconds`` pass; calls started before the end are
    waited for. Returns (latencies in seconds, errors, elapsed seconds)."""
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    begin = clock()
    deadline = begin + seconds

    def failed(what: str) -> None:
        nonlocal errors
        errors += 1
        if errors <= 3:  # a benchmark reports, it does not flood
            print(f"bench: {what}", file=sys.stderr)

    async def worker(w: int) -> None:
        i = 0
        while clock() < deadline:
            t0 = clock()
            try:
                problem = await one(w, i)
            except Exception as exc:
                failed(f"saga failed: {exc!r}")
                continue
            finally:
                i += 1
            if problem is not None:
                failed(problem)
                continue
            latencies.append(clock() - t0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, errors, clock() - begin


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and mean in milliseconds (latencies in seconds, any order)."""
    values = sorted(latencies)
    ms = 1000.0
    return {
        "p50_ms": round(percentile(values, 50) * ms, 3),
        "p99_ms": round(percentile(values, 99) * ms, 3),
        "mean_ms": round(statistics.fmean(values) * ms, 3) if values else float("nan"),
    }


# -- memory ----------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float | None:
    """Resident set size now (Linux only; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


# -- the machine -----------------------------------------------------------------------------


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


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# -- PostgreSQL ------------------------------------------------------------------------------


def safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``?schema=`` set (PostgresStore keeps its tables there)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


def plain_dsn(url: str) -> str:
    """``url`` without sagaway's own query parameters, for asyncpg.connect."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in ("schema", "migrate")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def new_schema_name(prefix: str = "bench") -> str:
    return f"sagaway_{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


async def pg_server_info(url: str) -> dict[str, Any]:
    """Connect once (5 s timeout); return the settings that bound the commit rate. Raises on
    an unreachable server or a missing asyncpg."""
    import asyncpg

    conn = await asyncpg.connect(plain_dsn(url), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["server_version", "synchronous_commit", "fsync", "wal_sync_method",
             "commit_delay", "max_connections"],
        )
    finally:
        await conn.close()
    return {r["name"]: r["setting"] for r in rows}


async def create_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(plain_dsn(url), timeout=10)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    finally:
        await conn.close()


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(plain_dsn(url), timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


# -- child processes -------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


async def spawn_children(script: str, kind: str, payloads: list[dict[str, Any]], *,
                         barrier: bool, timeout: float) -> list[dict[str, Any]]:
    """Run ``python script --_child kind JSON`` once per payload, at the same time.

    With ``barrier``, each child prints ``ready`` when set up, and none goes on until all
    are ready and the parent writes ``go`` to every child. Each child's last stdout line is
    its JSON result; stderr passes through. A child that hangs past ``timeout`` is killed.
    """
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, script, "--_child", kind, json.dumps(p),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        for p in payloads
    ]
    try:
        if barrier:
            async def ready(proc: asyncio.subprocess.Process) -> None:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if line.strip() != b"ready":
                    raise ChildFailed(f"{kind} child exited before it was ready "
                                      f"(exit {await proc.wait()})")

            await asyncio.wait_for(asyncio.gather(*(ready(p) for p in procs)), timeout)
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
        outputs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), timeout)
    except BaseException:
        for p in procs:
            if p.returncode is None:
                p.kill()
        await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
        raise
    results = []
    for proc, (out, _) in zip(procs, outputs, strict=True):
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise ChildFailed(f"{kind} child failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1]))
    return results


async def child_barrier() -> None:
    """In a child started with ``barrier=True``: say ready, then wait for ``go``."""
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("bench: the parent went away before the start signal")
