"""An in-process transport: for tests and the embedded default.

Messages live in a :class:`MemoryBroker` (one per transport unless you share one), so they
last as long as the process. Delivery, redelivery, prefetch and dead-lettering follow the
same rules as the broker-backed transports, and it passes the same conformance suite.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from sagaway.messaging.base import Handler, InFlight, Subscription, Transport, settle

__all__ = ["MemoryBroker", "MemoryTransport"]


@dataclass(slots=True)
class _Message:
    body: bytes
    message_id: str | None
    deliveries: int = 0


class _Queue:
    def __init__(self) -> None:
        self.ready: deque[_Message] = deque()
        self.unacked = 0
        self.changed = asyncio.Condition()

    async def put(self, message: _Message) -> None:
        async with self.changed:
            self.ready.append(message)
            self.changed.notify_all()


class MemoryBroker:
    """The destinations of one or more :class:`MemoryTransport` s (pass the same broker to
    several transports to connect them)."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def depth(self, destination: str) -> tuple[int, int]:
        """(ready, unacked) message counts of ``destination``."""
        queue = self._queues.get(destination)
        return (len(queue.ready), queue.unacked) if queue else (0, 0)

    def destinations(self) -> list[str]:
        return sorted(self._queues)


class MemoryTransport(Transport):
    """A transport whose broker is a Python object in this process.

    Args:
        broker: share one between transports to let them talk; a fresh one by default.
    """

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        super().__init__()
        self.url = "memory://"
        self.broker = broker if broker is not None else MemoryBroker()

    async def _connect(self) -> None:
        pass

    async def _disconnect(self) -> None:
        pass

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        await self.broker._queue(destination).put(_Message(body, message_id))

    async def _subscribe(
        self,
        source: str,
        handler: Handler,
        *,
        prefetch: int,
        max_deliveries: int,
        dead_letter: str,
    ) -> Subscription:
        sub = _MemorySubscription(
            self, handler, source=source, dead_letter=dead_letter, prefetch=prefetch,
            max_deliveries=max_deliveries,
        )
        sub.start()
        return sub


class _MemorySubscription(Subscription):
    def __init__(
        self,
        transport: MemoryTransport,
        handler: Handler,
        *,
        source: str,
        dead_letter: str,
        prefetch: int,
        max_deliveries: int,
    ) -> None:
        super().__init__(source=source, dead_letter=dead_letter, prefetch=prefetch,
                         max_deliveries=max_deliveries)
        self._transport = transport
        self._handler = handler
        self._queue = transport.broker._queue(source)
        self._inflight = InFlight(prefetch)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sagaway-consume-{self.source}")

    async def _run(self) -> None:
        queue = self._queue
        while not self._stopped:
            await self._inflight.wait_free()
            async with queue.changed:
                await queue.changed.wait_for(lambda: bool(queue.ready) or self._stopped)
                if self._stopped:
                    return
                message = queue.ready.popleft()
                queue.unacked += 1
            message.deliveries += 1
            self._inflight.spawn(self._handle(message))

    async def _handle(self, message: _Message) -> None:
        try:
            verdict = await settle(
                self._handler,
                source=self.source,
                body=message.body,
                attempt=message.deliveries,
                max_deliveries=self.max_deliveries,
                max_bytes=self._transport.max_message_bytes,
            )
        except asyncio.CancelledError:
            # Like a broker with the unacked messages of a consumer that went away.
            async with self._queue.changed:
                self._queue.unacked -= 1
                self._queue.ready.appendleft(message)
                self._queue.changed.notify_all()
            raise
        if verdict.dead_letter is not None:
            body = self._transport._dead_letter_body(verdict.dead_letter)
            await self._transport.broker._queue(self.dead_letter).put(_Message(body, None))
        async with self._queue.changed:
            self._queue.unacked -= 1
            if not verdict.ack:
                self._queue.ready.append(message)
            self._queue.changed.notify_all()

    async def _stop(self) -> None:
        async with self._queue.changed:
            self._queue.changed.notify_all()
        if self._task is not None:
            await self._task
        await self._inflight.drain(self._grace)
