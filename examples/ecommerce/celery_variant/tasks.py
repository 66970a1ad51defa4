"""The shop's Celery tasks: what your workers already run, made saga-ready.

Run a worker: ``celery -A examples.ecommerce.celery_variant.tasks worker -Q shop -c 2``.

Each task is declared with ``saga_task`` instead of ``app.task`` and writes its change
through ``saga_context().db``: the change and the inbox record (its idempotency key) commit
together, so a redelivered task (a worker died, a message was sent twice) is answered
from the inbox instead of running again.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from sagaway import NonRetryableError
from sagaway.integrations.celery import saga_context, saga_task

BROKER = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("SHOP_QUEUE", "shop")
DB = f"sqlite:///{os.environ.get('SHOP_DB', 'shop.db')}"

app = Celery("shop", broker=BROKER)
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True,
                broker_connection_retry_on_startup=True)


def _db() -> Any:
    db = saga_context().db
    db.execute("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INTEGER)")
    db.execute("INSERT OR IGNORE INTO stock VALUES ('book', 100)")
    db.execute("CREATE TABLE IF NOT EXISTS ledger (order_id TEXT, what TEXT, amount REAL, "
               "at REAL)")
    return db


@saga_task(app, name="inventory.reserve", db=DB)
def reserve(order: dict[str, Any]) -> dict[str, Any]:
    db = _db()
    (qty,) = db.execute("SELECT qty FROM stock WHERE sku = ?", (order["sku"],)).fetchone()
    if qty < order["qty"]:
        raise NonRetryableError(f"only {qty} {order['sku']} left")  # a business "no"
    db.execute("UPDATE stock SET qty = qty - ? WHERE sku = ?", (order["qty"], order["sku"]))
    return {**order, "reserved": order["qty"]}


@saga_task(app, name="inventory.release", db=DB)
def release(reserved: dict[str, Any] | None, order: dict[str, Any]) -> None:
    if saga_context().action_applied is False:
        return  # the reservation never happened here: nothing to give back
    _db().execute("UPDATE stock SET qty = qty + ? WHERE sku = ?", (order["qty"], order["sku"]))


@saga_task(app, name="payments.charge", db=DB, autoretry_for=(ConnectionError,),
           retry_backoff=True, max_retries=3)
def charge(order: dict[str, Any]) -> dict[str, Any]:
    if order.get("card") == "declined":
        raise NonRetryableError("card declined")
    _db().execute("INSERT INTO ledger VALUES (?, 'charge', ?, ?)",
                  (order["id"], order["amount"], time.time()))
    return {**order, "charged": order["amount"]}


@saga_task(app, name="payments.refund", db=DB)
def refund(charged: dict[str, Any] | None, order: dict[str, Any]) -> None:
    if saga_context().action_applied is False:
        return
    _db().execute("INSERT INTO ledger VALUES (?, 'refund', ?, ?)",
                  (order["id"], -order["amount"], time.time()))


@saga_task(app, name="shipping.ship", db=DB)
def ship(order: dict[str, Any]) -> dict[str, Any]:
    if order.get("address") == "nowhere":
        raise NonRetryableError("cannot ship there")
    return {**order, "tracking": f"TRK-{order['id']}"}
