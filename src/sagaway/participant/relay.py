"""The participant's outbox relay: publishes committed replies, marks them sent.

A reply is written to the outbox in the transaction that applied its command, so it cannot
be lost between the commit and the publish. The relay publishes unsent rows with broker
confirmation and only then marks them sent. It is woken after each commit and also polls,
so rows left by a crash (committed, never published) go out when the participant starts
again, and rows another process committed to a shared database go out too. A row can be
published twice (a crash after the broker's confirm, before marking it sent): the
orchestrator ignores a reply for a step that is no longer waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from sagaway.messaging.base import Transport
from sagaway.messaging.envelope import Envelope
from sagaway.participant.base import Database, OutboxRow

__all__ = ["OutboxRelay"]

log = logging.getLogger("sagaway.participant")


class OutboxRelay:
    """Publishes a participant database's outbox on a transport.

    Args:
        interval: seconds between polls when nothing wakes it.
        batch: rows per pass; a pass publishes them concurrently.
        retention: seconds sent rows are kept before they are deleted (``None``: kept).
        max_backoff: longest wait between attempts while publishing fails.
    """

    def __init__(
        self,
        db: Database,
        transport: Transport,
        *,
        interval: float = 1.0,
        batch: int = 100,
        retention: float | None = 3600.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.db = db
        self.transport = transport
        self.interval = interval
        self.batch = batch
        self.retention = retention
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failed = False
        self._purged_at = 0.0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Publish soon: a reply was just committed."""
        self._wake.set()

    def start(self) -> None:
        """Start relaying in a task (the first pass publishes what a crash left behind)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="sagaway-participant-relay")

    async def stop(self, *, grace: float | None = 10.0) -> None:
        """Publish what is pending, for up to ``grace`` seconds, then stop. Idempotent.

        Rows still unsent stay in the outbox for the next start.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, grace)
        except TimeoutError:
            log.warning(
                "outbox relay: stopped after %ss with replies unpublished; they "
                "go out when the participant starts again",
                grace,
            )

    async def flush(self) -> int:
        """One pass: publish up to ``batch`` unsent rows. Returns how many were pending."""
        self._failed = False
        return await self.db.flush_outbox(self._send, limit=self.batch)

    async def _send(self, rows: Sequence[OutboxRow]) -> list[int]:
        results = await asyncio.gather(
            *(self._publish(row) for row in rows), return_exceptions=True
        )
        sent = []
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                self._failed = True
                log.warning(
                    "outbox relay: publishing reply %d to %s failed, will retry: %s",
                    row.id,
                    row.destination,
                    result,
                )
            else:
                sent.append(row.id)
        return sent

    async def _publish(self, row: OutboxRow) -> None:
        # The envelope (and its id) is the one committed: a republish is the same message.
        envelope = Envelope.from_bytes(row.body.encode("utf-8"))
        await self.transport.publish(row.destination, envelope)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            self._wake.clear()
            try:
                pending = await self.flush()
            except Exception as exc:
                log.warning("outbox relay: reading the outbox failed, will retry: %s", exc)
                self._failed, pending = True, 0
            if self._failed:
                if self._stopping:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05
            if pending >= self.batch:
                continue  # more are waiting
            if self._stopping:
                return
            await self._purge()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def _purge(self) -> None:
        now = time.time()
        if self.retention is None or now - self._purged_at < 60.0:
            return
        self._purged_at = now
        try:
            await self.db.purge_sent(now - self.retention)
        except Exception as exc:
            log.warning("outbox relay: deleting sent replies failed: %s", exc)
