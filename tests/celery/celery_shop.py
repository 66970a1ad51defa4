"""The Celery app the tests' worker processes run (``celery -A celery_shop worker``).

Five tasks of a shop — ``shop.reserve``/``shop.release``, ``shop.pay``/``shop.refund``,
``shop.ship`` — declared with :func:`~sagaway.integrations.celery.saga_task` over one SQLite
file (``SHOP_LEDGER``) that holds both the inbox and the ``effects`` ledger. Every task
writes one ledger row per call, keyed by its idempotency key, through
``saga_context().db``, with **no unique constraint**: an effect applied twice shows up as
two rows.

The order (the run's input, or the previous task's result in a chain) steers the tasks:
``{"fail": "pay"}`` makes ``pay`` say no (NonRetryableError); ``{"crash_once": "pay"}``
makes ``pay`` write its row, touch ``<ledger>.<step>.started`` and sleep until killed
(only the first time: a redelivery goes straight through); ``{"retries": {"pay": 2}}``
makes ``pay`` call ``self.retry`` twice before it succeeds; ``{"soft": "pay"}`` makes it
overrun its soft time limit; ``{"ignore": "pay"}`` makes it raise Celery's ``Ignore`` (no
reply ever comes). ``SHOP_KILL_BEFORE_REPLY=pay`` in the worker's environment
SIGKILLs the worker once, after ``pay`` committed and before its reply is published.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import Ignore

from sagaway import NonRetryableError
from sagaway.integrations.celery import saga_context, saga_task

BROKER = os.environ.get("SHOP_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
LEDGER = os.environ.get("SHOP_LEDGER", "/tmp/sagaway-celery-shop.db")
DB = os.environ.get("SHOP_DB_URL") or f"sqlite:///{LEDGER}"
"""The inbox and the ledger: the SQLite file, or a PostgreSQL database (``SHOP_DB_URL``, the
``effects`` table created beforehand by the test)."""

app = Celery("celery_shop", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)


def _ledger(task: str, order: Any, *, extra: str = "") -> None:
    ctx = saga_context()
    assert ctx.db is not None
    order_id = order.get("id") if isinstance(order, dict) else None
    row = (ctx.idempotency_key, task, order_id, extra, time.time())
    if isinstance(ctx.db, sqlite3.Connection):
        ctx.db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT, task TEXT, "
                       "order_id TEXT, extra TEXT, at REAL)")
        ctx.db.execute("INSERT INTO effects VALUES (?, ?, ?, ?, ?)", row)
    else:  # PostgreSQL: asyncpg's methods, run inside the inbox transaction
        ctx.db.execute("INSERT INTO effects VALUES ($1, $2, $3, $4, $5)", *row)


def _steer(task: str, order: Any) -> None:
    if not isinstance(order, dict):
        return
    if order.get("fail") == task:
        raise NonRetryableError(f"{task} declined order {order.get('id')}")
    if order.get("crash_once") == task:
        marker = Path(f"{LEDGER}.{saga_context().idempotency_key.replace(':', '_')}.started")
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(60)  # the test SIGKILLs the worker here
    if order.get("soft") == task:
        time.sleep(5)  # past the soft time limit the test sets
    if order.get("ignore") == task:
        raise Ignore()  # no outcome: only the step's deadline can decide


def _kill_before_reply(step: str) -> None:
    """Test hook: SIGKILL this worker (parent and children) right before the first reply of
    ``step``'s action is published — after the task's transaction committed."""
    import json
    import signal

    from sagaway.integrations import celery as integration

    send = integration._replies.send

    def send_or_die(app: Any, destination: str, message_id: str, body: bytes) -> None:
        correlation = json.loads(body).get("correlation_id", "")
        marker = Path(f"{LEDGER}.killed-before-reply")
        if f":{step}:action:" in correlation and not marker.exists():
            marker.write_text(correlation)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        send(app, destination, message_id, body)

    integration._replies.send = send_or_die  # type: ignore[method-assign]


if os.environ.get("SHOP_KILL_BEFORE_REPLY"):
    _kill_before_reply(os.environ["SHOP_KILL_BEFORE_REPLY"])


@saga_task(app, name="shop.reserve", db=DB)
def reserve(order: dict[str, Any]) -> dict[str, Any]:
    _steer("reserve", order)
    _ledger("reserve", order)
    return {**order, "reservation": f"r-{order.get('id')}"}


@saga_task(app, name="shop.release", db=DB)
def release(result: dict[str, Any] | None, order: dict[str, Any]) -> None:
    _ledger("release", order, extra="known" if result else "unknown")


@saga_task(app, name="shop.pay", db=DB, bind=True, max_retries=5)
def pay(self: Any, order: dict[str, Any]) -> dict[str, Any]:
    _steer("pay", order)
    wanted = (order.get("retries") or {}).get("pay", 0)
    if self.request.retries < wanted:
        raise self.retry(countdown=0.1)
    _ledger("pay", order, extra=str(self.request.retries))
    return {**order, "payment": f"p-{order.get('id')}"}


@saga_task(app, name="shop.refund", db=DB)
def refund(result: dict[str, Any] | None, order: dict[str, Any]) -> None:
    _ledger("refund", order, extra="known" if result else "unknown")


@saga_task(app, name="shop.ship", db=DB)
def ship(order: dict[str, Any]) -> dict[str, Any]:
    _steer("ship", order)
    _ledger("ship", order)
    return {**order, "shipment": f"s-{order.get('id')}"}
