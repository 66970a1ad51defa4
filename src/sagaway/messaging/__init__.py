"""Messaging: the envelope, the transport port (``base``) and its backends, built from a URL.

This is the composition root for transports: a backend's module (and its driver) is imported
only when its URL scheme is used, so ``pip install sagaway`` stays small.
"""

from __future__ import annotations

from sagaway.errors import TransportError
from sagaway.messaging.base import Delivery, Handler, Subscription, Transport, redact_url
from sagaway.messaging.envelope import DEAD_LETTER_TYPE, DeadLetter, Envelope

__all__ = [
    "DEAD_LETTER_TYPE",
    "DeadLetter",
    "Delivery",
    "Envelope",
    "Handler",
    "Subscription",
    "Transport",
    "open_transport",
]

_FORMS = (
    "memory://, amqp://user:password@host:5672/vhost (RabbitMQ, the [rabbitmq] extra), "
    "nats://host:4222 (NATS JetStream, the [nats] extra) or redis://host:6379/0 (Redis "
    "Streams, the [redis] extra)"
)


def open_transport(url: str) -> Transport:
    """Build (not yet open) the transport a URL names.

    ``memory://``, ``amqp://guest:guest@127.0.0.1:5672/`` (or ``amqps://``),
    ``nats://127.0.0.1:4222`` (or ``tls://``), ``redis://127.0.0.1:6379/0`` (or
    ``rediss://``). A broker's driver comes with its extra (``pip install
    'sagaway[rabbitmq]'``, ``[nats]``, ``[redis]``); the error says so when it is missing.

    Raises:
        TransportError: the scheme is not one of these (the message lists them).
        ImportError: the driver for that scheme is not installed.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from sagaway.messaging.memory import MemoryTransport

        return MemoryTransport()
    if scheme in ("amqp", "amqps"):
        from sagaway.messaging.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(url)
    if scheme in ("nats", "tls"):
        from sagaway.messaging.nats import NatsTransport

        return NatsTransport(url)
    if scheme in ("redis", "rediss"):
        from sagaway.messaging.redis import RedisTransport

        return RedisTransport(url)
    raise TransportError(f"unknown transport URL {redact_url(url)!r}: use {_FORMS}")
