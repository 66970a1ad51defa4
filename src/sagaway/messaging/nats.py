"""NATS JetStream transport (nats-py): a stream per destination, durable pull consumers.

* A destination ``orders.reserve`` is the subject of the same name, stored by a file-backed
  **work-queue stream** ``sagaway_orders_reserve`` (dots become underscores; two names
  that map to one stream are refused), created on first use. ``publish`` waits for the
  stream's PubAck and sets ``Nats-Msg-Id`` to the envelope id, so a publish retried within
  the stream's two-minute duplicate window is stored once.
* Consumers of one source share one **durable** pull consumer (``group``), with explicit
  acks. The subscription fetches only as many messages as it has free handler slots (the
  prefetch). The attempt number is JetStream's ``num_delivered``. A handler running longer
  than ``ack_wait`` keeps its message with ``in_progress`` heartbeats; a consumer that dies
  holding messages loses them to the others after ``ack_wait``.
* ``delivery_limit`` is the consumer's ``max_deliver``: a backstop that stops a message
  being redelivered forever should it never be settled; the normal path dead-letters it to
  the dead-letter subject (its own stream) well before.
* The client reconnects forever after a server restart; a publish during the outage raises
  TransportError after ``publish_timeout`` (publish again: the message id deduplicates).
"""

from __future__ import annotations

import asyncio
import contextlib

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

try:
    import nats
    import nats.aio.client
    import nats.aio.msg
    import nats.errors
    import nats.js
    import nats.js.api
    import nats.js.errors
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the NATS transport needs nats-py: pip install 'sagaway[nats]'") from exc

__all__ = ["NatsTransport", "stream_name"]

_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, asyncio.TimeoutError)
_HEADER_ROOM = 4096
"""Bytes of a NATS message kept for headers when sizing bodies against ``max_payload``."""


def stream_name(destination: str) -> str:
    """The JetStream stream that stores ``destination``."""
    return "sagaway_" + destination.replace(".", "_")


