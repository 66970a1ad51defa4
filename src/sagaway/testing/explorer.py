"""The crash explorer and the double-invoke check: prove a saga safe, or show the schedule
that breaks it.

``explore_crashes`` runs the saga once cleanly for each failure point, counts its durable
transitions and its effects, then runs it again once per transition (crashing the process
right after that transition is committed) and once per effect (crashing right after the
effect applied, before its result is committed). Every run is checked against the
invariants in :mod:`sagaway.testing.invariants` and your own ``check``. A violation carries
the :class:`~sagaway.testing.harness.Schedule` that produced it: ``report.replay(schedule)``
runs exactly that again.

``double_invoke`` runs the saga with every action and compensation invoked twice, and every
compensation also invoked for steps whose action never ran: a participant that is not
idempotent, or that cannot take "nothing to undo", is named.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sagaway.definition.saga import Saga
from sagaway.testing.faults import Call, Failure
from sagaway.testing.harness import Outcome, SagaHarness, Schedule, StateFn, stable_id
from sagaway.testing.invariants import pivot_unknown
from sagaway.testing.virtual import run_virtual

__all__ = ["SafetyError", "SafetyReport", "Violation", "assert_safe", "double_invoke",
           "explore_crashes"]

CheckFn = Callable[[Outcome], Any]

MODES: tuple[Literal["fails", "times_out", "fails_after_effect"], ...] = (
    "fails", "times_out", "fails_after_effect")
"""The failure points explored for each step by default."""


class SafetyError(AssertionError):
    """A saga broke an invariant; the message is the whole report (schedules included)."""


@dataclass(frozen=True)
class Violation:
    """One run that broke an invariant."""

    schedule: Schedule
    """Replay it with ``report.replay(schedule)`` (or ``harness.run(input, schedule)``)."""
    problems: tuple[str, ...]
    timeline: tuple[str, ...]
    calls: tuple[Call, ...]

    def __str__(self) -> str:
        lines = [f"{self.schedule!r}"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append("  timeline:")
        lines += [f"    {t}" for t in self.timeline]
        lines.append("  calls the participants saw:")
        lines += [f"    {c.describe()}" for c in self.calls]
        return "\n".join(lines)


@dataclass
class PointSummary:
    """What was explored for one failure point."""

    label: str
    transitions: int
    effects: int
    runs: int = 0
    crash_points: int = 0
    violations: int = 0
    operator: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class SafetyReport:
    """What an exploration found.

    Attributes:
        mode: ``"crash explorer"`` or ``"double invoke"``.
        saga: the saga's name.
        points: one summary per failure point.
        violations: every run that broke an invariant, with its schedule.
        runs: harness runs made.
        crash_points: runs with a crash injected.
        seconds: real time taken.
    """

    mode: str
    saga: str
    points: list[PointSummary]
    violations: list[Violation]
    runs: int
    crash_points: int
    seconds: float
    _replay: Callable[[Schedule], Outcome] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def failure_points(self) -> int:
        return len(self.points)

    @property
    def crash_points_per_second(self) -> float:
        return self.crash_points / self.seconds if self.seconds > 0 else 0.0

    def replay(self, schedule: Schedule) -> Outcome:
        """Run exactly this schedule again (same saga, input, fakes and checks)."""
        if self._replay is None:
            raise RuntimeError("this report cannot replay (it was not made by the explorer)")
        return self._replay(schedule)

    def summary(self) -> str:
        """One line: the figure the project's own tests print."""
        if self.mode == "double invoke":
            return (f"double invoke: saga {self.saga!r}: {self.failure_points} failure points "
                    f"in {self.runs} runs, {len(self.violations)} violations "
                    f"({self.seconds:.2f} s)")
        return (f"{self.mode}: saga {self.saga!r}: {self.crash_points} crash points x "
                f"{self.failure_points} failure points explored in {self.runs} runs, "
                f"{len(self.violations)} violations ({self.seconds:.2f} s, "
                f"{self.crash_points_per_second:.0f} crash points/s)")

    def __str__(self) -> str:
        lines = [self.summary(), "",
                 f"  {'failure point':<32} {'transitions':>11} {'effects':>7} "
                 f"{'crash pts':>9} {'violations':>10}  endings"]
        for p in self.points:
            ends = ", ".join(f"{k} {v}" for k, v in sorted(p.statuses.items()))
            if p.operator:
                ends += f" ({p.operator} for an operator: the pivot's outcome unknown)"
            lines.append(f"  {p.label:<32} {p.transitions:>11} {p.effects:>7} "
                         f"{p.crash_points:>9} {p.violations:>10}  {ends}")
        for i, v in enumerate(self.violations, 1):
            lines += ["", f"VIOLATION {i}: {v}"]
        if self.violations:
            lines += ["", "replay one with report.replay(Schedule(...)) or "
                          "SagaHarness(saga).run(input, Schedule(...))"]
        return "\n".join(lines)


