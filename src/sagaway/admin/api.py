"""The admin REST API: list and inspect runs, and ask for operator actions.

``create_app`` builds a FastAPI app over a client orchestrator (``worker=False``): it reads
the store and records operator requests, and the workers sharing the store carry them out.
Every ``/api/`` request is authenticated first (see ``auth``), before its body is read; the
dashboard's static files are served at ``/``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sagaway import (
    IdempotencyConflict,
    InvalidPayload,
    InvalidTransition,
    Orchestrator,
    OrchestratorClosed,
    PayloadTooLarge,
    RateLimited,
    RunNotFound,
    Saga,
    SagaRun,
    SagaStatus,
    SagawayError,
    StoreError,
    UnknownSaga,
    __version__,
)
from sagaway.admin import views
from sagaway.admin.auth import Principal, Role, Token, TokenAuth
from sagaway.admin.guard import PRINCIPAL, AuthMiddleware
from sagaway.admin.masking import Masker
from sagaway.admin.params import (
    PRINTABLE,
    decode_cursor,
    encode_cursor,
    parse_statuses,
    parse_time,
)
from sagaway.admin.schemas import (
    Action,
    ActionBody,
    Counts,
    ErrorBody,
    Health,
    RunDetail,
    RunPage,
    Started,
    WhoAmI,
)

__all__ = ["STATIC_DIR", "AdminState", "create_app"]

log = logging.getLogger("sagaway.admin")

STATIC_DIR = FilePath(__file__).parent / "static"
MAX_PAGE = 500
RunId = Annotated[str, Path(max_length=200, pattern=PRINTABLE)]
_ACTIVE = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
_DOC = {
    "retry": "Retry a FAILED run: its failed compensations (or the step after the pivot "
             "that gave up) get a fresh retry budget.",
    "resume": "Resume a parked run now (PENDING, RUNNING or COMPENSATING): take it from its "
              "worker and fire its retry timers at once.",
    "compensate": "Force-compensate a PENDING, RUNNING or FAILED run: actions in flight are "
                  "cut and every step that may have taken effect is undone.",
    "resolve": "Mark a FAILED run RESOLVED: an operator settled it by hand.",
}
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No token, or an unknown one."},
    403: {"model": ErrorBody, "description": "The token's role does not allow this."},
}


class AdminState:
    """What the app's handlers share: the orchestrator, auth, masking and settings."""

    def __init__(self, orchestrator: Orchestrator, *, owned: bool, auth: TokenAuth,
                 masker: Masker, stuck_after: float) -> None:
        self.owned = owned
        self.orchestrator = orchestrator
        self.auth = auth
        self.masker = masker
        self.stuck_after = stuck_after
        self._metrics: Any = None
        self._ready = False
        self._lock: asyncio.Lock | None = None

    async def orch(self) -> Orchestrator:
        """The orchestrator, opened on first use (so the app works without a lifespan)."""
        if not self._ready:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if not self._ready:
                    await self.orchestrator.open()  # a no-op when the caller opened it
                    self._ready = True
        return self.orchestrator

    async def aclose(self) -> None:
        """Close the orchestrator if the app made it (one passed in is the caller's)."""
        if self.owned and self._ready:
            await self.orchestrator.aclose()
        self._ready = False

    def definition(self, run: SagaRun) -> Saga | None:
        try:
            return self.orchestrator.definition(run.saga, run.version)
        except UnknownSaga:
            return None

    def detail(self, run: SagaRun) -> RunDetail:
        definition = self.definition(run)
        return views.detail(self.masker.run(run, definition), self.masker,
                            now=self.orchestrator.clock.now(), stuck_after=self.stuck_after,
                            definition=definition)

    def masked(self, run: SagaRun) -> SagaRun:
        return self.masker.run(run, self.definition(run))

    def metrics(self) -> Any:
        """The PrometheusMetrics /metrics renders: the orchestrator's own listener if it has
        one (an in-process worker), else one that reports the store gauges. Raises
        ImportError without prometheus_client."""
        if self._metrics is None:
            from sagaway.observability.metrics import PrometheusMetrics

            orch = self.orchestrator
            found = next((m for m in orch.listeners if isinstance(m, PrometheusMetrics)), None)
            metrics = found or PrometheusMetrics(stuck_after=self.stuck_after)
            metrics.watch_store(orch.store, clock=orch.clock.now,
                                sagas=[s.name for s in orch.sagas])
            self._metrics = metrics
        return self._metrics


