"""The transport port: publish with broker confirmation, consume with acknowledgements.

One shape for every broker. A backend implements four primitives — ``_connect``,
``_disconnect``, ``_publish`` (return only once the broker has the message) and ``_subscribe``
(deliver, then ack, give back or dead-letter as :func:`settle` decides). The policy lives
once, here:

* the handler gets a :class:`Delivery`; a normal return acks the message;
* an exception gives it back for redelivery, until the ``max_deliveries``-th attempt, after
  which it is published to the ``dead_letter`` destination with the reason and acked;
* bytes that are not an envelope are dead-lettered at once with the reason; a message
  delivered more than ``max_deliveries`` times (its consumers kept dying before settling it)
  is dead-lettered without calling the handler again. Either way the consumer goes on.

Delivery is at least once: a handler can see a message again after a crash or a lost ack,
so handlers deduplicate (by ``envelope.id`` or ``envelope.idempotency_key``). Every backend
passes ``sagaway.testing.transport_conformance``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from sagaway.errors import MalformedEnvelope, TransportError, UntrustedMessage
from sagaway.messaging.envelope import DEFAULT_MAX_MESSAGE_BYTES, DeadLetter, Envelope

if TYPE_CHECKING:
    from sagaway.protection.signing import EnvelopeSigner

__all__ = [
    "ACK",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_PREFETCH",
    "RETRY",
    "Delivery",
    "Handler",
    "InFlight",
    "Subscription",
    "Transport",
    "Verdict",
    "check_destination",
    "redact_url",
    "scrub",
    "settle",
]

log = logging.getLogger("sagaway.messaging")

DEFAULT_PREFETCH = 10
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_GRACE = 30.0
"""Seconds ``Subscription.stop`` lets running handlers finish before cancelling them."""
MAX_REASON_CHARS = 2000

_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a message to a handler."""

    envelope: Envelope
    attempt: int
    """1 on the first delivery; counted by the broker, so it survives consumer crashes."""
    raw: bytes
    """The bytes as received."""
    source: str
    """The destination it was consumed from."""

    @property
    def dead_letter(self) -> DeadLetter | None:
        """The dead letter this message is, when consumed from a dead-letter destination."""
        try:
            return DeadLetter.from_envelope(self.envelope)
        except MalformedEnvelope:
            return None


Handler = Callable[[Delivery], Awaitable[object]]
"""An async callable taking a :class:`Delivery`. Return to ack; raise to have it redelivered."""


def check_destination(name: str) -> str:
    """Validate a destination (queue, stream) name: dot-separated ``[A-Za-z0-9_-]`` words."""
    if not isinstance(name, str) or len(name) > 200 or not _NAME.fullmatch(name):
        raise TransportError(
            f"bad destination name {name!r}: use dot-separated words of letters, digits, '_' "
            f"and '-' (at most 200 characters), such as 'payments.commands'"
        )
    return name


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
        parts = None
    if parts is not None and password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    if "@" in url:  # not parseable as a URL with a password, but it may still hold one
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        return f"{scheme}…@{url.rsplit('@', 1)[1]}"
    return url


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) with the password of ``url`` blanked out."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, redact_url(url))
    return text.replace(password, "***") if password else text


# -- the delivery policy, shared by every backend -----------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a backend does with a delivered message once :func:`settle` has run."""

    ack: bool
    """True: remove it from the source (after publishing ``dead_letter``, if any)."""
    dead_letter: DeadLetter | None = None


ACK = Verdict(ack=True)
RETRY = Verdict(ack=False)


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


