"""Celery integration: saga steps that run Celery tasks, and a compensating ``celery.chain``.

Three pieces (the ``[celery]`` extra)::

    # the orchestrator's side
    order = Saga("place_order")
    celery_step(order, "reserve", task="shop.reserve", compensation="shop.release",
                queue="shop", timeout=60)
    orch = Orchestrator(store, sagas=[order], transport=CeleryTransport("amqp://…"))

    # the Celery worker's side (the tasks' module)
    @saga_task(app, name="shop.reserve", db="sqlite:////var/lib/shop/shop.db")
    def reserve(order: dict) -> dict:
        saga_context().db.execute("INSERT INTO reservations …")
        return {"reservation": …}

    # or, for a chain: the same tasks, each with its compensation
    place_order = saga_chain((reserve.s(), release.s()), (pay.s(), refund.s()),
                             (ship.s(), None), name="place_order")
    handle = await place_order.start(orch, order)

How a step travels. A Celery step is a command step: the task message is written to the
store's outbox in the same commit as the "step started" transition (so the send and the
transition are atomic), and the run **parks** — no thread or task waits for the Celery
task. The outbox relay publishes through :class:`CeleryTransport`, which turns a sagaway
command into a Celery protocol-2 task message (JSON) on the task's queue, with publisher
confirms; everything else (replies, other command steps, domain events) goes through the
transport it wraps. The task id is the attempt's correlation id
(``{run}:{step}:action|compensation:{attempt}``), and the run id, step, attempt,
idempotency key and the orchestrator's ``reply_to`` ride in one keyword argument,
``_sagaway``, which :class:`SagaTask` removes before calling the task's function.

How the outcome comes back. A task declared with :func:`saga_task` (base class
:class:`SagaTask`) publishes a sagaway reply on ``reply_to`` itself, inside the task, before
Celery acknowledges the message; the reply wakes the parked run like any participant's.
Keyword arguments rather than headers carry the metadata because Celery hands a task's
kwargs, and not its headers, to the hooks that run in the worker's parent process when a
child is killed for a hard time limit. The mapping:

* the task returns → ``{"ok": true, "result": …}``;
* ``self.retry()`` (or ``autoretry_for``) → no reply: Celery sends the retry, and only the
  final outcome is answered; ``Ignore`` and ``Reject`` send none either (the step's
  deadline then decides);
* :class:`~sagaway.NonRetryableError` (or an exception in ``non_retryable``) → a failure
  the step does not retry; any other exception (``MaxRetriesExceededError`` included) → a
  retryable failure, which the step's retry policy retries with the same idempotency key;
* ``SoftTimeLimitExceeded`` inside the task, or a hard ``TimeLimitExceeded`` (reported by
  the worker's parent process) → a failure that *may have taken effect*: retried, or
  compensated;
* a worker that dies mid-task (``acks_late`` and ``reject_on_worker_lost`` are on by
  default) → the broker delivers the task again; a reply that never comes (a lost message,
  a worker that stays down) → the step's ``timeout`` counts the attempt as timed out,
  possibly applied.

Exactly once. With ``db=`` a task runs inside one transaction of its service's database
that also records its idempotency key in the ``sagaway_inbox`` table (the same table
:mod:`sagaway.participant` uses): its writes through ``saga_context().db`` and the inbox
record commit together, a redelivered or re-sent task answers the recorded reply without
running again, and a compensation that runs first fences its action (a late action is then
never applied). ``sqlite:///path.db``: the task gets the ``sqlite3.Connection`` (tasks
sharing the file take turns on its write lock); ``postgresql://…``: the participant's
``PostgresDatabase`` on an event loop of the worker process's own, the task gets a
``SyncPostgresConnection`` (asyncpg's methods), and replies go through the participant
outbox in the same transaction. Without ``db`` the task gets its idempotency key in
``saga_context()`` and must apply it once itself.

The step's time budget: ``timeout`` (the deadline of one attempt) should exceed the
task's hard ``time_limit`` plus queueing, or the orchestrator gives up on an attempt that a
worker is still running (it is then "possibly applied" and retried with the same key,
which the inbox answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaway import NonRetryableError, Orchestrator, RunHandle, Saga, SagaRun, Step
from sagaway.definition.retry import RetryPolicy
from sagaway.definition.saga import Command
from sagaway.engine.relay import REPLY_TYPE
from sagaway.errors import (
    DefinitionError,
    InvalidPayload,
    MalformedEnvelope,
    SagawayError,
    StoreError,
    TransportError,
)
from sagaway.messaging import Envelope, Transport, open_transport
from sagaway.messaging.base import Handler, Subscription, check_destination, redact_url, scrub

try:
    import celery
    from celery import signals as celery_signals
    from celery.exceptions import SoftTimeLimitExceeded, TaskPredicate, TimeLimitExceeded
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Celery integration needs celery: pip install 'sagaway[celery]'"
    ) from exc

__all__ = [
    "DEFAULT_QUEUE",
    "META_KWARG",
    "CeleryIntegrationError",
    "CeleryTransport",
    "ChainSaga",
    "SagaTask",
    "TaskContext",
    "celery_step",
    "celery_task_message",
    "close_inboxes",
    "saga_chain",
    "saga_context",
    "saga_task",
]

log = logging.getLogger("sagaway.celery")

DEFAULT_QUEUE = "celery"
"""Celery's default queue (``task_default_queue``)."""
META_KWARG = "_sagaway"
"""The keyword argument that carries a task's saga metadata (removed before the call)."""
_MARKER = "sagaway.celery"
"""Key of a command payload that is a Celery task call (set by :func:`celery_step`)."""
_FENCED_ACTION = {"ok": False, "retryable": False,
                  "error": "compensated before it was applied: not applied"}
