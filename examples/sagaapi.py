"""A small HTTP front for an orchestrator: ``POST /<things>`` starts a run, ``GET`` shows it.

The e-commerce order service and the travel agency are this app with their own saga. The
process runs the orchestrator (a worker): it drives the runs it starts and, after a crash,
resumes the ones it left (the saga store is its own database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

from sagaway import IdempotencyConflict, Orchestrator, RunNotFound, SagaRun

__all__ = ["create_saga_api", "describe"]


def describe(run: SagaRun) -> dict[str, Any]:
    """A run as the API shows it."""
    return {
        "id": run.id,
        "saga": run.saga,
        "status": str(run.status),
        "input": run.input,
        "results": run.results,
        "error": run.error,
        "steps": {
            name: {"status": s.get("status"), "attempts": s.get("attempts")}
            for name, s in (run.steps or {}).items()
        },
    }


def create_saga_api(
    *,
    title: str,
    resource: str,
    saga: str,
    model: type[BaseModel],
    build: Callable[[], Orchestrator],
) -> FastAPI:
    """The app: ``POST /{resource}`` (body: ``model``; an ``Idempotency-Key`` header makes a
    retried POST return the same run), ``GET /{resource}/{id}``, ``GET /{resource}`` (how
    many runs are in each status), ``GET /healthz``.

    ``build`` makes the orchestrator; it is opened and closed with the app.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with build() as orch:
            app.state.orch = orch
            yield

    app = FastAPI(title=title, lifespan=lifespan)

    def orch_of(request: Request) -> Orchestrator:
        orch: Orchestrator = request.app.state.orch
        return orch

    async def start(
        body: BaseModel,
        request: Request,
        idempotency_key: str | None = Header(default=None, max_length=200),
    ) -> dict[str, Any]:
        try:
            handle = await orch_of(request).start(
                saga, body.model_dump(mode="json"), key=idempotency_key
            )
        except IdempotencyConflict as exc:
            raise HTTPException(422, str(exc)) from None
        return {"id": handle.id, "created": handle.created, "status": "started"}

    # The body's type is the example's model: set it on the signature FastAPI reads.
    start.__annotations__["body"] = model
    app.post(f"/{resource}", status_code=202)(start)

    @app.get(f"/{resource}/{{run_id}}")
    async def show(run_id: str, request: Request) -> dict[str, Any]:
        try:
            return describe(await orch_of(request).get(run_id))
        except RunNotFound:
            raise HTTPException(404, f"no {resource[:-1]} {run_id}") from None

    @app.get(f"/{resource}")
    async def counts(request: Request) -> dict[str, int]:
        found = await orch_of(request).counts(saga=saga)
        return {str(status): n for status, n in found.items()}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": title}

    return app
