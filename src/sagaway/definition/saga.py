"""How users declare a saga: ordered steps, each with an action and an optional compensation.

Pure: nothing here does I/O or touches asyncio. A definition is data; the decider reads it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, overload

from sagaway.definition.http import HTTP_METHODS, HttpCall, parse_template
from sagaway.definition.retry import (
    DEFAULT_ACTION_RETRY,
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRIABLE_RETRY,
    RetryPolicy,
)
from sagaway.errors import DefinitionError

__all__ = ["Command", "Saga", "Step", "StepContext", "StepKind"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")

ActionFn = Callable[..., Any]
CompensationFn = Callable[..., Any]


class StepKind(StrEnum):
    """The role a step plays, after the classic saga literature."""

    COMPENSATABLE = "compensatable"
    """Before the pivot: undone by its compensation if a later step fails."""
    PIVOT = "pivot"
    """The point of no return: once it succeeds the saga only goes forward."""
    RETRIABLE = "retriable"
    """After the pivot: retried until it succeeds, never compensated."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step (or compensation) invocation knows about itself.

    Attributes:
        run_id: the saga run's id.
        saga: the saga definition's name.
        step: this step's name.
        attempt: 1 for the first invocation; stays the same idempotency key across attempts.
        idempotency_key: ``{run_id}:{step}:action`` or ``{run_id}:{step}:compensation``;
            never contains the attempt, so a participant can apply the effect once.
        results: results of the steps that have already succeeded, by step name.
        input: the run's input (the same object the step receives as ``data``).
        compensating: True when this invocation is a compensation.
        headers: headers listeners asked this attempt to carry (e.g. ``traceparent``), for a
            step that calls other services itself.
    """

    run_id: str
    saga: str
    step: str
    attempt: int
    idempotency_key: str
    results: Mapping[str, Any]
    input: Any = None
    compensating: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


def idempotency_key(run_id: str, step: str, *, compensation: bool) -> str:
    """The key every invocation of a step's action (or compensation) carries."""
    return f"{run_id}:{step}:{'compensation' if compensation else 'action'}"


def _check_callable(fn: Any, what: str) -> None:
    if not callable(fn):
        raise DefinitionError(f"{what} must be a function, got {fn!r}")


@dataclass(frozen=True, slots=True)
class Command:
    """A step (or compensation) carried out by another service over messages.

    The orchestrator writes the command to its outbox with the transition that starts the
    step, the run parks (no task waits on it), and the service's reply wakes it.
    """

    service: str
    """The destination (queue or stream) the service consumes."""
    name: str
    """The command's type, which picks the service's handler."""

    def __call__(self, *args: Any) -> Any:
        raise TypeError(
            f"{self.name!r} is a command for service {self.service!r}: the orchestrator sends it "
            f"as a message; it cannot be called in-process"
        )


DEFAULT_COMMAND_TIMEOUT = 30.0
"""Seconds a command step waits for its reply before the attempt counts as timed out."""

DEFAULT_HTTP_TIMEOUT = 5.0
"""Seconds an HTTP step's attempt may take before it counts as timed out."""


def _http_call(where: str, method: str, url: str, *, timeout: float,
               json: Callable[..., Any] | None, response_model: Any, compensating: bool
               ) -> HttpCall:
    verb = method.upper() if isinstance(method, str) else method
    if verb not in HTTP_METHODS:
        raise DefinitionError(f"{where}: method {method!r} is not supported; use one of "
                              f"{', '.join(sorted(HTTP_METHODS))}")
    if json is not None and not callable(json):
        raise DefinitionError(f"{where}: json must be a function building the body, "
                              f"got {json!r}")
    service, path = parse_template(url, where=where, compensation=compensating)
    return HttpCall(verb, url, service, path, timeout, json, response_model, compensating)


