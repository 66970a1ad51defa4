"""The bank example as real processes: two banks (participants taking RabbitMQ commands,
each with its own database) and the transfer service running the saga.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from examples.bank_transfer.system import BankSystem

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[BankSystem]:
    system = BankSystem(tmp_path_factory.mktemp("bank"), amqp_url)
    try:
        with system:
            yield system
    finally:
        asyncio.run(system.delete_queues())


def statuses(t: dict[str, Any]) -> dict[str, str]:
    return {name: s["status"] for name, s in t["steps"].items()}


def db_total(system: BankSystem) -> int:
    total = 0
    for name in ("a", "b"):
        path = system.workdir / f"bank-{name}.db"
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            total += conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
    return total


def test_transfers_and_refusals(bank: BankSystem) -> None:
    ids = {
        "ok": bank.place(bank.transfer(amount=1000)),
        "ok-2": bank.place(bank.transfer(from_account="A-2", to_account="B-2", amount=777)),
        "credit": bank.place(bank.transfer(fail_at="credit", amount=5000)),
        "debit": bank.place(bank.transfer(fail_at="debit")),
        "no-account": bank.place(bank.transfer(to_account="B-404")),
    }
    done = bank.wait(ids.values(), timeout=60)
    t = {name: done[i] for name, i in ids.items()}
    assert t["ok"]["status"] == t["ok-2"]["status"] == "COMPLETED"
    assert t["ok"]["results"] == {"debit": {"debited": 1000, "account": "A-1"},
                                  "credit": {"credited": 1000, "account": "B-1"}}  # fmt: skip

    closed = t["credit"]
    assert closed["status"] == "COMPENSATED"
    assert "account B-CLOSED is closed" in closed["error"]
    assert statuses(closed) == {"debit": "COMPENSATED", "credit": "FAILED"}
    assert "no account 'B-404'" in t["no-account"]["error"]

    poor = t["debit"]
    assert poor["status"] == "COMPENSATED"
    assert "insufficient funds in A-POOR" in poor["error"]

    report = bank.check()
    assert report.problems == []
    assert report.total_after == report.total_before == db_total(bank)
    balances = bank.balances()
    assert balances["b"]["B-1"] >= 1000 and balances["b"]["B-CLOSED"] == 0


def test_money_is_conserved_at_every_quiescent_point(bank: BankSystem) -> None:
    for round_ in range(3):
        bodies = [
            bank.transfer(fail_at="credit" if n % 4 == 0 else None, amount=100 + n + round_)
            for n in range(12)
        ]
        ids = [bank.place(b) for b in bodies]
        finished = bank.wait(ids, timeout=60)
        assert [finished[i]["status"] for i in ids].count("COMPENSATED") == 3
        report = bank.check()  # every transfer of the module so far
        assert report.problems == [], round_
        assert db_total(bank) == report.total_before


def test_bank_b_killed_with_transfers_in_flight(amqp_url: str, tmp_path: Path) -> None:
    system = BankSystem(tmp_path, amqp_url)
    try:
        with system:
            ids = [system.place(system.transfer(amount=10 + n,
                                                fail_at="credit" if n % 5 == 0 else None))
                   for n in range(30)]  # fmt: skip
            system.banks["b"].kill()
            ids += [system.place(system.transfer(amount=50 + n)) for n in range(10)]
            time.sleep(0.5)
            system.banks["b"].start()
            system.banks["b"].wait_ready()
            done = system.wait(ids, timeout=90)
            report = system.check(done)
            assert report.problems == []
            assert len(report.compensated) == 6
            assert len(report.completed) == 34
    finally:
        asyncio.run(system.delete_queues())
