"""Core throughput/latency benchmark: a 3-step saga on the memory, SQLite and PostgreSQL stores.

For every configuration (store x workers x concurrency x path) it runs W worker processes,
each with its own Orchestrator on the same store and C/W coroutines looping
``start() -> wait()``, first for a short warm-up and then, all workers released together,
for ``--seconds``. It reports completed sagas per second (all workers), p50/p99 latency
(start -> finished, over all sagas), durable transactions (group-commit batches), average
batch size and peak RSS.

On PostgreSQL it also measures, in the same run, the store's own ceiling (single-row
autocommit INSERTs per second from N clients) and prints sagas/s divided by it; optionally
the same saga as a DBOS workflow (when ``dbos`` is installed); and a memory scenario with
10,000 sagas in flight in one worker (see ``inflight.py``).

Steps are trivial ``async def`` functions (no sleeps), so this measures the framework and the
store, nothing else. Each configuration runs in fresh child processes (unless
``--in-process``), so peak RSS and allocator state belong to that configuration alone.

    .venv/bin/python bench/bench_core.py                      # memory + SQLite + memory test
    .venv/bin/python bench/bench_core.py --stores postgres    # PostgreSQL matrix (+ DBOS)
    .venv/bin/python bench/bench_core.py --stores sqlite --concurrency 64 --paths success
    .venv/bin/python bench/bench_core.py --json results.json  # also write JSON
    .venv/bin/python bench/bench_core.py --json - 2>/dev/null # JSON on stdout, table on stderr

No thresholds: this reports numbers, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dbos_compare
from benchlib import (
    PATHS,
    ChildFailed,
    bench_sagas,
    child_barrier,
    closed_loop,
    create_schema,
    csv_list,
    drop_schema,
    latency_summary,
    machine_info,
    new_schema_name,
    peak_rss_mb,
    pg_server_info,
    plain_dsn,
    safe_url,
    spawn_children,
    with_schema,
)
from rich.console import Console
from rich.table import Table

from sagaway import Orchestrator

SCRIPT = str(Path(__file__).resolve())
PG_ENV = "SAGAWAY_BENCH_POSTGRES_URL"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
MEMORY_TARGET_MB = 300

# "sqlite" in --stores expands to both synchronous modes: FULL (the default) and NORMAL.
STORE_VARIANTS = {
    "memory": ["memory"],
    "sqlite": ["sqlite-full", "sqlite-normal"],
    "sqlite-full": ["sqlite-full"],
    "sqlite-normal": ["sqlite-normal"],
    "postgres": ["postgres"],
}


# -- stores ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_store(variant: str, *, tmpdir: str | None, pg_url: str | None,
                      prefix: str = "bench") -> AsyncIterator[str]:
    """A store URL for one configuration: a new SQLite file, or a new PostgreSQL schema
    (created here, so W workers do not race to create it; dropped afterwards)."""
    if variant == "memory":
        yield "memory://"
    elif variant.startswith("sqlite"):
        sync = variant.split("-", 1)[1].upper()
        with tempfile.TemporaryDirectory(prefix="sagaway-bench-", dir=tmpdir) as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"  # absolute: sqlite:////tmp/...
            yield url if sync == "FULL" else f"{url}?synchronous={sync}"
    elif variant == "postgres":
        assert pg_url is not None
        schema = new_schema_name(prefix)
        await create_schema(pg_url, schema)
        try:
            yield with_schema(pg_url, schema)
        finally:
            await drop_schema(pg_url, schema)
    else:
        raise ValueError(f"unknown store {variant!r}")


# -- one worker process ----------------------------------------------------------------------


def observers() -> tuple[list[Any], Any]:
    """``--observe``: the listeners a production worker would run (children read the env)."""
    level = os.environ.get("SAGAWAY_BENCH_OBSERVE", "")
    if not level:
        return [], None
    from sagaway.observability import PrometheusMetrics, TracingListener, configure_logging

    configure_logging("INFO", fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    metrics = PrometheusMetrics()
    listeners: list[Any] = [metrics]
    if level == "all":
        from opentelemetry.sdk.trace import TracerProvider

        listeners.append(TracingListener(TracerProvider()))  # spans recorded, not exported
    return listeners, metrics


async def run_worker(spec: dict[str, Any], barrier: Callable[[], Awaitable[None]] | None
                     ) -> dict[str, Any]:
    """One Orchestrator with ``spec['concurrency']`` coroutines: warm up, wait at the barrier
    (all workers of a configuration start measuring together), then measure."""
    saga, expected = PATHS[spec["path"]]

    async def one(w: int, i: int) -> str | None:
        handle = await orch.start(saga, {"worker": spec["index"], "w": w, "n": i})
        run = await handle.wait(timeout=60)
        if run.status is not expected:
            return f"run {run.id} ended {run.status}, expected {expected}: {run.error}"
        return None

    listeners, metrics = observers()
    async with Orchestrator(spec["url"], sagas=bench_sagas(), listeners=listeners) as orch:
        if metrics is not None:
            metrics.watch(orch)
        if spec["warmup"] > 0:
            await closed_loop(one, spec["concurrency"], spec["warmup"])
        gc.collect()
        if barrier is not None:
            await barrier()
        # _committer is internal (the GroupCommitter); its counters are the only view of how
        # many durable transactions the runs cost. Read as deltas over the window.
        committer = getattr(orch, "_committer", None)

        def counters() -> tuple[int, int]:
            return (getattr(committer, "batches", 0), getattr(committer, "operations", 0))

        batches0, ops0 = counters()
        latencies, errors, elapsed = await closed_loop(one, spec["concurrency"],
                                                       spec["seconds"])
        batches1, ops1 = counters()
    return {
        "latencies": [round(x, 6) for x in latencies],
        "errors": errors,
        "elapsed": elapsed,
        "batches": batches1 - batches0,
        "operations": ops1 - ops0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# -- one configuration -----------------------------------------------------------------------


@dataclass
class Config:
    store: str
    concurrency: int
    path: str
    seconds: float
    warmup: float
    workers: int = 1


@dataclass
class Result:
    store: str
    synchronous: str | None
    workers: int
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
    """The largest of the worker processes' peak RSS (each is in ``worker_peak_rss_mb``)."""
    worker_peak_rss_mb: list[float] = field(default_factory=list)
    commits_per_sec: float | None = None
    """PostgreSQL only: the single-row commit ceiling with as many clients as ``concurrency``."""
    ratio: float | None = None
    """sagas_per_sec / commits_per_sec."""
    ratio_1_client: float | None = None
    """sagas_per_sec / the ceiling with one client."""


