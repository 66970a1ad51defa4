"""examples/ecommerce/celery_variant against a real ``celery worker`` and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Names

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


async def test_the_celery_example_places_its_orders(amqp_url: str, names: Names,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shop_db = tmp_path / "shop.db"
    env = {**os.environ, "CELERY_BROKER_URL": amqp_url, "SHOP_QUEUE": names.queue,
           "SHOP_DB": str(shop_db),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.ecommerce.celery_variant.tasks",
             "worker", "-Q", names.queue, "-c", "1", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "INFO", "-n", f"example-{names.tag}@%h"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        sys.path.insert(0, str(ROOT))
        try:
            from examples.ecommerce.celery_variant import orders
        finally:
            sys.path.remove(str(ROOT))
        outcome = await orders.place(orders.ORDERS, store=f"sqlite:///{tmp_path / 'o.db'}",
                                     broker=amqp_url, reply_to=names.replies)
    finally:
        worker.terminate()
        worker.wait(30)

    status = {order_id: s for order_id, s, _ in outcome}
    assert status == {"o-1": "COMPLETED", "o-2": "COMPENSATED", "o-3": "COMPENSATED"}
    assert outcome[0][2]["tracking"] == "TRK-o-1"
    assert "card declined" in outcome[1][2]
    with closing(sqlite3.connect(shop_db)) as conn:
        (qty,) = conn.execute("SELECT qty FROM stock WHERE sku = 'book'").fetchone()
        ledger = conn.execute("SELECT order_id, what FROM ledger ORDER BY rowid").fetchall()
    assert qty == 99  # o-1 keeps its book; o-2 and o-3 gave theirs back
    assert ledger == [("o-1", "charge"), ("o-3", "charge"), ("o-3", "refund")]
