"""Idempotent FastAPI endpoints: each ``Idempotency-Key`` is applied once.

::

    from fastapi import FastAPI
    from sagaway.participant.fastapi import Idempotency, IdempotentRequest

    idem = Idempotency("sqlite:///inventory.db")          # or postgresql://…
    app = FastAPI(lifespan=idem.lifespan)

    @app.post("/reservations", status_code=201)
    @idem.endpoint
    async def reserve(body: ReserveIn, req: IdempotentRequest) -> dict[str, str]:
        await req.db.execute("UPDATE stock SET qty = qty - ? WHERE sku = ?", (1, body.sku))
        return {"reservation_id": body.order_id}

What :meth:`Idempotency.endpoint` guarantees (the saga orchestrator retries an HTTP step
with the same key, so this is what makes a retry safe):

* **Same transaction.** The handler's writes (through ``req.db``) and the record of the key
  with its response commit together in the service's own database, or not at all. A crash
  before the commit leaves neither; the retry runs the handler again.
* **Replay.** A request whose key was recorded gets the recorded status and body back
  (with ``Idempotent-Replayed: true``), and the handler does not run.
* **Concurrent duplicates apply once.** The key is locked before the handler runs; a second
  request with the same key waits for the first to finish and then gets its response (on
  SQLite requests take turns on the one connection; on PostgreSQL the second waits on the
  key's row). Both callers get the same answer; neither sees a "409 in progress".
* **Same key, other request.** The recorded entry keeps a SHA-256 fingerprint of the method,
  path, query and body (JSON canonicalised: key order and spacing do not matter); a key
  reused for anything else gets ``422`` and the handler does not run.
* **What is recorded.** A returned value (the JSON body, status = the route's
  ``status_code``) or a returned :class:`~starlette.responses.Response` below 500 is
  recorded with the handler's writes. An :class:`~fastapi.HTTPException` below 500 (a
  business "no": out of stock) undoes the handler's writes and records the error response,
  so a retry gets the same "no". Any other exception, or a status of 500 and above, rolls
  everything back and records nothing: the caller may retry.
* **No key.** ``400``: an endpoint declared idempotent refuses to run without one (leave
  an endpoint undecorated to take requests without keys). Requests FastAPI rejects before
  the handler (body validation, ``422``) record nothing.

Keys and responses live in the participant's ``sagaway_inbox`` table, as ``http:<key>``,
next to the inbox of message-driven commands; :meth:`Idempotency.purge` forgets old ones.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sagaway.errors import SagawayError
from sagaway.participant.base import Database, open_database
from sagaway.participant.sqlite import AsyncSQLiteConnection

try:
    from fastapi import HTTPException, Request, Response
    from fastapi.encoders import jsonable_encoder
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "idempotent FastAPI endpoints need FastAPI: pip install 'sagaway[fastapi]'"
    ) from exc

__all__ = [
    "IDEMPOTENCY_HEADER",
    "REPLAYED_HEADER",
    "Idempotency",
    "IdempotentRequest",
    "fingerprint",
]

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
_PREFIX = "http:"
_REQUEST_PARAM = "_sagaway_request"
_PURGE = "DELETE FROM sagaway_inbox WHERE idempotency_key LIKE $1 AND created_at < $2"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class EndpointError(SagawayError, TypeError):
    """``@idem.endpoint`` was put on a function it cannot make idempotent."""


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """What an idempotent handler gets (declare a parameter of this type)."""

    key: str
    """The request's ``Idempotency-Key``."""
    db: Any
    """The service's database connection, inside the transaction that will also record the
    key and the response: write the business change through it and do not commit. An
    ``asyncpg.Connection`` on PostgreSQL, an
    :class:`~sagaway.participant.sqlite.AsyncSQLiteConnection` on SQLite."""


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """The SHA-256 a key's recorded entry is compared against: the same method, path, query
    and body (JSON compared after canonicalising; other bodies byte for byte)."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    except (ValueError, UnicodeDecodeError):
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper(), path, "&".join(sorted(query.split("&"))) if query else ""):
        digest.update(part.encode("utf-8") + b"\n")
    digest.update(canonical)
    return digest.hexdigest()


class Idempotency:
    """Makes FastAPI endpoints idempotent against the service's own database.

    Args:
        db: ``sqlite:///service.db``, ``postgresql://…`` (the ``[postgres]`` extra), a
            :class:`~sagaway.participant.Database` or an asyncpg pool.

    Open it with ``FastAPI(lifespan=idem.lifespan)`` or ``await idem.open()`` in your own
    lifespan; :meth:`connection` serves the other endpoints (reads, setup).
    """

    def __init__(self, db: Database | str | Any) -> None:
        self.db = open_database(db)

    async def open(self) -> None:
        """Open the database, creating sagaway's tables if needed. Idempotent."""
        await self.db.open()

    async def aclose(self) -> None:
        await self.db.aclose()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """A FastAPI ``lifespan``: the database is open while the app serves."""
        await self.open()
        try:
            yield
        finally:
            await self.aclose()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """The database connection outside idempotent requests (each statement commits on
        its own): for reads and setup. On SQLite it waits its turn with the requests."""
        async with self.db.transaction() as tx:
            yield tx.connection

    async def purge(self, older_than: float) -> int:
        """Forget the keys recorded more than ``older_than`` seconds ago; return how many.

        A request retried with a forgotten key runs again: keep keys longer than any caller
        retries (a saga step's whole retry policy, plus its compensation's).
        """
        if older_than < 0:
            raise ValueError("older_than must be >= 0 seconds")
        before = time.time() - older_than
        async with self.connection() as conn:
            if isinstance(conn, AsyncSQLiteConnection):
                return await conn.execute(_PURGE.replace("$1", "?").replace("$2", "?"),
                                          (_PREFIX + "%", before))  # fmt: skip
            status: str = await conn.execute(_PURGE, _PREFIX + "%", before)
            return int(status.rsplit(" ", 1)[-1])

    def endpoint(self, fn: F) -> F:
        """Make ``fn`` (an ``async def`` FastAPI endpoint) idempotent by its
        ``Idempotency-Key``; put it under the route decorator. ``fn`` may declare a
        parameter of type :class:`IdempotentRequest` to get the key and the transaction.

        Raises:
            EndpointError: ``fn`` is not ``async def``.
        """
        if not inspect.iscoroutinefunction(fn):
            raise EndpointError(
                f"@idem.endpoint needs an `async def` endpoint, got {fn!r}: the handler's "
                f"writes share the request's transaction, which lives on the event loop"
            )
        signature = inspect.signature(fn)
        tx_param = _request_param(fn, signature)
        params = [p for name, p in signature.parameters.items() if name != tx_param]
        params.append(
            inspect.Parameter(_REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        )

        @functools.wraps(fn)
        async def idempotent(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs.pop(_REQUEST_PARAM)
            return await self._handle(fn, tx_param, request, args, kwargs)

        # FastAPI reads the parameters from __signature__ and resolves string annotations
        # with the globals of the function __wrapped__ (the user's module).
        idempotent.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=_ordered(params)
        )
        return typing.cast(F, idempotent)

    async def _handle(
        self,
        fn: Callable[..., Awaitable[Any]],
        tx_param: str | None,
        request: Request,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Response:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key) <= MAX_KEY_CHARS):
            raise HTTPException(
                400, f"the {IDEMPOTENCY_HEADER} header must be 1 to {MAX_KEY_CHARS} characters"
            )
        route = request.scope.get("route")
        status = getattr(route, "status_code", None) or 200
        if key is None:
            raise HTTPException(
                400,
                f"{request.method} {request.url.path} is idempotent: send an "
                f"{IDEMPOTENCY_HEADER} header (the same value on each retry of one "
                f"operation, a new one per operation)",
            )
        fp = fingerprint(request.method, request.url.path, request.url.query, await request.body())
        async with self.db.transaction() as tx:
            recorded = await tx.claim(_PREFIX + key)
            if recorded is not None:
                return _replay(key, recorded, fp)
            try:
                response = await self._run(
                    fn, tx_param, IdempotentRequest(key, tx.connection), args, kwargs, status
                )
                undo = False
            except HTTPException as exc:
                if exc.status_code >= 500:
                    raise
                response = _error_response(exc)
                undo = True  # a business "no": its partial writes go, the answer stays
            if response.status_code >= 500:
                return response  # rolled back on leaving: the caller may retry
            entry = {
                "fingerprint": fp,
                "status": response.status_code,
                "body": bytes(response.body).decode("utf-8"),
                "media_type": response.media_type,
            }
            await tx.commit(_PREFIX + key, entry, undo=undo)
            return response

    async def _run(
        self,
        fn: Callable[..., Awaitable[Any]],
        tx_param: str | None,
        req: IdempotentRequest,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        status: int,
    ) -> Response:
        if tx_param is not None:
            kwargs[tx_param] = req
        result = await fn(*args, **kwargs)
        if isinstance(result, Response):
            if not isinstance(getattr(result, "body", None), bytes | memoryview):
                raise EndpointError(
                    f"an idempotent endpoint must return data or a Response with a body, "
                    f"not a {type(result).__name__} (its body cannot be recorded)"
                )
            return result
        return Response(
            content=json.dumps(jsonable_encoder(result), separators=(",", ":")),
            status_code=status,
            media_type="application/json",
        )


