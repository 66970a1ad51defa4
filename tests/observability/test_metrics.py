"""Prometheus metrics: counters and histograms from real runs, store gauges read at scrape
time (bounded by a timeout), dead letters, the worker's and the admin's /metrics."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from obs_helpers import CANARY, free_port, order, shop_saga, uvicorn_server, value

from sagaway import Orchestrator, Saga, SagawayError, SQLiteStore, StepContext
from sagaway.admin import Role, Token
from sagaway.admin.api import create_app
from sagaway.engine.worker import serve
from sagaway.messaging.envelope import Envelope
from sagaway.messaging.memory import MemoryTransport
from sagaway.observability import PrometheusMetrics
from sagaway.store.base import OutboxMessage
from sagaway.testing.conformance import new_run

ALLOWED_LABELS = {"saga", "step", "phase", "outcome", "status", "source", "le", "reason"}


async def test_counters_and_histograms_follow_the_runs(tmp_path: Path) -> None:
    metrics = PrometheusMetrics()
    idle = Saga("idle")

    @idle.step(read_only=True)
    async def nothing(ctx: StepContext, data: Any) -> None:
        return None

    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga(), idle],
                            listeners=[metrics], poll_interval=0.05) as orch:
        metrics.watch(orch)
        runs = [await orch.start("shop", order()), await orch.start("shop", order(flaky=True)),
                await orch.start("shop", order(decline=True)),
                await orch.start("shop", order(decline=True, release_broken=True))]
        ends = [await r.wait(timeout=10) for r in runs]
        assert [e.status.value for e in ends] == ["COMPLETED", "COMPLETED", "COMPENSATED",
                                                  "FAILED"]
        text = (await metrics.render()).decode()

    shop = {"saga": "shop"}
    assert value(text, "sagaway_runs_started_total", **shop) == 4
    assert value(text, "sagaway_runs_completed_total", **shop) == 2
    assert value(text, "sagaway_runs_compensated_total", **shop) == 1
    assert value(text, "sagaway_runs_failed_total", **shop) == 1
    # Counters of a registered saga that never ran exist at zero (rate() works from the start).
    assert value(text, "sagaway_runs_started_total", saga="idle") == 0

    def step(name: str, step: str, phase: str = "action", **more: str) -> float:
        return value(text, name, saga="shop", step=step, phase=phase, **more)

    assert step("sagaway_step_attempts_total", "ship") == 3  # the flaky run retried once
    assert step("sagaway_step_failures_total", "ship") == 1
    assert step("sagaway_step_attempts_total", "charge") == 4
    assert step("sagaway_step_failures_total", "charge") == 2
    assert step("sagaway_step_attempts_total", "reserve", "compensation") == 2
    assert step("sagaway_step_failures_total", "reserve", "compensation") == 1
    assert step("sagaway_step_duration_seconds_count", "ship", outcome="succeeded") == 2
    assert step("sagaway_step_duration_seconds_count", "ship", outcome="failed") == 1
    assert step("sagaway_step_duration_seconds_sum", "ship", outcome="succeeded") > 0
    for status, n in (("COMPLETED", 2), ("COMPENSATED", 1), ("FAILED", 1)):
        assert value(text, "sagaway_run_duration_seconds_count", saga="shop",
                     status=status) == n
    # Store gauges: the FAILED run waits for an operator; nothing is in flight or stuck.
    assert value(text, "sagaway_runs_awaiting_operator", **shop) == 1
    assert value(text, "sagaway_runs_in_flight", **shop) == 0
    assert value(text, "sagaway_runs_stuck", **shop) == 0
    assert value(text, "sagaway_outbox_backlog") == 0
    assert value(text, "sagaway_store_up") == 1

    # No label holds a run id, a key or payload data: only the known label names, and no
    # value that came from a run.
    forbidden = {CANARY, "sku-1", "A. Buyer", "r-1", "ch-1", "shipped"}
    for e in ends:
        forbidden |= {e.id, *(f"{e.id}:{s}:action" for s in ("reserve", "charge", "ship"))}
    label_names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert not any(f in line for f in forbidden), line
        label_names |= {part.split("=")[0] for part in
                        line.partition("{")[2].partition("}")[0].split(",") if "=" in part}
    assert label_names <= ALLOWED_LABELS, label_names - ALLOWED_LABELS


async def test_store_gauges_count_in_flight_stuck_runs_and_the_outbox(tmp_path: Path) -> None:
    gate = asyncio.Event()
    slow = Saga("slow")

    @slow.step(read_only=True)
    async def hold(ctx: StepContext, data: Any) -> None:
        await gate.wait()

    metrics = PrometheusMetrics(stuck_after=0.4, cache_seconds=0)
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[slow],
                            listeners=[metrics]) as orch:
        metrics.watch(orch)
        runs = [await orch.start("slow", i) for i in range(3)]
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_runs_in_flight", saga="slow", status="RUNNING") == 3
        assert value(text, "sagaway_runs_stuck", saga="slow") == 0
        await asyncio.sleep(0.6)
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_runs_stuck", saga="slow") == 3
        assert value(text, "sagaway_runs_stuck_threshold_seconds") == 0.4

        # An outbox message written with a transition and not yet sent.
        await orch.store.commit([replace(new_run("with-outbox", saga="other"), outbox=[
            OutboxMessage(id="m-1", destination="payments", body="{}")])], [],
            owner="someone", lease_seconds=30)
        await asyncio.sleep(1.1)
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_outbox_backlog") == 1
        assert 1.0 <= value(text, "sagaway_outbox_oldest_unsent_age_seconds") < 30
        # A saga the store knows but this worker does not register is reported too.
        assert value(text, "sagaway_runs_in_flight", saga="other", status="RUNNING") == 1

        gate.set()
        for r in runs:
            await r.wait(timeout=10)
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_runs_in_flight", saga="slow") == 0
        assert value(text, "sagaway_runs_stuck", saga="slow") == 0


class SlowStore(SQLiteStore):
    """A SQLite store whose gauge query hangs while ``slow`` is set (a database in trouble)."""

    slow = False

    async def open_counts(self, *, updated_before: float) -> Any:
        if self.slow:
            await asyncio.sleep(30)
        return await super().open_counts(updated_before=updated_before)


async def test_a_slow_store_cannot_hang_a_scrape(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "s.db")
    gate = asyncio.Event()
    saga = Saga("slow")

    @saga.step(read_only=True)
    async def hold(ctx: StepContext, data: Any) -> None:
        await gate.wait()

    metrics = PrometheusMetrics(cache_seconds=0, timeout=0.3)
    async with Orchestrator(store, sagas=[saga], listeners=[metrics]) as orch:
        metrics.watch(orch)
        run = await orch.start("slow", None)
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_store_up") == 1
        store.slow = True
        began = time.monotonic()
        text = (await metrics.render()).decode()
        assert time.monotonic() - began < 2.0
        # The last values are served, marked stale.
        assert value(text, "sagaway_store_up") == 0
        assert value(text, "sagaway_runs_in_flight", saga="slow", status="RUNNING") == 1
        assert value(text, "sagaway_store_stats_age_seconds") >= 0.3
        store.slow = False
        gate.set()
        await run.wait(timeout=10)
        text = (await metrics.render()).decode()
        assert value(text, "sagaway_store_up") == 1


async def test_dead_letters_are_counted_by_source() -> None:
    metrics = PrometheusMetrics()
    async with MemoryTransport() as transport:
        metrics.watch_transport(transport)

        async def broken(delivery: Any) -> None:
            raise RuntimeError("cannot handle this")

        await transport.subscribe("obs-orders", broken, max_deliveries=2)
        for _ in range(3):
            await transport.publish("obs-orders", Envelope(type="t", payload={}))
        async with asyncio.timeout(10):
            while True:
                text = (await metrics.render()).decode()
                if "obs-orders" in text and value(
                        text, "sagaway_messages_dead_lettered_total", source="obs-orders") == 3:
                    break
                await asyncio.sleep(0.02)


async def test_a_metrics_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        orch = Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga()])
        with pytest.raises(SagawayError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await serve(orch, metrics_port=port, metrics_host="127.0.0.1")


WORKER_APP = textwrap.dedent('''
    import logging
    from sagaway import Orchestrator, Saga

    order = Saga("shop")
    log = logging.getLogger("shop")

    @order.step(read_only=True)
    def charge(ctx, data):
        log.info("charging order %s", data["order"])
        return {{"charged": True}}

    @order.step(read_only=True)
    async def ship(ctx, data):
        return "shipped"

    orchestrator = Orchestrator("sqlite:///{db}", sagas=[order], poll_interval=0.05)
''')


@pytest.mark.e2e
async def test_worker_serves_metrics_and_writes_json_logs(tmp_path: Path) -> None:
    db = tmp_path / "sagas.db"
    (tmp_path / "obs_worker_app.py").write_text(WORKER_APP.format(db=db))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaway.cli", "worker", "--app", "obs_worker_app:orchestrator",
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--log-format", "json",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        async with httpx.AsyncClient(timeout=5) as http:
            async with asyncio.timeout(20):
                while True:
                    try:
                        first = await http.get(url)
                        break
                    except httpx.TransportError:
                        assert proc.returncode is None, "the worker exited"
                        await asyncio.sleep(0.1)
            assert first.status_code == 200
            assert first.headers["content-type"].startswith("text/plain")
            assert value(first.text, "sagaway_runs_started_total", saga="shop") == 0
            spec = importlib.util.spec_from_file_location("obs_worker_app_client",
                                                          tmp_path / "obs_worker_app.py")
            assert spec is not None and spec.loader is not None
            app_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(app_module)
            async with Orchestrator(f"sqlite:///{db}", sagas=[app_module.order],
                                    worker=False) as client:
                handles = [await client.start("shop", {"order": i}) for i in range(3)]
                for h in handles:
                    assert (await client.wait(h.id, timeout=20)).status.value == "COMPLETED"
            text = (await http.get(url)).text
            assert value(text, "sagaway_runs_started_total", saga="shop") == 3
            assert value(text, "sagaway_runs_completed_total", saga="shop") == 3
            assert value(text, "sagaway_step_attempts_total", saga="shop", step="ship",
                         phase="action") == 3
            assert value(text, "sagaway_store_up") == 1
            assert (await http.get(f"http://127.0.0.1:{port}/other")).status_code == 404
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records, "the worker logged nothing"
    assert all({"time", "level", "logger", "message", "run_id", "saga", "step",
                "attempt"} <= r.keys() for r in records)
    charging = [r for r in records if r["message"].startswith("charging order")]
    assert len(charging) == 3
    run_ids = {h.id for h in handles}
    assert {r["run_id"] for r in charging} == run_ids
    assert all((r["saga"], r["step"], r["attempt"]) == ("shop", "charge", 1) for r in charging)
    assert any("metrics at http://127.0.0.1:" in r["message"] for r in records)


async def test_the_admin_serves_metrics_with_or_without_a_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with Orchestrator(url, sagas=[shop_saga()]) as orch:
        run = await orch.start("shop", order(decline=True, release_broken=True))
        await run.wait(timeout=10)
    viewer = Token("vic", Role.VIEWER, "view-secret-0123456789abcdef")
    open_app = create_app(url, tokens=[viewer], static_dir=None)
    locked_app = create_app(url, tokens=[viewer], static_dir=None, metrics_auth=True)
    async with uvicorn_server(open_app) as base, httpx.AsyncClient(timeout=5) as http:
        got = await http.get(f"{base}/metrics")
        assert got.status_code == 200, got.text
        assert value(got.text, "sagaway_runs_awaiting_operator", saga="shop") == 1
        assert value(got.text, "sagaway_store_up") == 1
        assert (await http.get(f"{base}/api/runs")).status_code == 401  # the API still is
    async with uvicorn_server(locked_app) as base, httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{base}/metrics")).status_code == 401
        got = await http.get(f"{base}/metrics",
                             headers={"Authorization": f"Bearer {viewer.secret}"})
        assert got.status_code == 200
        assert value(got.text, "sagaway_runs_awaiting_operator", saga="shop") == 1


async def test_refused_starts_and_rejected_envelopes_are_exported(tmp_path: Path) -> None:
    from sagaway import RateLimited
    from sagaway.protection import EnvelopeSigner

    metrics = PrometheusMetrics()
    signer = EnvelopeSigner({"s1": os.urandom(32)})
    async with MemoryTransport() as transport:
        transport.signer = signer
        async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga()],
                                listeners=[metrics], transport=transport,
                                start_rate={"shop": 1}) as orch:
            metrics.watch(orch)
            await orch.start("shop", order())
            with pytest.raises(RateLimited):
                await orch.start("shop", order())

            async def handle(delivery: Any) -> None:
                pass

            await transport.subscribe("obs-signed", handle)
            # Unsigned bytes straight onto the queue: the consumer refuses them.
            await transport.publish_raw("obs-signed",
                                        Envelope(type="t", payload={}).to_bytes())
            async with asyncio.timeout(10):
                while True:
                    text = (await metrics.render()).decode()
                    if signer.counts["unsigned"] >= 1:
                        break
                    await asyncio.sleep(0.02)
            text = (await metrics.render()).decode()
    assert value(text, "sagaway_starts_rejected_total", reason="rate_limited") == 1
    assert value(text, "sagaway_starts_rejected_total", reason="payload_too_large") == 0
    assert value(text, "sagaway_envelopes_checked_total", outcome="unsigned") == 1
