"""The decider: a pure function from (definition, run state, event) to (new state, commands).

No I/O, no clock reads (time comes in on the event), no randomness (jitter is derived from
the idempotency key). The runtime persists the new state and its history entries *before*
it carries out the commands: that ordering is the write-ahead promise.

Rules, in the words of the saga literature:

* Stages run in order; the steps of a stage (a parallel group) run concurrently.
* A failed attempt is retried by the step's policy; a retry waits on a durable timer.
* An attempt that timed out, or that was cut by a crash, *may have taken effect*.
* When a step before the pivot gives up, the run compensates: it waits for the actions
  still in flight, then undoes every step that may have taken effect, stage by stage in
  reverse order.
* A pivot that gives up with an unknown outcome, a step after the pivot that exhausts a
  finite policy, or a compensation that exhausts its policy ends the run FAILED, for an
  operator: after the pivot a saga never compensates, and nothing is dropped silently.
* An event that does not match the state (a late or duplicate result) is ignored and
  recorded in the history, never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sagaway.definition.saga import Saga, Step, StepKind, idempotency_key
from sagaway.engine.state import (
    ActionFailed,
    ActionSucceeded,
    Command,
    CompensationFailed,
    CompensationSucceeded,
    Event,
    InvokeAction,
    InvokeCompensation,
    Operator,
    Recover,
    RunState,
    Start,
    StepState,
    StepStatus,
    TimerFired,
)
from sagaway.run import HistoryEntry, SagaStatus

__all__ = ["Decision", "decide"]

INTERRUPTED = "interrupted: the worker stopped while the attempt was in flight"


@dataclass(slots=True)
class Decision:
    """What the decider wants: the new state, history to append, and commands to carry out."""

    state: RunState
    history: list[HistoryEntry] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.history)


class _Decider:
    def __init__(self, saga: Saga, run_id: str, state: RunState, now: float) -> None:
        self.saga = saga
        self.run_id = run_id
        self.state = state
        self.now = now
        self.history: list[HistoryEntry] = []
        self.commands: list[Command] = []

    # -- helpers ------------------------------------------------------------------------

    def log(self, kind: str, step: str | None = None, attempt: int | None = None,
            **data: object) -> None:
        clean = {k: v for k, v in data.items() if v is not None}
        self.history.append(HistoryEntry(self.now, kind, step, attempt, clean or None))

    def step_state(self, name: str) -> StepState:
        return self.state.steps.setdefault(name, StepState())

    def ignore(self, event: Event, reason: str) -> None:
        step = getattr(event, "step", None)
        attempt = getattr(event, "attempt", None)
        self.log("event.ignored", step, attempt, event=type(event).__name__, reason=reason)

    def invoke_action(self, step: Step) -> None:
        s = self.step_state(step.name)
        s.attempts += 1
        s.status = StepStatus.RUNNING
        # A command to another service waits for its reply until this deadline; a local
        # call is timed by the worker that makes it.
        s.wake_at = self.now + step.timeout if step.remote and step.timeout else None
        self.log("step.started", step.name, s.attempts)
        self.commands.append(InvokeAction(step.name, s.attempts))

    def invoke_compensation(self, step: Step) -> None:
        s = self.step_state(step.name)
        s.compensation_attempts += 1
        s.status = StepStatus.COMPENSATING
        timeout = step.compensation_timeout
        s.wake_at = self.now + timeout if step.remote_compensation and timeout else None
        self.log("compensation.started", step.name, s.compensation_attempts)
        self.commands.append(InvokeCompensation(step.name, s.compensation_attempts))

    def finish(self, status: SagaStatus, error: str | None = None) -> None:
        self.state.status = status
        if error is not None:
            self.state.error = error
        for s in self.state.steps.values():
            s.wake_at = None
        self.log("run.finished", status=status.value, error=error)

    def stage_steps(self, index: int) -> tuple[Step, ...]:
        return self.saga.stages[index]

    # -- forward path -------------------------------------------------------------------

    def start_stage(self, index: int) -> None:
        self.state.stage = index
        for step in self.stage_steps(index):
            self.invoke_action(step)

    def advance_forward(self) -> None:
        stage = self.stage_steps(self.state.stage)
        if any(self.step_state(s.name).status is not StepStatus.SUCCEEDED for s in stage):
            return
        if self.state.stage + 1 < len(self.saga.stages):
            self.start_stage(self.state.stage + 1)
        else:
            self.finish(SagaStatus.COMPLETED)

    def action_gave_up(self, step: Step, s: StepState, error: str) -> None:
        """The step will not be attempted again."""
        s.status = StepStatus.FAILED
        s.wake_at = None
        self.log("step.gave_up", step.name, s.attempts, error=error,
                 maybe_applied=s.maybe_applied or None)
        if self.state.status is SagaStatus.COMPENSATING:
            self.advance_compensation()
        elif step.kind is StepKind.RETRIABLE:
            self.finish(
                SagaStatus.FAILED,
                f"step {step.name!r} comes after the pivot and gave up after {s.attempts} "
                f"attempt(s) ({error}); the saga cannot compensate past its pivot, so it "
                f"needs an operator",
            )
        elif step.kind is StepKind.PIVOT and s.maybe_applied:
            self.finish(
                SagaStatus.FAILED,
                f"the pivot {step.name!r} gave up with an unknown outcome ({error}); it may "
                f"have taken effect, so neither finishing nor compensating is safe without an "
                f"operator",
            )
        else:
            self.begin_compensation(f"step {step.name!r} failed: {error}")

    def action_failed(self, step: Step, s: StepState, error: str, *, retryable: bool,
                      maybe_applied: bool, immediate: bool = False,
                      retry_after: float | None = None) -> None:
        s.error = error
        if maybe_applied:
            s.maybe_applied = True
        next_attempt = s.attempts + 1
        if (
            retryable
            and self.state.status is SagaStatus.RUNNING
            and step.retry.allows(next_attempt - s.attempts_before)
        ):
            delay = 0.0 if immediate else step.retry.delay(
                s.attempts, idempotency_key(self.run_id, step.name, compensation=False)
            )
            delay = _honour(delay, retry_after, step.retry.max_backoff)
            s.status = StepStatus.WAITING
            s.wake_at = self.now + delay
            self.log("step.retry_scheduled", step.name, next_attempt, delay=round(delay, 6))
        else:
            self.action_gave_up(step, s, error)

    # -- compensation path ----------------------------------------------------------------

    def begin_compensation(self, reason: str) -> None:
        self.state.status = SagaStatus.COMPENSATING
        self.state.error = reason
        self.log("run.compensating", reason=reason)
        # Retries that were waiting in the failed stage are cancelled: they never ran again.
        for step in self.stage_steps(self.state.stage):
            s = self.step_state(step.name)
            if s.status is StepStatus.WAITING:
                s.status = StepStatus.FAILED
                s.wake_at = None
                self.log("step.cancelled", step.name, s.attempts,
                         maybe_applied=s.maybe_applied or None)
        self.advance_compensation()

    def needs_compensation(self, step: Step) -> bool:
        s = self.step_state(step.name)
        return (
            step.kind is StepKind.COMPENSATABLE
            and step.compensation_fn is not None
            and s.maybe_applied
            and s.status is not StepStatus.COMPENSATED
        )

    def advance_compensation(self) -> None:
        # Actions still in flight must land first: they may take effect and need undoing.
        if any(s.status is StepStatus.RUNNING for s in self.state.steps.values()):
            return
        for index in range(self.state.stage, -1, -1):
            pending = [st for st in self.stage_steps(index) if self.needs_compensation(st)]
            if not pending:
                continue
            busy = False
            for step in pending:
                s = self.step_state(step.name)
                if s.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_WAITING):
                    busy = True
                else:
                    self.invoke_compensation(step)
                    busy = True
            if busy:
                self.state.stage = index
                return
        self.finish(SagaStatus.COMPENSATED)

    def compensation_failed(self, step: Step, s: StepState, error: str, *, retryable: bool,
                            immediate: bool = False, retry_after: float | None = None
                            ) -> None:
        s.error = error
        next_attempt = s.compensation_attempts + 1
        if retryable and step.compensation_retry.allows(
                next_attempt - s.compensation_attempts_before):
            delay = 0.0 if immediate else step.compensation_retry.delay(
                s.compensation_attempts, idempotency_key(self.run_id, step.name, compensation=True)
            )
            delay = _honour(delay, retry_after, step.compensation_retry.max_backoff)
            s.status = StepStatus.COMPENSATION_WAITING
            s.wake_at = self.now + delay
            self.log("compensation.retry_scheduled", step.name, next_attempt,
                     delay=round(delay, 6))
            return
        self.log("compensation.gave_up", step.name, s.compensation_attempts, error=error)
        self.finish(
            SagaStatus.FAILED,
            f"compensation of step {step.name!r} failed after {s.compensation_attempts} "
            f"attempts: {error}",
        )

    # -- event handlers -----------------------------------------------------------------

    def on_start(self, event: Start) -> None:
        if self.state.status is not SagaStatus.PENDING or self.state.steps:
            self.ignore(event, "the run has already started")
            return
        self.state.status = SagaStatus.RUNNING
        self.log("run.started", saga=self.saga.name, version=self.saga.version)
        self.start_stage(0)

    def current_step(self, event: ActionSucceeded | ActionFailed | CompensationSucceeded
                     | CompensationFailed) -> tuple[Step, StepState] | None:
        if self.state.status.finished:
            self.ignore(event, f"the run has finished ({self.state.status.value})")
            return None
        try:
            step = self.saga[event.step]
        except KeyError:
            self.ignore(event, "no such step in this saga")
            return None
        s = self.state.steps.get(step.name)
        if s is None:
            self.ignore(event, "the step has not started")
            return None
        compensating = isinstance(event, CompensationSucceeded | CompensationFailed)
        expected_status = StepStatus.COMPENSATING if compensating else StepStatus.RUNNING
        expected_attempt = s.compensation_attempts if compensating else s.attempts
        if s.status is not expected_status:
            self.ignore(event, f"the step is {s.status.value}, not {expected_status.value}")
            return None
        if event.attempt != expected_attempt:
            self.ignore(event, f"attempt {event.attempt} is stale; the step is on attempt "
                               f"{expected_attempt}")
            return None
        return step, s

    def on_action_succeeded(self, event: ActionSucceeded) -> None:
        found = self.current_step(event)
        if found is None:
            return
        step, s = found
        s.status = StepStatus.SUCCEEDED
        s.wake_at = None
        s.succeeded = True
        s.result = event.result
        s.error = None
        s.maybe_applied = True
        self.log("step.succeeded", step.name, event.attempt)
        if self.state.status is SagaStatus.COMPENSATING:
            # A parallel sibling finished after the group failed: it is undone like the rest.
            self.advance_compensation()
        else:
            self.advance_forward()

    def on_action_failed(self, event: ActionFailed) -> None:
        found = self.current_step(event)
        if found is None:
            return
        step, s = found
        self.log("step.failed", step.name, event.attempt, error=event.error,
                 retryable=event.retryable, maybe_applied=event.maybe_applied or None)
        if step.remote and not event.retryable and not event.maybe_applied:
            # A participant answers every attempt of a key with the one outcome its inbox
            # recorded: a definite "no" proves no attempt took effect, even one whose reply
            # was late.
            s.maybe_applied = False
        self.action_failed(step, s, event.error, retryable=event.retryable,
                           maybe_applied=event.maybe_applied, retry_after=event.retry_after)

    def on_compensation_succeeded(self, event: CompensationSucceeded) -> None:
        found = self.current_step(event)
        if found is None:
            return
        step, s = found
        s.status = StepStatus.COMPENSATED
        s.wake_at = None
        s.error = None
        self.log("compensation.succeeded", step.name, event.attempt)
        self.advance_compensation()

    def on_compensation_failed(self, event: CompensationFailed) -> None:
        found = self.current_step(event)
        if found is None:
            return
        step, s = found
        self.log("compensation.failed", step.name, event.attempt, error=event.error,
                 retryable=event.retryable)
        self.compensation_failed(step, s, event.error, retryable=event.retryable,
                                 retry_after=event.retry_after)

    def on_timer(self) -> None:
        if self.state.status.finished:
            return
        for step in self.saga.steps:
            s = self.state.steps.get(step.name)
            if s is None or s.wake_at is None or s.wake_at > self.now:
                continue
            if s.status is StepStatus.WAITING:
                self.invoke_action(step)
            elif s.status is StepStatus.COMPENSATION_WAITING:
                self.invoke_compensation(step)
            elif s.status is StepStatus.RUNNING:
                error = f"no reply within {step.timeout}s (may have taken effect)"
                self.log("step.failed", step.name, s.attempts, error=error, retryable=True,
                         maybe_applied=True)
                self.action_failed(step, s, error, retryable=True, maybe_applied=True)
            elif s.status is StepStatus.COMPENSATING:
                error = f"no reply within {step.compensation_timeout}s"
                self.log("compensation.failed", step.name, s.compensation_attempts,
                         error=error, retryable=True)
                self.compensation_failed(step, s, error, retryable=True)

    def on_operator(self, event: Operator) -> None:
        allowed = OPERATOR_ALLOWED.get(event.action)
        if allowed is None or self.state.status not in allowed:
            self.ignore(event,
                        f"{event.action!r} is not allowed on a {self.state.status.value} run")
            return
        self.log(f"operator.{event.action}", actor=event.actor, reason=event.reason)
        by = f"operator {event.actor}: {event.reason}"
        if event.action == "resolve":
            self.state.status = SagaStatus.RESOLVED
            self.log("run.finished", status=SagaStatus.RESOLVED.value)
            return
        if self.state.status is SagaStatus.PENDING:
            if event.action == "compensate":
                self.finish(SagaStatus.COMPENSATED, f"compensated before it started ({by})")
            else:
                self.on_start(Start(event.now))
            return
        if self.state.status is SagaStatus.FAILED:
            self.reopen(event.action, by)
            return
        # An active run taken over from its worker: attempts in flight there were cut.
        if event.action == "resume":
            for s in self.state.steps.values():
                if s.wake_at is not None:
                    s.wake_at = event.now
            self.on_recover(Recover(event.now))
            return
        self.interrupt_all(by)
        if self.state.status is SagaStatus.RUNNING:
            self.begin_compensation(f"forced by {by}")

    def interrupt_all(self, why: str) -> None:
        """Stop the forward path: cut actions in flight (possibly applied), cancel retries."""
        for step in self.saga.steps:
            s = self.state.steps.get(step.name)
            if s is None:
                continue
            if s.status is StepStatus.RUNNING:
                self.log("step.interrupted", step.name, s.attempts)
                s.maybe_applied = True
                s.status = StepStatus.FAILED
                s.error = f"interrupted ({why})"
            elif s.status is StepStatus.WAITING:
                s.status = StepStatus.FAILED
                s.wake_at = None
                self.log("step.cancelled", step.name, s.attempts,
                         maybe_applied=s.maybe_applied or None)

    def reopen(self, action: str, by: str) -> None:
        """Take a FAILED run back into work, with fresh retry budgets."""
        stuck = [st for st in self.saga.steps
                 if (s := self.state.steps.get(st.name)) is not None
                 and s.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_WAITING)]
        if stuck or action == "compensate":
            self.state.status = SagaStatus.COMPENSATING
            self.state.error = f"compensating again ({by})"
            for step in stuck:
                s = self.step_state(step.name)
                s.compensation_attempts_before = s.compensation_attempts
                s.status = StepStatus.COMPENSATION_WAITING
                s.wake_at = self.now
            if not stuck:
                self.advance_compensation()
            else:
                self.on_timer()
            return
        # Failed on the forward path (after the pivot, or the pivot's outcome unknown).
        failed = [st for st in self.saga.steps
                  if (s := self.state.steps.get(st.name)) is not None
                  and s.status is StepStatus.FAILED]
        self.state.status = SagaStatus.RUNNING
        self.state.error = None
        for step in failed:
            s = self.step_state(step.name)
            s.attempts_before = s.attempts
            s.status = StepStatus.WAITING
            s.wake_at = self.now
        self.on_timer()

    def on_recover(self, event: Recover) -> None:
        if self.state.status.finished:
            self.ignore(event, f"the run has finished ({self.state.status.value})")
            return
        if self.state.status is SagaStatus.PENDING:
            self.on_start(Start(event.now))
            return
        self.log("run.recovered")
        # Collected first: handling one interruption can start compensations of siblings,
        # and those are new attempts, not interrupted ones.
        # A command to another service is not cut by a worker's crash: it sits in the
        # outbox (written with the transition) and its reply, or its deadline, moves it on.
        interrupted = [
            (step, s, s.status)
            for step in self.saga.steps
            if (s := self.state.steps.get(step.name)) is not None
            and ((s.status is StepStatus.RUNNING and not step.remote)
                 or (s.status is StepStatus.COMPENSATING and not step.remote_compensation))
        ]
        for step, s, status in interrupted:
            if self.state.status.finished:
                return
            if status is StepStatus.RUNNING:
                self.log("step.interrupted", step.name, s.attempts)
                self.action_failed(step, s, INTERRUPTED, retryable=True, maybe_applied=True,
                                   immediate=True)
            else:
                self.log("compensation.interrupted", step.name, s.compensation_attempts)
                self.compensation_failed(step, s, INTERRUPTED, retryable=True, immediate=True)
        if self.state.status.finished:
            return
        if self.state.status is SagaStatus.COMPENSATING:
            self.advance_compensation()
        self.on_timer()


def _honour(delay: float, retry_after: float | None, cap: float) -> float:
    """The policy's delay, stretched to what the service asked for, within the policy's cap."""
    if retry_after is None or retry_after <= delay:
        return delay
    return max(delay, min(retry_after, cap))


OPERATOR_ALLOWED: dict[str, tuple[SagaStatus, ...]] = {
    "retry": (SagaStatus.FAILED,),
    "compensate": (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.FAILED),
    "resume": (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING),
    "resolve": (SagaStatus.FAILED,),
}
"""Which statuses each operator action may be applied to."""


def decide(saga: Saga, run_id: str, state: RunState, event: Event) -> Decision:
    """Apply ``event`` to ``state`` (not mutated) and return the decision."""
    d = _Decider(saga, run_id, state.clone(), event.now)
    match event:
        case Start():
            d.on_start(event)
        case ActionSucceeded():
            d.on_action_succeeded(event)
        case ActionFailed():
            d.on_action_failed(event)
        case CompensationSucceeded():
            d.on_compensation_succeeded(event)
        case CompensationFailed():
            d.on_compensation_failed(event)
        case TimerFired():
            d.on_timer()
        case Recover():
            d.on_recover(event)
        case Operator():
            d.on_operator(event)
    return Decision(d.state, d.history, d.commands)
