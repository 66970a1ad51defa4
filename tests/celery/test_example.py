"""examples/ecommerce/celery_variant against a real ``celery worker`` and RabbitMQ."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
from celery_helpers import Names, Worker

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


async def test_the_celery_example_places_its_orders(amqp_url: str, names: Names,
                                                    tmp_path: Path, workers: list[Worker],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shop_db = tmp_path / "shop.db"
    env = {"CELERY_BROKER_URL": amqp_url, "SHOP_QUEUE": names.queue, "SHOP_DB": str(shop_db)}
    worker = Worker(broker=amqp_url, ledger=shop_db, queue=names.queue, name="example",
                    log_dir=tmp_path, env=env, app="examples.ecommerce.celery_variant.tasks",
                    path=ROOT)
    workers.append(worker)
    await asyncio.to_thread(worker.start)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("examples.ecommerce.celery_variant.tasks", None)
    sys.modules.pop("examples.ecommerce.celery_variant.orders", None)
    from examples.ecommerce.celery_variant import orders

    served = orders.orchestrator()  # what `sagaway worker --app …:orchestrator` loads
    assert [s.name for s in served.sagas] == ["place_order"]
    await served.store.aclose()
    outcome = await orders.place(orders.ORDERS, store=f"sqlite:///{tmp_path / 'o.db'}",
                                 broker=amqp_url, reply_to=names.replies)
    await asyncio.to_thread(worker.stop)

    status = {order_id: s for order_id, s, _ in outcome}
    assert status == {"o-1": "COMPLETED", "o-2": "COMPENSATED", "o-3": "COMPENSATED"}
    assert outcome[0][2]["tracking"] == "TRK-o-1"
    assert "card declined" in outcome[1][2]
    with closing(sqlite3.connect(shop_db)) as conn:
        (qty,) = conn.execute("SELECT qty FROM stock WHERE sku = 'book'").fetchone()
        ledger = conn.execute("SELECT order_id, what FROM ledger ORDER BY rowid").fetchall()
    assert qty == 99  # o-1 keeps its book; o-2 and o-3 gave theirs back
    assert ledger == [("o-1", "charge"), ("o-3", "charge"), ("o-3", "refund")]
