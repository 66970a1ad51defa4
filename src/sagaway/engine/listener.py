"""The one interface observability hooks in through: listeners on committed transitions.

The engine calls every listener after a transition is durable and before the commands it
led to are carried out. Metrics, tracing and logs are listeners; the engine never imports
a metrics or tracing library. A listener that raises is logged and otherwise ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from sagaway.run import HistoryEntry, SagaStatus

__all__ = ["Invocation", "Listener", "RunContext", "Transition", "current_run"]


@dataclass(frozen=True, slots=True)
class Transition:
    """One durable transition of one run: the history entries it appended."""

    run_id: str
    saga: str
    version: int
    status: SagaStatus
    entries: tuple[HistoryEntry, ...]
    seq: int
    """How many transitions of this run this worker has committed (1 = its first)."""
    created_at: float | None = None
    """When the run was started (for run durations on a worker that did not start it)."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """One attempt of a step's action or compensation, about to be carried out."""

    run_id: str
    saga: str
    step: str
    attempt: int
    compensating: bool
    kind: Literal["local", "http", "command"]
    """How it is carried out: a function in this process, an HTTP call, or a message."""


@dataclass(frozen=True, slots=True)
class RunContext:
    """Which run (and step attempt) the code running now works for.

    Set by the runtime while it drives a run and around each attempt of a local step (sync
    steps on threads included), so log records and spans can say which run they belong to.
    """

    run_id: str
    saga: str
    step: str | None = None
    attempt: int | None = None
    compensating: bool = False
    secrets: frozenset[str] = frozenset()
    """The values of the run's sensitive fields: log handlers cut them out of messages."""


current_run: ContextVar[RunContext | None] = ContextVar("sagaway_current_run", default=None)
"""The run the current task or thread is working for, if any (see ``RunContext``)."""


class Listener:
    """Subclass and override what you need; every hook is optional."""

    def on_transition(self, transition: Transition) -> None:
        """A transition was committed."""

    def on_lease_lost(self, run_id: str) -> None:
        """Another worker took over a run this worker was driving."""

    def on_invoke(self, invocation: Invocation) -> Mapping[str, str] | None:
        """An attempt is about to be carried out; return headers it should carry.

        Called right before a local step runs, before an HTTP step's request is sent, and
        when a command step's message is written to the outbox (before that commit). The
        returned headers (e.g. W3C ``traceparent``) from every listener are merged and sent
        with the HTTP request or in the command envelope's headers, and are visible to local
        steps as ``ctx.headers``. Return ``None`` (the default) to add nothing.
        """
        return None
