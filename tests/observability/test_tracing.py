"""OpenTelemetry: a span per run and per attempt, and one trace across a real HTTP call (a
uvicorn FastAPI service) and a real RabbitMQ message (a Participant), with the SDK's
in-memory exporter."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from obs_helpers import FAST, order, shop_saga, uvicorn_server
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaway import Orchestrator, Saga, StepContext
from sagaway.observability import TracingListener, participant_tracing
from sagaway.participant import Command, Participant

Spans = tuple[TracerProvider, InMemorySpanExporter]


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_span_per_run_and_per_attempt(tmp_path: Path, spans: Spans) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga()],
                            listeners=[TracingListener(provider)]) as orch:
        # Started inside a request's span: the run's span is its child.
        with tracer.start_as_current_span("POST /orders") as request_span:
            ok = await orch.start("shop", order(flaky=True))
        declined = await orch.start("shop", order(decline=True))
        assert (await ok.wait(timeout=10)).status.value == "COMPLETED"
        assert (await declined.wait(timeout=10)).status.value == "COMPENSATED"
    got = exporter.get_finished_spans()

    [run_span] = [s for s in by_name(got, "saga shop")
                  if s.attributes and s.attributes["sagaway.run_id"] == ok.id]
    assert parent_id(run_span) == request_span.get_span_context().span_id
    assert run_span.attributes is not None
    assert run_span.attributes["sagaway.status"] == "COMPLETED"
    assert run_span.attributes["sagaway.version"] == 1
    steps = [s for s in got if s.attributes and s.attributes.get("sagaway.run_id") == ok.id
             and s is not run_span]
    assert sorted((s.name, s.attributes["sagaway.attempt"], s.attributes["sagaway.outcome"])
                  for s in steps if s.attributes) == [
        ("step shop.charge", 1, "succeeded"),
        ("step shop.reserve", 1, "succeeded"),
        ("step shop.ship", 1, "failed"),
        ("step shop.ship", 2, "succeeded"),
    ]
    for s in steps:
        assert parent_id(s) == run_span.context.span_id
        assert s.context.trace_id == request_span.get_span_context().trace_id
        assert s.attributes is not None and s.attributes["sagaway.saga"] == "shop"
        assert s.attributes["sagaway.phase"] == "action"
        assert s.attributes["sagaway.invoke"] == "local"
    [failed] = [s for s in steps if s.attributes and s.attributes["sagaway.outcome"] == "failed"]
    assert failed.status.status_code is StatusCode.ERROR
    assert "carrier timeout" in (failed.status.description or "")
    assert any(e.name == "step.retry_scheduled" for e in run_span.events)

    # The declined run: the charge fails, reserve is compensated, the run span says so.
    [comp_run] = [s for s in by_name(got, "saga shop")
                  if s.attributes and s.attributes["sagaway.run_id"] == declined.id]
    assert comp_run.attributes is not None
    assert comp_run.attributes["sagaway.status"] == "COMPENSATED"
    assert parent_id(comp_run) is None
    [undo] = by_name(got, "compensate shop.reserve")
    assert undo.attributes is not None
    assert (undo.attributes["sagaway.phase"], undo.attributes["sagaway.outcome"]) == (
        "compensation", "succeeded")
    assert parent_id(undo) == comp_run.context.span_id
    assert any(e.name == "run.compensating" for e in comp_run.events)


def inventory_service(provider: TracerProvider) -> tuple[FastAPI, list[dict[str, str]]]:
    """A FastAPI service that continues the caller's trace from ``traceparent``."""
    app = FastAPI()
    tracer = provider.get_tracer("inventory-service")
    propagator = TraceContextTextMapPropagator()
    seen: list[dict[str, str]] = []

    @app.post("/reservations")
    async def reserve(request: Request) -> dict[str, Any]:
        seen.append(dict(request.headers))
        with tracer.start_as_current_span("POST /reservations", kind=SpanKind.SERVER,
                                          context=propagator.extract(dict(request.headers))):
            return {"reservation": "r-1"}

    return app, seen


async def test_one_trace_across_a_real_http_call_and_a_rabbitmq_message(
    tmp_path: Path, spans: Spans, amqp_url: str
) -> None:
    provider, exporter = spans
    suffix = uuid.uuid4().hex[:10]
    payments = f"obs-payments-{suffix}"
    app, seen = inventory_service(provider)

    async with uvicorn_server(app) as base, httpx.AsyncClient(timeout=5) as http:
        trip = Saga("trip")

        @trip.step(retry=FAST)
        async def reserve(ctx: StepContext, data: Any) -> Any:
            # A local step calling a service forwards the headers the listeners gave it.
            got = await http.post(f"{base}/reservations", json=data, headers=dict(ctx.headers))
            got.raise_for_status()
            return got.json()

        @reserve.compensation
        async def release(ctx: StepContext, data: Any, result: Any) -> None:
            return None

        trip.command_step("pay", service=payments, command="charge", timeout=20, pivot=True)

        participant = Participant(payments, amqp_url, db=f"sqlite:///{tmp_path}/payments.db",
                                  around_command=participant_tracing(provider))
        handled: list[str | None] = []

        @participant.handler("charge")
        async def charge(cmd: Command) -> dict[str, str]:
            # The handler runs inside the participant's span.
            handled.append(cmd.envelope.headers.get("traceparent"))
            assert trace.get_current_span().is_recording()
            return {"charge": "ch-1"}

        async with participant, Orchestrator(
            f"sqlite:///{tmp_path}/s.db", sagas=[trip], transport=amqp_url,
            reply_to=f"obs-replies-{suffix}", listeners=[TracingListener(provider)],
        ) as orch:
            run = await orch.start("trip", {"sku": "sku-1"})
            assert (await run.wait(timeout=30)).status.value == "COMPLETED"

    got = exporter.get_finished_spans()
    [run_span] = by_name(got, "saga trip")
    [http_step] = by_name(got, "step trip.reserve")
    [server] = by_name(got, "POST /reservations")
    [msg_step] = by_name(got, "step trip.pay")
    [handler] = by_name(got, f"handle {payments}.charge")
    trace_id = run_span.context.trace_id
    assert {s.context.trace_id for s in (http_step, server, msg_step, handler)} == {trace_id}
    # The service's span is a child of the step's span, over HTTP headers...
    assert parent_id(http_step) == run_span.context.span_id
    assert parent_id(server) == http_step.context.span_id
    assert seen[0]["traceparent"].split("-")[2] == format(http_step.context.span_id, "016x")
    # ...and the participant's span a child of the command step's, over message headers.
    assert parent_id(msg_step) == run_span.context.span_id
    assert parent_id(handler) == msg_step.context.span_id
    assert handler.kind is SpanKind.CONSUMER
    assert handler.attributes is not None
    assert handler.attributes["sagaway.run_id"] == run.id
    assert handler.attributes["sagaway.step"] == "pay"
    assert msg_step.attributes is not None
    assert msg_step.attributes["sagaway.invoke"] == "command"
    assert msg_step.attributes["sagaway.outcome"] == "succeeded"
    assert handled and handled[0] is not None
