"""The service side of message-driven saga steps: command handlers with an inbox.

::

    from sagaway.participant import Command, Participant

    inventory = Participant("inventory", "amqp://guest:guest@127.0.0.1/",
                            db="sqlite:///inventory.db")

    @inventory.handler("reserve")
    def reserve(cmd: Command) -> dict[str, int]:
        cmd.db.execute("UPDATE stock SET qty = qty - 1 WHERE sku = ?", (cmd.payload["sku"],))
        return {"reserved": 1}

    await inventory.run()

Each command is applied once (its idempotency key is recorded in the ``sagaway_inbox``
table in the same transaction as the handler's changes) and answered through an outbox
(``sagaway_participant_outbox``), so no reply is lost to a crash. The databases:
:class:`~sagaway.participant.sqlite.SQLiteDatabase` (stdlib) and
:class:`~sagaway.participant.postgres.PostgresDatabase` (the ``[postgres]`` extra).
"""

from __future__ import annotations

from sagaway.participant.base import Database, OutboxRow, Transaction, open_database
from sagaway.participant.core import REPLY_TYPE, Command, CommandRejected, Participant
from sagaway.participant.relay import OutboxRelay
from sagaway.participant.sqlite import AsyncSQLiteConnection, SQLiteDatabase

__all__ = [
    "REPLY_TYPE",
    "AsyncSQLiteConnection",
    "Command",
    "CommandRejected",
    "Database",
    "OutboxRelay",
    "OutboxRow",
    "Participant",
    "SQLiteDatabase",
    "Transaction",
    "open_database",
]
