"""Redis Streams transport (redis-py asyncio): consumer groups, XAUTOCLAIM, a dead-letter stream.

* A destination ``orders.reserve`` is the stream ``sagaway:orders.reserve``; an entry holds
  the message bytes (``body``) and its id. ``publish`` returns once ``XADD`` has answered:
  the entry is in the server's memory. How long it lasts there is the server's persistence
  setting (AOF with ``appendfsync always`` for durability across a Redis restart).
* Consumers of a source are one consumer group (``group``), created at the stream's start
  so entries added before anyone subscribed are delivered. A subscription reads new entries
  with ``XREADGROUP`` (only as many as it has free handler slots: the prefetch) and takes
  over, with ``XAUTOCLAIM``, entries pending longer than ``claim_idle`` with a consumer that
  died, and entries handed back after a handler failure. The attempt number is the entry's
  delivery count from ``XPENDING``.
* Ack is ``XACK`` + ``XDEL`` in one transaction, so settled entries do not pile up;
  dead-lettering is ``XADD`` to the dead-letter stream + ``XACK`` + ``XDEL``, also atomic. A
  handler that runs long keeps its entry with an ``XCLAIM … JUSTID`` heartbeat.
* After a lost connection, commands fail with TransportError and the subscription retries;
  after a restart that lost the data, it creates its group again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from typing import Any

from sagaway.errors import TransportError
from sagaway.messaging.base import (
    RETRY,
    Handler,
    InFlight,
    Subscription,
    Transport,
    Verdict,
    log,
    redact_url,
    scrub,
    settle,
)

try:
    import redis.asyncio
    import redis.exceptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Redis transport needs redis-py: pip install 'sagaway[redis]'") from exc

__all__ = ["RedisTransport"]

_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    OSError,
    asyncio.TimeoutError,
)
_GIVEN_BACK_IDLE_MS = 10**10
"""Idle time stamped on an entry handed back after a failure, so the next XAUTOCLAIM
(of any consumer) takes it at once."""


class RedisTransport(Transport):
    """A transport over Redis Streams (Redis 7 or later).

    Args:
        url: ``redis://host:6379/0`` (``redis://:password@host:6379/0``, ``rediss://…``).
        prefix: stream keys are ``prefix + destination``.
        group: the consumer group consumers of a source share.
        claim_idle: seconds an entry stays pending with a silent consumer before another
            consumer takes it over (running handlers send heartbeats well within it).
        poll_interval: how long one ``XREADGROUP`` blocks; also the most a ``stop()`` waits
            and the delay before a handed-back entry is tried again.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sagaway:",
        group: str = "sagaway",
        claim_idle: float = 30.0,
        poll_interval: float = 0.5,
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.group = group
        self.claim_idle = claim_idle
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self._redis: redis.asyncio.Redis | None = None

    def _fail(self, doing: str, exc: BaseException) -> TransportError:
        detail = scrub(str(exc) or type(exc).__name__, self.url)
        return TransportError(f"Redis at {redact_url(self.url)}: {doing} failed: {detail}")

    @property
    def client(self) -> redis.asyncio.Redis:
        """The redis-py client (for tests and operators' tools)."""
        if self._redis is None:
            raise TransportError(f"{self!r} is not open")
        return self._redis

    def key(self, destination: str) -> str:
        """The stream key of ``destination``."""
        return self.prefix + destination

    async def _connect(self) -> None:
        try:
            self._redis = redis.asyncio.Redis.from_url(
                self.url,
                socket_connect_timeout=self.connect_timeout,
                # Above the XREADGROUP block, so a blocked read is not cut short.
                socket_timeout=self.publish_timeout + self.poll_interval,
                health_check_interval=15,
            )
            await self._redis.ping()
        except _ERRORS as exc:
            if self._redis is not None:
                await self._redis.aclose()
                self._redis = None
            raise self._fail("connecting", exc) from None

    async def _disconnect(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(*_ERRORS):
                await self._redis.aclose()
        self._redis = None

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        try:
            async with asyncio.timeout(self.publish_timeout):  # not wait_for: see nats.py
                await self.client.xadd(self.key(destination),
                                       {"body": body, "id": message_id or ""})
        except _ERRORS as exc:
            raise self._fail(f"publishing to {destination!r}", exc) from None

    async def _ensure_group(self, destination: str) -> None:
        try:
            await self.client.xgroup_create(self.key(destination), self.group, id="0",
                                            mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _subscribe(
        self,
        source: str,
        handler: Handler,
        *,
        prefetch: int,
        max_deliveries: int,
        dead_letter: str,
    ) -> Subscription:
        try:
            await self._ensure_group(source)
        except _ERRORS as exc:
            raise self._fail(f"subscribing to {source!r}", exc) from None
        sub = _RedisSubscription(
            self, handler, source=source, dead_letter=dead_letter, prefetch=prefetch,
            max_deliveries=max_deliveries,
        )
        sub.start()
        return sub


class _RedisSubscription(Subscription):
    def __init__(
        self,
        transport: RedisTransport,
        handler: Handler,
        *,
        source: str,
        dead_letter: str,
        prefetch: int,
        max_deliveries: int,
    ) -> None:
        super().__init__(source=source, dead_letter=dead_letter, prefetch=prefetch,
                         max_deliveries=max_deliveries)
        self._t = transport
        self._handler = handler
        self._key = transport.key(source)
        self._dead_key = transport.key(dead_letter)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._inflight = InFlight(prefetch)
        self._task: asyncio.Task[None] | None = None
        self._cursor: Any = "0-0"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sagaway-consume-{self.source}")

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopped:
            free = await self._inflight.wait_free()
            if self._stopped:
                break
            try:
                claimed = await self._claim(free)
                if claimed < free:
                    await self._read(free - claimed, block=claimed == 0)
                backoff = 0.1
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    log.warning("Redis consumer on %s: %s", self.source, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                # The stream or its group is gone (a restart that kept nothing): start over.
                with contextlib.suppress(*_ERRORS):
                    await self._t._ensure_group(self.source)
            except _ERRORS as exc:
                log.debug("Redis consumer on %s: %r", self.source, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _claim(self, count: int) -> int:
        """Take over entries pending too long with dead consumers, or handed back."""
        r = self._t.client
        # Resume the scan where the last one stopped: a long list of entries live consumers
        # hold must not hide the dead consumers' entries behind it.
        self._cursor, entries, *_deleted = await r.xautoclaim(
            self._key, self._t.group, self.consumer, int(self._t.claim_idle * 1000),
            start_id=self._cursor, count=count,
        )
        entries = [(i, f) for i, f in entries if f is not None]
        if not entries:
            return 0
        ids = [i for i, _ in entries]
        pending = await r.xpending_range(
            self._key, self._t.group, min=min(ids, key=_order), max=max(ids, key=_order),
            count=len(ids) * 2 + 10, consumername=self.consumer,
        )
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        for entry_id, fields in entries:
            self._inflight.spawn(self._handle(entry_id, fields, counts.get(entry_id, 2)))
        return len(entries)

    async def _read(self, count: int, *, block: bool) -> None:
        reply: Any = await self._t.client.xreadgroup(
            self._t.group, self.consumer, {self._key: ">"}, count=count,
            block=int(self._t.poll_interval * 1000) if block else None,
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._inflight.spawn(self._handle(entry_id, fields, 1))

    async def _keep_alive(self, entry_id: bytes) -> None:
        # Reset the entry's idle time so no other consumer claims it while it is handled.
        while True:
            await asyncio.sleep(self._t.claim_idle / 3)
            with contextlib.suppress(*_ERRORS):
                await self._t.client.xclaim(self._key, self._t.group, self.consumer, 0,
                                            [entry_id], justid=True)

    async def _handle(self, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> None:
        heartbeat = asyncio.create_task(self._keep_alive(entry_id))
        try:
            verdict = await settle(
                self._handler,
                source=self.source,
                body=fields.get(b"body", b""),
                attempt=attempt,
                max_deliveries=self.max_deliveries,
                max_bytes=self._t.max_message_bytes,
            )
        except asyncio.CancelledError:
            with contextlib.suppress(*_ERRORS):  # sooner than after claim_idle
                await self._settle(entry_id, RETRY)
            raise
        finally:
            heartbeat.cancel()
        try:
            await self._settle(entry_id, verdict)
        except _ERRORS as exc:
            # Still pending with us: after claim_idle another consumer (or we) takes it.
            log.warning("settling entry %s of %s failed (it will be redelivered): %r",
                        entry_id, self.source, exc)

    async def _settle(self, entry_id: bytes, verdict: Verdict) -> None:
        r = self._t.client
        if not verdict.ack:
            # Hand it back: make it look long idle, so the next XAUTOCLAIM takes it.
            await r.xclaim(self._key, self._t.group, self.consumer, 0, [entry_id],
                           idle=_GIVEN_BACK_IDLE_MS, justid=True)
            return
        async with r.pipeline(transaction=True) as tx:
            if verdict.dead_letter is not None:
                body = self._t._dead_letter_body(verdict.dead_letter)
                tx.xadd(self._dead_key, {"body": body, "id": ""})
            tx.xack(self._key, self._t.group, entry_id)
            tx.xdel(self._key, entry_id)
            await tx.execute()

    async def _stop(self) -> None:
        # Let the blocked read end rather than cancel it: entries it took would stay pending
        # with a consumer that is gone until claim_idle passes.
        if self._task is not None:
            await self._task
        await self._inflight.drain(self._grace)
        with contextlib.suppress(*_ERRORS):
            r = self._t.client
            mine = await r.xpending_range(self._key, self._t.group, min="-", max="+",
                                          count=1, consumername=self.consumer)
            if not mine:  # deleting a consumer drops its pending entries: only when empty
                await r.xgroup_delconsumer(self._key, self._t.group, self.consumer)


def _order(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)
