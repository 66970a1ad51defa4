"""Command steps: steps whose action or compensation is a message to a participant.

A transition that starts a command step's attempt writes the command message into the
store's outbox in the same transaction (the relay publishes it later), so a command is sent
if and only if its "started" is durable. A run that can only move on when a reply (or a
timer) arrives is *parked*: released in the store, driven by nobody, until the reply claims
it (``Orchestrator._on_reply``) or its deadline makes it due.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sagaway.definition.saga import Command as CommandSpec
from sagaway.definition.saga import Saga, idempotency_key
from sagaway.engine.listener import Invocation
from sagaway.engine.relay import command_message
from sagaway.engine.state import Command, InvokeAction, InvokeCompensation, RunState, StepStatus
from sagaway.messaging.base import Transport
from sagaway.store.base import OutboxMessage

__all__ = ["CommandSteps", "is_remote"]


def is_remote(saga: Saga, cmd: Command) -> bool:
    """The command is carried out by a participant (a message), not in this worker."""
    step = saga[cmd.step]
    return step.remote if isinstance(cmd, InvokeAction) else step.remote_compensation


class CommandSteps:
    """What an Orchestrator writes and decides for command steps.

    Args:
        transport: the Orchestrator's transport (None: no command steps, nothing parks).
        reply_to: where participants send their replies (every worker listens there).
        headers_for: the listeners' headers for an attempt (trace context), sent in the
            command envelope.
    """

    def __init__(self, *, transport: Transport | None, reply_to: str,
                 headers_for: Callable[[Invocation], dict[str, str]]) -> None:
        self.transport = transport
        self.reply_to = reply_to
        self.headers_for = headers_for

    def outbox_for(self, run_id: str, saga: Saga, data: Any, commands: Iterable[Command],
                   results: Mapping[str, Any]) -> builtins.list[OutboxMessage]:
        """The command messages a transition emits (written in its own transaction)."""
        out = []
        for cmd in commands:
            if not is_remote(saga, cmd):
                continue
            step = saga[cmd.step]
            compensating = isinstance(cmd, InvokeCompensation)
            target = step.compensation_fn if compensating else step.action
            assert isinstance(target, CommandSpec)
            headers = self.headers_for(Invocation(run_id, saga.name, step.name, cmd.attempt,
                                                  compensating, "command"))
            out.append(command_message(
                run_id=run_id, step=step.name, attempt=cmd.attempt,
                key=idempotency_key(run_id, step.name, compensation=compensating),
                service=target.service, command=target.name,
                payload=data if target.payload is None else target.payload(data, results),
                reply_to=self.reply_to, headers=headers,
            ))
        return out

    def parks(self, saga: Saga, state: RunState, commands: Iterable[Command], *,
              busy: bool) -> bool:
        """Only replies (or timers) can move the run on: release it instead of holding it."""
        if state.status.finished or busy or self.transport is None:
            return False
        if any(not is_remote(saga, c) for c in commands):
            return False
        return any(
            (s.status is StepStatus.RUNNING and saga[name].remote)
            or (s.status is StepStatus.COMPENSATING and saga[name].remote_compensation)
            for name, s in state.steps.items()
        )
