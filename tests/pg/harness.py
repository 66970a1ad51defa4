"""Helpers for the multi-process PostgreSQL tests: worker processes, a ledger, checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from sagaway import SagaRun, SagaStatus

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from worker_app import LEDGER_SCHEMA_SQL, split_schema  # noqa: E402

STEPS = ("debit", "credit", "confirm")
WORKER_CMD = [sys.executable, "-m", "sagaway.cli", "worker", "--app",
              "worker_app:orchestrator"]


def ledger_url_for(store_url: str) -> str:
    """The ledger lives in a schema next to the saga log's (a different 'service')."""
    return store_url.replace("schema=", "schema=ledger_")


async def create_ledger(url: str) -> None:
    dsn, schema = split_schema(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        await conn.execute(LEDGER_SCHEMA_SQL)
    finally:
        await conn.close()


async def drop_ledger(url: str) -> None:
    dsn, schema = split_schema(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_worker(store_url: str, ledger_url: str, tmp: Path, name: str, **env: str) -> Worker:
    log_path = tmp / f"{name}.log"
    environ = {
        **os.environ,
        "SAGAWAY_STORE_URL": store_url,
        "LEDGER_URL": ledger_url,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **env,
    }
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            WORKER_CMD,
            cwd=HERE, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )
    return Worker(proc, log_path)


async def wait_finished(orch: object, run_ids: list[str], timeout: float) -> list[SagaRun]:
    from sagaway import Orchestrator

    assert isinstance(orch, Orchestrator)
    deadline = time.monotonic() + timeout
    out = []
    for rid in run_ids:
        out.append(await orch.wait(rid, timeout=max(deadline - time.monotonic(), 0.1)))
    return out


@dataclass
class Audit:
    runs: int = 0
    lost: int = 0
    stuck: int = 0
    recorded_twice: int = 0
    second_keys: int = 0
    double_applied: int = 0
    wrong_effects: list[str] = field(default_factory=list)
    workers: set[int] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.recorded_twice or self.second_keys
                    or self.double_applied or self.wrong_effects)

    def __str__(self) -> str:
        return (f"{self.runs} runs: lost={self.lost} stuck={self.stuck} "
                f"recorded_twice={self.recorded_twice} second_keys={self.second_keys} "
                f"double_applied={self.double_applied} wrong_effects={self.wrong_effects[:5]} "
                f"workers={len(self.workers)}")


async def audit(ledger_url: str, runs: list[SagaRun], expected: dict[str, SagaStatus]) -> Audit:
    """Check every run against the ledger: one key per step, effects once, right order."""
    dsn, schema = split_schema(ledger_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema or "public"})
    try:
        invocations = await conn.fetch(
            "SELECT idem_key, run_id, step, kind, worker FROM invocations")
        effects = await conn.fetch("SELECT idem_key, run_id, step, kind FROM effects ORDER BY seq")
    finally:
        await conn.close()
    result = Audit(runs=len(runs))
    result.lost = len(set(expected) - {r.id for r in runs})
    keys: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for row in invocations:
        keys[(row["run_id"], row["step"], row["kind"])].add(row["idem_key"])
        result.workers.add(row["worker"])
    for (run_id, step, kind), seen in keys.items():
        if seen != {f"{run_id}:{step}:{kind}"}:
            result.second_keys += 1
    per_run: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in effects:
        per_run[row["run_id"]].append((row["step"], row["kind"]))
    for run in runs:
        if not run.status.finished:
            result.stuck += 1
            continue
        succeeded = Counter(e.step for e in run.history if e.kind == "step.succeeded")
        if any(n > 1 for n in succeeded.values()):
            result.recorded_twice += 1
        applied = per_run.get(run.id, [])
        if any(n > 1 for n in Counter(applied).values()):
            result.double_applied += 1
        if run.status is not expected[run.id]:
            result.wrong_effects.append(f"{run.id}: {run.status} != {expected[run.id]}")
            continue
        actions = [s for s, k in applied if k == "action"]
        comps = [s for s, k in applied if k == "compensation"]
        if run.status is SagaStatus.COMPLETED:
            good = actions == list(STEPS) and comps == []
        else:
            good = actions == ["debit", "credit"] and comps == ["credit", "debit"]
        if not good:
            result.wrong_effects.append(f"{run.id}: actions={actions} compensations={comps}")
    return result


def run_async(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]
