"""The service side of a choreography: react to events, emit events, each exactly once.

::

    inventory = ChoreographedService("inventory", "amqp://guest:guest@127.0.0.1/",
                                     "sqlite:///inventory.db", flow=flow)

    @inventory.on("OrderCreated", emits=("StockReserved", "StockRejected"))
    def reserve(event: Command) -> dict[str, Any]:
        if not take_stock(event.db, event.payload["sku"]):
            raise NonRetryableError("out of stock")      # -> StockRejected, changes undone
        return {**event.payload, "reserved": True}       # -> StockReserved

    @inventory.on("PaymentFailed", emits="StockReleased")
    def release(event: Command) -> None: ...             # -> StockReleased

    await inventory.run()

A :class:`ChoreographedService` is a :class:`~sagaway.participant.Participant` whose
messages are events: it consumes its own queue of the flow (``{prefix}.{service}``), and
each event is applied once — the inbox record (keyed ``{flow}:{run}:{step}:action`` or
``:compensation``, so a second copy of the event, even with another envelope id, does
nothing twice), the handler's changes and the events it emits (written to the outbox once
per consumer of each) commit in one transaction; retries, backoff and dead letters come from
the transport, as for commands. A duplicate re-emits the recorded events with their
recorded envelope ids, so downstream consumers and the tracker drop the copy.

What a handler's outcome emits:

* a return of :class:`Emit` → that event (it must be one the flow lets this reaction emit);
* any other return → the reaction's success event (``success`` for a step, ``compensated``
  for a compensation) with the returned value as payload, or the received payload when the
  handler returns ``None``;
* :class:`~sagaway.NonRetryableError` → its changes are rolled back and the failure event
  (``failure``, ``compensation_failure``) is emitted with ``{**payload, "error": "…"}``; a
  reaction without a failure event lets the error go to redelivery and the dead letter;
* any other exception → nothing is recorded; the transport redelivers, then dead-letters.

A handler reached after its step was already undone (the compensation overtook the action)
is not run: it is recorded as fenced and emits nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic_core import PydanticSerializationError, to_jsonable_python

from sagaway.choreography.flow import Choreography, Reaction
from sagaway.engine.runtime import NonRetryableError, new_run_id
from sagaway.errors import DefinitionError, InvalidPayload, TransportError
from sagaway.messaging.base import (
    DEFAULT_GRACE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_PREFETCH,
    Delivery,
    Transport,
)
from sagaway.messaging.envelope import Envelope
from sagaway.participant.base import Database
from sagaway.participant.core import CommandRejected, Participant, _describe, _is_async

if TYPE_CHECKING:
    from sagaway.protection.codec import PayloadCodec
    from sagaway.protection.signing import EnvelopeSigner

__all__ = ["FLOW_HEADER", "SERVICE_HEADER", "ChoreographedService", "Emit", "emit_event"]

FLOW_HEADER = "sagaway-flow"
"""Header naming the choreography an event belongs to."""
SERVICE_HEADER = "sagaway-service"
"""Header naming the service that emitted an event."""

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("sagaway.choreography")

_FENCED = {"ok": False, "fenced": True, "emit": None,
           "error": "undone before it was applied: not applied"}


@dataclass(frozen=True, slots=True)
class Emit:
    """What a handler returns to choose the event it emits (and its payload)."""

    event: str
    payload: Any = None


def _event_envelope(flow: Choreography, *, event: str, payload: Any, run_id: str,
                    event_id: str, at: float, service: str | None,
                    headers: Mapping[str, str] | None, cause: str | None,
                    codec: PayloadCodec | None = None) -> Envelope:
    if codec is not None:
        # Sealed for this message id, as the orchestrator's outbox seals commands: the
        # consuming services and the tracker open it with the same codec.
        payload = codec.seal(payload, aad=f"msg:{event_id}")
    producer = flow.producer(event)
    step = producer[0].name if producer and producer[0] else None
    hdrs = dict(headers or {})
    hdrs[FLOW_HEADER] = flow.name
    if service:
        hdrs[SERVICE_HEADER] = service
    return Envelope(type=event, payload=payload, id=event_id, run_id=run_id, step=step,
                    correlation_id=cause, headers=hdrs, created_at=at)


async def emit_event(
    transport: Transport,
    flow: Choreography,
    event: str,
    payload: Any = None,
    *,
    run_id: str | None = None,
    event_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    codec: PayloadCodec | None = None,
) -> str:
    """Publish an event of ``flow`` straight to every queue that consumes it; return the
    run id (a new one when ``run_id`` is None). With ``codec``, the payload is sealed.

    No outbox: use it to start a saga from a process without a database, in tests, or to
    replay an event by hand (the same ``event_id`` is dropped as a duplicate). A service
    starts sagas atomically with its own change with :meth:`ChoreographedService.start`.

    Raises:
        DefinitionError: ``event`` is not an event of the flow.
        TransportError: the broker did not confirm (publish again with the same ids).
    """
    if flow.producer(event) is None:
        raise DefinitionError(
            f"{event!r} is not an event of choreography {flow.name!r}; its events are "
            f"{flow.events}"
        )
    run_id = run_id or new_run_id()
    env = _event_envelope(flow, event=event, payload=payload, run_id=run_id,
                          event_id=event_id or uuid.uuid4().hex, at=time.time(), service=None,
                          headers=headers, cause=None, codec=codec)
    for destination in flow.subscribers(event):
        await transport.publish(destination, env)
    return run_id


class ChoreographedService(Participant):
    """A service's reactions to the events of one choreography.

    Args:
        service: the service's name in the flow (its steps' ``service``, or a ``notify`` key).
        transport: a :class:`~sagaway.messaging.Transport` or a transport URL.
        db: the service's own database (``sqlite:///…``, ``postgresql://…``, a
            :class:`~sagaway.participant.Database`, an asyncpg pool).
        flow: the :class:`~sagaway.choreography.Choreography`.

    The other keywords are :class:`~sagaway.participant.Participant`'s (prefetch,
    max_deliveries, dead_letter, relay_interval, outbox_retention, grace, codec — the events
    it emits are sealed with it —, signer), and
    ``retry_backoff`` / ``max_backoff``: a handler that raised holds its event
    ``retry_backoff * 2**(attempt-1)`` seconds (at most ``max_backoff``) before the broker
    redelivers it; the ``max_deliveries``-th failure dead-letters it at once.

    Raises:
        DefinitionError: the service takes no part in the flow.
    """

    def __init__(
        self,
        service: str,
        transport: Transport | str,
        db: Database | str | Any,
        *,
        flow: Choreography,
        prefetch: int = DEFAULT_PREFETCH,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        dead_letter: str | None = None,
        relay_interval: float = 1.0,
        outbox_retention: float | None = 3600.0,
        grace: float | None = DEFAULT_GRACE,
        retry_backoff: float = 0.2,
        max_backoff: float = 10.0,
        codec: PayloadCodec | bool | None = None,
        signer: EnvelopeSigner | bool | None = None,
    ) -> None:
        if retry_backoff < 0 or max_backoff < 0:
            raise ValueError("retry_backoff and max_backoff must be >= 0 seconds")
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.flow = flow
        self.name = service
        self._reactions = flow.reactions(service)
        super().__init__(
            flow.destination(service), transport, db, prefetch=prefetch,
            max_deliveries=max_deliveries, dead_letter=dead_letter,
            relay_interval=relay_interval, outbox_retention=outbox_retention, grace=grace,
            codec=codec, signer=signer,
        )

    def on(self, event: str, *, emits: str | Sequence[str] | None = None) -> Callable[[F], F]:
        """Register the decorated function (sync or async) as this service's reaction to
        ``event``. It receives a :class:`~sagaway.participant.Command` (``payload``,
        ``run_id``, ``db`` inside the transaction, ``envelope``).

        ``emits`` (optional) restates the events the flow lets this reaction emit; it is
        checked against the flow so the code and the flow cannot drift apart.

        Raises:
            DefinitionError: the flow has no such reaction for this service, ``emits``
                disagrees with the flow, or the event has a handler already.
        """
        reaction = self._reactions.get(event)
        if reaction is None:
            raise DefinitionError(
                f"service {self.name!r} does not react to {event!r} in choreography "
                f"{self.flow.name!r}; it reacts to {sorted(self._reactions)}. Change the "
                f"flow (a step's on/compensate_on, or notify) to add it"
            )
        if emits is not None:
            declared = (emits,) if isinstance(emits, str) else tuple(emits)
            if set(declared) != set(reaction.emits):
                raise DefinitionError(
                    f"service {self.name!r} on {event!r}: emits={list(declared)} but "
                    f"choreography {self.flow.name!r} has this reaction emit "
                    f"{list(reaction.emits)}; make them agree"
                )

        def register(fn: F) -> F:
            if event in self._handlers:
                raise DefinitionError(
                    f"service {self.name!r} already has a handler for {event!r}"
                )
            self._handlers[event] = (fn, _is_async(fn))
            return fn

        return register

    def handler(self, command: str) -> Callable[[F], F]:
        """Not for choreographed services: use :meth:`on`."""
        raise DefinitionError(
            f"{self.name!r} is a choreographed service: register reactions with "
            f"@service.on({command!r}, emits=...)"
        )

    @property
    def missing(self) -> list[str]:
        """The events the flow has this service react to that have no handler yet."""
        return sorted(set(self._reactions) - set(self._handlers))

    async def open(self) -> None:
        """Check every reaction the flow gives this service has a handler, then open as a
        participant (database, transport, outbox relay, subscription). Idempotent.

        Raises:
            DefinitionError: a reaction has no handler.
        """
        if self.missing:
            raise DefinitionError(
                f"service {self.name!r} has no handler for {self.missing} in choreography "
                f"{self.flow.name!r}: add @{self.name}.on('<Event>') for each"
            )
        await super().open()

    # -- starting a saga --------------------------------------------------------------------

    async def start(
        self,
        payload: Any = None,
        *,
        key: str | None = None,
        apply: Callable[[Any, str], Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Start a run: emit the flow's start event through this service's outbox; return
        the run (saga) id.

        ``apply(db, run_id)`` (sync or async) writes the service's own change in the same
        transaction (the order row next to its ``OrderCreated``). With ``key``, starting
        again returns the first run's id and emits nothing.

        Raises:
            TransportError: the service is not open.
            InvalidPayload: ``payload`` is not JSON data.
        """
        if self._subscription is None:
            raise TransportError(f"{self!r} is not open: `async with service:` first")
        run_id = new_run_id()
        inbox_key = f"{self.flow.name}:start:{key if key is not None else run_id}"
        try:
            data = to_jsonable_python(payload)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise InvalidPayload(f"the start payload is not JSON data: {exc}") from None
        reply = {"ok": True, "emit": self.flow.start, "payload": data,
                 "id": uuid.uuid4().hex, "at": time.time(), "run_id": run_id,
                 "headers": dict(headers or {})}
        async with self.db.transaction() as tx:
            recorded = await tx.claim(inbox_key)
            if recorded is not None:
                return str(recorded["run_id"])
            if apply is not None:
                if _is_async(apply):
                    await apply(tx.connection, run_id)
                else:
                    await tx.call_sync(lambda conn: apply(conn, run_id))
            await tx.commit(inbox_key, reply, undo=False,
                            messages=self._messages(run_id, None, reply))
        self.relay.wake()
        return run_id

    # -- one event --------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        env = delivery.envelope
        reaction = self._reactions.get(env.type)
        entry = self._handlers.get(env.type)
        if reaction is None or entry is None:
            raise CommandRejected(
                f"service {self.name!r} has no reaction to {env.type!r} in choreography "
                f"{self.flow.name!r} (it reacts to {sorted(self._handlers)})"
            )
        if not env.run_id:
            raise CommandRejected(f"event {env.type!r} {env.id} carries no run_id (saga id)")
        fn, is_async = entry
        key, fence = self._key(reaction, env.run_id)
        try:
            await self._apply(
                delivery, fn, is_async, key=key, fence=fence,
                outcome=lambda e, result: self._outcome(reaction, e, result),
                messages=lambda reply: self._messages(env.run_id or "", env, reply),
            )
        except Exception as exc:
            if delivery.attempt < self.max_deliveries:
                # Brokers redeliver at once; hold the event (unacknowledged) first, so a
                # dependency that is down gets time to come back before the next attempt.
                delay = self.backoff(delivery.attempt)
                log.info("service %s: %s for run %s failed (attempt %d), retrying in "
                         "%.2fs: %s", self.name, env.type, env.run_id, delivery.attempt,
                         delay, exc)
                await asyncio.sleep(delay)
            raise

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the event is redelivered."""
        return float(min(self.retry_backoff * 2.0 ** (attempt - 1), self.max_backoff))

    def _key(self, reaction: Reaction, run_id: str
             ) -> tuple[str, tuple[str, dict[str, Any]] | None]:
        base = f"{self.flow.name}:{run_id}"
        if reaction.step is None:
            return f"{base}:{self.name}:{reaction.event}:notify", None
        action = f"{base}:{reaction.step.name}:action"
        if reaction.role == "compensation":
            # An action delivered after its compensation must never be applied.
            return f"{base}:{reaction.step.name}:compensation", (action, _FENCED)
        return action, None

    def _outcome(self, reaction: Reaction, env: Envelope, result: Any
                 ) -> tuple[dict[str, Any], bool]:
        if isinstance(result, Emit):
            event, payload = result.event, result.payload
            if event not in reaction.emits:
                raise DefinitionError(
                    f"the handler of {env.type!r} in service {self.name!r} returned "
                    f"Emit({event!r}), but the flow lets it emit only {list(reaction.emits)}"
                )
        else:
            event = reaction.default_event  # type: ignore[assignment]
            payload = env.payload if result is None else result
        if event is None:
            return {"ok": True, "emit": None}, False
        try:
            data = to_jsonable_python(payload)
            json.dumps(data, allow_nan=False)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            failure = reaction.failure_event
            text = f"the payload of {event!r} cannot be sent as JSON: {_describe(exc)}"
            if failure is None:
                raise InvalidPayload(text) from None
            return self._failure(reaction, env, failure, text), True
        return {"ok": True, "emit": event, "payload": data, "id": uuid.uuid4().hex,
                "at": time.time()}, False

    def _refused(self, env: Envelope, exc: NonRetryableError) -> tuple[dict[str, Any], bool]:
        reaction = self._reactions[env.type]
        failure = reaction.failure_event
        if failure is None:
            # The flow says this reaction cannot fail: let the transport retry it and, in
            # the end, dead-letter it where an operator sees it.
            raise exc
        return self._failure(reaction, env, failure, str(exc) or _describe(exc)), True

    @staticmethod
    def _failure(reaction: Reaction, env: Envelope, event: str, error: str) -> dict[str, Any]:
        payload: dict[str, Any] = (
            {**env.payload, "error": error} if isinstance(env.payload, dict)
            else {"error": error, "payload": env.payload}
        )
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError):
            payload = {"error": error}
        return {"ok": False, "emit": event, "payload": payload, "id": uuid.uuid4().hex,
                "at": time.time()}

    def _messages(self, run_id: str, cause: Envelope | None, reply: dict[str, Any]
                  ) -> list[tuple[str, str]]:
        event = reply.get("emit")
        if not event:
            return []
        headers = dict(cause.headers) if cause is not None else dict(reply.get("headers") or {})
        env = _event_envelope(
            self.flow, event=event, payload=reply.get("payload"),
            run_id=str(reply.get("run_id") or run_id), event_id=str(reply["id"]),
            at=float(reply["at"]), service=self.name, headers=headers,
            cause=cause.id if cause is not None else None, codec=self.codec,
        )
        body = env.to_bytes(max_bytes=self.transport.max_message_bytes).decode("utf-8")
        return [(destination, body) for destination in self.flow.subscribers(event)]

    def __repr__(self) -> str:
        state = "running" if self._subscription is not None else "stopped"
        return f"<ChoreographedService {self.name!r} of {self.flow.name!r} {state}>"