def _request_param(fn: Callable[..., Any], signature: inspect.Signature) -> str | None:
    """The name of ``fn``'s IdempotentRequest parameter, if it has one."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name FastAPI resolves later (or fails on): compare spellings
        hints = {}
    for name, param in signature.parameters.items():
        hint = hints.get(name, param.annotation)
        if hint is IdempotentRequest or (
            isinstance(hint, str) and hint.rsplit(".", 1)[-1] == "IdempotentRequest"
        ):
            return name
    return None


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    # Keep a valid signature: the added keyword-only parameter goes before **kwargs.
    kinds = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    kinds.sort(key=lambda p: p.kind)
    return kinds + [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]


def _error_response(exc: HTTPException) -> Response:
    return Response(
        content=json.dumps({"detail": jsonable_encoder(exc.detail)}, separators=(",", ":")),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


def _replay(key: str, recorded: dict[str, Any], fp: str) -> Response:
    if recorded.get("fingerprint") != fp:
        raise HTTPException(
            422,
            f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different request (another "
            f"method, path or body); use a new key for a new operation",
        )
    return Response(
        content=recorded["body"],
        status_code=int(recorded["status"]),
        media_type=recorded.get("media_type") or "application/json",
        headers={REPLAYED_HEADER: "true"},
    )