def _state(request: Request) -> AdminState:
    state: AdminState = request.app.state.sagaway
    return state


def _principal(request: Request) -> Principal:
    principal: Principal = request.scope[PRINCIPAL]
    return principal


# -- errors --------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    def error(status: int, detail: str, headers: Mapping[str, str] | None = None
              ) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        # The engine's message names the store URL; a client does not need it.
        run_id = str(request.path_params.get("run_id", ""))[:200]
        return error(404, f"no saga run with id {run_id!r}")

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return error(409, str(exc))

    async def bad_payload(request: Request, exc: Exception) -> JSONResponse:
        return error(422, str(exc))

    async def unknown_saga(request: Request, exc: Exception) -> JSONResponse:
        saga = str(request.path_params.get("saga", ""))[:200]
        return error(404, f"no saga named {saga!r} is registered with this admin app; "
                          f"pass its definition in create_app(..., sagas=[...])")

    async def too_large(request: Request, exc: Exception) -> JSONResponse:
        return error(413, str(exc))

    async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        return error(429, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Driver errors (SQL text, hosts) go to the log, never to the client.
        log.error("store error on %s %s: %s", request.method, request.url.path, exc)
        return error(503, "the saga store is unavailable; see the admin server's log")

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal error; see the admin server's log")

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query",
                                                                             "path"))
            problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        # The echoed input is left out: it may hold the very data masking hides.
        return JSONResponse(
            {"detail": "invalid request: " + "; ".join(problems),
             "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"),
                         "type": e.get("type")} for e in exc.errors()]},
            status_code=422,
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error(exc.status_code, str(exc.detail), exc.headers)

    app.add_exception_handler(RunNotFound, not_found)
    app.add_exception_handler(InvalidTransition, conflict)
    app.add_exception_handler(InvalidPayload, bad_payload)
    app.add_exception_handler(PayloadTooLarge, too_large)
    app.add_exception_handler(UnknownSaga, unknown_saga)
    app.add_exception_handler(IdempotencyConflict, conflict)
    app.add_exception_handler(RateLimited, rate_limited)
    app.add_exception_handler(StoreError, unavailable)
    app.add_exception_handler(OrchestratorClosed, unavailable)
    app.add_exception_handler(SagawayError, internal)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


# -- routes --------------------------------------------------------------------------------


