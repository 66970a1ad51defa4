"""The transfer saga: debit in bank A, credit in bank B, over RabbitMQ commands.

::

    debit   command "debit" to bank-a     undo: "reverse_debit" to bank-a
    credit  command "credit" to bank-b    the pivot: done once it succeeds

A credit bank B refuses (a closed account) reverses the debit: no money is created or
lost; once no transfer is in flight, the two banks together hold what they started with.

Import :data:`transfer` (queues ``bank-a``, ``bank-b``), :func:`make_saga` (other queue
names) and :func:`build_orchestrator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from sagaway import Listener, Orchestrator, RetryPolicy, Saga

__all__ = ["STEPS", "TransferIn", "build_orchestrator", "make_saga", "transfer"]

STEPS = ("debit", "credit")
TIMEOUT = 10.0
RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=5.0)


class TransferIn(BaseModel):
    """What ``POST /transfers`` takes (the run's input and the commands' payload)."""

    from_account: str = "A-1"
    to_account: str = "B-1"
    amount: int = Field(default=2500, gt=0, description="cents")


def make_saga(source: str = "bank-a", target: str = "bank-b") -> Saga:
    """The transfer saga, its debit sent to queue ``source``, its credit to ``target``."""
    saga = Saga("transfer", description="debit one bank, credit the other")
    saga.command_step(
        "debit", service=source, command="debit", compensation="reverse_debit",
        timeout=TIMEOUT, retry=RETRY,
    )  # fmt: skip
    # The pivot: once the money is credited the transfer is done (nothing after it fails).
    saga.command_step(
        "credit", service=target, command="credit", timeout=TIMEOUT, retry=RETRY, pivot=True
    )
    return saga


transfer = make_saga()


def build_orchestrator(
    store: str = "sqlite:///transfers.db",
    transport: str = "amqp://guest:guest@127.0.0.1:5672/",
    *,
    saga: Saga = transfer,
    reply_to: str = "transfers.replies",
    listeners: Iterable[Listener] = (),
    **options: Any,
) -> Orchestrator:
    """An orchestrator that runs ``saga``, sending its commands over ``transport``."""
    return Orchestrator(
        store, sagas=[saga], transport=transport, reply_to=reply_to, listeners=listeners,
        **options,
    )  # fmt: skip