def assert_safe(report: SafetyReport) -> None:
    """Fail the test (``SafetyError``, an ``AssertionError``) with the report's text if any
    run broke an invariant."""
    if not report.ok:
        raise SafetyError("\n" + str(report))


FailurePoint = str | Failure | tuple[str | Failure, ...]


def _failure_points(saga: Saga, failures: Iterable[FailurePoint] | None
                    ) -> list[tuple[Failure, ...]]:
    if failures is None:
        return [(), *((Failure(s.name, mode),) for s in saga.steps for mode in MODES)]
    names = {s.name for s in saga.steps}
    points: list[tuple[Failure, ...]] = []
    for f in failures:
        parts = f if isinstance(f, tuple | list) else (f,)
        point = tuple(Failure(x) if isinstance(x, str) else x for x in parts)
        for fault in point:
            if not isinstance(fault, Failure) or fault.step not in names:
                raise ValueError(f"failure point {f!r}: saga {saga.name!r} has no such step "
                                 f"(steps: {', '.join(s.name for s in saga.steps)})")
        points.append(point)
    return points


def _label(point: tuple[Failure, ...]) -> str:
    return " + ".join(f.label() for f in point) if point else "none"


class _Session:
    """One exploration: a harness, the author's hooks, and the running tally."""

    def __init__(self, harness: SagaHarness, input: Any, check: CheckFn | None,
                 reset: Callable[[], Any] | None, state: StateFn | None) -> None:
        self.harness = harness
        self.input = input
        self.check = check
        self.reset = reset
        self.state = state
        self.violations: list[Violation] = []

    async def run(self, schedule: Schedule, point: PointSummary | None = None, *,
                  record: bool = True) -> Outcome:
        if self.reset is not None:
            self.reset()
        # One id per schedule, the same when replayed: an identical timeline.
        run_id = stable_id(self.harness.saga.name, self.harness.saga.version, self.input,
                           repr(schedule), "explore")
        outcome = await self.harness.arun(self.input, schedule, state=self.state,
                                          run_id=run_id)
        if self.check is not None and outcome.ended and outcome.run is not None:
            try:
                self.check(outcome)
            except AssertionError as exc:
                outcome.violations.append(f"check: {exc}" if str(exc) else
                                          "check: assertion failed")
        if point is not None:
            point.runs += 1
            point.crash_points += 1 if (schedule.crash_after or schedule.crash_after_effect) \
                else 0
            key = outcome.status.value if outcome.status else "not started"
            point.statuses[key] = point.statuses.get(key, 0) + 1
            if pivot_unknown(outcome):
                point.operator += 1
            if outcome.violations:
                point.violations += 1
        if outcome.violations and record:
            self.violations.append(Violation(schedule, tuple(outcome.violations),
                                             tuple(outcome.timeline()), tuple(outcome.calls)))
        return outcome

    def replay(self, schedule: Schedule) -> Outcome:
        # A replay leaves the report as it was.
        return run_virtual(self.run(schedule, record=False))