_MAX_ERROR_CHARS = 2000
_CHAIN_INPUT = "a saga_chain run's input is {'args': [...], 'kwargs': {...}}"

class CeleryIntegrationError(SagawayError):
    """The Celery integration is misused: a task asking for its saga context outside a saga
    call, a ``db`` URL it does not support, malformed ``_sagaway`` metadata. (Bad step
    definitions raise :class:`~sagaway.DefinitionError`.)"""


# -- the orchestrator's side: steps -----------------------------------------------------------


ArgsFn = Callable[[Any, Mapping[str, Any]], Sequence[Any]]
"""``(input, results) -> positional arguments`` of a task call."""
KwargsFn = Callable[[Any, Mapping[str, Any]], Mapping[str, Any]]
"""``(input, results) -> keyword arguments`` of a task call."""


@dataclass(frozen=True, slots=True)
class _TaskRef:
    """A task as a step names it: its name, partial arguments and options."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    immutable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def _task_ref(task: Any, what: str) -> _TaskRef:
    """Read a task name, a Celery task object or a signature (``task.s(…)``)."""
    if isinstance(task, str):
        if not task.strip():
            raise DefinitionError(f"{what}: the task name is empty")
        return _TaskRef(task)
    if isinstance(task, dict) and isinstance(task.get("task"), str):  # a celery Signature
        options = dict(task.get("options") or {})
        return _TaskRef(
            task["task"],
            tuple(task.get("args") or ()),
            dict(task.get("kwargs") or {}),
            options.get("queue"),
            bool(task.get("immutable")),
            {k: options[k] for k in ("time_limit", "soft_time_limit", "priority")
             if options.get(k) is not None},
        )
    name = getattr(task, "name", None)
    if isinstance(name, str) and callable(getattr(task, "apply_async", None)):
        queue = getattr(task, "queue", None)
        return _TaskRef(name, queue=queue if isinstance(queue, str) else None)
    raise DefinitionError(
        f"{what}: expected a task name, a Celery task or a signature (task.s(...)), got "
        f"{task!r}"
    )


def _call_payload(ref: _TaskRef, args: Sequence[Any], kwargs: Mapping[str, Any],
                  options: Mapping[str, Any]) -> dict[str, Any]:
    return {_MARKER: 1, "args": list(args), "kwargs": dict(kwargs),
            "options": {**ref.options, **options}}


def _unbuildable(step: str, exc: Exception) -> dict[str, Any]:
    # Called while a transition is being written, so it must not raise: the transport
    # answers the attempt with this failure instead of sending a task.
    return {_MARKER: 1, "error": f"celery step {step!r}: its task call could not be built "
                                 f"from the run's input and results: {_describe(exc)}"}


def _as_args(value: Any, step: str) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise InvalidPayload(f"celery step {step!r}: args must return a list or tuple, got "
                             f"{type(value).__name__}")
    return list(value)


def celery_step(
    saga: Saga,
    name: str,
    *,
    task: Any,
    compensation: Any = None,
    queue: str | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
    args: ArgsFn | None = None,
    kwargs: KwargsFn | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    pivot: bool = False,
    retriable: bool = False,
    read_only: bool = False,
) -> Step:
    """Declare a saga step that runs a Celery task (and a compensation task).

    The action task is called as ``task(*args(input, results), **kwargs(input, results))``
    — by default ``task(input)``, the run's input. The compensation task is called with the
    action's result first (``None`` when the attempt's outcome is unknown) and then the
    action's own arguments: ``release(result, input)`` by default.

    Args:
        saga: the definition to add the step to.
        name: the step's name.
        task: the task's name (``"shop.reserve"``), a Celery task, or a signature
            (``reserve.s(extra, queue="shop")``: partial arguments are appended, its
            ``queue``, ``time_limit``, ``soft_time_limit`` and ``priority`` are used).
        compensation: the task that undoes it, in the same forms; ``None`` for a step that
            needs none (the pivot, a retriable or read-only step).
        queue: the Celery queue both tasks are sent to (default: the signature's or task's
            own, else ``"celery"``).
        timeout: seconds one attempt may take before it counts as timed out (possibly
            applied); keep it above the task's hard time limit plus queueing.
        retry / compensation_retry: the step's retry policies (attempts after Celery's own
            retries have given up; each attempt is one Celery task message).
        args / kwargs: pure functions ``(input, results) -> arguments`` (``results``: the
            results of the steps that have succeeded, by step name).
        time_limit / soft_time_limit: Celery time limits sent with the task message.
        pivot / retriable / read_only: the step's kind, as for ``Saga.step``.

    Raises:
        DefinitionError: a task reference that cannot be read, a bad queue name, or
            ``timeout`` not above ``time_limit``.
    """
    action_ref = _task_ref(task, f"celery step {name!r}")
    comp_ref = (None if compensation is None
                else _task_ref(compensation, f"compensation of celery step {name!r}"))
    target = queue or action_ref.queue or DEFAULT_QUEUE
    comp_target = queue or (comp_ref.queue if comp_ref else None) or target
    for q in (target, comp_target):
        try:
            check_destination(q)
        except TransportError as exc:
            raise DefinitionError(f"celery step {name!r}: queue: {exc}") from None
    if timeout is None or timeout <= 0:
        raise DefinitionError(f"celery step {name!r}: timeout must be > 0 seconds")
    limit = time_limit or action_ref.options.get("time_limit")
    if limit is not None and timeout <= limit:
        raise DefinitionError(
            f"celery step {name!r}: timeout ({timeout}s) must be above the task's hard "
            f"time_limit ({limit}s), or the saga gives up on attempts a worker still runs"
        )
    options = {k: v for k, v in (("time_limit", time_limit),
                                 ("soft_time_limit", soft_time_limit)) if v is not None}

    def action_call(data: Any, results: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        positional = [data] if args is None else _as_args(args(data, results), name)
        named = {} if kwargs is None else dict(kwargs(data, results))
        if not action_ref.immutable:
            positional += action_ref.args
            named = {**action_ref.kwargs, **named}
        else:
            positional, named = list(action_ref.args), dict(action_ref.kwargs)
        return positional, named

    return _declare(saga, name, action_ref, comp_ref, target, comp_target, action_call,
                    options=options, timeout=timeout, retry=retry,
                    compensation_retry=compensation_retry, pivot=pivot, retriable=retriable,
                    read_only=read_only)


def _declare(saga: Saga, name: str, action_ref: _TaskRef, comp_ref: _TaskRef | None,
             target: str, comp_target: str,
             action_call: Callable[[Any, Mapping[str, Any]], tuple[list[Any], dict[str, Any]]],
             *, options: Mapping[str, Any], timeout: float, retry: RetryPolicy | None,
             compensation_retry: RetryPolicy | None, pivot: bool, retriable: bool,
             read_only: bool) -> Step:
    def action_payload(data: Any, results: Mapping[str, Any]) -> dict[str, Any]:
        try:
            positional, named = action_call(data, results)
        except Exception as exc:
            return _unbuildable(name, exc)
        return _call_payload(action_ref, positional, named, options)

    declare = saga.step(name=name, retry=retry, timeout=timeout, pivot=pivot,
                        retriable=retriable, read_only=read_only)
    step: Step = declare(Command(target, action_ref.name, payload=action_payload))
    if comp_ref is not None:
        ref = comp_ref

        def compensation_payload(data: Any, results: Mapping[str, Any]) -> dict[str, Any]:
            try:
                positional, named = action_call(data, results)
            except Exception as exc:
                return _unbuildable(name, exc)
            extra_args = list(ref.args) if not ref.immutable else []
            return _call_payload(ref, [results.get(name), *positional, *extra_args],
                                 {**named, **ref.kwargs}, options)

        step.compensation(retry=compensation_retry, timeout=timeout)(
            Command(comp_target, ref.name, payload=compensation_payload))
    return step


class ChainSaga(Saga):
    """What :func:`saga_chain` returns: a saga definition you can start like a chain."""

    async def start(self, orchestrator: Orchestrator, *args: Any, key: str | None = None,
                    **kwargs: Any) -> RunHandle:
        """Start a run: ``await place_order.start(orch, order)`` is the durable
        ``chain(...).delay(order)``. ``key`` makes starting twice return the same run."""
        return await orchestrator.start(self.name, {"args": list(args), "kwargs": kwargs},
                                        key=key)

    def result(self, run: SagaRun) -> Any:
        """The chain's result: what its last task returned (``None`` until it has)."""
        return run.results.get(self.steps[-1].name)