def _add_routes(app: FastAPI) -> None:
    # Auth is enforced by AuthMiddleware; this dependency only documents it in OpenAPI.
    bearer = [Security(HTTPBearer(auto_error=False, description="A token's SECRET."))]

    @app.get("/healthz", response_model=Health, tags=["meta"],
             responses={503: {"model": ErrorBody}})
    async def healthz(request: Request) -> Health:
        """Liveness and store reachability (no token needed)."""
        await (await _state(request).orch()).list(limit=1)
        return Health(status="ok")

    @app.get("/metrics", tags=["meta"], response_class=Response,
             responses={200: {"content": {"text/plain": {}},
                              "description": "Prometheus text exposition."},
                        501: {"model": ErrorBody}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: the store's gauges (runs in flight, stuck, awaiting an
        operator, outbox backlog) and, with an in-process worker, its counters. No token
        needed unless the app was made with ``metrics_auth=True``; no label holds a run id
        or payload data."""
        state = _state(request)
        await state.orch()
        try:
            exporter = state.metrics()
        except ImportError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=501)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await exporter.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/whoami", response_model=WhoAmI, tags=["auth"], dependencies=bearer,
             responses=_AUTH_ERRORS)
    async def whoami(request: Request) -> WhoAmI:
        """The caller's token name and role."""
        p = _principal(request)
        return WhoAmI(name=p.name, role=p.role.value, auth=_state(request).auth.enabled)

    @app.get("/api/runs", response_model=RunPage, tags=["runs"], dependencies=bearer,
             responses={**_AUTH_ERRORS, 400: {"model": ErrorBody},
                        422: {"model": ErrorBody}})
    async def list_runs(
        request: Request,
        saga: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE,
                                          description="Saga name.")] = None,
        status: Annotated[list[str] | None, Query(
            description="Status (repeatable, or comma-separated; case-insensitive).")] = None,
        started_from: Annotated[str | None, Query(
            description="Started at or after: ISO 8601 or epoch seconds.")] = None,
        started_to: Annotated[str | None, Query(
            description="Started before: ISO 8601 or epoch seconds.")] = None,
        stuck: Annotated[bool, Query(
            description="Only active runs with no transition for stuck_after seconds.")]
        = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(max_length=400,
                                            description="next_cursor of the previous "
                                                        "page.")] = None,
    ) -> RunPage:
        """Runs newest first, filtered, one page at a time."""
        state = _state(request)
        statuses: list[SagaStatus] | None = parse_statuses(status or ()) or None
        if stuck:
            statuses = [s for s in (statuses or _ACTIVE) if s in _ACTIVE]
            if not statuses:
                return RunPage(runs=[], next_cursor=None)
        orch = await state.orch()
        found = await orch.list(
            status=statuses, saga=saga, limit=limit + 1,
            before=decode_cursor(cursor) if cursor else None,
            created_from=parse_time(started_from, "started_from") if started_from else None,
            created_to=parse_time(started_to, "started_to") if started_to else None,
            stuck_for=state.stuck_after if stuck else None,
        )
        page = found[:limit]
        now = orch.clock.now()
        return RunPage(
            runs=[views.summary(state.masked(r), state.masker, now=now,
                                stuck_after=state.stuck_after) for r in page],
            next_cursor=encode_cursor(page[-1]) if len(found) > limit else None,
        )

    @app.get("/api/runs/counts", response_model=Counts, tags=["runs"], dependencies=bearer,
             responses=_AUTH_ERRORS)
    async def counts(
        request: Request,
        saga: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE)] = None,
    ) -> Counts:
        """How many runs are in each status."""
        found = await (await _state(request).orch()).counts(saga=saga)
        return Counts(counts=found, total=sum(found.values()))

    @app.get("/api/runs/{run_id}", response_model=RunDetail, tags=["runs"],
             dependencies=bearer, responses={**_AUTH_ERRORS, 404: {"model": ErrorBody}})
    async def get_run(request: Request, run_id: RunId) -> RunDetail:
        """One run: input, results, each step's attempts and the full timeline."""
        state = _state(request)
        return state.detail(await (await state.orch()).get(run_id))

    for action in ("retry", "resume", "compensate", "resolve"):
        app.add_api_route(
            f"/api/runs/{{run_id}}/{action}", _action(action), methods=["POST"],
            status_code=202, response_model=RunDetail, tags=["actions"],
            dependencies=bearer, summary=action.capitalize(), description=_DOC[action]
            + " Needs an operator token; the reason and the token's name are recorded in "
              "the run's history, and a worker carries the action out.",
            responses={**_AUTH_ERRORS, 404: {"model": ErrorBody},
                       409: {"model": ErrorBody, "description": "The run's state does "
                                                                "not allow it."},
                       422: {"model": ErrorBody, "description": "No reason."}},
        )


    app.add_api_route(
        "/api/runs/{run_id}/erase", _erase, methods=["POST"], response_model=RunDetail,
        tags=["actions"], dependencies=bearer, summary="Erase",
        description="Erase a finished (COMPLETED, COMPENSATED or RESOLVED) run's payloads: "
                    "input, results, error texts and message payloads. Its timeline stays, "
                    "with a run.erased entry naming the token and the reason. Needs an "
                    "operator token.",
        responses={**_AUTH_ERRORS, 404: {"model": ErrorBody},
                   409: {"model": ErrorBody, "description": "The run is not finished, or "
                                                            "is FAILED."},
                   422: {"model": ErrorBody, "description": "No reason."}},
    )
    app.add_api_route(
        "/api/sagas/{saga}/runs", _start, methods=["POST"], status_code=202,
        response_model=Started, tags=["runs"], dependencies=bearer, summary="Start",
        description="Start a run of a saga this app's orchestrator registers (pass "
                    "`sagas=` to create_app). Body: `{\"input\": …, \"key\": …}`. Needs an "
                    "operator token. Over the payload limit: 413; over the saga's "
                    "start_rate: 429 with Retry-After.",
        responses={**_AUTH_ERRORS, 404: {"model": ErrorBody},
                   409: {"model": ErrorBody, "description": "The key was used with "
                                                            "another input."},
                   413: {"model": ErrorBody}, 422: {"model": ErrorBody},
                   429: {"model": ErrorBody}},
    )


async def _erase(request: Request, run_id: RunId, body: ActionBody) -> RunDetail:
    state = _state(request)
    principal = _principal(request)
    actor = principal.name if state.auth.enabled else (body.actor or principal.name)
    orch = await state.orch()
    run = await orch.erase(run_id, reason=body.reason, actor=actor)
    log.info("%s erased the payloads of run %s", actor, run_id)
    return state.detail(run)


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (never buffered
    beyond it, whatever Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes, over the limit of "
                              f"{limit} bytes", size=int(declared), limit=limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes",
                                  size=len(body), limit=limit)
    return bytes(body)