def _harness(saga: Saga | SagaHarness, fakes: Iterable[str] | str | None) -> SagaHarness:
    harness = saga if isinstance(saga, SagaHarness) else SagaHarness(saga)
    if fakes == "all":
        harness.fake_all()
    elif fakes is not None:
        for name in fakes:
            harness.fake(name)
    return harness


def explore_crashes(
    saga: Saga | SagaHarness,
    input: Any = None,
    *,
    failures: Iterable[FailurePoint] | None = None,
    fakes: Iterable[str] | str | None = None,
    check: CheckFn | None = None,
    reset: Callable[[], Any] | None = None,
    crash_effects: bool = True,
) -> SafetyReport:
    """Crash the saga at every durable transition (and after every effect), for each
    failure point, and check the invariants.

    Args:
        saga: the definition, or a :class:`SagaHarness` with its fakes already scripted.
        input: the run's input.
        failures: the failure points: step names (the step fails every attempt; after the
            pivot, its first two), :class:`Failure` s, or tuples of them injected together
            (``("ship", Failure("charge", compensation=True))``: a compensation only runs
            once something fails). Default: no failure, then each step in each mode — fails,
            times out (nothing applied), applies but its reply is lost.
        fakes: steps to replace by fakes, or ``"all"`` (then the explorer checks the
            definition alone; with real functions it checks your code too).
        check: called with each ended run's :class:`Outcome`; raise ``AssertionError`` when
            your world is inconsistent (e.g. "charged but not refunded").
        reset: called before each run, to reset your world (databases, dicts).
        crash_effects: also crash after each effect, before its result is committed.

    Returns:
        The report; pass it to :func:`assert_safe` in a test.
    """
    harness = _harness(saga, fakes)
    session = _Session(harness, input, check, reset, None)
    points = _failure_points(harness.saga, failures)

    async def explore() -> list[PointSummary]:
        summaries = []
        for fault in points:
            clean = await session.run(Schedule(failure=fault))
            point = PointSummary(_label(fault), clean.transitions,
                                 clean.effects, runs=1,
                                 violations=1 if clean.violations else 0,
                                 operator=1 if pivot_unknown(clean) else 0,
                                 statuses={clean.status.value if clean.status else "?": 1})
            for k in range(1, clean.transitions + 1):
                await session.run(Schedule(failure=fault, crash_after=k), point)
            if crash_effects:
                for k in range(1, clean.effects + 1):
                    await session.run(Schedule(failure=fault, crash_after_effect=k), point)
            summaries.append(point)
        return summaries

    started = time.perf_counter()
    summaries = run_virtual(explore())
    return SafetyReport("crash explorer", harness.saga.name, summaries, session.violations,
                        sum(p.runs for p in summaries), sum(p.crash_points for p in summaries),
                        time.perf_counter() - started, session.replay)


def double_invoke(
    saga: Saga | SagaHarness,
    input: Any = None,
    *,
    state: StateFn | None = None,
    failures: Iterable[FailurePoint] | None = None,
    reset: Callable[[], Any] | None = None,
    check: CheckFn | None = None,
) -> SafetyReport:
    """Invoke every action and compensation twice (and compensations of steps that never
    ran), for each failure point; name every step whose participant is not idempotent.

    Args:
        state: returns a comparable snapshot of your participants' state (``lambda:
            dict(db)``): a second invocation with the same key must leave it unchanged.
            Without it, only the two invocations' results are compared.
        failures, reset, check: as for :func:`explore_crashes`.
    """
    harness = _harness(saga, None)
    session = _Session(harness, input, check, reset, state)
    points = _failure_points(harness.saga, failures)

    async def explore() -> list[PointSummary]:
        summaries = []
        for fault in points:
            point = PointSummary(_label(fault), 0, 0)
            outcome = await session.run(Schedule(failure=fault, double_invoke=True), point)
            point.transitions, point.effects = outcome.transitions, outcome.effects
            summaries.append(point)
        return summaries

    started = time.perf_counter()
    summaries = run_virtual(explore())
    return SafetyReport("double invoke", harness.saga.name, summaries, session.violations,
                        sum(p.runs for p in summaries), 0, time.perf_counter() - started,
                        session.replay)
