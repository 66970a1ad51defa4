"""Participant: the service side of message-driven saga steps.

The wire protocol. The orchestrator sends a **command** to the destination named after the
service: ``type`` is the command (``"reserve"``), ``payload`` the saga input, and
``run_id``, ``step``, ``idempotency_key`` (``{run_id}:{step}:action`` or
``:compensation``, the same on every re-send), ``reply_to`` and ``correlation_id`` say
what it belongs to and where to answer. The participant answers on ``reply_to`` with a
**reply**: ``type`` :data:`REPLY_TYPE`, the command's ``run_id``, ``step``,
``idempotency_key`` and ``correlation_id``, and ``payload`` either
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "…", "retryable": false}``.

What happens to a command:

* its key is in the inbox → the handler does not run; the recorded reply is sent again;
* the handler returns → its changes, the inbox record and the reply (in the outbox) commit
  in one transaction, then the relay publishes the reply;
* the handler raises :class:`~sagaway.NonRetryableError` (a business "no") → its changes
  are rolled back, the failure is recorded and replied (a redelivery gets the same answer);
* any other exception → nothing is recorded and the transport redelivers the command, up
  to ``max_deliveries`` times, then dead-letters it; the queue keeps flowing meanwhile;
* an unknown ``type``, or no ``idempotency_key`` or ``reply_to`` → :class:`CommandRejected`,
  dead-lettered with that reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic_core import PydanticSerializationError, to_jsonable_python

from sagaway import NonRetryableError
from sagaway.engine.relay import REPLY_TYPE  # the one wire format, both sides
from sagaway.errors import InvalidPayload, SagawayError, TransportError
from sagaway.messaging import open_transport
from sagaway.messaging.base import (
    DEFAULT_GRACE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_PREFETCH,
    Delivery,
    Subscription,
    Transport,
    check_destination,
)
from sagaway.messaging.envelope import Envelope
from sagaway.participant.base import Database, open_database
from sagaway.participant.relay import OutboxRelay

if TYPE_CHECKING:
    from sagaway.protection.codec import PayloadCodec
    from sagaway.protection.signing import EnvelopeSigner

__all__ = ["REPLY_TYPE", "Command", "CommandRejected", "Participant"]

log = logging.getLogger("sagaway.participant")

"""The ``type`` of the envelopes a participant answers commands with."""
MAX_ERROR_CHARS = 2000

F = TypeVar("F", bound=Callable[..., Any])


FENCED_ACTION = {"ok": False, "retryable": False,
                 "error": "compensated before it was applied: not applied"}
"""The reply recorded for an action whose compensation ran first."""


class CommandRejected(SagawayError):
    """A command this participant cannot take: an unknown type, or no idempotency key or
    reply destination. The transport dead-letters it with this message as the reason."""


@dataclass(frozen=True, slots=True)
class Command:
    """What a handler receives."""

    type: str
    """The command's name (``"reserve"``)."""
    payload: Any
    """The saga input (JSON data)."""
    idempotency_key: str
    run_id: str | None
    step: str | None
    envelope: Envelope
    """The command as received."""
    db: Any
    """The participant's database connection, inside the transaction that will also record
    this command in the inbox: write the business change through it and do not commit.
    Async handlers get the backend's async connection (an ``asyncpg.Connection``, an
    :class:`~sagaway.participant.sqlite.AsyncSQLiteConnection`); sync handlers a sync one
    (a ``sqlite3.Connection``, a :class:`~sagaway.participant.postgres.SyncPostgresConnection`).
    """
    attempt: int = 1
    """The delivery attempt (1 first; more after a crash or a handler exception)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


class Participant:
    """Runs a service's command handlers, applying each command once, and replies.

    Example::

        inventory = Participant("inventory", "amqp://guest:guest@127.0.0.1/",
                                db="sqlite:///inventory.db")

        @inventory.handler("reserve")
        async def reserve(cmd: Command) -> dict[str, int]:
            await cmd.db.execute("UPDATE stock SET qty = qty - 1 WHERE sku = ?",
                                 (cmd.payload["sku"],))
            return {"reserved": 1}

        await inventory.run()   # or: async with inventory: ...

    Args:
        service: the destination commands arrive on (the service's queue or stream).
        transport: a :class:`~sagaway.messaging.Transport` or a transport URL.
        db: the participant's own database: ``sqlite:///path.db``, ``postgresql://…``, a
            :class:`~sagaway.participant.Database` or an asyncpg pool.
        prefetch: commands handled at once (SQLite applies them one at a time anyway).
        max_deliveries: attempts before a command whose handler keeps raising is
            dead-lettered.
        dead_letter: where those go (default ``service + ".dead-letter"``).
        relay_interval: seconds between outbox polls (the relay is also woken per commit).
        outbox_retention: seconds sent replies stay in the outbox (``None``: forever).
        grace: seconds ``aclose`` lets running handlers and the relay finish.
        around_command: called as ``around_command(service, envelope)`` for each command;
            the handling runs inside the context manager it returns. For tracing:
            ``sagaway.observability.participant_tracing()`` continues the orchestrator's
            trace from the envelope's ``traceparent`` header.
        codec: the payload codec the orchestrator uses (``AesGcmCodec``): command payloads
            are opened before the handler sees them, replies are sealed, and the inbox keeps
            the recorded reply sealed. None reads ``SAGAWAY_KEYS`` (no encryption when
            unset); False turns it off.
        signer: signs the replies and checks the commands (``EnvelopeSigner``): unsigned,
            forged, stale and replayed commands are dead-lettered with the reason. None
            reads ``SAGAWAY_SIGNING_KEYS`` (no signing when unset); False turns it off.

    Whatever the participant builds from a URL, or opens itself, it closes in ``aclose``;
    a transport or database passed already open is left open.
    """

    def __init__(
        self,
        service: str,
        transport: Transport | str,
        db: Database | str | Any,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        dead_letter: str | None = None,
        relay_interval: float = 1.0,
        outbox_retention: float | None = 3600.0,
        grace: float | None = DEFAULT_GRACE,
        around_command: Callable[[str, Envelope], AbstractContextManager[Any]] | None = None,
        codec: PayloadCodec | bool | None = None,
        signer: EnvelopeSigner | bool | None = None,
    ) -> None:
        self.service = check_destination(service)
        self.transport = open_transport(transport) if isinstance(transport, str) else transport
        self.db = open_database(db)
        if signer is None or signer is True:
            from sagaway.protection.signing import signer_from_env

            signer = signer_from_env()
        if signer:
            self.transport.signer = signer
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.dead_letter = dead_letter
        self.grace = grace
        self.around_command = around_command
        self.relay = OutboxRelay(
            self.db, self.transport, interval=relay_interval, retention=outbox_retention
        )
        if codec is None or codec is True:
            from sagaway.protection.codec import codec_from_env

            codec = codec_from_env()
        self.codec: PayloadCodec | None = codec or None
        self._handlers: dict[str, tuple[Callable[[Command], Any], bool]] = {}
        self._subscription: Subscription | None = None
        self._close_db = False
        self._close_transport = False
        self._stop = asyncio.Event()

    def handler(self, command: str) -> Callable[[F], F]:
        """Register the decorated function (sync or async) as the handler of ``command``.

        It takes a :class:`Command` and returns the result (JSON data, or what pydantic can
        dump to it); it raises :class:`~sagaway.NonRetryableError` to refuse. Sync handlers
        run on a thread.
        """

        def register(fn: F) -> F:
            if command in self._handlers:
                raise ValueError(f"{self.service!r} already has a handler for {command!r}")
            self._handlers[command] = (fn, _is_async(fn))
            return fn

        return register

    @property
    def commands(self) -> list[str]:
        """The command types this participant handles."""
        return sorted(self._handlers)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database (creating the inbox and outbox tables) and the transport,
        start the relay, and subscribe to the service's destination. Idempotent."""
        if self._subscription is not None:
            return
        if not self._handlers:
            raise ValueError(
                f"participant {self.service!r} has no handlers: register them "
                f"with @participant.handler('command')"
            )
        self._stop.clear()
        try:
            if not self.db.is_open:
                await self.db.open()
                self._close_db = True
            if not self.transport.is_open:
                await self.transport.open()
                self._close_transport = True
            self.relay.start()
            self._subscription = await self.transport.subscribe(
                self.service,
                self._on_delivery,
                prefetch=self.prefetch,
                max_deliveries=self.max_deliveries,
                dead_letter=self.dead_letter,
            )
        except BaseException:
            await self.aclose()
            raise
        log.info("participant %s: taking commands %s", self.service, self.commands)

    async def aclose(self) -> None:
        """Stop taking commands, let running ones finish and their replies go out (within
        ``grace`` each), then close what the participant opened. Idempotent."""
        sub, self._subscription = self._subscription, None
        try:
            if sub is not None:
                await sub.stop(grace=self.grace)
            await self.relay.stop(grace=self.grace)
        finally:
            if self._close_transport:
                self._close_transport = False
                await self.transport.aclose()
            if self._close_db:
                self._close_db = False
                await self.db.aclose()
            self._stop.set()

    async def run(self) -> None:
        """Open, serve until :meth:`stop` is called or the task is cancelled, then close."""
        await self.open()
        try:
            await self._stop.wait()
        finally:
            await self.aclose()

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler on the loop)."""
        self._stop.set()

    async def __aenter__(self) -> Participant:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one command ------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        if self.around_command is None:
            await self._handle(delivery)
            return
        with self.around_command(self.service, delivery.envelope):
            await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        env = delivery.envelope
        entry = self._handlers.get(env.type)
        if entry is None:
            raise CommandRejected(
                f"unknown command type {env.type!r} for service {self.service!r} (it "
                f"handles {self.commands})"
            )
        key, reply_to = env.idempotency_key, env.reply_to
        if not key:
            raise CommandRejected(f"command {env.type!r} {env.id} has no idempotency_key")
        if not reply_to:
            raise CommandRejected(f"command {env.type!r} {env.id} has no reply_to")
        try:
            check_destination(reply_to)
        except TransportError as exc:
            raise CommandRejected(f"command {env.type!r} {env.id}: reply_to: {exc}") from None
        fn, is_async = entry
        fence = None
        if key.endswith(":compensation"):
            fence = (key.removesuffix(":compensation") + ":action", FENCED_ACTION)
        await self._apply(
            delivery, fn, is_async, key=key, fence=fence, outcome=self._success,
            messages=lambda reply: [(reply_to, self._reply(env, reply))],
        )

    async def _apply(
        self,
        delivery: Delivery,
        fn: Callable[[Command], Any],
        is_async: bool,
        *,
        key: str,
        fence: tuple[str, dict[str, Any]] | None,
        outcome: Callable[[Envelope, Any], tuple[dict[str, Any], bool]],
        messages: Callable[[dict[str, Any]], Sequence[tuple[str, str]]],
    ) -> None:
        """Apply one message once: the handler's changes, the inbox record for ``key`` and
        the ``messages(recorded reply)`` (destination, body) commit in one transaction; a
        key recorded before sends its messages again without running the handler.

        ``outcome(envelope, result)`` turns the handler's result into (reply, undo);
        :meth:`_refused` does the same for a NonRetryableError. Subclasses (choreographed
        services) reuse this with their own keys, outcomes and messages.
        """
        env = delivery.envelope
        payload = env.payload
        if self.codec is not None:
            payload = self.codec.open(payload, aad=f"msg:{env.id}")
        async with self.db.transaction() as tx:
            recorded = await tx.claim(key, fence=fence)
            if self.codec is not None and isinstance(recorded, dict) \
                    and set(recorded) == {"sealed"}:
                recorded = self.codec.open(recorded["sealed"], aad=f"inbox:{key}")
            if recorded is not None:  # applied before: send the same again
                await tx.commit(key, None, undo=False, messages=messages(recorded))
            else:
                cmd = Command(
                    type=env.type,
                    payload=payload,
                    idempotency_key=key,
                    run_id=env.run_id,
                    step=env.step,
                    envelope=env,
                    db=tx.connection,
                    attempt=delivery.attempt,
                )
                try:
                    if is_async:
                        result = await fn(cmd)
                    else:
                        result = await tx.call_sync(lambda conn: _call_sync(fn, cmd, conn))
                except NonRetryableError as exc:
                    reply, undo = self._refused(env, exc)
                else:
                    reply, undo = outcome(env, result)
                kept = reply if self.codec is None else {
                    "sealed": self.codec.seal(reply, aad=f"inbox:{key}")}
                await tx.commit(key, kept, undo=undo, messages=messages(reply))
        self.relay.wake()

    def _refused(self, env: Envelope, exc: NonRetryableError) -> tuple[dict[str, Any], bool]:
        """The reply recording a business "no" (its changes undone)."""
        return {"ok": False, "error": _describe(exc), "retryable": False}, True

    def _success(self, env: Envelope, result: Any) -> tuple[dict[str, Any], bool]:
        """The ok reply, or — when the result cannot be sent — a failure, its changes undone
        (retrying would compute the same result)."""
        reply: dict[str, Any]
        try:
            reply = {"ok": True, "result": to_jsonable_python(result)}
            self._reply(env, reply)
        except (PydanticSerializationError, TypeError, ValueError, InvalidPayload) as exc:
            text = _describe(exc)
            log.error(
                "participant %s: the result of %r for %s cannot be sent, replying a "
                "failure and rolling its changes back: %s",
                self.service,
                env.type,
                env.idempotency_key,
                text,
            )
            error = f"the result of {env.type!r} cannot be sent as JSON: {text}"
            return {"ok": False, "error": error[:MAX_ERROR_CHARS], "retryable": False}, True
        return reply, False

    def _reply(self, command: Envelope, payload: dict[str, Any]) -> str:
        reply = Envelope(
            type=REPLY_TYPE,
            payload=payload,
            run_id=command.run_id,
            step=command.step,
            idempotency_key=command.idempotency_key,
            correlation_id=command.correlation_id,
        )
        if self.codec is not None:
            reply = dataclasses.replace(
                reply, payload=self.codec.seal(payload, aad=f"msg:{reply.id}"))
        return reply.to_bytes(max_bytes=self.transport.max_message_bytes).decode("utf-8")

    def __repr__(self) -> str:
        state = "running" if self._subscription is not None else "stopped"
        return f"<Participant {self.service!r} {state}>"


def _call_sync(fn: Callable[[Command], Any], cmd: Command, conn: Any) -> Any:
    result = fn(dataclasses.replace(cmd, db=conn))
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError(
            f"the handler of {cmd.type!r} returned an awaitable: declare it "
            f"`async def` so it runs on the event loop"
        )
    return result
