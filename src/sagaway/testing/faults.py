"""Fault injection: fake participants, the failures the explorer injects, and the call ledger.

A :class:`Fake` stands in for a step's participant, whatever the step's kind (a local
function, a command over messages, an HTTP call): the harness runs the saga with the step's
action (and compensation) replaced by the fake, keeping its name, kind, retry policies and
timeouts. A fake behaves like a well-built participant: it applies an effect once per
idempotency key, answers a repeated key with the recorded result, and records everything,
so the harness can check "applied at most once" and "compensated if it may have applied".

Every invocation the harness sees, faked or real, is a :class:`Call` in the run's ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Call", "Failure", "Fake", "InjectedFailure"]

Outcome = Literal["ok", "failed", "timed_out", "effect_lost", "crashed", "cut", "sent"]
"""What became of one invocation:

* ``ok`` — it returned (its effect applied);
* ``failed`` — it raised (not applied: a participant rolls back on error);
* ``timed_out`` — no answer; a fake's request was lost before it applied anything, a real
  function raised ``TimeoutError`` (which sagaway counts as possibly applied);
* ``effect_lost`` — it applied its effect, then the reply was lost;
* ``crashed`` — it applied its effect, then the process crashed before the result was
  committed;
* ``cut`` — a real function was cancelled part-way (a timeout or a crash): possibly applied;
* ``sent`` — a command or HTTP request went out to a real participant: possibly applied.
"""


class InjectedFailure(Exception):
    """The error a fake (or an injected failure) raises: not applied, retryable."""


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation of a step's action or compensation, as the harness saw it."""

    seq: int
    """Its place in the order of all calls of the run (0 first)."""
    at: float
    """Virtual time it started (seconds since the epoch)."""
    generation: int
    """Which orchestrator process made it: 1, then one more after each crash."""
    run_id: str
    step: str
    compensating: bool
    attempt: int
    key: str
    """The idempotency key it carried."""
    kind: Literal["local", "fake", "command", "http"]
    outcome: Outcome
    effect: bool
    """It may have taken effect (applied, possibly applied, or unknown)."""

    def describe(self) -> str:
        what = "compensation" if self.compensating else "action"
        return (f"#{self.seq} {self.step} {what} attempt {self.attempt} (process "
                f"{self.generation}, {self.kind}): {self.outcome}")


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure point for the crash explorer: which step fails, and how.

    Attributes:
        step: the step's name.
        mode: ``"fails"`` (every attempt raises), ``"times_out"`` (no answer, nothing
            applied), ``"fails_after_effect"`` (every attempt applies, then its reply is
            lost). A step after the pivot is retried until it succeeds, so there only its
            first two attempts are affected.
        compensation: fail the step's compensation instead of its action (every attempt),
            so the run must end FAILED, for an operator.
    """

    step: str
    mode: Literal["fails", "times_out", "fails_after_effect"] = "fails"
    compensation: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("fails", "times_out", "fails_after_effect"):
            raise ValueError(f"Failure mode must be fails, times_out or fails_after_effect, "
                             f"got {self.mode!r}")

    def __repr__(self) -> str:
        args = [repr(self.step)]
        if self.mode != "fails":
            args.append(f"mode={self.mode!r}")
        if self.compensation:
            args.append("compensation=True")
        return f"Failure({', '.join(args)})"

    def label(self) -> str:
        where = f"{self.step} compensation" if self.compensation else self.step
        return where if self.mode == "fails" else f"{where} {self.mode}"


Behaviour = Literal["ok", "fail", "timeout", "effect_lost"]


@dataclass
class _Script:
    """What the next attempts do, then what every later one does."""

    first: list[Behaviour] = field(default_factory=list)
    then: Behaviour = "ok"

    def add(self, what: Behaviour, times: int | None) -> None:
        if times is None:
            self.then = what
            return
        if times < 1:
            raise ValueError(f"times must be >= 1 (or None for every attempt), got {times}")
        self.first.extend([what] * times)

    def pick(self, attempt: int) -> Behaviour:
        return self.first[attempt - 1] if attempt <= len(self.first) else self.then


class Fake:
    """A fake participant for one step. Get one with ``harness.fake("step")``.

    Each method says what the next attempts do and returns the fake, so calls chain:
    ``harness.fake("charge").fails(times=2).returns({"charge_id": "c1"})``. Attempts are
    counted per idempotency key (per run), so a script replays the same way in every run.

    What it records (per idempotency key): :attr:`applied` (the action's effect, with its
    result), :attr:`compensated` (the undo) and :attr:`invocations` (how many times each key
    was invoked, duplicates included).
    """

    def __init__(self, step: str) -> None:
        self.step = step
        self._action = _Script()
        self._compensation = _Script()
        self._result: Any = None
        self._error: str = f"{step} failed (injected)"
        self.applied: dict[str, Any] = {}
        """Action key → the result it returned when its effect was applied (once)."""
        self.compensated: dict[str, bool] = {}
        """Compensation key → whether there was an applied effect to undo."""
        self.invocations: dict[str, int] = {}
        """Idempotency key → how many times it was invoked."""

    def __repr__(self) -> str:
        return f"<Fake {self.step}>"

    # -- scripting ----------------------------------------------------------------------------

    def returns(self, result: Any) -> Fake:
        """The result a successful attempt returns (JSON data; default ``None``)."""
        self._result = result
        return self

    def fails(self, times: int | None = 1, *, error: str | None = None) -> Fake:
        """The next ``times`` attempts raise (nothing applied); ``None``: every attempt."""
        if error is not None:
            self._error = error
        self._action.add("fail", times)
        return self

    def times_out(self, times: int | None = 1) -> Fake:
        """The next ``times`` attempts get no answer and apply nothing (the request was
        lost): the step's timeout fires (or, with no timeout, ``TimeoutError`` is raised)."""
        self._action.add("timeout", times)
        return self

    def fails_after_effect(self, times: int | None = 1) -> Fake:
        """The next ``times`` attempts apply the effect, then the reply is lost (a timeout
        for the orchestrator: possibly applied)."""
        self._action.add("effect_lost", times)
        return self

    def succeeds(self) -> Fake:
        """Every attempt after the scripted ones succeeds (the default)."""
        self._action.then = "ok"
        return self

    def compensation_fails(self, times: int | None = None) -> Fake:
        """The next ``times`` compensation attempts raise; ``None`` (default): every one."""
        self._compensation.add("fail", times)
        return self

    def compensation_times_out(self, times: int | None = 1) -> Fake:
        """The next ``times`` compensation attempts get no answer (nothing undone)."""
        self._compensation.add("timeout", times)
        return self

    # -- what the harness asks ------------------------------------------------------------

    def behaviour(self, key: str, *, compensating: bool) -> Behaviour:
        """Count an invocation of ``key`` and say what it does."""
        count = self.invocations.get(key, 0) + 1
        self.invocations[key] = count
        return (self._compensation if compensating else self._action).pick(count)

    def apply(self, key: str, run_id: str) -> Any:
        """Apply the action's effect for ``key`` once; a repeat returns the recorded result.

        An action whose compensation already ran is fenced (not applied), as a participant
        with an inbox does it.
        """
        if key in self.applied:
            return self.applied[key]
        if self.compensation_key(run_id) in self.compensated:
            raise InjectedFailure(f"{self.step}: compensated before it was applied")
        self.applied[key] = self._result
        return self._result

    def undo(self, key: str, run_id: str) -> None:
        """Apply the compensation for ``key`` once."""
        if key not in self.compensated:
            self.compensated[key] = self.action_key(run_id) in self.applied

    def error(self) -> str:
        return self._error

    def action_key(self, run_id: str) -> str:
        return f"{run_id}:{self.step}:action"

    def compensation_key(self, run_id: str) -> str:
        return f"{run_id}:{self.step}:compensation"

    def state(self, run_id: str) -> Literal["untouched", "applied", "compensated"]:
        """Where this participant is for one run."""
        if self.compensation_key(run_id) in self.compensated:
            return "compensated"
        return "applied" if self.action_key(run_id) in self.applied else "untouched"

    def results(self) -> Mapping[str, Any]:
        return dict(self.applied)

    def reset(self) -> None:
        """Forget every effect (the harness does this before each run)."""
        self.applied.clear()
        self.compensated.clear()
        self.invocations.clear()