async def _start(request: Request,
                 saga: Annotated[str, Path(max_length=200, pattern=PRINTABLE)]) -> Started:
    state = _state(request)
    orch = await state.orch()
    orch.definition(saga)  # 404 before reading a body for a saga nobody registers
    # The body wraps the input, so allow it some room over the input's own limit.
    raw = await _read_limited(request, orch.max_payload_bytes + 4096)
    try:
        doc = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"input", "key"}:
        raise InvalidPayload('the body must be an object {"input": …, "key": …} (key optional)')
    key = doc.get("key")
    if key is not None and not isinstance(key, str):
        raise InvalidPayload("key must be a string")
    handle = await orch.start(saga, doc.get("input"), key=key)
    return Started(id=handle.id, saga=handle.saga, created=handle.created)


def _action(action: Action) -> Callable[..., Awaitable[RunDetail]]:
    async def act(request: Request, run_id: RunId, body: ActionBody) -> RunDetail:
        state = _state(request)
        principal = _principal(request)
        # With auth on, who acted is the token's name and nothing the client says.
        actor = principal.name if state.auth.enabled else (body.actor or principal.name)
        orch = await state.orch()
        await getattr(orch, action)(run_id, reason=body.reason, actor=actor)
        log.info("%s requested %s of run %s", actor, action, run_id)
        return state.detail(await orch.get(run_id))

    act.__name__ = f"{action}_run"
    return act


def create_app(
    orchestrator_or_store_url: Orchestrator | str,
    *,
    tokens: Iterable[Token] | Mapping[str, Role] | None = None,
    sensitive_fields: Iterable[str] = (),
    stuck_after: float = 300.0,
    static_dir: str | FilePath | None = STATIC_DIR,
    sagas: Iterable[Saga] = (),
    sensitive_paths: Iterable[str] = (),
    metrics_auth: bool = False,
) -> FastAPI:
    """The admin API (and dashboard) as an ASGI app.

    Args:
        orchestrator_or_store_url: a store URL (the app opens and closes a client
            orchestrator on it), or an orchestrator (opened if needed, never closed here;
            pass one with your saga definitions to show each step's kind).
        tokens: ``Token`` objects or ``{secret: Role}``; None or empty turns auth off, and
            then only loopback clients are served.
        sensitive_fields: field names masked in every response, on top of
            ``DEFAULT_SENSITIVE_FIELDS``.
        stuck_after: an active run with no transition for this many seconds is stuck.
        static_dir: the dashboard's files, served at ``/`` (None serves none).
        sagas: with a store URL, definitions to read step kinds from (never driven).
        sensitive_paths: payload paths (``card.number``) masked in every run, on top of
            those its saga declares (``Saga(sensitive=…)``, recorded on each run).
        metrics_auth: ``/metrics`` needs a viewer token too. Off by default: it holds only
            counts by saga, step and status, and most scrapers send no token (Prometheus
            can: ``authorization: {credentials: …}`` in the scrape config).
    """
    if stuck_after <= 0:
        raise ValueError("stuck_after must be > 0 seconds")
    auth = TokenAuth(tokens)
    target = orchestrator_or_store_url
    state = AdminState(
        Orchestrator(target, sagas=sagas, worker=False) if isinstance(target, str) else target,
        owned=isinstance(target, str), auth=auth,
        masker=Masker(sensitive_fields, paths=sensitive_paths),
        stuck_after=stuck_after,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.orch()
        try:
            yield
        finally:
            await state.aclose()

    app = FastAPI(
        title="sagaway admin",
        version=__version__,
        description="List and inspect saga runs; retry, resume, force-compensate or resolve "
                    "them. Send `Authorization: Bearer <token>`: viewer tokens read, operator "
                    "tokens also act. Sensitive payload fields are masked as `***`.",
        lifespan=lifespan,
    )
    app.state.sagaway = state
    _install_error_handlers(app)
    _add_routes(app)
    if static_dir is not None:
        app.mount("/", StaticFiles(directory=static_dir, html=True, check_dir=False),
                  name="dashboard")
    app.add_middleware(AuthMiddleware, auth=auth,
                       protected=("/metrics",) if metrics_auth else ())
    return app
