"""A run held by this worker: its state in memory and the tasks that drive it.

The Orchestrator keeps one :class:`Driver` per run it drives (see ``runtime``); the step
invoker (``invocation``) and recovery (``recovery``) read and create them too.
"""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import dataclass, field
from typing import Any

from sagaway.definition.saga import Saga
from sagaway.engine.state import Event, RunState
from sagaway.run import HistoryEntry

__all__ = ["Driver", "run_secrets"]


@dataclass(eq=False)
class Driver:
    """A run held by this worker: its state in memory and the task that drives it."""

    run_id: str
    saga: Saga
    state: RunState
    row_version: int
    input: Any
    idempotency_key: str | None
    created_at: float
    updated_at: float
    history: builtins.list[HistoryEntry] | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    timer: asyncio.Task[None] | None = None
    timer_at: float | None = None
    invocations: set[asyncio.Task[None]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    committed: bool = False
    """Its first write (creation or claim) is durable: the lease is really ours."""
    claim_seq: int = 0
    """When it became ours, on this worker's claim counter (see Orchestrator._renew_loop)."""
    transitions: int = 0
    releasing: bool = False
    """Its final transition, which also drops the lease, is being committed."""
    clear_request: bool = False
    """It was claimed to carry out an operator request; the next write clears it."""
    secrets: frozenset[str] | None = None
    """The values of its sensitive fields (see Saga(sensitive=…)), once computed."""


def run_secrets(d: Driver) -> frozenset[str]:
    """The run's sensitive values (recomputed when they may come from step results)."""
    redactor = d.saga.redactor
    if not redactor:
        return frozenset()
    if d.secrets is None or redactor.covers_results:
        d.secrets = redactor.secrets(d.input, d.state.results)
    return d.secrets