def _chain_input(data: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(data, dict):
        raise InvalidPayload(_CHAIN_INPUT)
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidPayload(_CHAIN_INPUT)
    return args, kwargs


def saga_chain(
    *links: tuple[Any, Any],
    name: str,
    version: int = 1,
    queue: str | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
) -> ChainSaga:
    """Turn ``chain(a.s(), b.s(), c.s())`` into a durable saga that compensates.

    ``saga_chain((reserve.s(), release.s()), (pay.s(), refund.s()), (ship.s(), None),
    name="place_order")``. Calls follow ``celery.chain``: the first task gets the run's
    arguments (``start(orch, *args, **kwargs)``) followed by its signature's own; every
    next task gets the previous task's result first (unless its signature is immutable,
    ``.si()``). A compensation gets its action's result (``None`` when unknown), then the
    action's arguments, then its own signature's.

    A link without a compensation is the point of no return: the first one is the pivot,
    and the links after it are retried until they succeed (so they may not have
    compensations either). Register the result with the orchestrator like any saga.

    Raises:
        DefinitionError: no links, a link that is not an ``(action, compensation)`` pair,
            a compensation after the pivot, or what :func:`celery_step` refuses.
    """
    if not links:
        raise DefinitionError(f"saga_chain {name!r}: give at least one (task, compensation)")
    saga = ChainSaga(name, version=version)
    used: set[str] = set()
    previous: str | None = None
    pivot_seen = False
    for index, link in enumerate(links):
        if not isinstance(link, tuple) or len(link) != 2:
            raise DefinitionError(
                f"saga_chain {name!r}: link {index + 1} must be a pair (task, compensation "
                f"or None), got {link!r}"
            )
        action, compensation = link
        ref = _task_ref(action, f"saga_chain {name!r} link {index + 1}")
        comp = (None if compensation is None
                else _task_ref(compensation, f"saga_chain {name!r} link {index + 1} "
                                             f"compensation"))
        step_name = _step_name(ref.name, used)
        target = ref.queue or queue or DEFAULT_QUEUE
        comp_target = (comp.queue if comp else None) or queue or target
        for q in (target, comp_target):
            try:
                check_destination(q)
            except TransportError as exc:
                raise DefinitionError(f"saga_chain {name!r} link {index + 1}: {exc}") from None
        limit = ref.options.get("time_limit")
        if limit is not None and timeout <= limit:
            raise DefinitionError(
                f"saga_chain {name!r}: timeout ({timeout}s) must be above the time_limit "
                f"of {ref.name!r} ({limit}s)"
            )
        call = _chain_call(ref, previous)
        pivot = comp is None and not pivot_seen
        retriable = comp is None and pivot_seen
        pivot_seen = pivot_seen or comp is None
        _declare(saga, step_name, ref, comp, target, comp_target, call, options={},
                 timeout=timeout, retry=retry, compensation_retry=compensation_retry,
                 pivot=pivot, retriable=retriable, read_only=False)
        previous = step_name
    saga.validate()
    return saga


def _step_name(task_name: str, used: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in task_name.rsplit(".", 1)[-1])
    base = base if base and not base[0].isdigit() and base[0] != "-" else f"task_{base}"
    base = base[:100]
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate)
    return candidate