async def settle(
    handler: Handler,
    *,
    source: str,
    body: bytes,
    attempt: int,
    max_deliveries: int,
    max_bytes: int | None = None,
    envelope: Envelope | None = None,
) -> Verdict:
    """Run ``handler`` on one delivery and decide: ack, give back, or dead-letter.

    ``envelope`` skips decoding ``body`` (a backend that built it from broker metadata).
    Never raises an ``Exception``; cancellation propagates (the message is then neither
    acked nor given back, and the broker redelivers it).
    """

    def dead(reason: str) -> Verdict:
        reason = _reason(reason)
        log.warning("dead-lettering a message from %s after %d attempt(s): %s",
                    source, attempt, reason)
        return Verdict(ack=True, dead_letter=DeadLetter(source, reason, attempt, body))

    if attempt > max_deliveries:
        return dead(
            f"delivered {attempt} times, over max_deliveries={max_deliveries}: its consumers "
            f"stopped before settling it (crash or lost connection)"
        )
    if envelope is None:
        try:
            envelope = Envelope.from_bytes(body, max_bytes=max_bytes)
        except MalformedEnvelope as exc:
            return dead(str(exc))
    try:
        await handler(Delivery(envelope=envelope, attempt=attempt, raw=body, source=source))
    except UntrustedMessage as exc:
        # Unsigned, forged, stale or replayed: no redelivery can fix it.
        return dead(str(exc))
    except Exception as exc:
        reason = f"{type(exc).__qualname__}: {exc}"
        if attempt >= max_deliveries:
            return dead(f"handler failed on attempt {attempt} of {max_deliveries}: {reason}")
        log.info("handler failed on %s (message %s, attempt %d of %d), redelivering: %s",
                 source, envelope.id, attempt, max_deliveries, _reason(reason))
        return RETRY
    return ACK


class InFlight:
    """The handler tasks of one subscription: at most ``limit`` at once (the prefetch)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait_free(self) -> int:
        """Wait until a slot is free; return how many are."""
        while len(self._tasks) >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        return self.limit - len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("message settlement failed", exc_info=task.exception())

    async def drain(self, grace: float | None = None) -> None:
        """Wait for every running handler (and its ack) to finish.

        After ``grace`` seconds the rest are cancelled: their messages are not acked, so
        the broker delivers them again.
        """
        while self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("cancelling %d handler(s) still running after %ss",
                            len(pending), grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


# -- the port -----------------------------------------------------------------------------


class Subscription(abc.ABC):
    """A running consumer of one source. :meth:`stop` ends it."""

    def __init__(
        self, *, source: str, dead_letter: str, prefetch: int, max_deliveries: int
    ) -> None:
        self.source = source
        self.dead_letter = dead_letter
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self._stopped = False
        self._grace: float | None = DEFAULT_GRACE

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def stop(self, *, grace: float | None = DEFAULT_GRACE) -> None:
        """Stop taking messages; let the handlers running now finish and settle.

        Handlers still running after ``grace`` seconds (``None``: no limit) are cancelled
        and their messages given back. Messages not yet handled stay on the source for other
        consumers. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        self._grace = grace
        await self._stop()

    @abc.abstractmethod
    async def _stop(self) -> None:
        """Stop receiving and drain the in-flight handlers within ``self._grace`` (once)."""

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<{type(self).__name__} {self.source!r} {state}>"


