"""HTTP step throughput: a 3-HTTP-step saga against a local uvicorn service.

The service (FastAPI, three POST endpoints that answer small JSON at once) runs as a child
process on a free 127.0.0.1 port, so it has its own interpreter; the orchestrator runs here
with C coroutines looping ``start() -> wait()`` for ``--seconds`` after a warm-up. It
prints sagas/s and p50/p99 latency per store. Every request goes through the one pooled
httpx client the orchestrator opens, with the idempotency, correlation and attempt headers.

    .venv/bin/python bench/bench_http.py                         # memory + SQLite, c=64
    .venv/bin/python bench/bench_http.py --stores sqlite --concurrency 16,64 --seconds 10
    .venv/bin/python bench/bench_http.py --service-workers 2     # uvicorn --workers 2

No thresholds: this reports numbers, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import closed_loop, csv_list, latency_summary, machine_info

from sagaway import Orchestrator, Saga, SagaStatus

SERVICE = '''
from fastapi import FastAPI, Request
app = FastAPI()

@app.post("/{kind}")
async def act(kind: str, request: Request) -> dict:
    return {"id": request.headers["idempotency-key"], "kind": kind}

@app.delete("/{kind}/{ident}")
async def undo(kind: str, ident: str) -> dict:
    return {"undone": ident}
'''


def build_saga() -> Saga:
    saga = Saga("bench_http")
    for name in ("reserve", "charge", "ship"):
        saga.http_step(name, "POST", f"{{shop}}/{name}",
                       compensation=("DELETE", f"{{shop}}/{name}/{{result[id]}}"))
    return saga


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_service(workdir: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    Path(workdir, "bench_service.py").write_text(SERVICE)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench_service:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log",
         "--workers", str(workers)],
        cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the bench service did not start") from None
            time.sleep(0.05)


async def measure(store: str, url: str, concurrency: int, seconds: float,
                  warmup: float, connections: int) -> dict[str, float]:
    saga = build_saga()
    async with Orchestrator(store, sagas=[saga], services={"shop": url},
                            http_connections=connections) as orch:

        async def one(w: int, i: int) -> str | None:
            run = await (await orch.start("bench_http", {"w": w, "i": i})).wait(timeout=60)
            if run.status is not SagaStatus.COMPLETED:
                return f"run {run.id} ended {run.status.value}: {run.error}"
            return None

        await closed_loop(one, concurrency, warmup)
        latencies, errors, elapsed = await closed_loop(one, concurrency, seconds)
    return {"sagas_per_s": round(len(latencies) / elapsed, 1), "errors": errors,
            "requests_per_s": round(3 * len(latencies) / elapsed, 1),
            **latency_summary(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="memory,sqlite")
    parser.add_argument("--concurrency", default="64")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--service-workers", type=int, default=1)
    parser.add_argument("--http-connections", default="16",
                        help="the orchestrator's HTTP pool size(s), comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaway-bench-http-") as tmp:
        info = machine_info(tmp)
        print(f"machine: {info.get('cpu_count')} CPUs, python {info.get('python')}, "
              f"load {info.get('loadavg_1m')}; service: uvicorn, "
              f"{args.service_workers} worker(s)")
        proc, url = start_service(tmp, args.service_workers)
        try:
            print(f"{'store':<8} {'c':>4} {'pool':>5} {'sagas/s':>9} {'requests/s':>11} "
                  f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
            for store in csv_list(args.stores):
                for c, pool in ((int(x), int(p)) for x in csv_list(args.concurrency)
                                for p in csv_list(args.http_connections)):
                    store_url = ("memory://" if store == "memory"
                                 else f"sqlite:///{tmp}/bench-{c}-{pool}-{os.getpid()}.db")
                    r = asyncio.run(measure(store_url, url, c, args.seconds, args.warmup,
                                            pool))
                    print(f"{store:<8} {c:>4} {pool:>5} {r['sagas_per_s']:>9} "
                          f"{r['requests_per_s']:>11} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                          f"{r['errors']:>6}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
