"""The orchestrator's side of the Celery integration: :class:`CeleryTransport` publishes the
commands of Celery steps as Celery protocol-2 task messages (:func:`celery_task_message`),
and everything else through the transport it wraps."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from typing import TYPE_CHECKING, Any

from sagaway.engine.relay import REPLY_TYPE
from sagaway.errors import MalformedEnvelope, TransportError
from sagaway.integrations.celery._wire import _MARKER, META_KWARG
from sagaway.messaging import Envelope, Transport, open_transport
from sagaway.messaging.base import Handler, Subscription, redact_url, scrub

if TYPE_CHECKING:
    from sagaway.protection.codec import PayloadCodec


def celery_task_message(envelope: Envelope, *, origin: str | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any], bytes] | None:
    """The Celery protocol-2 message (headers, properties, body) a command envelope is, or
    ``None`` when it is not a Celery call (not written by :func:`celery_step`)."""
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get(_MARKER) != 1 or "error" in payload:
        return None
    key = envelope.idempotency_key
    correlation = envelope.correlation_id
    if not key or not correlation or not envelope.reply_to:
        raise MalformedEnvelope(f"celery call {envelope.type!r} {envelope.id} lacks its "
                                f"idempotency key, correlation id or reply_to")
    args, kwargs = payload.get("args", []), payload.get("kwargs", {})
    options = payload.get("options") or {}
    attempt = correlation.rsplit(":", 1)[-1]
    meta = {
        "run_id": envelope.run_id,
        "step": envelope.step,
        "key": key,
        "attempt": int(attempt) if attempt.isdigit() else 1,
        "compensation": key.endswith(":compensation"),
        "reply_to": envelope.reply_to,
        "correlation_id": correlation,
        "headers": dict(envelope.headers),
    }
    kwargs = {**kwargs, META_KWARG: meta}
    task_id = correlation
    headers: dict[str, Any] = {
        "lang": "py",
        "task": envelope.type,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [options.get("time_limit"), options.get("soft_time_limit")],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args)[:1024],
        "kwargsrepr": repr({k: v for k, v in kwargs.items() if k != META_KWARG})[:1024],
        "origin": origin or f"sagaway@{socket.gethostname()}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "sagaway_run_id": envelope.run_id,
        "sagaway_step": envelope.step,
        "sagaway_key": key,
    }
    # Trace context, for Celery-side instrumentation; never over Celery's own headers.
    headers = {**dict(envelope.headers), **headers}
    properties = {"correlation_id": task_id, "priority": options.get("priority")}
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None}],
                      separators=(",", ":"), ensure_ascii=False).encode()
    return headers, properties, body


def _is_unbuildable(envelope: Envelope) -> bool:
    payload = envelope.payload
    return isinstance(payload, dict) and payload.get(_MARKER) == 1 and "error" in payload


class CeleryTransport(Transport):
    """A transport that delivers Celery steps to Celery workers, the rest through another.

    ``Orchestrator(store, sagas=[...], transport=CeleryTransport("amqp://…"))``. Commands
    written by :func:`celery_step` / :func:`saga_chain` are published as Celery task
    messages on their queue (RabbitMQ's default exchange, routed by the queue's name,
    ``mandatory``, with publisher confirms); replies, other command steps and domain
    events use ``transport`` (a URL or a Transport; its replies' queue is where
    :class:`SagaTask` answers, so both must be the same RabbitMQ).

    A task published before any Celery worker has declared its queue is returned by the
    broker: the publish fails, the message stays in the outbox and is published again when
    its lease runs out (start the workers, or declare the queues, first).

    Args:
        transport: sagaway's transport for everything that is not a Celery task.
        broker_url: Celery's broker (default: ``transport``'s URL); must be AMQP.
        publish_timeout: seconds to wait for a publisher confirm.
        codec: the orchestrator's payload codec (``sagaway.protection``), so the calls of
            Celery steps, sealed in the outbox like every payload, can be opened and sent
            as task messages (Celery carries task arguments in its own format, unsealed).
            None reads ``SAGAWAY_KEYS`` as the orchestrator does; False: no codec.
    """

    def __init__(self, transport: Transport | str, *, broker_url: str | None = None,
                 publish_timeout: float = 10.0, connect_timeout: float = 10.0,
                 codec: PayloadCodec | bool | None = None) -> None:
        super().__init__()
        if codec is None or codec is True:
            from sagaway.protection.codec import codec_from_env

            codec = codec_from_env()
        self.codec: PayloadCodec | None = codec or None
        self.inner = open_transport(transport) if isinstance(transport, str) else transport
        self.url = self.inner.url
        self.broker_url = broker_url or self.inner.url
        scheme = self.broker_url.split("://", 1)[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise TransportError(
                f"CeleryTransport publishes Celery task messages over AMQP; "
                f"{redact_url(self.broker_url)!r} is not an amqp:// URL (pass broker_url=…)"
            )
        self.max_message_bytes = self.inner.max_message_bytes
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.published_tasks = 0
        self._connection: Any = None
        self._channel: Any = None
        self._origin = f"sagaway@{socket.gethostname()}:{os.getpid()}"

    def _fail(self, doing: str, exc: BaseException) -> TransportError:
        detail = scrub(str(exc) or type(exc).__name__, self.broker_url)
        return TransportError(f"Celery broker {redact_url(self.broker_url)}: {doing} failed: "
                              f"{detail}")

    async def _connect(self) -> None:
        import aio_pika

        await self.inner.open()
        try:
            self._connection = await aio_pika.connect_robust(
                self.broker_url, timeout=self.connect_timeout,
                client_properties={"connection_name": "sagaway-celery"},
            )
            self._channel = await self._connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
            await self.inner.aclose()
            raise self._fail("connecting", exc) from None

    async def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._channel = None
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        try:
            envelope: Envelope | None = Envelope.from_bytes(body, max_bytes=None)
        except MalformedEnvelope:
            envelope = None
        message = None
        if envelope is not None:
            envelope = self._opened(envelope)
            message = celery_task_message(envelope, origin=self._origin)
        if envelope is None or message is None:
            if envelope is not None and _is_unbuildable(envelope) and envelope.reply_to:
                # Answer the attempt ourselves: a clear failure, nothing sent, not applied.
                reply = Envelope(type=REPLY_TYPE, run_id=envelope.run_id, step=envelope.step,
                                 idempotency_key=envelope.idempotency_key,
                                 correlation_id=envelope.correlation_id,
                                 payload={"ok": False, "retryable": False,
                                          "error": envelope.payload["error"]})
                await self.inner.publish(envelope.reply_to, reply)
                return
            await self.inner.publish_raw(destination, body, message_id=message_id)
            return
        import aio_pika

        headers, properties, task_body = message
        amqp_message = aio_pika.Message(
            task_body,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=properties["correlation_id"],
            priority=properties["priority"],
            message_id=message_id,
        )
        try:
            await self._channel.default_exchange.publish(
                amqp_message, routing_key=destination, mandatory=True,
                timeout=self.publish_timeout)
        except aio_pika.exceptions.PublishError as exc:
            raise self._fail(
                f"publishing task {envelope.type!r} to queue {destination!r} (no such queue: "
                f"start a Celery worker with -Q {destination}, it declares it)", exc) from None
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            raise self._fail(f"publishing task {envelope.type!r} to {destination!r}",
                             exc) from None
        self.published_tasks += 1

    def _opened(self, envelope: Envelope) -> Envelope:
        """The envelope with its payload opened when it is sealed and this transport holds
        the codec (only to read a Celery call: other messages are sent as they were)."""
        payload = envelope.payload
        if self.codec is None or not self.codec.is_sealed(payload):
            return envelope
        opened = self.codec.open(payload, aad=f"msg:{envelope.id}")
        return dataclasses.replace(envelope, payload=opened)

    async def _subscribe(self, source: str, handler: Handler, *, prefetch: int,
                         max_deliveries: int, dead_letter: str) -> Subscription:
        return await self.inner.subscribe(source, handler, prefetch=prefetch,
                                          max_deliveries=max_deliveries,
                                          dead_letter=dead_letter)
