"""RabbitMQ transport (aio-pika): durable quorum queues, publisher confirms, manual acks.

* A destination is a durable **quorum queue** of the same name (replicated on a cluster,
  always persistent), declared on first use by publishers and consumers alike, with the
  same arguments. Publishing goes through the default exchange, ``mandatory``, on a channel
  in confirm mode: ``publish`` returns after the broker's ``basic.ack``.
* Each subscription has its own channel with ``basic.qos(prefetch)`` and acks manually.
  The attempt number is the quorum queue's ``x-delivery-count`` + 1, which the broker keeps
  across consumer crashes.
* ``x-delivery-limit`` (the transport's ``delivery_limit``) is the broker-side backstop for
  poison messages: should consumers keep dying before they can dead-letter a message, the
  broker dead-letters it through the ``sagaway.dead-letter`` exchange, routed by the source
  name to the subscription's dead-letter queue, where it reads as a :class:`DeadLetter`
  with the broker's reason. ``max_deliveries`` must not exceed it.
* The connection is aio-pika's ``connect_robust``: after a broker restart it reconnects,
  re-declares and resumes the consumers. A publish during the outage raises TransportError
  (the caller retries; a retry may duplicate, which consumers deduplicate by message id).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sagaway.errors import TransportError
from sagaway.messaging.base import (
    Handler,
    InFlight,
    Subscription,
    Transport,
    log,
    redact_url,
    scrub,
    settle,
)
from sagaway.messaging.envelope import DeadLetter

try:
    import aio_pika
    import aio_pika.abc
    import aio_pika.exceptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the RabbitMQ transport needs aio-pika: pip install 'sagaway[rabbitmq]'"
    ) from exc

__all__ = ["DEAD_LETTER_EXCHANGE", "RabbitMQTransport"]

DEAD_LETTER_EXCHANGE = "sagaway.dead-letter"
"""The direct exchange the broker dead-letters through (routing key: the source queue)."""

_ERRORS: tuple[type[BaseException], ...] = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
    asyncio.TimeoutError,
)


class RabbitMQTransport(Transport):
    """A transport over RabbitMQ (3.8 or later, for quorum queues).

    Args:
        url: ``amqp://user:password@host:5672/vhost``.
        delivery_limit: the queues' ``x-delivery-limit``; part of each queue's arguments, so
            every transport using a queue must agree on it.
        publish_timeout: seconds to wait for a publisher confirm.
        reconnect_interval: seconds between reconnection attempts after the broker is lost.
    """

    def __init__(
        self,
        url: str,
        *,
        delivery_limit: int = 20,
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.delivery_limit = delivery_limit
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        """Queues the publish channel has declared."""
        self.declared: set[str] = set()
        """Every queue this transport declared, on any channel (tests delete them after)."""

    def _fail(self, doing: str, exc: BaseException) -> TransportError:
        detail = scrub(str(exc) or type(exc).__name__, self.url)
        return TransportError(f"RabbitMQ at {redact_url(self.url)}: {doing} failed: {detail}")

    async def _connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(
                self.url,
                timeout=self.connect_timeout,
                reconnect_interval=self.reconnect_interval,
                client_properties={"connection_name": "sagaway"},
            )
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self._channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
        except _ERRORS as exc:
            if self._connection is not None:
                await self._connection.close()
            raise self._fail("connecting", exc) from None

    async def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(*_ERRORS):  # already gone: nothing left to release
                await self._connection.close()
        self._connection = self._channel = None

    def _arguments(self, name: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": name,
        }

    async def _declare(
        self, channel: aio_pika.abc.AbstractChannel, name: str
    ) -> aio_pika.abc.AbstractQueue:
        self.declared.add(name)
        try:
            return await channel.declare_queue(
                name, durable=True, arguments=self._arguments(name),
                timeout=self.publish_timeout,
            )
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise TransportError(
                f"RabbitMQ queue {name!r} exists with other arguments than a sagaway quorum "
                f"queue with x-delivery-limit={self.delivery_limit}: {exc}. Delete it or "
                f"build the transport with its delivery_limit"
            ) from None

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        channel = self._channel
        assert channel is not None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        for retry in (True, False):
            try:
                if destination not in self._declared:
                    await self._declare(channel, destination)
                    self._declared.add(destination)
                await channel.default_exchange.publish(
                    message, routing_key=destination, mandatory=True,
                    timeout=self.publish_timeout,
                )
                return
            except aio_pika.exceptions.PublishError as exc:
                # Returned as unroutable: the queue was deleted behind our back. Declare again.
                self._declared.discard(destination)
                if not retry:
                    raise self._fail(f"publishing to {destination!r}", exc) from None
            except _ERRORS as exc:
                raise self._fail(f"publishing to {destination!r}", exc) from None

    async def _subscribe(
        self,
        source: str,
        handler: Handler,
        *,
        prefetch: int,
        max_deliveries: int,
        dead_letter: str,
    ) -> Subscription:
        if max_deliveries > self.delivery_limit:
            raise TransportError(
                f"max_deliveries={max_deliveries} is over this transport's delivery_limit="
                f"{self.delivery_limit} (the queues' x-delivery-limit): build the transport "
                f"with a larger delivery_limit"
            )
        assert self._connection is not None
        sub = _RabbitMQSubscription(
            self, handler, source=source, dead_letter=dead_letter, prefetch=prefetch,
            max_deliveries=max_deliveries,
        )
        try:
            await sub.start(self._connection)
        except _ERRORS as exc:
            await sub.stop()
            raise self._fail(f"subscribing to {source!r}", exc) from None
        return sub


class _RabbitMQSubscription(Subscription):
    def __init__(
        self,
        transport: RabbitMQTransport,
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
        self._inflight = InFlight(prefetch)
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        t = self._transport
        self._channel = channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        dlx = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead = await t._declare(channel, self.dead_letter)
        # The broker's backstop dead-letters with the source's name as routing key.
        await dead.bind(dlx, routing_key=self.source)
        self._queue = await t._declare(channel, self.source)
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if self._stopped:
            # Arrived between the cancel and its confirmation: hand it straight back.
            await _quietly(message.nack(requeue=True))
            return
        self._inflight.spawn(self._handle(message))

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        count = headers.get("x-delivery-count", 0)
        attempt = (count if isinstance(count, int) else 0) + 1
        envelope = None
        death = headers.get("x-death")
        if death and isinstance(death, list) and isinstance(death[0], dict):
            # Dead-lettered by the broker's x-delivery-limit, not by a consumer.
            first = death[0]
            envelope = DeadLetter(
                source=_text(first.get("queue")),
                reason=f"dead-lettered by RabbitMQ ({_text(first.get('reason'))}): delivered "
                       f"more than its queue's x-delivery-limit",
                attempts=self._transport.delivery_limit + 1,
                body=message.body,
            ).to_envelope()
        try:
            verdict = await settle(
                self._handler,
                source=self.source,
                body=message.body,
                attempt=attempt,
                max_deliveries=self.max_deliveries,
                max_bytes=self._transport.max_message_bytes,
                envelope=envelope,
            )
        except asyncio.CancelledError:
            await _quietly(message.nack(requeue=True))
            raise
        if verdict.dead_letter is not None:
            try:
                await self._transport._publish(
                    self.dead_letter,
                    self._transport._dead_letter_body(verdict.dead_letter),
                    message_id=None,
                )
            except TransportError as exc:
                # Not dead-lettered, so not acked: it comes back and we try again.
                _log_settle_failure("dead-lettering", self.source, exc)
                await _quietly(message.nack(requeue=True))
                return
        if verdict.ack:
            await _quietly(message.ack())
        else:
            await _quietly(message.nack(requeue=True))

    async def _stop(self) -> None:
        if self._queue is not None and self._tag is not None:
            await _quietly(self._queue.cancel(self._tag))
        await self._inflight.drain(self._grace)
        if self._channel is not None:
            await _quietly(self._channel.close())


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "?" if value is None else str(value)


def _log_settle_failure(doing: str, source: str, exc: BaseException) -> None:
    log.warning("%s a message from %s failed (it will be redelivered): %s", doing, source, exc)


async def _quietly(op: Any) -> None:
    """Await an ack, nack, cancel or close whose failure only means the channel is gone.

    A delivery on a lost channel is redelivered by the broker, so there is nothing to do.
    """
    try:
        await op
    except _ERRORS as exc:
        log.debug("ignored after a lost channel: %r", exc)
