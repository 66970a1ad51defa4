"""The one interface observability hooks in through: listeners on committed transitions.

The engine calls every listener after a transition is durable and before the commands it
led to are carried out. Metrics, tracing and logs are listeners; the engine never imports
a metrics or tracing library. A listener that raises is logged and otherwise ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sagaway.run import HistoryEntry, SagaStatus

__all__ = ["Invocation", "Listener", "Transition"]


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