def _chain_call(ref: _TaskRef, previous: str | None
                ) -> Callable[[Any, Mapping[str, Any]], tuple[list[Any], dict[str, Any]]]:
    def call(data: Any, results: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        if ref.immutable:
            return list(ref.args), dict(ref.kwargs)
        if previous is None:
            args, kwargs = _chain_input(data)
            return [*args, *ref.args], {**ref.kwargs, **kwargs}
        return [results.get(previous), *ref.args], dict(ref.kwargs)

    return call


# -- the orchestrator's side: the transport ---------------------------------------------------


def celery_task_message(envelope: Envelope, *, origin: str | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any], bytes] | None:
    """The Celery protocol-2 message (headers, properties, body) a command envelope is, or
    ``None`` when it is not a Celery call (not written by :func:`celery_step`)."""
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get(_MARKER) != 1 or "error" in payload:
        return None
    key = envelope.idempotency_key
    correlation = envelope.correlation_id
    if not key or not correlation or not envelope.reply_to:
        raise MalformedEnvelope(f"celery call {envelope.type!r} {envelope.id} lacks its "
                                f"idempotency key, correlation id or reply_to")
    args, kwargs = payload.get("args", []), payload.get("kwargs", {})
    options = payload.get("options") or {}
    attempt = correlation.rsplit(":", 1)[-1]
    meta = {
        "run_id": envelope.run_id,
        "step": envelope.step,
        "key": key,
        "attempt": int(attempt) if attempt.isdigit() else 1,
        "compensation": key.endswith(":compensation"),
        "reply_to": envelope.reply_to,
        "correlation_id": correlation,
        "headers": dict(envelope.headers),
    }
    kwargs = {**kwargs, META_KWARG: meta}
    task_id = correlation
    headers: dict[str, Any] = {
        "lang": "py",
        "task": envelope.type,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [options.get("time_limit"), options.get("soft_time_limit")],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args)[:1024],
        "kwargsrepr": repr({k: v for k, v in kwargs.items() if k != META_KWARG})[:1024],
        "origin": origin or f"sagaway@{socket.gethostname()}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "sagaway_run_id": envelope.run_id,
        "sagaway_step": envelope.step,
        "sagaway_key": key,
    }
    # Trace context, for Celery-side instrumentation; never over Celery's own headers.
    headers = {**dict(envelope.headers), **headers}
    properties = {"correlation_id": task_id, "priority": options.get("priority")}
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None}],
                      separators=(",", ":"), ensure_ascii=False).encode()
    return headers, properties, body


def _is_unbuildable(envelope: Envelope) -> bool:
    payload = envelope.payload
    return isinstance(payload, dict) and payload.get(_MARKER) == 1 and "error" in payload