class Transport(abc.ABC):
    """A connection to a message broker. Async; share one between the tasks of a loop.

    Use ``async with transport:`` or ``await open()`` / ``await aclose()``. Destinations
    are queues (every message goes to one of the source's consumers) and are created on
    first use, so a message published before anyone subscribes is kept.
    """

    url: str = ""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """``publish`` refuses bigger envelopes with PayloadTooLarge."""
    dead_letter_suffix = ".dead-letter"
    """The default dead-letter destination is the source's name plus this."""
    _broker_max_bytes: int | None = None
    """The broker's own message size limit, if it has a small one (dead letters are cut to it)."""
    signer: EnvelopeSigner | None = None
    """Signs what this transport publishes and checks what its consumers receive (see
    ``sagaway.protection.signing``): unsigned, forged, stale and replayed messages are
    dead-lettered with the reason and counted in ``signer.counts``."""

    def __init__(self) -> None:
        self._state = "new"
        self._subscriptions: list[Subscription] = []
        self.dead_letter_observers: list[Callable[[DeadLetter], None]] = []
        """Called with each message this transport's consumers dead-letter (metrics)."""

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to the broker. Idempotent.

        Raises:
            TransportError: the broker is unreachable, or the transport was closed.
        """
        if self._state == "open":
            return
        if self._state == "closed":
            raise TransportError(f"{self!r} is closed; build a new transport")
        await self._connect()
        self._state = "open"

    async def aclose(self) -> None:
        """Stop every subscription (letting running handlers finish), then disconnect.

        Idempotent.
        """
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            await sub.stop()
        if was_open:
            await self._disconnect()

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _require_open(self) -> None:
        if self._state != "open":
            state = "not open yet: await transport.open() or use `async with`"
            if self._state == "closed":
                state = "closed"
            raise TransportError(f"{self!r} is {state}")

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, destination: str, envelope: Envelope) -> None:
        """Send ``envelope`` to ``destination``; return once the broker has confirmed it.

        Raises:
            InvalidPayload, PayloadTooLarge: the envelope cannot be sent as it is.
            TransportError: the broker did not confirm it (it may or may not have it:
                publish again; the consumer deduplicates by ``envelope.id``).
        """
        self._require_open()
        check_destination(destination)
        if self.signer is not None:
            envelope = self.signer.sign(envelope)
        body = envelope.to_bytes(max_bytes=self.max_message_bytes)
        await self._publish(destination, body, message_id=envelope.id)

    async def publish_raw(
        self, destination: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Send bytes as they are (replaying a dead letter; tests of malformed input).

        ``message_id`` is what deduplicating brokers key on. Raises TransportError.
        """
        self._require_open()
        check_destination(destination)
        await self._publish(destination, bytes(body), message_id=message_id)

    # -- consuming -------------------------------------------------------------------------

    async def subscribe(
        self,
        source: str,
        handler: Handler,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        dead_letter: str | None = None,
    ) -> Subscription:
        """Consume ``source``: call ``handler`` for each message, up to ``prefetch`` at once.

        Consumers of one source share its messages. A message whose handler raised is
        redelivered until its ``max_deliveries``-th attempt, then published to
        ``dead_letter`` (default ``source + ".dead-letter"``) with the reason; so are bytes
        that are not an envelope, at once. Subscribe to the dead-letter destination like any
        other; :attr:`Delivery.dead_letter` reads what is there.

        Raises:
            TransportError: not open, a bad name, or the broker refused the consumer.
        """
        self._require_open()
        check_destination(source)
        dead_letter = check_destination(dead_letter or source + self.dead_letter_suffix)
        if dead_letter == source:
            raise TransportError(f"{source!r} cannot be its own dead-letter destination")
        if not 1 <= prefetch <= 10_000:
            raise TransportError(f"prefetch must be between 1 and 10000, got {prefetch!r}")
        if max_deliveries < 1:
            raise TransportError(f"max_deliveries must be at least 1, got {max_deliveries!r}")
        if self.signer is not None:
            handler = self._checked(handler, self.signer)
        sub = await self._subscribe(
            source, handler, prefetch=prefetch, max_deliveries=max_deliveries,
            dead_letter=dead_letter,
        )
        self._subscriptions = [s for s in self._subscriptions if not s.stopped] + [sub]
        return sub

    @staticmethod
    def _checked(handler: Handler, signer: EnvelopeSigner) -> Handler:
        """``handler`` behind the signature check, with this consumer's own seen-set."""
        guard = signer.guard()

        async def checked(delivery: Delivery) -> object:
            signature = signer.verify(delivery.envelope, attempt=delivery.attempt,
                                      guard=guard)
            result = await handler(delivery)
            guard.remember(signature, signer.clock())
            return result

        return checked

    def _dead_letter_body(self, dead: DeadLetter) -> bytes:
        """The bytes to publish on the dead-letter destination for ``dead`` (signed when a
        signer is set, so a dead-letter consumer can check it like any message)."""
        for observe in self.dead_letter_observers:
            try:
                observe(dead)
            except Exception:
                log.exception("dead-letter observer %r failed", observe)
        envelope = dead.to_envelope(max_bytes=self._broker_max_bytes)
        if self.signer is not None:
            envelope = self.signer.sign(envelope)
        return envelope.to_bytes(max_bytes=None)

    # -- what a backend implements ---------------------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect; raise TransportError when the broker cannot be reached."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Release the connection (subscriptions are already stopped)."""

    @abc.abstractmethod
    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        """Store ``body`` on ``destination`` (creating it if needed) and await the broker's
        confirmation; raise TransportError otherwise."""

    @abc.abstractmethod
    async def _subscribe(
        self,
        source: str,
        handler: Handler,
        *,
        prefetch: int,
        max_deliveries: int,
        dead_letter: str,
    ) -> Subscription:
        """Start consuming: :func:`settle` each message, then act on the verdict."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)}>"
