"""The transfer service: ``POST /transfers`` starts a transfer, ``GET /transfers/{id}``.

Run::

    TRANSFERS_DB=sqlite:///transfers.db SAGAWAY_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ \
    uvicorn --factory examples.bank_transfer.transfers:from_env --port 8020

``BANK_A_QUEUE`` / ``BANK_B_QUEUE`` (default ``bank-a``, ``bank-b``) and ``REPLY_QUEUE``
(default ``transfers.replies``) name the queues.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from examples.bank_transfer.saga import TransferIn, build_orchestrator, make_saga
from examples.sagaapi import create_saga_api


def from_env() -> FastAPI:
    saga = make_saga(os.environ.get("BANK_A_QUEUE", "bank-a"),
                     os.environ.get("BANK_B_QUEUE", "bank-b"))  # fmt: skip
    store = os.environ.get("TRANSFERS_DB", "sqlite:///transfers.db")
    amqp = os.environ.get("SAGAWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    reply_to = os.environ.get("REPLY_QUEUE", "transfers.replies")
    return create_saga_api(
        title="transfers",
        resource="transfers",
        saga=saga.name,
        model=TransferIn,
        build=lambda: build_orchestrator(
            store, amqp, saga=saga, reply_to=reply_to, poll_interval=0.5
        ),
    )
