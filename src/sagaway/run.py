"""What a saga run looks like from outside: its status, its timeline, and the snapshot users read.

Shared by the engine, the stores and the surfaces; pure data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["ACTIVE_STATUSES", "HistoryEntry", "SagaRun", "SagaStatus"]


class SagaStatus(StrEnum):
    """Where a run is in its life.

    PENDING → RUNNING → COMPLETED; RUNNING → COMPENSATING → COMPENSATED;
    RUNNING/COMPENSATING → FAILED (needs an operator); FAILED → RESOLVED (an operator
    settled it by hand), or back to RUNNING/COMPENSATING when an operator retries it.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    RESOLVED = "RESOLVED"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED, SagaStatus.RESOLVED}
)
ACTIVE_STATUSES = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)



@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a run's timeline. ``at`` is the time of the event that caused it."""

    at: float
    kind: str
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "kind": self.kind}
        if self.step is not None:
            out["step"] = self.step
        if self.attempt is not None:
            out["attempt"] = self.attempt
        if self.data:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryEntry:
        return cls(
            at=data["at"],
            kind=data["kind"],
            step=data.get("step"),
            attempt=data.get("attempt"),
            data=data.get("data"),
        )


@dataclass(frozen=True, slots=True)
class SagaRun:
    """A snapshot of one run, as ``run.wait()``, ``orch.get()`` and ``orch.list()`` return it.

    Attributes:
        id: the run id (time-ordered).
        saga: the definition's name.
        version: the definition's version the run was started with.
        status: where the run is.
        input: the run's input, as JSON data.
        results: each succeeded step's result, by step name.
        error: why the run compensated or failed, or why no worker can drive it.
        history: every transition, oldest first (empty when listed without history).
        created_at: when the run was started (seconds since the epoch).
        updated_at: when the run last changed.
        idempotency_key: the ``key=`` it was started with, if any.
        steps: each step's status, attempts and error.
        owner: the worker that holds the run's lease, if any.
        lease_expires: when that lease runs out.
        wake_at: when the run's next timer is due, if it waits on one.
    """

    id: str
    saga: str
    version: int
    status: SagaStatus
    input: Any
    results: dict[str, Any]
    error: str | None
    history: tuple[HistoryEntry, ...]
    created_at: float
    updated_at: float
    idempotency_key: str | None = None
    steps: dict[str, dict[str, Any]] | None = None
    owner: str | None = None
    lease_expires: float | None = None
    wake_at: float | None = None
    request: dict[str, Any] | None = None
    """An operator's action waiting for a worker to carry it out, if any."""

    @property
    def finished(self) -> bool:
        """Ended, with no operator request waiting to take it back into work."""
        return self.status.finished and self.request is None
