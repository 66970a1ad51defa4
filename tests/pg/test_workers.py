"""Many worker processes on one PostgreSQL saga log: races, fencing, a database restart.

Real processes (``sagaway worker``), a real server; the participant's ledger is in its own
schema and applies each effect once per idempotency key.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from harness import Worker, audit, create_ledger, drop_ledger, ledger_url_for, start_worker
from worker_app import split_schema, transfer

from sagaway import Orchestrator, SagaStatus

pytestmark = pytest.mark.e2e

LOCAL_CLUSTER = os.path.isdir("/etc/postgresql")
"""The restart test restarts the machine's cluster with pg_ctlcluster."""


@pytest.fixture
async def ledger_url(postgres_url: str):
    url = ledger_url_for(postgres_url)
    await create_ledger(url)
    yield url
    await drop_ledger(url)


@pytest.fixture
async def client(postgres_url: str):
    async with Orchestrator(postgres_url, sagas=[transfer], worker=False) as orch:
        yield orch


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


async def submit(client: Orchestrator, n: int, *, fail_every: int = 4
                 ) -> dict[str, SagaStatus]:
    expected: dict[str, SagaStatus] = {}
    for i in range(n):
        fail = i % fail_every == fail_every - 1
        handle = await client.start("transfer", {"i": i, "fail_at": "confirm" if fail else None},
                                    key=f"transfer-{i}")
        expected[handle.id] = SagaStatus.COMPENSATED if fail else SagaStatus.COMPLETED
    return expected


async def test_two_workers_race_on_the_same_runs(postgres_url, ledger_url, client, workers,
                                                 tmp_path: Path) -> None:
    # Small capacity per worker so neither can claim everything in one poll: they race.
    for name in ("a", "b"):
        workers.append(start_worker(postgres_url, ledger_url, tmp_path, name,
                                    MAX_RUNS="4", POLL_INTERVAL="0.05"))
    expected = await submit(client, 100)
    runs = [await client.wait(rid, timeout=90) for rid in expected]
    result = await audit(ledger_url, runs, expected)
    print(f"\ntwo workers, one log: {result}")
    assert result.ok, str(result)
    assert len(result.workers) == 2, "both workers should have driven some runs"


async def owner_of(postgres_url: str, run_id: str) -> str | None:
    dsn, schema = split_schema(postgres_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema or "public"})
    try:
        return await conn.fetchval("SELECT owner FROM sagaway_runs WHERE id = $1", run_id)
    finally:
        await conn.close()


async def invocations_of(ledger_url: str, run_id: str, step: str) -> list[asyncpg.Record]:
    dsn, schema = split_schema(ledger_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema or "public"})
    try:
        return await conn.fetch(
            "SELECT worker, attempt FROM invocations WHERE run_id = $1 AND step = $2 ORDER BY id",
            run_id, step)
    finally:
        await conn.close()


async def test_a_worker_paused_past_its_lease_cannot_write(postgres_url, ledger_url, client,
                                                           workers, tmp_path: Path) -> None:
    env = {"LEASE_SECONDS": "1", "POLL_INTERVAL": "0.1", "SLOW_STEP": "credit",
           "STEP_DELAY": "2.5"}
    first = start_worker(postgres_url, ledger_url, tmp_path, "first", **env)
    workers.append(first)
    handle = await client.start("transfer", {"i": 1}, key="paused")
    # Wait until the first worker is inside the slow step (its sleep precedes the effect).
    deadline = time.monotonic() + 20
    while (await owner_of(postgres_url, handle.id) or "").split(":")[1:2] != [str(first.pid)]:
        assert time.monotonic() < deadline, first.log()
        await asyncio.sleep(0.05)
    snap = await client.get(handle.id)
    while not any(e.kind == "step.started" and e.step == "credit" for e in snap.history):
        assert time.monotonic() < deadline, first.log()
        await asyncio.sleep(0.05)
        snap = await client.get(handle.id)
    os.kill(first.pid, signal.SIGSTOP)
    second = start_worker(postgres_url, ledger_url, tmp_path, "second", **env)
    workers.append(second)
    done = await client.wait(handle.id, timeout=30)
    assert done.status is SagaStatus.COMPLETED
    version_after_takeover = (await client.get(handle.id)).updated_at
    os.kill(first.pid, signal.SIGCONT)
    # The first worker's in-flight step now finishes and tries to record it: fenced.
    deadline = time.monotonic() + 15
    while "taken over" not in first.log() and "lease lost" not in first.log():
        assert time.monotonic() < deadline, f"first worker never noticed:\n{first.log()}"
        await asyncio.sleep(0.1)
    final = await client.get(handle.id)
    assert final.updated_at == version_after_takeover
    assert final.status is SagaStatus.COMPLETED
    assert [e.kind for e in final.history].count("run.recovered") == 1
    result = await audit(ledger_url, [final], {handle.id: SagaStatus.COMPLETED})
    assert result.ok, str(result)
    credit_calls = await invocations_of(ledger_url, handle.id, "credit")
    assert {r["worker"] for r in credit_calls} <= {first.pid, second.pid}
    assert second.pid in {r["worker"] for r in credit_calls}