def split(total: int, parts: int) -> list[int]:
    """``total`` coroutines over ``parts`` workers, as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def aggregate(outs: list[dict[str, Any]], *, store: str, synchronous: str | None,
              workers: int, path: str, concurrency: int) -> Result:
    latencies = [x for o in outs for x in o["latencies"]]
    # Workers start together, so the window is the longest of theirs.
    elapsed = max(o["elapsed"] for o in outs)
    batches = sum(o.get("batches", 0) for o in outs)
    ops = sum(o.get("operations", 0) for o in outs)
    done = len(latencies)
    rss = [o["peak_rss_mb"] for o in outs]
    return Result(
        store=store,
        synchronous=synchronous,
        workers=workers,
        path=path,
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        sagas=done,
        errors=sum(o["errors"] for o in outs),
        sagas_per_sec=round(done / elapsed, 1) if elapsed > 0 else 0.0,
        **latency_summary(latencies),
        transactions=batches,
        operations=ops,
        avg_batch=round(ops / batches, 2) if batches else 0.0,
        transactions_per_saga=round(batches / done, 2) if done else 0.0,
        peak_rss_mb=max(rss),
        worker_peak_rss_mb=rss,
    )


async def run_config(cfg: Config, *, tmpdir: str | None, pg_url: str | None,
                     in_process: bool) -> Result:
    async with fresh_store(cfg.store, tmpdir=tmpdir, pg_url=pg_url) as url:
        specs = [
            {"url": url, "path": cfg.path, "concurrency": share, "seconds": cfg.seconds,
             "warmup": cfg.warmup, "index": i}
            for i, share in enumerate(split(cfg.concurrency, cfg.workers))
        ]
        if in_process and cfg.workers == 1:
            outs = [await run_worker(specs[0], None)]
        else:
            outs = await spawn_children(SCRIPT, "worker", specs, barrier=True,
                                        timeout=cfg.warmup + cfg.seconds + 180)
    return aggregate(
        outs,
        store=cfg.store.split("-", 1)[0],
        synchronous=cfg.store.split("-", 1)[1].upper() if "-" in cfg.store else None,
        workers=cfg.workers, path=cfg.path, concurrency=cfg.concurrency,
    )


# -- PostgreSQL: the store's own commit ceiling ----------------------------------------------


async def commit_ceiling(pg_url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` connections, each looping a single-row ``INSERT`` in autocommit (one
    transaction, one WAL flush each) for ``seconds``; same DSN and search_path setting as
    the store's pool, in a fresh schema."""
    import asyncpg

    async with fresh_store("postgres", tmpdir=None, pg_url=pg_url, prefix="ceiling") as url:
        schema = url.rsplit("schema=", 1)[1]
        dsn = plain_dsn(pg_url)
        conns = await asyncio.gather(*(
            asyncpg.connect(dsn, command_timeout=30, server_settings={"search_path": schema})
            for _ in range(clients)))
        try:
            await conns[0].execute(
                "CREATE TABLE t (id BIGINT PRIMARY KEY, client INT NOT NULL, at FLOAT8 NOT NULL,"
                " payload TEXT NOT NULL)")
            latencies: list[float] = []
            clock = time.perf_counter

            async def client(c: int, conn: Any, deadline: float, measure: bool) -> None:
                n = 0
                while clock() < deadline:
                    t0 = clock()
                    await conn.execute("INSERT INTO t VALUES ($1, $2, $3, $4)",
                                       (c << 40) + n + (0 if measure else 1 << 39), c, t0,
                                       '{"step":"reserve","result":{"reserved":1}}')
                    n += 1
                    if measure:
                        latencies.append(clock() - t0)

            warm = clock() + min(1.0, seconds / 3)
            await asyncio.gather(*(client(i, c, warm, False) for i, c in enumerate(conns)))
            begin = clock()
            await asyncio.gather(*(client(i, c, begin + seconds, True)
                                   for i, c in enumerate(conns)))
            elapsed = clock() - begin
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return {
        "clients": clients,
        "seconds": round(elapsed, 3),
        "commits": len(latencies),
        "commits_per_sec": round(len(latencies) / elapsed, 1),
        **latency_summary(latencies),
    }


