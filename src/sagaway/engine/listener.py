"""The one interface observability hooks in through: listeners on committed transitions.

The engine calls every listener after a transition is durable and before the commands it
led to are carried out. Metrics, tracing and logs are listeners; the engine never imports
a metrics or tracing library. A listener that raises is logged and otherwise ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagaway.run import HistoryEntry, SagaStatus

__all__ = ["Listener", "Transition"]


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


class Listener:
    """Subclass and override what you need; every hook is optional."""

    def on_transition(self, transition: Transition) -> None:
        """A transition was committed."""

    def on_lease_lost(self, run_id: str) -> None:
        """Another worker took over a run this worker was driving."""