def pg_restart() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True, capture_output=True, timeout=120,
    )


async def test_postgres_restart_with_500_sagas_in_flight(postgres_url, ledger_url, workers,
                                                         tmp_path: Path) -> None:
    if not LOCAL_CLUSTER:
        message = "needs a local PostgreSQL cluster (pg_ctlcluster) that this test may restart"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {"LEASE_SECONDS": "3", "POLL_INTERVAL": "0.2", "SLOW_STEP": "credit",
           "STEP_DELAY": "1.0"}
    for name in ("a", "b"):
        workers.append(start_worker(postgres_url, ledger_url, tmp_path, name, **env))
    async with Orchestrator(postgres_url, sagas=[transfer], worker=False) as client:
        expected = await submit(client, 500)
    await asyncio.sleep(1.0)  # let the workers claim and get some runs mid-step
    await asyncio.to_thread(pg_restart)
    async with Orchestrator(postgres_url, sagas=[transfer], worker=False) as client:
        runs = [await client.wait(rid, timeout=180) for rid in expected]
    result = await audit(ledger_url, runs, expected)
    print(f"\nPostgreSQL restarted mid-flight: {result}")
    assert result.ok, str(result)
    logs = "".join(w.log() for w in workers)
    assert "PostgreSQL error" in logs, "the restart should have been noticed by the workers"
    recovered = sum(1 for r in runs if any(e.kind == "run.recovered" for e in r.history))
    print(f"runs resumed after the restart: {recovered}")
    assert all(w.proc.poll() is None for w in workers), "workers must survive the restart"


async def test_sigterm_releases_leases_so_another_worker_resumes_at_once(
        postgres_url, ledger_url, client, workers, tmp_path: Path) -> None:
    # A long lease: without the release on SIGTERM the runs would wait 60 s for it.
    env = {"LEASE_SECONDS": "60", "POLL_INTERVAL": "0.1", "SLOW_STEP": "credit",
           "STEP_DELAY": "1.5"}
    first = start_worker(postgres_url, ledger_url, tmp_path, "first", **env)
    workers.append(first)
    expected = await submit(client, 10, fail_every=1000)
    deadline = time.monotonic() + 20
    mine = [str(first.pid)]
    while [(await owner_of(postgres_url, rid) or "").split(":")[1:2]
           for rid in expected] != [mine] * len(expected):
        assert time.monotonic() < deadline, first.log()
        await asyncio.sleep(0.05)
    second = start_worker(postgres_url, ledger_url, tmp_path, "second", **env)
    workers.append(second)
    stopped_at = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(15) == 0, first.log()
    runs = [await client.wait(rid, timeout=30) for rid in expected]
    took = time.monotonic() - stopped_at
    result = await audit(ledger_url, runs, expected)
    assert result.ok, str(result)
    assert took < 20, f"runs resumed only after {took:.1f}s: leases were not released"
    assert "releasing leases" in first.log()