class Step:
    """One step of a saga: an action, an optional compensation, and their policies.

    Created by ``@saga.step``; the decorated name refers to this object, which stays
    callable (it calls the action) so steps can be unit-tested directly.
    """

    def __init__(
        self,
        saga: Saga,
        name: str,
        action: ActionFn,
        *,
        retry: RetryPolicy | None,
        timeout: float | None,
        pivot: bool,
        retriable: bool,
        read_only: bool,
    ) -> None:
        self.saga = saga
        self.name = name
        self.action = action
        self.declared_retry = retry
        self.timeout = timeout
        self.pivot = pivot
        self.declared_retriable = retriable
        self.read_only = read_only
        self.compensation_fn: CompensationFn | None = None
        self.compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
        self.compensation_timeout: float | None = timeout
        # Resolved by Saga.validate(): a step after the pivot is retriable whatever it says.
        self.kind: StepKind = (
            StepKind.PIVOT if pivot else StepKind.RETRIABLE if retriable else StepKind.COMPENSATABLE
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.action(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.saga.name}.{self.name} {self.kind.value}>"

    @property
    def retry(self) -> RetryPolicy:
        """The action's effective retry policy."""
        if self.declared_retry is not None:
            return self.declared_retry
        return DEFAULT_RETRIABLE_RETRY if self.kind is StepKind.RETRIABLE else DEFAULT_ACTION_RETRY

    @property
    def remote(self) -> bool:
        """The action is a command to another service (a reply wakes the run)."""
        return isinstance(self.action, Command)

    @property
    def http(self) -> bool:
        """The action is an HTTP request (sent by the orchestrator's HTTP invoker)."""
        return isinstance(self.action, HttpCall)

    @property
    def remote_compensation(self) -> bool:
        return isinstance(self.compensation_fn, Command)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.action)

    @overload
    def compensation(self, fn: CompensationFn, /) -> CompensationFn: ...

    @overload
    def compensation(
        self, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> Callable[[CompensationFn], CompensationFn]: ...

    def compensation(  # type: ignore[misc]  # mypy mis-reads the positional-only default
        self,
        fn: CompensationFn | None = None,
        /,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Register the function that undoes this step: ``(ctx, data, result) -> None``.

        A compensation must tolerate "nothing to undo": it is also invoked when the action
        timed out or was interrupted by a crash (then ``result`` is ``None``), and it may be
        invoked more than once with the same ``ctx.idempotency_key``.

        Use bare (``@step.compensation``) or with a policy
        (``@step.compensation(retry=RetryPolicy(max_attempts=50))``).
        """

        def register(f: CompensationFn) -> CompensationFn:
            _check_callable(f, f"compensation of step {self.name!r}")
            if self.compensation_fn is not None:
                raise DefinitionError(
                    f"step {self.name!r} of saga {self.saga.name!r} already has a compensation "
                    f"({self.compensation_fn.__name__}); register only one"
                )
            if self.read_only:
                raise DefinitionError(
                    f"step {self.name!r} is read_only, so it has nothing to compensate; "
                    f"remove read_only=True or the compensation"
                )
            if self.pivot:
                raise DefinitionError(
                    f"step {self.name!r} is the pivot (the point of no return) and cannot have "
                    f"a compensation; make it an ordinary step or drop the compensation"
                )
            self.compensation_fn = f
            if retry is not None:
                self.compensation_retry = retry
            if timeout is not None:
                self.compensation_timeout = timeout
            return f

        if fn is not None:
            return register(fn)
        return register


class Saga:
    """A saga definition: a name, a version, and an ordered list of steps.

    Steps run in declaration order; ``parallel(a, b, …)`` groups steps to run concurrently.
    """

    def __init__(self, name: str, *, version: int = 1, description: str = "") -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DefinitionError(
                f"saga name {name!r} is not valid: use letters, digits, '_', '.', '-' "
                f"(at most 128 characters, starting with a letter or '_')"
            )
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DefinitionError(f"saga {name!r}: version must be a positive int, got {version!r}")
        self.name = name
        self.version = version
        self.description = description
        self._steps: dict[str, Step] = {}
        # Each stage is a tuple of step names that run concurrently; most stages hold one.
        self._stages: list[tuple[str, ...]] = []
        # Built on first use and dropped when the shape changes: the decider reads these on
        # every event, so they must not be rebuilt each time.
        self._steps_cache: list[Step] | None = None
        self._stages_cache: list[tuple[Step, ...]] | None = None
        self.events: dict[str, str] = {}
        """Domain event type to publish when the run ends, by final status."""
        self.events_destination: str | None = None

    def emits(self, *, destination: str, completed: str | None = None,
              compensated: str | None = None, failed: str | None = None) -> None:
        """Publish a domain event when a run ends, through the outbox (same transaction).

        ``order.emits(destination="order-events", completed="OrderPlaced",
        compensated="OrderCancelled")``. The event's payload holds the run id, the input and
        the results; its idempotency key is ``{run_id}:event``.
        """
        if not isinstance(destination, str) or not destination.strip():
            raise DefinitionError(f"saga {self.name!r}: emits() needs a destination")
        chosen = {"COMPLETED": completed, "COMPENSATED": compensated, "FAILED": failed}
        events = {status: name for status, name in chosen.items() if name}
        if not events:
            raise DefinitionError(f"saga {self.name!r}: emits() needs at least one event type")
        self.events = events
        self.events_destination = destination

    def __repr__(self) -> str:
        return f"<Saga {self.name} v{self.version}: {' -> '.join(self._steps)}>"

    @property
    def steps(self) -> list[Step]:
        if self._steps_cache is None:
            self._steps_cache = list(self._steps.values())
        return self._steps_cache

    @property
    def stages(self) -> list[tuple[Step, ...]]:
        if self._stages_cache is None:
            self._stages_cache = [tuple(self._steps[n] for n in stage) for stage in self._stages]
        return self._stages_cache

    def _shape_changed(self) -> None:
        self._steps_cache = self._stages_cache = None

    def __getitem__(self, name: str) -> Step:
        return self._steps[name]

    def __iter__(self) -> Iterator[Step]:
        return iter(self._steps.values())

    @overload
    def step(self, fn: ActionFn, /) -> Step: ...

    @overload
    def step(
        self,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        pivot: bool = False,
        retriable: bool = False,
        read_only: bool = False,
    ) -> Callable[[ActionFn], Step]: ...

    def step(  # type: ignore[misc]  # mypy mis-reads the positional-only default
        self,
        fn: ActionFn | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        pivot: bool = False,
        retriable: bool = False,
        read_only: bool = False,
    ) -> Any:
        """Declare the next step. The action is ``(ctx, data) -> result`` (sync or async).

        Args:
            name: the step's name; defaults to the function's name.
            retry: the action's retry policy (default: 3 attempts; unlimited after the pivot).
            timeout: seconds per attempt; a timed-out attempt counts as possibly applied.
            pivot: this step is the point of no return.
            retriable: this step is retried until it succeeds and never compensated.
            read_only: this step changes nothing, so it needs no compensation.
        """

        def register(f: ActionFn) -> Step:
            _check_callable(f, "a saga step")
            step_name = name or getattr(f, "__name__", None)
            if not step_name or not _NAME.fullmatch(step_name):
                raise DefinitionError(
                    f"step name {step_name!r} in saga {self.name!r} is not valid; pass name=…"
                )
            if step_name in self._steps:
                raise DefinitionError(
                    f"saga {self.name!r} already has a step named {step_name!r}; "
                    f"step names must be unique (pass name=… to rename one)"
                )
            if pivot and retriable:
                raise DefinitionError(
                    f"step {step_name!r} cannot be both pivot=True and retriable=True"
                )
            if pivot:
                existing = [s.name for s in self._steps.values() if s.pivot]
                if existing:
                    raise DefinitionError(
                        f"saga {self.name!r} already has a pivot ({existing[0]!r}); a saga has at "
                        f"most one pivot, so make {step_name!r} retriable or compensatable"
                    )
            if timeout is not None and timeout <= 0:
                raise DefinitionError(f"step {step_name!r}: timeout must be > 0 seconds")
            if retry is not None and not isinstance(retry, RetryPolicy):
                raise DefinitionError(f"step {step_name!r}: retry must be a RetryPolicy")
            s = Step(
                self,
                step_name,
                f,
                retry=retry,
                timeout=timeout,
                pivot=pivot,
                retriable=retriable,
                read_only=read_only,
            )
            self._steps[step_name] = s
            self._stages.append((step_name,))
            self._shape_changed()
            return s

        if fn is not None:
            return register(fn)
        return register

    def command_step(
        self,
        name: str,
        *,
        service: str,
        command: str | None = None,
        compensation: str | None = None,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        pivot: bool = False,
        retriable: bool = False,
        read_only: bool = False,
    ) -> Step:
        """Declare a step that another service carries out, over messages.

        ``order.command_step("reserve_inventory", service="inventory", command="reserve",
        compensation="release", timeout=10)`` sends a ``reserve`` command (with the run's
        input as its payload and the step's idempotency key) to ``inventory``; the service's
        reply completes the step. No reply within ``timeout`` seconds is a timed-out attempt:
        possibly applied, retried by ``retry``, compensated with the ``release`` command.
        """
        if not isinstance(service, str) or not service.strip():
            raise DefinitionError(f"command step {name!r}: service must be a non-empty name")
        if timeout is None or timeout <= 0:
            raise DefinitionError(
                f"command step {name!r}: timeout must be > 0 seconds (a lost reply must not "
                f"park the run forever)"
            )
        declare = self.step(name=name, retry=retry, timeout=timeout, pivot=pivot,
                            retriable=retriable, read_only=read_only)
        step: Step = declare(Command(service, command or name))
        if compensation is not None:
            step.compensation(retry=compensation_retry, timeout=timeout)(
                Command(service, compensation))
        return step

    def http_step(
        self,
        name: str,
        method: str,
        url: str,
        *,
        compensation: tuple[str, str] | None = None,
        timeout: float = DEFAULT_HTTP_TIMEOUT,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        json: Callable[..., Any] | None = None,
        compensation_json: Callable[..., Any] | None = None,
        response_model: Any = None,
        pivot: bool = False,
        retriable: bool = False,
        read_only: bool = False,
    ) -> Step:
        """Declare a step that is one HTTP request to another service.

        ``order.http_step("reserve", "POST", "{inventory}/reservations",
        compensation=("DELETE", "{inventory}/reservations/{result[reservation_id]}"))``.
        ``{inventory}`` is a base URL from ``Orchestrator(services={"inventory": …})`` (or
        ``SAGAWAY_SERVICE_INVENTORY``); the other fields are listed in
        ``sagaway.definition.http``. Every attempt carries ``Idempotency-Key``.

        Args:
            method, url: the action's request. POST, PUT and PATCH send the run's input as
                the JSON body; GET and DELETE send none.
            compensation: ``(method, url)`` of the request that undoes it; its default body
                (POST/PUT/PATCH) is ``{"input": …, "result": …}``. A 404 or 410 answer counts
                as undone (nothing to undo).
            timeout: seconds per attempt (action and compensation); a timed-out attempt
                counts as possibly applied.
            json: ``(ctx, data) -> body`` for the action (``None`` sends no body).
            compensation_json: ``(ctx, data, result) -> body`` for the compensation.
            response_model: a pydantic model the 2xx body must match; the step's result is
                the validated model as JSON. A body that does not match fails the step
                (possibly applied, not retried).
        """
        where = f"HTTP step {name!r} of saga {self.name!r}"
        if timeout is None or not isinstance(timeout, int | float) or timeout <= 0:
            raise DefinitionError(f"{where}: timeout must be > 0 seconds")
        if response_model is not None and not callable(getattr(response_model,
                                                               "model_validate", None)):
            raise DefinitionError(f"{where}: response_model must be a pydantic model class, "
                                  f"got {response_model!r}")
        action = _http_call(where, method, url, timeout=float(timeout), json=json,
                            response_model=response_model, compensating=False)
        declare = self.step(name=name, retry=retry, timeout=timeout, pivot=pivot,
                            retriable=retriable, read_only=read_only)
        step: Step = declare(action)
        if compensation is None:
            if compensation_json is not None:
                raise DefinitionError(f"{where}: compensation_json needs a compensation")
            return step
        if (not isinstance(compensation, tuple | list) or len(compensation) != 2):
            raise DefinitionError(f"{where}: compensation must be (method, url), e.g. "
                                  f"('DELETE', '{{inventory}}/reservations/{{result[id]}}')")
        undo = _http_call(f"{where} (compensation)", compensation[0], compensation[1],
                          timeout=float(timeout), json=compensation_json, response_model=None,
                          compensating=True)
        step.compensation(retry=compensation_retry, timeout=timeout)(undo)
        return step

    def parallel(self, *steps: Step) -> None:
        """Run already-declared, consecutive steps concurrently as one stage.

        If one of them fails, the others are let finish and every one that may have taken
        effect is compensated; compensation across stages stays in reverse order.
        """
        if len(steps) < 2:
            raise DefinitionError("parallel() needs at least two steps")
        names = []
        for s in steps:
            if not isinstance(s, Step) or s.saga is not self:
                raise DefinitionError(f"parallel() takes steps of saga {self.name!r}, got {s!r}")
            if s.pivot:
                raise DefinitionError(
                    f"the pivot {s.name!r} cannot run in parallel with other steps; the point "
                    f"of no return must be a single step"
                )
            names.append(s.name)
        positions = []
        for n in names:
            idx = next((i for i, st in enumerate(self._stages) if n in st), None)
            if idx is None or len(self._stages[idx]) != 1:
                raise DefinitionError(f"step {n!r} is already in a parallel group")
            positions.append(idx)
        positions.sort()
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise DefinitionError(
                f"parallel() steps must be declared consecutively in saga {self.name!r}: {names}"
            )
        merged = tuple(self._stages[i][0] for i in positions)
        self._stages[positions[0] : positions[-1] + 1] = [merged]
        self._shape_changed()

    def validate(self) -> None:
        """Check the whole definition; resolve each step's kind. Raises DefinitionError."""
        if not self._steps:
            raise DefinitionError(
                f"saga {self.name!r} has no steps; declare at least one with @saga.step"
            )
        forward_only = False
        for stage in self.stages:
            for s in stage:
                if forward_only or s.declared_retriable:
                    if s.compensation_fn is not None:
                        after = "after the pivot" if forward_only else "marked retriable"
                        raise DefinitionError(
                            f"step {s.name!r} of saga {self.name!r} is {after}, so it is never "
                            f"compensated; remove its compensation or move it before the pivot"
                        )
                    if not s.pivot:
                        s.kind = StepKind.RETRIABLE
                elif s.pivot:
                    s.kind = StepKind.PIVOT
                else:
                    s.kind = StepKind.COMPENSATABLE
                    if s.compensation_fn is None and not s.read_only:
                        fn_name = getattr(s.action, "__name__", s.name)
                        fix = ("pass compensation=(method, url)" if s.http
                               else f"add @{fn_name}.compensation")
                        raise DefinitionError(
                            f"step {s.name!r} of saga {self.name!r} runs before the pivot, so it "
                            f"must be undoable: {fix}, or mark it "
                            f"read_only=True if it changes nothing, or retriable=True/pivot=True"
                        )
            if any(s.pivot or s.kind is StepKind.RETRIABLE for s in stage):
                forward_only = True
