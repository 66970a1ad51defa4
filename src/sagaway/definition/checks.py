"""Definition checks: what is risky in a saga's shape, each finding with its fix.

Pure (no I/O), like the rest of ``definition``: ``check(saga)`` reads the definition and never
raises for a bad one — it reports. ``Saga.validate()`` rejects some of these at registration;
the rest are legal but unsafe or surprising in production. The testing kit re-exports it
(``sagaway.testing.check``) and ``sagaway check module:saga`` prints it for CI.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sagaway.definition.saga import Saga, Step

__all__ = ["Finding", "Severity", "check"]

SMALL_COMPENSATION_BUDGET = 5
"""Fewer compensation attempts than this is flagged: a brief outage would end runs FAILED."""


class Severity(StrEnum):
    ERROR = "error"
    """The saga cannot keep its promises (or will not register): fix before deploying."""
    WARNING = "warning"
    """Legal, but a likely cause of FAILED runs or runs that never end."""
    INFO = "info"
    """Worth knowing."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing :func:`check` found."""

    severity: Severity
    step: str | None
    """The step it is about (``None``: the saga as a whole)."""
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.step}: " if self.step else ""
        return f"{self.severity.value}: {where}{self.message} (fix: {self.fix})"


def _is_local(fn: Any) -> bool:
    return fn is not None and not type(fn).__module__.startswith("sagaway.definition")


def _kind_name(fn: Any) -> str:
    if _is_local(fn):
        return "local function"
    name = type(fn).__name__
    return {"Command": "command", "HttpCall": "HTTP call"}.get(name, name)


def check(saga: Saga) -> list[Finding]:
    """Every finding for ``saga``, errors first, then in step order. Never raises."""
    found: list[Finding] = []

    def add(sev: Severity, step: Step | None, message: str, fix: str) -> None:
        found.append(Finding(sev, step.name if step else None, message, fix))

    if not saga.steps:
        add(Severity.ERROR, None, "the saga has no steps", "declare steps with @saga.step")
        return found
    staged = {s.name for stage in saga.stages for s in stage}
    for s in saga.steps:
        if s.name not in staged:
            add(Severity.ERROR, s, "the step is in no stage, so it can never run (unreachable)",
                "declare steps only through saga.step / saga.command_step")
    forward_only = False
    pivots = [s for s in saga.steps if s.pivot]
    if len(pivots) > 1:
        add(Severity.ERROR, pivots[1], f"a second pivot (the first is {pivots[0].name!r})",
            "a saga has one point of no return: make the others retriable or compensatable")
    for stage in saga.stages:
        for s in stage:
            after = forward_only or s.declared_retriable
            if after and not s.pivot:
                _check_forward(s, forward_only, add)
            elif s.pivot:
                _check_pivot(s, add)
            else:
                _check_compensatable(s, add)
            _check_remote(s, add)
        if any(s.pivot or s.declared_retriable for s in stage):
            forward_only = True
    if not pivots and any(s.compensation_fn is not None for s in saga.steps):
        add(Severity.INFO, None, "no pivot: any failure, even at the last step, undoes the "
            "whole saga", "mark the point of no return with pivot=True if there is one")
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(found, key=lambda f: order[f.severity])


def _check_compensatable(s: Step, add: Any) -> None:
    if s.compensation_fn is None and not s.read_only:
        name = getattr(s.action, "__name__", s.name)
        add(Severity.ERROR, s, "runs before the pivot but has no compensation, so a later "
            "failure cannot undo it",
            f"add @{name}.compensation, or mark it read_only=True if it changes nothing, or "
            f"pivot=True / retriable=True")
    if s.declared_retry is not None and s.declared_retry.max_attempts is None:
        add(Severity.WARNING, s, "retried without limit before the pivot: while it keeps "
            "failing, the saga neither finishes nor compensates",
            "give it a finite RetryPolicy(max_attempts=…)")
    if s.compensation_fn is not None:
        policy = s.compensation_retry
        if policy.max_attempts is not None and policy.max_attempts <= 1:
            add(Severity.ERROR, s, "its compensation has no retry (1 attempt): one transient "
                "error ends the run FAILED with the effect in place",
                "give the compensation a retry policy, e.g. "
                "@step.compensation(retry=RetryPolicy(max_attempts=20))")
        elif policy.max_attempts is not None and policy.max_attempts < SMALL_COMPENSATION_BUDGET:
            add(Severity.WARNING, s, f"its compensation gives up after "
                f"{policy.max_attempts} attempts: a brief outage ends the run FAILED",
                f"allow at least {SMALL_COMPENSATION_BUDGET} attempts (the default is 20)")
        if policy.non_retryable:
            names = ", ".join(t.__name__ for t in policy.non_retryable)
            add(Severity.WARNING, s, f"its compensation gives up at once on {names}: the run "
                "ends FAILED for an operator", "make the compensation retry those, or handle "
                "them inside it")
        if _is_local(s.compensation_fn) and not _accepts(s.compensation_fn, 3):
            add(Severity.ERROR, s, "its compensation does not take (ctx, data, result)",
                "define it as def undo(ctx, data, result)")


def _check_pivot(s: Step, add: Any) -> None:
    if s.compensation_fn is not None:
        add(Severity.ERROR, s, "the pivot has a compensation, which can never run "
            "(unreachable)", "drop the compensation, or move the pivot")
    if s.timeout is not None and s.retry.max_attempts is not None:
        add(Severity.INFO, s, "if every attempt of the pivot times out, its outcome is "
            "unknown and the run ends FAILED for an operator",
            "make the pivot's participant idempotent and give it more attempts")


def _check_forward(s: Step, after_pivot: bool, add: Any) -> None:
    where = "after the pivot" if after_pivot else "marked retriable"
    if s.compensation_fn is not None:
        add(Severity.ERROR, s, f"{where}, so it is never compensated: its compensation is "
            "unreachable", "remove the compensation or move the step before the pivot")
    # Undeclared, a forward-only step gets the unlimited default once validated.
    if s.declared_retry is not None and s.declared_retry.max_attempts is not None:
        add(Severity.WARNING, s, f"{where} with a finite retry budget "
            f"({s.declared_retry.max_attempts} attempts): exhausting it ends the run FAILED, since "
            "it cannot be undone", "use RetryPolicy(max_attempts=None) (the default after "
            "the pivot) and make the step idempotent")


def _check_remote(s: Step, add: Any) -> None:
    if not _is_local(s.action) and s.timeout is None:
        add(Severity.ERROR, s, f"a remote step ({_kind_name(s.action)}) without a timeout: a "
            "lost reply holds the run forever", "pass timeout=… seconds")
    if (s.compensation_fn is not None and not _is_local(s.compensation_fn)
            and s.compensation_timeout is None):
        add(Severity.ERROR, s, "a remote compensation without a timeout",
            "pass timeout=… to the compensation")
    if _is_local(s.action) and s.timeout is None and inspect.iscoroutinefunction(s.action):
        add(Severity.INFO, s, "an async step without a timeout: a hung call holds the run "
            "until a worker restarts", "pass timeout=… seconds if it calls other services")
    if _is_local(s.action) and not _accepts(s.action, 2):
        add(Severity.ERROR, s, "its action does not take (ctx, data)",
            "define it as def step(ctx, data)")


def _accepts(fn: Any, count: int) -> bool:
    """``fn`` can be called with ``count`` positional arguments (True when unknowable)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*([None] * count))
    except TypeError:
        return False
    return True
