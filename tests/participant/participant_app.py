"""A participant process for the crash test (tests/participant/test_participant_process.py).

    python participant_app.py --db URL --broker URL --service NAME [--sync] [--die-on-reply]

Serves the shop's ``reserve`` command (see participant_helpers.Shop) until SIGTERM, then
stops gracefully (exit 0). Prints ``ready`` once it takes commands. With ``--die-on-reply``
it SIGKILLs itself when its relay is about to publish a reply: the reply is committed in
the outbox, and never reaches the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from participant_helpers import PostgresShop, Shop, SQLiteShop

from sagaway.messaging import open_transport
from sagaway.messaging.base import Handler, Subscription, Transport
from sagaway.participant import Participant


class DyingTransport(Transport):
    """Another transport, except that the process dies (SIGKILL) on publishing a reply."""

    def __init__(self, inner: Transport) -> None:
        super().__init__()
        self.inner = inner
        self.url = inner.url

    async def _connect(self) -> None:
        await self.inner.open()

    async def _disconnect(self) -> None:
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        if destination.endswith(".replies"):
            os.kill(os.getpid(), signal.SIGKILL)
        await self.inner._publish(destination, body, message_id=message_id)

    async def _subscribe(
        self, source: str, handler: Handler, *, prefetch: int, max_deliveries: int, dead_letter: str
    ) -> Subscription:
        return await self.inner._subscribe(
            source,
            handler,
            prefetch=prefetch,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
        )


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--die-on-reply", action="store_true")
    args = parser.parse_args()
    shop: Shop
    if args.db.startswith("sqlite:///"):
        shop = SQLiteShop(args.db.removeprefix("sqlite:///"))
    else:
        shop = PostgresShop(args.db)
    transport = open_transport(args.broker)
    if args.die_on_reply:
        transport = DyingTransport(transport)
    participant = Participant(args.service, transport, shop.db_url)
    shop.register(participant, sync=args.sync)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, participant.stop)
    await participant.open()
    print("ready", flush=True)
    await participant.run()  # already open: serves until SIGTERM, then closes
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
