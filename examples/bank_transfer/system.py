"""The bank system as processes: two banks and the transfer service, over RabbitMQ.

Used by ``sagaway demo bank`` and the tests. Queue names get a fresh suffix per system, so
several can share one broker; :meth:`BankSystem.delete_queues` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from examples.bank_transfer.bank import ACCOUNTS, CLOSED
from examples.launch import SagaFront, Service, System

__all__ = ["FAILING_TRANSFERS", "BankSystem", "Invariants", "amqp_problem"]

FAILING_TRANSFERS: dict[str, dict[str, Any]] = {
    "debit": {"from_account": "A-POOR"},  # 100 cents: not enough
    "credit": {"to_account": "B-CLOSED"},  # a closed account
}


@dataclass
class Invariants:
    completed: set[str]
    compensated: set[str]
    total_before: int
    total_after: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def amqp_problem(url: str) -> str | None:
    """Why RabbitMQ at ``url`` cannot be used, or ``None`` when it answers."""
    try:
        import aio_pika
    except ImportError:
        return "aio-pika is not installed: pip install 'sagaway[rabbitmq]'"
    quiet = [logging.getLogger(name) for name in ("aio_pika", "aiormq")]
    levels = [log.level for log in quiet]
    for log in quiet:  # the error is reported once, by the caller
        log.setLevel(logging.CRITICAL)
    try:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()
    except Exception as exc:
        return f"cannot reach RabbitMQ at {url}: {exc}"
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return None


class BankSystem(System):
    """Banks ``a`` and ``b`` and the transfer service in ``workdir``, over ``amqp_url``."""

    def __init__(
        self, workdir: Path, amqp_url: str, *, db_urls: dict[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.amqp_url = amqp_url
        tag = uuid.uuid4().hex[:8]
        self.queues = {"a": f"bank-a-{tag}", "b": f"bank-b-{tag}", "replies": f"replies-{tag}"}
        self.accounts = {name: dict(ACCOUNTS[name]) for name in ("a", "b")}
        urls = {n: f"sqlite:///{self.workdir / n}.db" for n in ("bank-a", "bank-b", "transfers")}
        urls.update(db_urls or {})
        self.db_urls = urls
        logs = self.workdir / "logs"
        self.banks = {
            name: Service(
                f"bank-{name}",
                "examples.bank_transfer.bank:from_env",
                log_dir=logs,
                env={
                    "BANK_NAME": name,
                    "BANK_DB": urls[f"bank-{name}"],
                    "BANK_QUEUE": self.queues[name],
                    "SAGAWAY_AMQP_URL": amqp_url,
                    "BANK_ACCOUNTS": json.dumps(self.accounts[name]),
                    "BANK_CLOSED": ",".join(sorted(CLOSED[name])),
                },
            )
            for name in ("a", "b")
        }
        self.transfers = Service(
            "transfers",
            "examples.bank_transfer.transfers:from_env",
            log_dir=logs,
            env={
                "TRANSFERS_DB": urls["transfers"],
                "SAGAWAY_AMQP_URL": amqp_url,
                "BANK_A_QUEUE": self.queues["a"],
                "BANK_B_QUEUE": self.queues["b"],
                "REPLY_QUEUE": self.queues["replies"],
            },
        )
        self.services = [*self.banks.values(), self.transfers]
        self.client = httpx.Client(timeout=30.0)
        self.front = SagaFront(self.transfers, "transfers", self.client)

    def stop(self) -> None:
        """Stop the processes and delete this system's queues from the broker."""
        super().stop()
        with contextlib.suppress(Exception):
            asyncio.run(self.delete_queues())

    async def delete_queues(self) -> None:
        """Remove this system's queues (and their dead-letter queues) from the broker."""
        import aio_pika

        connection = await aio_pika.connect(self.amqp_url, timeout=10)
        try:
            for name in self.queues.values():
                for queue in (name, f"{name}.dead-letter"):
                    with contextlib.suppress(Exception):
                        channel = await connection.channel()
                        await channel.queue_delete(queue)
                        await channel.close()
        finally:
            await connection.close()

    def transfer(self, fail_at: str | None = None, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"from_account": "A-1", "to_account": "B-1", "amount": 2500}
        if fail_at is not None:
            body.update(FAILING_TRANSFERS[fail_at])
        body.update(fields)
        return body

    def place(self, body: dict[str, Any], *, key: str | None = None) -> str:
        return self.front.place(body, key=key)

    def wait(self, ids: Iterable[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        return self.front.wait(ids, timeout)

    def balances(self) -> dict[str, dict[str, int]]:
        return {
            name: self.client.get(service.url + "/accounts").json()
            for name, service in self.banks.items()
        }

    def check(self, transfers: dict[str, dict[str, Any]] | None = None) -> Invariants:
        """At a quiescent point (every transfer finished): money conserved overall, each
        account moved by exactly its completed transfers."""
        # Default: every transfer placed through this system.
        if transfers is None:
            transfers = self.wait(self.front.placed)
        completed = {i for i, t in transfers.items() if t["status"] == "COMPLETED"}
        compensated = {i for i, t in transfers.items() if t["status"] == "COMPENSATED"}
        balances = self.balances()
        before = sum(sum(a.values()) for a in self.accounts.values())
        after = sum(sum(a.values()) for a in balances.values())
        report = Invariants(completed, compensated, before, after)
        other = {i: t["status"] for i, t in transfers.items() if i not in completed | compensated}
        if other:
            report.problems.append(f"transfers neither completed nor compensated: {other}")
        if before != after:
            report.problems.append(f"money not conserved: {before} before, {after} after")
        expected = {name: dict(accounts) for name, accounts in self.accounts.items()}
        for i in completed:
            t = transfers[i]["input"]
            expected["a"][t["from_account"]] -= t["amount"]
            expected["b"][t["to_account"]] += t["amount"]
        if expected != balances:
            report.problems.append(f"balances {balances} != {expected} (completed transfers)")
        return report
