"""Sensitive fields on the real e-commerce example: a canary card number goes through the
inventory, payment and shipping services (real uvicorn processes) and never reaches a sink
of sagaway's — logs, spans, /metrics, the run records' errors and history, ``sagaway runs``
/ ``sagaway show`` and the admin API. The payment service quotes the card in its refusals,
as a careless service would; the saga declares ``card.number`` and ``card.cvc``.

The same scan with the saga built without the declaration finds the canary, so it would
catch a leak. Not scanned: the services' own databases (the payment service is meant to see
the card) and the saga store's copy of the input (the orchestrator needs it to run the saga;
encrypt it with the data-protection options if it must not be readable at rest).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from examples.ecommerce.saga import SENSITIVE, build_orchestrator, order_saga
from examples.ecommerce.system import EcommerceSystem
from examples.launch import start_all, stop_all
from examples.sagaapi import describe
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagaway.admin.api import create_app
from sagaway.observability import (
    JsonFormatter,
    PrometheusMetrics,
    RunContextFilter,
    TracingListener,
    serve_metrics,
)
from sagaway.observability.logs import TEXT_FORMAT

pytestmark = pytest.mark.e2e


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def canary_cards() -> tuple[str, str]:
    """A valid 16-digit card number no other test uses, and the same with a mistyped last
    digit (the payment service refuses it: the Luhn check fails)."""
    body = "4" + "".join(secrets.choice("0123456789") for _ in range(14))
    good = body + luhn_digit(body)
    bad = body + str((int(good[-1]) + 1) % 10)
    return good, bad


GOOD, BAD = canary_cards()
CANARIES = (GOOD, BAD)


def test_the_canaries_are_what_the_payment_service_takes_and_refuses() -> None:
    from examples.ecommerce.payment import luhn_ok

    assert luhn_ok(GOOD) and not luhn_ok(BAD)
    assert luhn_ok("4242424242424242") and luhn_ok("79927398713")
    assert not luhn_ok("4242424242424241")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[EcommerceSystem]:
    """Inventory, payment and shipping as processes (fresh for each test, so its invariants
    are its own); the test runs the orchestrator (the order service's part) in its own
    process, wired to every sink."""
    shop = EcommerceSystem(tmp_path / "services")
    three = [shop.inventory, shop.payment, shop.shipping]
    start_all(three)
    try:
        yield shop
    finally:
        stop_all(reversed(three))
        shop.client.close()


@pytest.fixture
def log_sinks() -> Iterator[dict[str, io.StringIO]]:
    """A JSON and a text handler on the root logger, as ``configure_logging`` makes them."""
    sinks = {"json logs": io.StringIO(), "text logs": io.StringIO()}
    root = logging.getLogger()
    handlers = []
    for name, formatter in (
        ("json logs", JsonFormatter()),
        ("text logs", logging.Formatter(TEXT_FORMAT)),
    ):
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


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """A real uvicorn server on 127.0.0.1 (an OS-picked port) in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, ws="none", lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn exited at startup"
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaway.cli",
        *args,
        env={**os.environ, "COLUMNS": "400", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode() + err.decode()


ORDERS: dict[str, tuple[dict[str, Any], str]] = {
    "paid": ({}, "COMPLETED"),
    "broke": ({"customer": "broke"}, "COMPENSATED"),  # 402 quoting the card
    "mistyped card": ({"card": {"number": BAD, "cvc": "987"}}, "COMPENSATED"),  # 402 too
    "not shipped": ({"address": "Atlantis"}, "COMPENSATED"),  # refunded after the charge
}


async def run_orders_and_collect(
    shop: EcommerceSystem, store: Path, sensitive: list[str], logs: dict[str, io.StringIO]
) -> dict[str, str]:
    """Run :data:`ORDERS` (card: the canary) through the services, check they ended as
    planned with stock and money conserved, then read every sink."""
    url = f"sqlite:///{store}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = PrometheusMetrics()
    sinks: dict[str, str] = {}
    services = {
        "inventory": shop.inventory.url,
        "payment": shop.payment.url,
        "shipping": shop.shipping.url,
    }
    async with build_orchestrator(
        url,
        services=services,
        saga=order_saga(sensitive=sensitive),
        listeners=[metrics, TracingListener(provider)],
    ) as orch:
        metrics.watch(orch)
        handles = {}
        for name, (change, _) in ORDERS.items():
            body = shop.order(card={"number": GOOD, "cvc": "123"})
            body.update(change)
            handles[name] = await orch.start("place_order", body)
        ends = {name: await h.wait(timeout=60) for name, h in handles.items()}
        assert {n: e.status.value for n, e in ends.items()} == {
            n: status for n, (_, status) in ORDERS.items()
        }
        runs = {name: await orch.get(e.id) for name, e in ends.items()}
        # The services really saw the orders: stock and money conserved.
        report = await asyncio.to_thread(shop.check, {r.id: describe(r) for r in runs.values()})
        assert report.problems == []
        server = await serve_metrics(metrics, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(timeout=10) as http:
            sinks["worker /metrics"] = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        server.close()
        await server.wait_closed()
        sinks["rendered metrics"] = (await metrics.render()).decode()
    # What the engine recorded, but the input (the store keeps it to run the saga).
    sinks["run records"] = json.dumps(
        {
            name: {
                "error": r.error,
                "steps": r.steps,
                "results": r.results,
                "history": [[h.kind, h.data] for h in r.history],
            }
            for name, r in runs.items()
        },
        default=str,
    )
    provider.force_flush()
    spans = exporter.get_finished_spans()
    assert len(spans) > 10
    sinks["spans"] = "\n".join(s.to_json() for s in spans)  # attributes and events

    async with (
        uvicorn_server(create_app(url, static_dir=None)) as base,
        httpx.AsyncClient(timeout=10) as http,
    ):
        listing = await http.get(f"{base}/api/runs")
        details = [await http.get(f"{base}/api/runs/{r.id}") for r in runs.values()]
        assert listing.status_code == 200 and all(d.status_code == 200 for d in details)
        sinks["admin api"] = listing.text + "".join(d.text for d in details)
        sinks["admin /metrics"] = (await http.get(f"{base}/metrics")).text

    sinks["cli runs"] = await cli("runs", "--store", url)
    sinks["cli show"] = "".join([await cli("show", r.id, "--store", url) for r in runs.values()])
    sinks.update({name: stream.getvalue() for name, stream in logs.items()})
    assert sinks["json logs"] and sinks["text logs"]
    sinks["declined"] = runs["broke"].error or ""  # for the checks below
    return sinks


def hits(sinks: dict[str, str]) -> dict[str, int]:
    return {name: sum(text.count(c) for c in CANARIES) for name, text in sinks.items()}


async def test_the_card_reaches_no_sink_when_the_saga_declares_it(
    services: EcommerceSystem, tmp_path: Path, log_sinks: dict[str, io.StringIO]
) -> None:
    sinks = await run_orders_and_collect(
        services, tmp_path / "orders.db", list(SENSITIVE), log_sinks
    )
    assert hits(sinks) == dict.fromkeys(sinks, 0)
    # Hidden, not absent: the refusals that quoted the card were recorded, masked.
    assert "card *** declined: insufficient funds" in sinks["declined"]
    for sink in ("run records", "spans", "admin api", "cli show"):
        assert "card *** declined: insufficient funds" in sinks[sink], sink
        assert "card *** declined: not a valid card number" in sinks[sink], sink
    assert '"number":"***"' in sinks["admin api"].replace(" ", "")
    charging = [json.loads(line) for line in sinks["json logs"].splitlines() if "charging" in line]
    assert len(charging) >= len(ORDERS) and all(
        r["message"].endswith("cents to card ***") and r["step"] == "charge_payment"
        for r in charging
    ), charging
    assert "sagaway_step_failures_total" in sinks["rendered metrics"]


async def test_the_scan_finds_the_card_when_the_saga_does_not_declare_it(
    services: EcommerceSystem, tmp_path: Path, log_sinks: dict[str, io.StringIO]
) -> None:
    sinks = await run_orders_and_collect(services, tmp_path / "orders.db", [], log_sinks)
    found = hits(sinks)
    print(f"\ncanary hits without the declaration: {found}")
    for sink in (
        "run records",
        "spans",
        "admin api",
        "cli runs",
        "cli show",
        "json logs",
        "text logs",
    ):
        assert found[sink] > 0, (sink, found)
    # Metrics carry no payload data, declared or not.
    assert found["worker /metrics"] == found["rendered metrics"] == 0
    assert found["admin /metrics"] == 0