class CeleryTransport(Transport):
    """A transport that delivers Celery steps to Celery workers, the rest through another.

    ``Orchestrator(store, sagas=[...], transport=CeleryTransport("amqp://…"))``. Commands
    written by :func:`celery_step` / :func:`saga_chain` are published as Celery task
    messages on their queue (RabbitMQ's default exchange, routed by the queue's name,
    ``mandatory``, with publisher confirms); replies, other command steps and domain
    events use ``transport`` (a URL or a Transport; its replies' queue is where
    :class:`SagaTask` answers, so both must be the same RabbitMQ).

    A task published before any Celery worker has declared its queue is returned by the
    broker: the publish fails, the message stays in the outbox and is published again when
    its lease runs out (start the workers, or declare the queues, first).

    Args:
        transport: sagaway's transport for everything that is not a Celery task.
        broker_url: Celery's broker (default: ``transport``'s URL); must be AMQP.
        publish_timeout: seconds to wait for a publisher confirm.
    """

    def __init__(self, transport: Transport | str, *, broker_url: str | None = None,
                 publish_timeout: float = 10.0, connect_timeout: float = 10.0) -> None:
        super().__init__()
        self.inner = open_transport(transport) if isinstance(transport, str) else transport
        self.url = self.inner.url
        self.broker_url = broker_url or self.inner.url
        scheme = self.broker_url.split("://", 1)[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise TransportError(
                f"CeleryTransport publishes Celery task messages over AMQP; "
                f"{redact_url(self.broker_url)!r} is not an amqp:// URL (pass broker_url=…)"
            )
        self.max_message_bytes = self.inner.max_message_bytes
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.published_tasks = 0
        self._connection: Any = None
        self._channel: Any = None
        self._origin = f"sagaway@{socket.gethostname()}:{os.getpid()}"

    def _fail(self, doing: str, exc: BaseException) -> TransportError:
        detail = scrub(str(exc) or type(exc).__name__, self.broker_url)
        return TransportError(f"Celery broker {redact_url(self.broker_url)}: {doing} failed: "
                              f"{detail}")

    async def _connect(self) -> None:
        import aio_pika

        await self.inner.open()
        try:
            self._connection = await aio_pika.connect_robust(
                self.broker_url, timeout=self.connect_timeout,
                client_properties={"connection_name": "sagaway-celery"},
            )
            self._channel = await self._connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
            await self.inner.aclose()
            raise self._fail("connecting", exc) from None

    async def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._channel = None
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        try:
            envelope: Envelope | None = Envelope.from_bytes(body, max_bytes=None)
        except MalformedEnvelope:
            envelope = None
        message = None
        if envelope is not None:
            message = celery_task_message(envelope, origin=self._origin)
        if envelope is None or message is None:
            if envelope is not None and _is_unbuildable(envelope) and envelope.reply_to:
                # Answer the attempt ourselves: a clear failure, nothing sent, not applied.
                reply = Envelope(type=REPLY_TYPE, run_id=envelope.run_id, step=envelope.step,
                                 idempotency_key=envelope.idempotency_key,
                                 correlation_id=envelope.correlation_id,
                                 payload={"ok": False, "retryable": False,
                                          "error": envelope.payload["error"]})
                await self.inner.publish(envelope.reply_to, reply)
                return
            await self.inner.publish_raw(destination, body, message_id=message_id)
            return
        import aio_pika

        headers, properties, task_body = message
        amqp_message = aio_pika.Message(
            task_body,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=properties["correlation_id"],
            priority=properties["priority"],
            message_id=message_id,
        )
        try:
            await self._channel.default_exchange.publish(
                amqp_message, routing_key=destination, mandatory=True,
                timeout=self.publish_timeout)
        except aio_pika.exceptions.PublishError as exc:
            raise self._fail(
                f"publishing task {envelope.type!r} to queue {destination!r} (no such queue: "
                f"start a Celery worker with -Q {destination}, it declares it)", exc) from None
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            raise self._fail(f"publishing task {envelope.type!r} to {destination!r}",
                             exc) from None
        self.published_tasks += 1

    async def _subscribe(self, source: str, handler: Handler, *, prefetch: int,
                         max_deliveries: int, dead_letter: str) -> Subscription:
        return await self.inner.subscribe(source, handler, prefetch=prefetch,
                                          max_deliveries=max_deliveries,
                                          dead_letter=dead_letter)


# -- the worker's side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task running as a saga step knows about itself (:func:`saga_context`)."""

    run_id: str
    step: str
    idempotency_key: str
    """``{run_id}:{step}:action`` or ``:compensation``: the same on every attempt."""
    attempt: int
    compensating: bool
    db: Any
    """With ``db=``: the connection, inside the transaction that records this call in the
    inbox (a ``sqlite3.Connection``, or for PostgreSQL a
    :class:`~sagaway.participant.postgres.SyncPostgresConnection` with asyncpg's methods).
    Write the task's changes through it and do not commit. ``None`` without ``db``."""
    action_applied: bool | None = None
    """For a compensation with ``db=``: whether the inbox recorded its action as done
    (``False``: the action never ran here, so there is nothing to undo)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers the orchestrator's listeners sent with the attempt (trace context)."""


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "sagaway_celery_task", default=None)


def saga_context() -> TaskContext:
    """The saga call the current task is running for.

    Raises:
        CeleryIntegrationError: not inside a :class:`SagaTask` run for a saga step.
    """
    ctx = _current.get()
    if ctx is None:
        raise CeleryIntegrationError(
            "saga_context() is only available inside a task declared with @saga_task (or "
            "base=SagaTask) while it runs for a saga step"
        )
    return ctx


