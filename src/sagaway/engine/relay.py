"""The outbox relay and the wire format of command steps.

Commands to other services are written to the store's outbox in the same transaction as the
transition that starts the step; the relay publishes them with broker confirmation and marks
them sent only then. A relay that dies between publish and mark-sent leaves the message
claimed until its lease runs out; another relay (or the same one, restarted) publishes it
again: duplicates on the wire are expected, the participant's inbox applies each once.

Wire format (the participant side, ``sagaway.participant``, speaks the same):

* command: ``type`` = the command name, ``run_id``, ``step``, ``idempotency_key``,
  ``reply_to``, ``correlation_id`` = ``{idempotency_key}:{attempt}``, ``payload`` = the
  run's input;
* reply: ``type`` = ``sagaway.reply``, the command's ``correlation_id``, ``payload`` =
  ``{"ok": true, "result": …}`` or ``{"ok": false, "error": "…", "retryable": false}``;
  a failure may add ``"maybe_applied": true`` when the service cannot tell whether the
  attempt took effect (it ran past a time limit): the step then counts as possibly applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagaway.engine.state import (
    ActionFailed,
    ActionSucceeded,
    CompensationFailed,
    CompensationSucceeded,
    Event,
)
from sagaway.errors import MalformedEnvelope, SagawayError, StoreError, TransportError
from sagaway.messaging.base import Transport
from sagaway.messaging.envelope import Envelope
from sagaway.store.base import OutboxMessage, Store

__all__ = ["REPLY_TYPE", "OutboxRelay", "Reply", "command_message", "domain_event",
           "parse_reply"]

log = logging.getLogger("sagaway.relay")

REPLY_TYPE = "sagaway.reply"


def command_message(*, run_id: str, step: str, key: str, attempt: int, service: str,
                    command: str, payload: Any, reply_to: str,
                    headers: Mapping[str, str] | None = None) -> OutboxMessage:
    """The outbox row for one attempt of a command step (or of its compensation)."""
    envelope = Envelope(
        type=command,
        headers=dict(headers or {}),
        payload=payload,
        run_id=run_id,
        step=step,
        idempotency_key=key,
        reply_to=reply_to,
        correlation_id=f"{key}:{attempt}",
    )
    return OutboxMessage(id=envelope.id, destination=service,
                         body=envelope.to_bytes(max_bytes=None).decode())


def domain_event(*, run_id: str, saga: str, event_type: str, destination: str,
                 payload: Any) -> OutboxMessage:
    """The outbox row of the event a saga publishes when it ends."""
    envelope = Envelope(type=event_type, payload=payload, run_id=run_id,
                        idempotency_key=f"{run_id}:event", correlation_id=run_id,
                        extra={"saga": saga})
    return OutboxMessage(id=envelope.id, destination=destination,
                         body=envelope.to_bytes(max_bytes=None).decode())


@dataclass(frozen=True, slots=True)
class Reply:
    """A participant's answer to one attempt."""

    run_id: str
    step: str
    compensation: bool
    attempt: int
    ok: bool
    result: Any = None
    error: str | None = None
    retryable: bool = False
    maybe_applied: bool = False
    """The service cannot say whether the attempt took effect (it ran past a time limit)."""

    def event(self, now: float) -> Event:
        """The decider event this reply is for its run."""
        if self.compensation:
            if self.ok:
                return CompensationSucceeded(self.step, self.attempt, now)
            return CompensationFailed(self.step, self.attempt, self.error or "", now,
                                      retryable=self.retryable)
        if self.ok:
            return ActionSucceeded(self.step, self.attempt, self.result, now)
        return ActionFailed(self.step, self.attempt, self.error or "", now,
                            retryable=self.retryable, maybe_applied=self.maybe_applied)


def parse_reply(envelope: Envelope) -> Reply:
    """Read a reply envelope. Raises MalformedEnvelope with the reason."""
    if envelope.type != REPLY_TYPE:
        raise MalformedEnvelope(f"expected a {REPLY_TYPE!r} message, got {envelope.type!r}")
    parts = (envelope.correlation_id or "").rsplit(":", 3)
    if len(parts) != 4 or parts[2] not in ("action", "compensation") or not parts[3].isdigit():
        raise MalformedEnvelope(
            f"reply correlation id {envelope.correlation_id!r} is not "
            f"'<run>:<step>:action|compensation:<attempt>'"
        )
    run_id, step, kind, attempt = parts
    body = envelope.payload
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise MalformedEnvelope("a reply's payload must be an object with a boolean 'ok'")
    return Reply(
        run_id=run_id,
        step=step,
        compensation=kind == "compensation",
        attempt=int(attempt),
        ok=body["ok"],
        result=body.get("result"),
        error=None if body["ok"] else str(body.get("error") or "the service said no"),
        retryable=bool(body.get("retryable", False)),
        maybe_applied=not body["ok"] and body.get("maybe_applied") is True,
    )


class OutboxRelay:
    """Publishes unsent outbox messages; one per worker, any number per store."""

    def __init__(self, store: Store, transport: Transport, *, owner: str,
                 lease_seconds: float = 30.0, batch: int = 256,
                 poll_interval: float = 1.0) -> None:
        self._store = store
        self._transport = transport
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._batch = batch
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sagaway-outbox-relay")

    def poke(self) -> None:
        """New messages were committed: publish them now, not at the next poll."""
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                moved = await self.relay_once()
            except (StoreError, TransportError) as exc:
                log.warning("outbox relay: %s; retrying in %.1fs", exc, self._poll_interval)
                moved = 0
            if moved >= self._batch:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()

    async def relay_once(self) -> int:
        """Claim a batch, publish it with confirms, mark what was confirmed. Returns claimed."""
        messages = await self._store.claim_outbox(owner=self._owner,
                                                  lease_seconds=self._lease_seconds,
                                                  limit=self._batch)
        if not messages:
            return 0

        signer = self._transport.signer

        async def publish(body: str, destination: str, message_id: str) -> str | None:
            data = body.encode()
            if signer is not None:
                # Signed now, as it goes out: the timestamp is the publish time.
                data = signer.sign_body(data)
            try:
                await self._transport.publish_raw(destination, data, message_id=message_id)
            except SagawayError as exc:
                # Left claimed: when the lease runs out it is published again.
                log.warning("outbox relay: publishing %s to %s failed: %s", message_id,
                            destination, exc)
                return None
            return message_id

        results = await asyncio.gather(*(publish(m.body, m.destination, m.id)
                                         for m in messages))
        sent = [i for i in results if i is not None]
        if sent:
            await self._store.mark_sent(sent, now=time.time())
            self.published += len(sent)
        return len(messages)
