"""Sensitive fields: a canary card number (and a sensitive step result) never reach a log,
a span, /metrics, an error message, the CLI or the admin API; and the same scan finds
them when the saga does not declare them, so it would catch a leak."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from obs_helpers import AUTH_CANARY, CANARY, order, shop_saga, uvicorn_server
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagaway import DefinitionError, Orchestrator, Redactor, Saga, redact
from sagaway.admin.api import create_app
from sagaway.admin.masking import Masker
from sagaway.observability import (
    JsonFormatter,
    PrometheusMetrics,
    RunContextFilter,
    TracingListener,
    serve_metrics,
)
from sagaway.observability.logs import TEXT_FORMAT

SENSITIVE = ["card.number", "results.charge.auth_code"]
CANARIES = (CANARY, AUTH_CANARY)

# -- the redaction hook ---------------------------------------------------------------------


def test_redactor_masks_paths_wildcards_and_results() -> None:
    r = Redactor(["card.number", "items.*.card", "results.charge.token"])
    data = {"card": {"number": 4111111111111111, "holder": "A"},
            "items": [{"card": "5500000000000004", "sku": "x"}, {"sku": "y"}]}
    assert r.input(data) == {"card": {"number": "***", "holder": "A"},
                             "items": [{"card": "***", "sku": "x"}, {"sku": "y"}]}
    assert data["card"]["number"] == 4111111111111111  # a copy; the input is untouched
    results = {"charge": {"token": "tok-123456", "id": "c-1"}, "ship": "ok"}
    assert r.results(results) == {"charge": {"token": "***", "id": "c-1"}, "ship": "ok"}
    secrets = r.secrets(data, results)
    assert secrets == {"4111111111111111", "5500000000000004", "tok-123456"}
    assert r.text("card 4111111111111111 and tok-123456 failed", secrets) == (
        "card *** and *** failed")
    # Short values are masked in their field but not searched for in text.
    short = Redactor(["cvv"])
    assert short.input({"cvv": "123"}) == {"cvv": "***"}
    assert short.secrets({"cvv": "123"}) == frozenset()


def test_redact_is_a_hook_for_documents_and_text() -> None:
    data = {"card": {"number": CANARY}, "note": f"paid with {CANARY}"}
    assert redact(data, ["card.number"]) == {"card": {"number": "***"},
                                              "note": "paid with ***"}
    assert redact(f"declined: {CANARY}", ["card.number"], input=data) == "declined: ***"


@pytest.mark.parametrize("bad", ["", "card..number", ".card", "results.charge", 5])
def test_a_malformed_sensitive_path_is_a_definition_error(bad: Any) -> None:
    with pytest.raises(DefinitionError, match="sensitive path"):
        Saga("order", sensitive=[bad])


def test_the_definition_keeps_its_paths() -> None:
    saga = Saga("order", sensitive="card.number")
    assert saga.sensitive == ("card.number",)


# -- the canary through every sink ----------------------------------------------------------


@pytest.fixture
def log_sinks() -> Iterator[dict[str, io.StringIO]]:
    """A text and a JSON handler on the root logger, as configure_logging makes them."""
    sinks = {"text logs": io.StringIO(), "json logs": io.StringIO()}
    root = logging.getLogger()
    handlers = []
    for name, formatter in (("text logs", logging.Formatter(TEXT_FORMAT)),
                            ("json logs", JsonFormatter())):
        handler = logging.StreamHandler(sinks[name])
        handler.addFilter(RunContextFilter())
        handler.setFormatter(formatter)
        root.addHandler(handler)
        handlers.append(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield sinks
    root.setLevel(level)
    for handler in handlers:
        root.removeHandler(handler)


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaway.cli", *args,
        env={**os.environ, "COLUMNS": "400", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode() + err.decode()


async def run_shop_and_collect(tmp_path: Path, sensitive: list[str],
                               log_sinks: dict[str, io.StringIO]) -> dict[str, str]:
    """Run orders that complete, are declined, fail to compensate and fail to ship (errors
    that repeat the card), then read every sink."""
    url = f"sqlite:///{tmp_path}/shop.db"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = PrometheusMetrics()
    sinks: dict[str, str] = {}
    async with Orchestrator(url, sagas=[shop_saga(sensitive=sensitive)],
                            listeners=[metrics, TracingListener(provider)]) as orch:
        metrics.watch(orch)
        handles = [await orch.start("shop", order(**extra)) for extra in
                   ({}, {"decline": True}, {"decline": True, "release_broken": True},
                    {"fail_ship": True})]
        ends = [await h.wait(timeout=20) for h in handles]
        assert [e.status.value for e in ends] == ["COMPLETED", "COMPENSATED", "FAILED",
                                                  "COMPENSATED"]
        server = await serve_metrics(metrics, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(timeout=10) as http:
            sinks["worker /metrics"] = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        server.close()
        await server.wait_closed()
        # The error messages as the engine recorded them.
        sinks["run errors"] = json.dumps(
            [[(await orch.get(e.id)).error, [h.data for h in (await orch.get(e.id)).history]]
             for e in ends], default=str)
    provider.force_flush()
    sinks["spans"] = "\n".join(s.to_json() for s in exporter.get_finished_spans())
    assert len(exporter.get_finished_spans()) > 10

    async with uvicorn_server(create_app(url, static_dir=None)) as base, \
            httpx.AsyncClient(timeout=10) as http:
        listing = await http.get(f"{base}/api/runs")
        assert listing.status_code == 200
        details = [await http.get(f"{base}/api/runs/{e.id}") for e in ends]
        assert all(d.status_code == 200 for d in details)
        sinks["admin api"] = listing.text + "".join(d.text for d in details)
        sinks["admin /metrics"] = (await http.get(f"{base}/metrics")).text
        assert "sagaway_runs_awaiting_operator" in sinks["admin /metrics"]

    sinks["cli runs"] = await cli("runs", "--store", url)
    sinks["cli show"] = "".join([await cli("show", e.id, "--store", url) for e in ends])
    for name, stream in log_sinks.items():
        sinks[name] = stream.getvalue()
    return sinks


def hits(sinks: dict[str, str]) -> dict[str, int]:
    return {name: sum(text.count(c) for c in CANARIES) for name, text in sinks.items()}


async def test_declared_sensitive_fields_reach_no_sink(
    tmp_path: Path, log_sinks: dict[str, io.StringIO]
) -> None:
    sinks = await run_shop_and_collect(tmp_path, SENSITIVE, log_sinks)
    assert hits(sinks) == dict.fromkeys(sinks, 0)
    # Hidden, not absent: the sinks did carry those records, masked.
    assert "charging card ***" in sinks["text logs"]
    charging = [json.loads(line) for line in sinks["json logs"].splitlines()
                if "charging card" in line]
    assert charging and all(r["message"] == "charging card ***" and r["step"] == "charge"
                            and r["run_id"] for r in charging)
    assert "card *** declined by the bank" in sinks["run errors"]
    assert "card *** declined by the bank" in sinks["spans"]
    assert '"number":"***"' in sinks["admin api"].replace(" ", "")
    assert '"auth_code":"***"' in sinks["admin api"].replace(" ", "")
    assert "***" in sinks["cli show"]


async def test_the_scan_finds_the_canary_when_it_is_not_declared(
    tmp_path: Path, log_sinks: dict[str, io.StringIO]
) -> None:
    sinks = await run_shop_and_collect(tmp_path, [], log_sinks)
    found = hits(sinks)
    # Every sink that shows payload or error text would have leaked it...
    for sink in ("text logs", "json logs", "spans", "run errors", "admin api", "cli runs",
                 "cli show"):
        assert found[sink] > 0, sink
    # ...while metrics never carry payload data, declared or not.
    assert found["worker /metrics"] == found["admin /metrics"] == 0


def test_masker_reads_the_paths_from_the_run_record() -> None:
    """A reader without the definition (the CLI, a standalone admin) masks declared paths
    from the run.started entry."""
    from sagaway import HistoryEntry, SagaRun, SagaStatus

    run = SagaRun(
        id="r-1", saga="shop", version=1, status=SagaStatus.COMPLETED,
        input={"card": {"number": CANARY}}, results={"charge": {"auth_code": AUTH_CANARY}},
        error=f"card {CANARY} declined",
        history=(HistoryEntry(1.0, "run.started",
                              data={"saga": "shop", "version": 1, "sensitive": SENSITIVE}),),
        created_at=1.0, updated_at=2.0,
        steps={"charge": {"status": "SUCCEEDED", "result": {"auth_code": AUTH_CANARY}}},
    )
    masked = Masker().run(run)
    assert CANARY not in repr(masked) and AUTH_CANARY not in repr(masked)
    assert masked.input == {"card": {"number": "***"}}
    assert masked.error == "card *** declined"
    # Without the record's paths, nothing says "number" is secret.
    bare = Masker().run(replace(run, history=()))
    assert CANARY in repr(bare.input)


async def test_the_admin_command_refuses_a_malformed_sensitive_path(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaway.cli", "admin", "--store", f"sqlite:///{tmp_path}/a.db",
        "--sensitive-path", "card..number", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "card..number" in err.decode() and "empty part" in err.decode()