class NatsTransport(Transport):
    """A transport over NATS JetStream (nats-server 2.9 or later, started with ``-js``).

    Args:
        url: ``nats://host:4222`` (``nats://user:password@host:4222``, ``tls://…``).
        group: the durable consumer name consumers of a source share.
        ack_wait: seconds a delivered message stays with its consumer without an ack or a
            heartbeat before the server redelivers it.
        delivery_limit: the consumers' ``max_deliver`` backstop.
        fetch_timeout: how long one pull waits for messages; also the most a ``stop()``
            waits for the pull in progress to finish.
    """

    def __init__(
        self,
        url: str,
        *,
        group: str = "sagaway",
        ack_wait: float = 30.0,
        delivery_limit: int = 20,
        publish_timeout: float = 10.0,
        connect_timeout: int = 5,
        reconnect_interval: int = 1,
        fetch_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.group = group
        self.ack_wait = ack_wait
        self.delivery_limit = delivery_limit
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self.fetch_timeout = fetch_timeout
        self._nc: nats.aio.client.Client | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._streams: set[str] = set()

    def _fail(self, doing: str, exc: BaseException) -> TransportError:
        detail = scrub(str(exc) or type(exc).__name__, self.url)
        return TransportError(f"NATS at {redact_url(self.url)}: {doing} failed: {detail}")

    @property
    def js(self) -> nats.js.JetStreamContext:
        assert self._js is not None
        return self._js

    async def _connect(self) -> None:
        last_error: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            if self.is_open:
                log.warning("NATS %s: %s", redact_url(self.url), scrub(str(exc), self.url))
            else:
                last_error[:] = [exc]

        async def on_disconnect() -> None:
            if self.is_open:
                log.warning("NATS %s: disconnected, reconnecting", redact_url(self.url))

        async def on_reconnect() -> None:
            log.warning("NATS %s: reconnected", redact_url(self.url))

        # Reconnect forever once connected, but give up on the first connection after
        # connect_timeout: the client itself would retry that forever too.
        nc = nats.aio.client.Client()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # (the engine's poll loop hung on it).
            async with asyncio.timeout(self.connect_timeout):
                await nc.connect(
                    self.url,
                    name="sagaway",
                    connect_timeout=self.connect_timeout,
                    reconnect_time_wait=self.reconnect_interval,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                )
            js = nc.jetstream(timeout=self.publish_timeout)
            await js.account_info()
        except _ERRORS as exc:
            with contextlib.suppress(*_ERRORS):
                await nc.close()
            cause = last_error[0] if isinstance(exc, asyncio.TimeoutError) and last_error \
                else exc
            raise self._fail("connecting", cause) from None
        self._nc, self._js = nc, js
        self._broker_max_bytes = nc.max_payload
        self.max_message_bytes = min(self.max_message_bytes, nc.max_payload - _HEADER_ROOM)

    async def _disconnect(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(*_ERRORS):
                await self._nc.close()
        self._nc = self._js = None

    async def _ensure_stream(self, destination: str) -> str:
        name = stream_name(destination)
        if name in self._streams:
            return name
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = await self.js.add_stream(
                nats.js.api.StreamConfig(
                    name=name,
                    subjects=[destination],
                    retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
                    storage=nats.js.api.StorageType.FILE,
                    duplicate_window=120.0,
                )
            )
        subjects = info.config.subjects or []
        if subjects != [destination]:
            raise TransportError(
                f"NATS stream {name!r} already stores {subjects!r}, so it cannot store "
                f"{destination!r}: destinations that differ only in '.' and '_' share a "
                f"stream name; rename one"
            )
        self._streams.add(name)
        return name

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        headers = {"Nats-Msg-Id": message_id} if message_id else None
        try:
            stream = await self._ensure_stream(destination)
            try:
                await self.js.publish(destination, body, stream=stream, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                # The stream was deleted behind our back: make it again, once.
                self._streams.discard(stream)
                stream = await self._ensure_stream(destination)
                await self.js.publish(destination, body, stream=stream, headers=headers)
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
        if max_deliveries >= self.delivery_limit:
            raise TransportError(
                f"max_deliveries={max_deliveries} must be under this transport's "
                f"delivery_limit={self.delivery_limit} (the consumers' max_deliver): build "
                f"the transport with a larger delivery_limit"
            )
        try:
            await self._ensure_stream(dead_letter)
            stream = await self._ensure_stream(source)
            psub = await self.js.pull_subscribe(
                source,
                durable=self.group,
                stream=stream,
                config=nats.js.api.ConsumerConfig(
                    durable_name=self.group,
                    ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_deliver=self.delivery_limit,
                    filter_subject=source,
                ),
            )
        except _ERRORS as exc:
            raise self._fail(f"subscribing to {source!r}", exc) from None
        sub = _NatsSubscription(
            self, handler, psub, source=source, dead_letter=dead_letter, prefetch=prefetch,
            max_deliveries=max_deliveries,
        )
        sub.start()
        return sub


class _NatsSubscription(Subscription):
    def __init__(
        self,
        transport: NatsTransport,
        handler: Handler,
        psub: nats.js.JetStreamContext.PullSubscription,
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
        self._psub = psub
        self._inflight = InFlight(prefetch)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sagaway-consume-{self.source}")

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopped:
            free = await self._inflight.wait_free()
            if self._stopped:
                break
            try:
                # Pull only what there are free slots for: this is the prefetch.
                messages = await self._psub.fetch(free, timeout=self._transport.fetch_timeout)
            except TimeoutError:
                continue
            except _ERRORS as exc:
                # Disconnected: the client reconnects on its own; pull again shortly.
                log.debug("NATS fetch on %s failed: %r", self.source, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            for message in messages:
                if self._stopped:
                    await _quietly(message.nak())
                else:
                    self._inflight.spawn(self._handle(message))

    async def _keep_alive(self, message: nats.aio.msg.Msg) -> None:
        while True:
            await asyncio.sleep(self._transport.ack_wait / 3)
            await _quietly(message.in_progress())

    async def _handle(self, message: nats.aio.msg.Msg) -> None:
        heartbeat = asyncio.create_task(self._keep_alive(message))
        try:
            meta = message.metadata
            verdict = await settle(
                self._handler,
                source=self.source,
                body=message.data,
                attempt=meta.num_delivered or 1,
                max_deliveries=self.max_deliveries,
                max_bytes=self._transport.max_message_bytes,
            )
            if verdict.dead_letter is not None:
                try:
                    await self._transport._publish(
                        self.dead_letter,
                        self._transport._dead_letter_body(verdict.dead_letter),
                        # Stored once even if this is retried after a lost ack.
                        message_id=f"{meta.stream}:{meta.sequence.stream}:dead-letter",
                    )
                except TransportError as exc:
                    log.warning("dead-lettering a message from %s failed (it will be "
                                "redelivered): %s", self.source, exc)
                    await _quietly(message.nak())
                    return
            await _quietly(message.ack() if verdict.ack else message.nak())
        except asyncio.CancelledError:
            await _quietly(message.nak())  # sooner than after ack_wait
            raise
        finally:
            heartbeat.cancel()

    async def _stop(self) -> None:
        # Let the pull in progress end rather than cancel it: a pull request cut short would
        # stay open on the server and take a message to a consumer that is gone.
        if self._task is not None:
            await self._task
        await self._inflight.drain(self._grace)
        await _quietly(self._psub.unsubscribe())


async def _quietly(op: object) -> None:
    """Await an ack, nak, heartbeat or unsubscribe whose failure only means a lost connection.

    The server redelivers an unacknowledged message after ``ack_wait``.
    """
    try:
        await op  # type: ignore[misc]
    except _ERRORS as exc:
        log.debug("ignored after a lost connection: %r", exc)