# -- output ----------------------------------------------------------------------------------


def new_table(title: str, columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_results(console: Console, results: list[Result]) -> None:
    table = new_table("3-step saga, trivial async steps", [
        ("store", "left"), ("sync", "left"), ("workers", "right"), ("path", "left"),
        ("conc", "right"), ("sagas", "right"), ("sagas/s", "right"), ("p50 ms", "right"),
        ("p99 ms", "right"), ("txns", "right"), ("avg batch", "right"),
        ("txns/saga", "right"), ("commits/s", "right"), ("ratio", "right"),
        ("ratio 1c", "right"), ("peak RSS MB", "right"), ("errors", "right"),
    ])
    for r in results:
        table.add_row(
            r.store, r.synchronous or "-", str(r.workers), r.path, str(r.concurrency),
            str(r.sagas), f"{r.sagas_per_sec:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
            str(r.transactions), f"{r.avg_batch:.1f}", f"{r.transactions_per_saga:.2f}",
            fmt(r.commits_per_sec, ",.0f"), fmt(r.ratio, ".3f"), fmt(r.ratio_1_client, ".3f"),
            f"{r.peak_rss_mb:.0f}", str(r.errors),
        )
    console.print(table)


def render_ceiling(console: Console, ceiling: list[dict[str, Any]]) -> None:
    table = new_table("PostgreSQL ceiling: single-row autocommit INSERTs, one connection "
                      "per client", [("clients", "right"), ("commits", "right"),
                                     ("commits/s", "right"), ("p50 ms", "right"),
                                     ("p99 ms", "right")])
    for c in ceiling:
        table.add_row(str(c["clients"]), str(c["commits"]), f"{c['commits_per_sec']:,.0f}",
                      f"{c['p50_ms']:.2f}", f"{c['p99_ms']:.2f}")
    console.print(table)


def render_dbos(console: Console, rows: list[dict[str, Any]]) -> None:
    table = new_table("sagaway (PostgreSQL, 1 worker) vs the same saga as a DBOS workflow", [
        ("path", "left"), ("conc", "right"), ("sagaway sagas/s", "right"),
        ("DBOS wf/s", "right"), ("DBOS p50 ms", "right"), ("DBOS p99 ms", "right"),
        ("DBOS errors", "right"), ("sagaway ÷ DBOS", "right"),
    ])
    for d in rows:
        table.add_row(d["path"], str(d["concurrency"]), fmt(d["sagaway_sagas_per_sec"], ",.0f"),
                      f"{d['sagas_per_sec']:,.1f}", f"{d['p50_ms']:.2f}", f"{d['p99_ms']:.2f}",
                      str(d["errors"]), fmt(d["factor"], ".1f"))
    console.print(table)


def render_memory(console: Console, rows: list[dict[str, Any]]) -> None:
    table = new_table(f"Sagas in flight in one worker, every step awaiting a slow participant "
                      f"(target: peak RSS < {MEMORY_TARGET_MB} MB)", [
        ("store", "left"), ("sagas", "right"), ("held", "right"), ("all in flight s", "right"),
        ("RSS before MB", "right"), ("RSS in flight MB", "right"),
        ("peak RSS in flight MB", "right"), ("peak RSS MB", "right"), ("drain s", "right"),
        ("drain sagas/s", "right"), ("errors", "right"),
    ])
    for m in rows:
        table.add_row(m["store"], str(m["sagas"]), str(m["held_by_worker"]),
                      f"{m['all_in_flight_seconds']:.2f}", fmt(m["baseline_rss_mb"], ".0f"),
                      fmt(m["in_flight_rss_mb"], ".0f"), f"{m['peak_rss_in_flight_mb']:.0f}",
                      f"{m['peak_rss_mb']:.0f}", f"{m['drain_seconds']:.2f}",
                      f"{m['drain_sagas_per_sec']:,.0f}", str(m["errors"]))
    console.print(table)


# -- the run ---------------------------------------------------------------------------------


def child_main(kind: str, payload: dict[str, Any]) -> None:
    if kind == "worker":
        out = asyncio.run(run_worker(payload, child_barrier))
    elif kind == "inflight":
        from inflight import run_inflight

        out = asyncio.run(run_inflight(payload["url"], payload["sagas"]))
    elif kind == "dbos":
        out = asyncio.run(dbos_compare.run_dbos(**payload))
    else:
        raise SystemExit(f"bench: unknown child kind {kind!r}")
    print(json.dumps(out), flush=True)


async def run_all(args: argparse.Namespace, stores: list[str], paths: list[str],
                  levels: list[int], workers: list[int], pg_url: str | None,
                  console: Console) -> dict[str, Any]:
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        console.print(f"[yellow]note:[/] {text}")

    pg_info: dict[str, Any] | None = None
    if pg_url is not None:
        try:
            pg_info = await pg_server_info(pg_url)
        except ImportError:
            note("PostgreSQL skipped: asyncpg is not installed (pip install 'sagaway[postgres]')")
        except Exception as exc:
            note(f"PostgreSQL skipped: {safe_url(pg_url)} is unreachable "
                 f"({type(exc).__name__}: {exc})")
        else:
            console.print(
                f"[dim]PostgreSQL {pg_info.get('server_version')} at {safe_url(pg_url)}: "
                f"synchronous_commit={pg_info.get('synchronous_commit')}, "
                f"fsync={pg_info.get('fsync')}, wal_sync_method="
                f"{pg_info.get('wal_sync_method')}, commit_delay={pg_info.get('commit_delay')}[/]")
    pg_ok = pg_info is not None
    if not pg_ok:
        stores = [s for s in stores if s != "postgres"]

    ceiling: list[dict[str, Any]] = []
    results: list[Result] = []
    dbos: dict[str, Any] = {"ran": False}
    memory: list[dict[str, Any]] = []

    if not args.memory_test:
        matrix: list[Config] = []
        for store in stores:
            for path in paths:
                for w in (workers if store == "postgres" else [1]):
                    for c in levels:
                        if c < w:
                            note(f"{store} {path} c={c} workers={w} skipped: each worker "
                                 f"needs at least one saga in flight (c >= workers)")
                            continue
                        matrix.append(Config(store, c, path, args.seconds, args.warmup, w))

        if "postgres" in stores and pg_url is not None:
            clients = sorted({int(c) for c in csv_list(args.ceiling_clients)}
                             | {c.concurrency for c in matrix if c.store == "postgres"})
            for n in clients:
                console.print(f"[dim]ceiling: {n} client(s) …[/]")
                ceiling.append(await commit_ceiling(pg_url, n, args.ceiling_seconds))
        by_clients = {c["clients"]: c["commits_per_sec"] for c in ceiling}

        for cfg in matrix:
            console.print(f"[dim]running {cfg.store} {cfg.path} c={cfg.concurrency} "
                          f"workers={cfg.workers} …[/]")
            try:
                r = await run_config(cfg, tmpdir=args.tmpdir, pg_url=pg_url,
                                     in_process=args.in_process)
            except ChildFailed as exc:
                note(f"{cfg} failed: {exc}")
                continue
            except TimeoutError:
                note(f"{cfg} did not finish in time; its processes were killed")
                continue
            if cfg.store == "postgres":
                ceil = by_clients.get(cfg.concurrency)
                r.commits_per_sec = ceil
                r.ratio = round(r.sagas_per_sec / ceil, 3) if ceil else None
                one = by_clients.get(1)
                r.ratio_1_client = round(r.sagas_per_sec / one, 3) if one else None
            results.append(r)

        if "postgres" in stores and pg_url is not None and not args.no_dbos:
            dbos = await run_dbos_comparison(args, paths, levels, pg_url, results, console,
                                             note)

    if not args.no_memory_test:
        targets = ["sqlite-full"] + (["postgres"] if pg_ok else [])
        for store in targets:
            console.print(f"[dim]memory test: {args.memory_sagas:,} sagas in flight on "
                          f"{store} …[/]")
            try:
                async with fresh_store(store, tmpdir=args.tmpdir, pg_url=pg_url,
                                       prefix="inflight") as url:
                    [out] = await spawn_children(
                        SCRIPT, "inflight", [{"url": url, "sagas": args.memory_sagas}],
                        barrier=False, timeout=900)
            except (ChildFailed, TimeoutError) as exc:
                note(f"memory test on {store} failed: {exc!r}")
                continue
            memory.append({"store": store, **out,
                           "under_target": out["peak_rss_in_flight_mb"] < MEMORY_TARGET_MB})

    return {"pg_info": pg_info, "ceiling": ceiling, "results": results, "dbos": dbos,
            "memory": memory, "notes": notes}


async def run_dbos_comparison(args: argparse.Namespace, paths: list[str], levels: list[int],
                              pg_url: str, results: list[Result], console: Console,
                              note: Callable[[str], None]) -> dict[str, Any]:
    if not dbos_compare.available():
        note(dbos_compare.INSTALL_HINT)
        return {"ran": False, "reason": dbos_compare.INSTALL_HINT}
    rows: list[dict[str, Any]] = []
    for path in paths:
        for c in levels:
            console.print(f"[dim]running DBOS {path} c={c} …[/]")
            schema = new_schema_name("dbos")
            payload = {"url": plain_dsn(pg_url), "schema": schema, "path": path,
                       "concurrency": c, "seconds": args.seconds, "warmup": args.warmup}
            try:
                [out] = await spawn_children(SCRIPT, "dbos", [payload], barrier=False,
                                             timeout=args.warmup + args.seconds + 180)
            except (ChildFailed, TimeoutError) as exc:
                note(f"DBOS {path} c={c} failed: {exc!r}")
                continue
            finally:
                await drop_schema(pg_url, schema)
            done = len(out["latencies"])
            rate = round(done / out["elapsed"], 1) if out["elapsed"] > 0 else 0.0
            ours = next((r.sagas_per_sec for r in results if r.store == "postgres"
                         and r.workers == 1 and r.path == path and r.concurrency == c), None)
            rows.append({
                "path": path, "concurrency": c, "workers": 1, "sagas": done,
                "errors": out["errors"], "seconds": round(out["elapsed"], 3),
                "sagas_per_sec": rate, **latency_summary(out["latencies"]),
                "peak_rss_mb": out["peak_rss_mb"], "sagaway_sagas_per_sec": ours,
                "factor": round(ours / rate, 1) if ours is not None and rate > 0 else None,
            })
    return {"ran": True, "version": dbos_compare.dbos_version(), "results": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default=None,
                        help="memory, sqlite (= sqlite-full and sqlite-normal), sqlite-full, "
                             "sqlite-normal, postgres (default: memory,sqlite, plus postgres "
                             f"when --postgres-url or ${PG_ENV} is given)")
    parser.add_argument("--postgres-url", default=None,
                        help=f"PostgreSQL for the postgres store (default: ${PG_ENV}, else "
                             f"{PG_DEFAULT}); each configuration gets a fresh schema")
    parser.add_argument("--workers", default="1,4",
                        help="worker processes for PostgreSQL, comma-separated (default: 1,4); "
                             "the other stores always run one")
    parser.add_argument("--concurrency", default="1,64",
                        help="sagas in flight at once over all workers, comma-separated "
                             "(default: 1,64)")
    parser.add_argument("--paths", default="success,compensation",
                        help="success, compensation (default: both)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured duration per configuration (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up per configuration, not measured (default: 1)")
    parser.add_argument("--ceiling-clients", default="1,8",
                        help="PostgreSQL commit ceiling: client counts, besides every "
                             "concurrency level of the matrix (default: 1,8)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0,
                        help="measured duration per ceiling measurement (default: 3)")
    parser.add_argument("--no-dbos", action="store_true",
                        help="skip the DBOS comparison even when dbos is installed")
    parser.add_argument("--memory-test", action="store_true",
                        help="run only the in-flight memory scenario (no throughput matrix)")
    parser.add_argument("--no-memory-test", action="store_true",
                        help="skip the in-flight memory scenario")
    parser.add_argument("--memory-sagas", type=int, default=10_000,
                        help="sagas in flight in the memory scenario (default: 10000)")
    parser.add_argument("--tmpdir", default=None,
                        help="where the SQLite file goes (default: the system temp dir); "
                             "must be a real disk for FULL to mean anything, not tmpfs")
    parser.add_argument("--observe", choices=["metrics", "all"], default=None,
                        help="attach PrometheusMetrics and JSON logging (to /dev/null) to each "
                             "worker; 'all' adds a TracingListener (SDK provider, no export)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write results as JSON to PATH; '-' prints JSON to stdout "
                             "(the tables then go to stderr)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every 1-worker configuration in this process (for "
                             "profilers); peak RSS is then cumulative")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.observe:
        os.environ["SAGAWAY_BENCH_OBSERVE"] = args.observe  # the workers are child processes

    if args._child:
        child_main(args._child[0], json.loads(args._child[1]))
        return

    explicit_url = args.postgres_url or os.environ.get(PG_ENV)
    pg_url = explicit_url or PG_DEFAULT
    stores_arg = args.stores or ("memory,sqlite,postgres" if explicit_url else "memory,sqlite")
    stores: list[str] = []
    for name in csv_list(stores_arg):
        if name not in STORE_VARIANTS:
            parser.error(f"unknown store {name!r}; choose from {', '.join(STORE_VARIANTS)}")
        stores += [v for v in STORE_VARIANTS[name] if v not in stores]
    paths = csv_list(args.paths)
    for p in paths:
        if p not in PATHS:
            parser.error(f"unknown path {p!r}; choose from {', '.join(PATHS)}")
    try:
        levels = [int(c) for c in csv_list(args.concurrency)]
        workers = [int(w) for w in csv_list(args.workers)]
        if any(int(c) < 1 for c in csv_list(args.ceiling_clients)):
            parser.error("--ceiling-clients values must be >= 1")
    except ValueError:
        parser.error("--concurrency, --workers and --ceiling-clients take integers, e.g. 1,64")
    if not levels or min(levels) < 1 or not workers or min(workers) < 1:
        parser.error("--concurrency and --workers values must be >= 1")
    if args.seconds <= 0 or args.warmup < 0 or args.ceiling_seconds <= 0:
        parser.error("--seconds and --ceiling-seconds must be > 0 and --warmup >= 0")
    if args.memory_test and args.no_memory_test:
        parser.error("--memory-test and --no-memory-test exclude each other")
    if args.memory_sagas < 1:
        parser.error("--memory-sagas must be >= 1")
    # The memory scenario uses PostgreSQL too when it is in play (named or given a URL).
    use_pg = "postgres" in stores

    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    if console.width < 180:  # the table has 17 columns; don't squeeze it into 80
        console.width = 180
    machine = machine_info(args.tmpdir)
    console.print(
        f"[bold]sagaway {machine['sagaway']}[/] core benchmark — {machine['cpu_count']} CPU "
        f"({machine['cpu_model']}), Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"db in {machine['tmpdir']}, load {machine['loadavg_1m']}"
    )
    out = asyncio.run(run_all(args, stores, paths, levels, workers,
                              pg_url if use_pg else None, console))

    if out["ceiling"]:
        render_ceiling(console, out["ceiling"])
    if out["results"]:
        render_results(console, out["results"])
        if any(r.store == "postgres" for r in out["results"]):
            console.print(
                "[dim]commits/s: the ceiling with as many clients as the run has sagas in "
                "flight (conc); ratio = sagas/s ÷ that; ratio 1c = sagas/s ÷ the 1-client "
                "ceiling. Without group commit a success saga costs 4 commits (ratio ≤ 0.25)."
                "[/]")
    if out["dbos"].get("results"):
        render_dbos(console, out["dbos"]["results"])
    if out["memory"]:
        render_memory(console, out["memory"])
    console.print(f"[dim]load after the run: {round(os.getloadavg()[0], 2)}[/]")

    if args.json:
        doc = {
            "machine": machine,
            "settings": {"seconds": args.seconds, "warmup": args.warmup,
                         "in_process": args.in_process, "steps": 3,
                         "ceiling_seconds": args.ceiling_seconds,
                         "memory_sagas": args.memory_sagas},
            "postgres": None if out["pg_info"] is None else {
                "url": safe_url(pg_url), **out["pg_info"]},
            "ceiling": out["ceiling"],
            "results": [asdict(r) for r in out["results"]],
            "dbos": out["dbos"],
            "memory_test": out["memory"],
            "notes": out["notes"],
        }
        text = json.dumps(doc, indent=2)
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            console.print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
