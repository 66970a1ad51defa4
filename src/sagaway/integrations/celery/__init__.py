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

The modules: :mod:`~sagaway.integrations.celery.steps` (:func:`celery_step`,
:func:`saga_chain`), :mod:`~sagaway.integrations.celery.transport` (:class:`CeleryTransport`,
:func:`celery_task_message`) and :mod:`~sagaway.integrations.celery.worker` (:class:`SagaTask`,
:func:`saga_task`, the inboxes). Import from this package: its ``__all__`` is the API.
"""

from __future__ import annotations

# Checked before the modules below import celery, so a missing extra says how to install it.
try:
    import celery  # noqa: F401
    from celery import signals as celery_signals  # noqa: F401
    from celery.exceptions import (  # noqa: F401
        SoftTimeLimitExceeded,
        TaskPredicate,
        TimeLimitExceeded,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Celery integration needs celery: pip install 'sagaway[celery]'"
    ) from exc

from sagaway.integrations.celery._wire import META_KWARG
from sagaway.integrations.celery.steps import DEFAULT_QUEUE, ChainSaga, celery_step, saga_chain
from sagaway.integrations.celery.transport import CeleryTransport, celery_task_message
from sagaway.integrations.celery.worker import (
    CeleryIntegrationError,
    SagaTask,
    TaskContext,
    close_inboxes,
    saga_context,
    saga_task,
)

# Not API: the worker's internals that the tests reach (as they did before the split).
from sagaway.integrations.celery.worker import _Inbox as _Inbox
from sagaway.integrations.celery.worker import _open_inbox as _open_inbox
from sagaway.integrations.celery.worker import _PostgresInbox as _PostgresInbox
from sagaway.integrations.celery.worker import _replies as _replies

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