@dataclass(frozen=True, slots=True)
class _Call:
    run_id: str
    step: str
    key: str
    attempt: int
    compensation: bool
    reply_to: str
    correlation_id: str
    headers: Mapping[str, str]

    @classmethod
    def parse(cls, meta: Any) -> _Call:
        try:
            call = cls(str(meta["run_id"]), str(meta["step"]), str(meta["key"]),
                       int(meta["attempt"]), bool(meta["compensation"]),
                       check_destination(str(meta["reply_to"])), str(meta["correlation_id"]),
                       {str(k): str(v) for k, v in (meta.get("headers") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError, TransportError) as exc:
            raise CeleryIntegrationError(f"malformed {META_KWARG} metadata {meta!r}: {exc}"
                                         ) from None
        return call

    def reply_body(self, payload: Mapping[str, Any]) -> tuple[str, bytes]:
        envelope = Envelope(type=REPLY_TYPE, payload=dict(payload), run_id=self.run_id,
                            step=self.step, idempotency_key=self.key,
                            correlation_id=self.correlation_id)
        return envelope.id, envelope.to_bytes()


class _Replies:
    """Publishes replies from a worker process (kombu, publisher confirms). One per process:
    a forked child opens its own connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._conn: Any = None
        self._producer: Any = None
        self._checked: set[str] = set()

    def _reset(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._producer = None
        self._checked = set()

    def send(self, app: Any, destination: str, message_id: str, body: bytes) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._conn = self._producer = None  # inherited across fork: not ours
                self._checked = set()
                self._pid = os.getpid()
            try:
                if self._conn is None:
                    options = dict(app.conf.broker_transport_options or {})
                    options["confirm_publish"] = True
                    self._conn = app.connection_for_write(transport_options=options)
                    self._conn.ensure_connection(max_retries=3)
                    self._producer = self._conn.Producer()
                if destination not in self._checked:
                    # The orchestrator declares its replies' queue; publishing to a queue
                    # that does not exist would drop the reply silently.
                    self._conn.default_channel.queue_declare(queue=destination, passive=True)
                    self._checked.add(destination)
                self._producer.publish(
                    body, exchange="", routing_key=destination,
                    content_type="application/json", content_encoding="utf-8",
                    delivery_mode=2, message_id=message_id, retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.2,
                                  "interval_step": 0.5, "interval_max": 2},
                )
            except Exception:
                self._reset()
                raise


_replies = _Replies()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


_open_postgres_inboxes: set[_PostgresInbox] = set()


def close_inboxes() -> None:
    """Close every PostgreSQL inbox this process opened for its tasks (their connection
    pools and loop threads). Connected to Celery's ``worker_process_shutdown``; call it
    yourself where tasks ran outside a worker (tests)."""
    for inbox in list(_open_postgres_inboxes):
        inbox.close()


celery_signals.worker_process_shutdown.connect(
    lambda **_: close_inboxes(), weak=False, dispatch_uid="sagaway.close_inboxes")


def _open_inbox(url: str) -> _Inbox | _PostgresInbox:
    scheme = _scheme(url)
    if scheme == "sqlite":
        return _Inbox(url)
    if scheme in ("postgresql", "postgres"):
        return _PostgresInbox(url)
    raise CeleryIntegrationError(
        f"saga_task db must be a sqlite:///path.db or postgresql://… URL, got "
        f"{url.split('://', 1)[0]}://…; without db, make the task idempotent by "
        f"saga_context().idempotency_key"
    )


class _Inbox:
    """The task's SQLite database: the ``sagaway_inbox`` table and the task's own tables."""

    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        from sagaway.participant import SQLiteDatabase

        self.url = url
        self.path = SQLiteDatabase.from_url(url).path
        self.busy_timeout = busy_timeout
        self._pid: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._migrated = False

    def connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            from sagaway.participant import SQLiteDatabase
            from sagaway.store.sqlite import connect

            if not self._migrated:
                # The participant's migrations create the same inbox table (once per process).
                async def migrate() -> None:
                    db = SQLiteDatabase(self.path, busy_timeout=self.busy_timeout)
                    await db.open()
                    await db.aclose()

                # On a thread of its own: the caller may be running an event loop.
                failure: list[BaseException] = []

                def run() -> None:
                    try:
                        asyncio.run(migrate())
                    except BaseException as exc:
                        failure.append(exc)

                thread = threading.Thread(target=run, name="sagaway-celery-migrate")
                thread.start()
                thread.join()
                if failure:
                    raise failure[0]
                self._migrated = True
            self._conn = connect(self.path, synchronous="FULL", busy_timeout=self.busy_timeout)
            self._pid = os.getpid()
        return self._conn


class _PostgresInbox:
    """The task's PostgreSQL database, through :class:`sagaway.participant.PostgresDatabase`
    (its inbox, its outbox for replies, asyncpg) on an event loop of this process's own.

    The task keeps running on Celery's thread (so ``self.request``, ``self.retry`` and soft
    time limits behave as usual); its statements and the inbox's run on that loop, each
    call waiting for its result (``saga_context().db`` is a
    :class:`~sagaway.participant.postgres.SyncPostgresConnection`). Replies are recorded in
    the participant outbox in the task's transaction and published from there, so a reply
    lost to a crash is published by the next task (or the redelivered one).
    """

    def __init__(self, url: str) -> None:
        try:
            from sagaway.participant.postgres import PostgresDatabase
        except ImportError as exc:
            raise CeleryIntegrationError(
                f"a postgresql:// db needs asyncpg: pip install 'sagaway[postgres]' ({exc})"
            ) from None
        self.url = url
        self._factory = PostgresDatabase
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.db: Any = None
        self._since_purge = 0

    def run(self, coro: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on this process's loop and wait for it."""
        if self._pid != os.getpid() or self._loop is None:
            self._start()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _start(self) -> None:
        # A fresh loop and pool in every process: a forked child must not share its
        # parent's connections.
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="sagaway-celery-inbox",
                                  daemon=True)
        thread.start()
        self._loop, self._pid, self._thread = loop, os.getpid(), thread
        db = self._factory(self.url, min_size=1, max_size=2)
        asyncio.run_coroutine_threadsafe(db.open(), loop).result(60)
        self.db = db
        _open_postgres_inboxes.add(self)

    def close(self, timeout: float = 10.0) -> None:
        """Close the pool and stop the loop's thread (a later task opens them again)."""
        _open_postgres_inboxes.discard(self)
        loop, db, thread = self._loop, self.db, self._thread
        self._loop, self.db, self._pid = None, None, None
        if loop is None or thread is None or not thread.is_alive():
            return
        if db is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(db.aclose(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def transaction(self) -> Any:
        """The participant database's transaction scope (an async context manager)."""
        if self._pid != os.getpid() or self._loop is None:
            self._start()
        return self.db.transaction()

    def sync_connection(self, conn: Any) -> Any:
        from sagaway.participant.postgres import SyncPostgresConnection

        return SyncPostgresConnection(conn, self._loop)  # type: ignore[arg-type]

    def flush(self, app: Any) -> None:
        """Publish the replies waiting in the outbox (raise if the broker would not)."""
        loop = self._loop
        assert loop is not None

        async def send(rows: Sequence[Any]) -> list[int]:
            sent = []
            for row in rows:
                await loop.run_in_executor(None, _replies.send, app, row.destination,
                                           f"outbox-{row.id}", row.body.encode())
                sent.append(row.id)
            return sent

        async def flush() -> None:
            while await self.db.flush_outbox(send, limit=100) >= 100:
                pass
            self._since_purge += 1
            if self._since_purge >= 500:
                self._since_purge = 0
                await self.db.purge_sent(time.time() - 3600)

        self.run(flush())


def _describe(exc: BaseException) -> str:
    text = str(exc)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _plain(value: Any) -> Any:
    """``value`` as JSON data, or InvalidPayload."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"the task's result cannot be sent as JSON: {exc}") from None


class SagaTask(celery.Task):  # type: ignore[misc]  # celery ships no type information
    """A Celery task base class that answers saga steps: ``@app.task(base=SagaTask)``.

    Called with the ``_sagaway`` keyword (as :class:`CeleryTransport` sends it), it removes
    it, runs the task (inside its inbox transaction when ``saga_db`` is set) and publishes
    the outcome to the orchestrator; called any other way it is a plain task.

    Class attributes (or ``@app.task(..., saga_db=…)`` options):
        saga_db: ``sqlite:///path.db`` or ``postgresql://…`` for exactly-once effects (see
            the module docs).
        saga_non_retryable: exception types that are a business "no" (never retried), in
            addition to :class:`~sagaway.NonRetryableError`.
        saga_reply_retries: how often the task is re-run (by ``self.retry``) when its
            reply cannot be published; with ``saga_db`` the re-run re-sends the recorded
            reply.
    """

    acks_late = True
    reject_on_worker_lost = True
    # Celery checks a call's arguments against the function when it sends one; a retry
    # re-sends the saga's ``_sagaway`` keyword, which the function does not take.
    typing = False
    saga_db: str | None = None
    saga_non_retryable: tuple[type[BaseException], ...] = ()
    saga_reply_retries = 10
    _saga_inbox: _Inbox | _PostgresInbox | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        meta = kwargs.pop(META_KWARG, None)
        if meta is None:
            return super().__call__(*args, **kwargs)
        call = _Call.parse(meta)
        redelivered = bool((getattr(self.request, "delivery_info", None) or {})
                           .get("redelivered"))
        if self.saga_db:
            if self._saga_inbox is None or self._saga_inbox.url != self.saga_db:
                self._saga_inbox = _open_inbox(self.saga_db)
            if isinstance(self._saga_inbox, _PostgresInbox):
                return self._run_with_postgres(call, self._saga_inbox, args, kwargs)
            return self._run_with_inbox(call, self._saga_inbox, args, kwargs)
        return self._run_plain(call, args, kwargs, redelivered)

    # -- outcomes -------------------------------------------------------------------------

    def _business_no(self, exc: BaseException) -> bool:
        return isinstance(exc, (NonRetryableError, *self.saga_non_retryable))

    def _send(self, call: _Call, reply: Mapping[str, Any], *, recorded: bool) -> None:
        message_id, body = call.reply_body(reply)
        try:
            _replies.send(self.app, call.reply_to, message_id, body)
        except Exception as exc:
            log.warning("saga task %s (%s): the reply to %s could not be published: %s",
                        self.name, call.correlation_id, call.reply_to, exc)
            if recorded or reply.get("ok"):
                # Run again (with the inbox: only to re-send what it recorded).
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc
            raise
        log.debug("saga task %s (%s): replied %s", self.name, call.correlation_id,
                  "ok" if reply.get("ok") else "failed")

    def _run_plain(self, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any],
                   redelivered: bool) -> Any:
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, None, None, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            raise
        except SoftTimeLimitExceeded as exc:
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            no = self._business_no(exc)
            # Without an inbox a "no" cannot vouch for an earlier attempt that may have run.
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": not no,
                              "maybe_applied": no and (call.attempt > 1 or redelivered)},
                       recorded=False)
            raise
        finally:
            _current.reset(token)
        try:
            reply = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply = {"ok": False, "error": str(exc), "retryable": False,
                     "maybe_applied": True}
        self._send(call, reply, recorded=False)
        return result

    def _run_with_inbox(self, call: _Call, inbox: _Inbox, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        conn = inbox.connection()
        try:
            recorded, args, applied = self._claim(conn, call, args)
        except sqlite3.Error as exc:
            _rollback(conn)
            # The inbox is unusable for now (locked past busy_timeout, disk): run again later.
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        if recorded is not None:  # done before: answer the same again, do not run
            self._send(call, recorded, recorded=True)
            return recorded.get("result")
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, conn, applied, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            _rollback(conn)
            raise
        except SoftTimeLimitExceeded as exc:
            _rollback(conn)
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            if self._business_no(exc):
                # A business "no": its writes undone, the answer recorded for every retry.
                failure = {"ok": False, "error": _describe(exc), "retryable": False}
                self._commit(conn, call, failure, undo=True)
                self._send(call, failure, recorded=True)
                raise
            _rollback(conn)  # not recorded: the next attempt runs the task again
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True},
                       recorded=False)
            raise
        except BaseException:
            _rollback(conn)
            raise
        finally:
            _current.reset(token)
        undo = False
        try:
            reply: dict[str, Any] = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply, undo = {"ok": False, "error": str(exc), "retryable": False}, True
        self._commit(conn, call, reply, undo=undo)
        self._send(call, reply, recorded=True)
        return result

    @staticmethod
    def _claim(conn: sqlite3.Connection, call: _Call, args: tuple[Any, ...]
               ) -> tuple[dict[str, Any] | None, tuple[Any, ...], bool | None]:
        """Begin and lock; the recorded reply, or the arguments and ``action_applied``."""
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT reply FROM sagaway_inbox WHERE idempotency_key = ?",
                           (call.key,)).fetchone()
        if row is not None:
            conn.execute("COMMIT")
            recorded: dict[str, Any] = json.loads(row[0])
            return recorded, args, None
        applied = None
        if call.compensation:
            action_key = call.key.removesuffix(":compensation") + ":action"
            action = conn.execute("SELECT reply FROM sagaway_inbox WHERE idempotency_key = ?",
                                  (action_key,)).fetchone()
            if action is None:
                # Fence: an action delivered after its compensation is never applied.
                conn.execute("INSERT INTO sagaway_inbox VALUES (?, ?, ?)",
                             (action_key, json.dumps(_FENCED_ACTION), time.time()))
                applied = False
            else:
                done = json.loads(action[0])
                applied = bool(done.get("ok"))
                if applied and args and args[0] is None:
                    # The orchestrator never heard the action's result; the inbox did.
                    args = (done.get("result"), *args[1:])
        conn.execute("SAVEPOINT sagaway_task")
        return None, args, applied

    def _commit(self, conn: sqlite3.Connection, call: _Call, reply: Mapping[str, Any], *,
                undo: bool) -> None:
        """Record ``reply`` for the key and commit (after undoing the task's writes)."""
        if not conn.in_transaction:
            error = ("the task ended its inbox transaction (COMMIT or ROLLBACK on "
                     "saga_context().db), so its changes were not recorded with its key; "
                     "leave committing to sagaway")
            self._send(call, {"ok": False, "error": error, "retryable": False,
                              "maybe_applied": True}, recorded=False)
            raise CeleryIntegrationError(error)
        try:
            if undo:
                conn.execute("ROLLBACK TO sagaway_task")
            conn.execute("INSERT INTO sagaway_inbox VALUES (?, ?, ?)",
                         (call.key, json.dumps(reply, separators=(",", ":")), time.time()))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc

    def _run_with_postgres(self, call: _Call, inbox: _PostgresInbox, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        fence = None
        if call.compensation:
            fence = (call.key.removesuffix(":compensation") + ":action", _FENCED_ACTION)
        try:
            scope = inbox.transaction()
            tx = inbox.run(scope.__aenter__())
        except (StoreError, TimeoutError) as exc:
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        try:
            return self._in_postgres_tx(call, inbox, tx, fence, args, kwargs)
        finally:
            with contextlib.suppress(Exception):
                inbox.run(scope.__aexit__(None, None, None), timeout=30)

    def _in_postgres_tx(self, call: _Call, inbox: _PostgresInbox, tx: Any,
                        fence: tuple[str, dict[str, Any]] | None, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        def commit(reply: Mapping[str, Any] | None, *, undo: bool,
                   answer: Mapping[str, Any]) -> None:
            try:
                inbox.run(tx.commit(call.key, None if reply is None else dict(reply),
                                    undo=undo, messages=[
                                        (call.reply_to, call.reply_body(answer)[1].decode())]))
            except (StoreError, TimeoutError) as exc:
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc
            try:
                inbox.flush(self.app)
            except Exception as exc:  # recorded: a re-run publishes it from the outbox
                log.warning("saga task %s (%s): publishing its reply failed: %s", self.name,
                            call.correlation_id, exc)
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc

        try:
            recorded = inbox.run(tx.claim(call.key, fence=fence))
        except (StoreError, TimeoutError) as exc:
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        if recorded is not None:  # done before: answer the same again, do not run
            commit(None, undo=False, answer=recorded)
            return recorded.get("result")
        applied = None
        if call.compensation:
            action = inbox.run(tx.connection.fetchval(
                "SELECT reply::text FROM sagaway_inbox WHERE idempotency_key = $1",
                call.key.removesuffix(":compensation") + ":action"))
            done = json.loads(action) if action else {}
            applied = bool(done.get("ok"))
            if applied and args and args[0] is None:
                args = (done.get("result"), *args[1:])
        db = inbox.sync_connection(tx.connection)
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, db, applied, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            raise
        except SoftTimeLimitExceeded as exc:
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            if self._business_no(exc):
                failure = {"ok": False, "error": _describe(exc), "retryable": False}
                commit(failure, undo=True, answer=failure)
                raise
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True},
                       recorded=False)
            raise
        finally:
            db._live = False
            _current.reset(token)
        undo = False
        try:
            reply: dict[str, Any] = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply, undo = {"ok": False, "error": str(exc), "retryable": False}, True
        commit(reply, undo=undo, answer=reply)
        return result

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """A hard time limit: the worker's parent process reports it (the child is gone)."""
        super().on_failure(exc, task_id, args, kwargs, einfo)
        if not isinstance(exc, TimeLimitExceeded) or not isinstance(kwargs, dict):
            return
        meta = kwargs.get(META_KWARG)
        if meta is None:
            return
        try:
            call = _Call.parse(meta)
            message_id, body = call.reply_body(
                {"ok": False, "error": _describe(exc) + " (hard time limit: the task was "
                 "killed mid-way and may have taken effect)", "retryable": True,
                 "maybe_applied": True})
            _replies.send(self.app, call.reply_to, message_id, body)
        except Exception as err:  # the step's deadline covers a lost reply
            log.warning("saga task %s (%s): could not report its hard time limit: %s",
                        self.name, task_id, err)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def saga_task(app: Any, *, db: str | None = None,
              non_retryable: Iterable[type[BaseException]] = (),
              **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Declare a Celery task that can run as a saga step: ``@saga_task(app, name=…)``.

    ``app.task(base=SagaTask, acks_late=True, reject_on_worker_lost=True, **options)`` with
    ``db`` (``sqlite:///path.db`` or ``postgresql://…``: effects written through
    ``saga_context().db`` are applied exactly once) and ``non_retryable`` (exception types
    that are a business "no"). Any Celery task option works (``name``, ``bind``,
    ``autoretry_for``, ``time_limit``, …).

    Raises:
        CeleryIntegrationError: ``db`` is neither a ``sqlite:///`` nor a ``postgresql://``
            URL (or asyncpg is missing for the latter).
    """
    if db is not None:
        _open_inbox(db)  # validate the URL now, not at the first task (connects lazily)
    options.setdefault("acks_late", True)
    options.setdefault("reject_on_worker_lost", True)
    base = options.pop("base", SagaTask)
    if not (isinstance(base, type) and issubclass(base, SagaTask)):
        raise CeleryIntegrationError(f"saga_task's base must subclass SagaTask, got {base!r}")

    def register(fn: Callable[..., Any]) -> Any:
        return app.task(base=base, saga_db=db, saga_non_retryable=tuple(non_retryable),
                        **options)(fn)

    return register
