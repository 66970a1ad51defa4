"""The admin API's request and response bodies (they make the OpenAPI spec).

Times are seconds since the epoch (``*_at``) with an ISO 8601 UTC twin where a person reads
them; durations are milliseconds. Payload data (inputs, results, history data, errors) is
masked before it gets here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sagaway import SagaStatus

__all__ = [
    "ActionBody",
    "Attempt",
    "Counts",
    "ErrorBody",
    "Health",
    "IdempotencyKeys",
    "RunDetail",
    "RunPage",
    "RunSummary",
    "Started",
    "StepSummary",
    "TimelineEntry",
    "WhoAmI",
]

Action = Literal["retry", "resume", "compensate", "resolve"]


class ErrorBody(BaseModel):
    detail: str = Field(description="What was wrong and, where it helps, what to do.")


class ActionBody(BaseModel):
    """An operator action's request body."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000,
                        description="Why; recorded in the run's history with who did it.")
    actor: str | None = Field(
        default=None, max_length=200,
        description="Who did it, when auth is off (a loopback-only server). With auth on, "
                    "the token's name is recorded and this is ignored.",
    )


class RunSummary(BaseModel):
    """A run in a listing (no payloads, no history)."""

    id: str
    saga: str
    version: int
    status: SagaStatus
    created_at: float
    created: str = Field(description="created_at as ISO 8601 (UTC).")
    updated_at: float
    updated: str
    error: str | None = Field(description="Why it compensated or failed (masked).")
    start_key: str | None = Field(description="The key it was started with, if any.")
    owner: str | None = Field(description="The worker holding its lease, if any.")
    lease_expires: float | None
    wake_at: float | None = Field(description="When its next timer is due, if any.")
    request: dict[str, Any] | None = Field(
        description="An operator action waiting for a worker to carry it out.")
    stuck: bool = Field(description="Active, with no transition for the server's "
                                    "stuck_after seconds.")
    allowed_actions: list[Action] = Field(
        description="The actions its state allows now (none while a request is pending).")


class RunPage(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null on the last page.")


class Counts(BaseModel):
    counts: dict[SagaStatus, int]
    total: int


class IdempotencyKeys(BaseModel):
    action: str
    compensation: str | None = Field(
        description="Null when the registered definition has no compensation for the step.")


class Attempt(BaseModel):
    """One invocation of a step's action or compensation, from the timeline."""

    phase: Literal["action", "compensation"]
    attempt: int
    started_at: float
    ended_at: float | None
    duration_ms: float | None
    outcome: Literal["running", "succeeded", "failed", "interrupted"]
    error: str | None = None
    maybe_applied: bool = False


class StepSummary(BaseModel):
    name: str
    kind: Literal["compensatable", "pivot", "retriable", "unknown"] = Field(
        description="From the registered definition; unknown when the server has none.")
    status: str | None = Field(description="The step's state in the run, if it started.")
    attempts: int
    compensation_attempts: int
    last_error: str | None
    maybe_applied: bool = Field(description="An attempt timed out or was cut: its effect "
                                            "may stand (it is compensated if needed).")
    action_ms: float = Field(description="Time spent in action attempts.")
    compensation_ms: float
    next_attempt_at: float | None = Field(description="When a scheduled retry is due.")
    idempotency_keys: IdempotencyKeys
    timeline: list[Attempt]


class TimelineEntry(BaseModel):
    at: float
    time: str = Field(description="at as ISO 8601 (UTC).")
    offset_ms: float = Field(description="Since the run's first entry.")
    kind: str
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] | None = None


class RunDetail(RunSummary):
    """One run with its payloads, per-step summary and full timeline."""

    input: Any
    results: dict[str, Any]
    duration_ms: float | None = Field(description="First to last timeline entry, once "
                                                  "finished.")
    steps: list[StepSummary]
    history: list[TimelineEntry]


class WhoAmI(BaseModel):
    name: str
    role: Literal["viewer", "operator"]
    auth: bool = Field(description="False when the server runs without tokens.")


class Started(BaseModel):
    """A run started through the API."""

    id: str
    saga: str
    created: bool = Field(description="False when the key had already started this run.")


class Health(BaseModel):
    status: Literal["ok"]
