"""The orchestrator's side of the Celery integration: steps whose actions and compensations
are Celery task calls (:func:`celery_step`), and a compensating ``celery.chain``
(:func:`saga_chain`, :class:`ChainSaga`). A step's command payload is the task call; the
transport (:mod:`sagaway.integrations.celery.transport`) turns it into a Celery message."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaway import Orchestrator, RunHandle, Saga, SagaRun, Step
from sagaway.definition.retry import RetryPolicy
from sagaway.definition.saga import Command
from sagaway.errors import DefinitionError, InvalidPayload, TransportError
from sagaway.integrations.celery._wire import _MARKER, _describe
from sagaway.messaging.base import check_destination

DEFAULT_QUEUE = "celery"
"""Celery's default queue (``task_default_queue``)."""
_CHAIN_INPUT = "a saga_chain run's input is {'args': [...], 'kwargs': {...}}"


ArgsFn = Callable[[Any, Mapping[str, Any]], Sequence[Any]]
"""``(input, results) -> positional arguments`` of a task call."""
KwargsFn = Callable[[Any, Mapping[str, Any]], Mapping[str, Any]]
"""``(input, results) -> keyword arguments`` of a task call."""


@dataclass(frozen=True, slots=True)
class _TaskRef:
    """A task as a step names it: its name, partial arguments and options."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    immutable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def _task_ref(task: Any, what: str) -> _TaskRef:
    """Read a task name, a Celery task object or a signature (``task.s(…)``)."""
    if isinstance(task, str):
        if not task.strip():
            raise DefinitionError(f"{what}: the task name is empty")
        return _TaskRef(task)
    if isinstance(task, dict) and isinstance(task.get("task"), str):  # a celery Signature
        options = dict(task.get("options") or {})
        return _TaskRef(
            task["task"],
            tuple(task.get("args") or ()),
            dict(task.get("kwargs") or {}),
            options.get("queue"),
            bool(task.get("immutable")),
            {k: options[k] for k in ("time_limit", "soft_time_limit", "priority")
             if options.get(k) is not None},
        )
    name = getattr(task, "name", None)
    if isinstance(name, str) and callable(getattr(task, "apply_async", None)):
        queue = getattr(task, "queue", None)
        return _TaskRef(name, queue=queue if isinstance(queue, str) else None)
    raise DefinitionError(
        f"{what}: expected a task name, a Celery task or a signature (task.s(...)), got "
        f"{task!r}"
    )


def _call_payload(ref: _TaskRef, args: Sequence[Any], kwargs: Mapping[str, Any],
                  options: Mapping[str, Any]) -> dict[str, Any]:
    return {_MARKER: 1, "args": list(args), "kwargs": dict(kwargs),
            "options": {**ref.options, **options}}


def _unbuildable(step: str, exc: Exception) -> dict[str, Any]:
    # Called while a transition is being written, so it must not raise: the transport
    # answers the attempt with this failure instead of sending a task.
    return {_MARKER: 1, "error": f"celery step {step!r}: its task call could not be built "
                                 f"from the run's input and results: {_describe(exc)}"}


def _as_args(value: Any, step: str) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise InvalidPayload(f"celery step {step!r}: args must return a list or tuple, got "
                             f"{type(value).__name__}")
    return list(value)


def celery_step(
    saga: Saga,
    name: str,
    *,
    task: Any,
    compensation: Any = None,
    queue: str | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
    args: ArgsFn | None = None,
    kwargs: KwargsFn | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    pivot: bool = False,
    retriable: bool = False,
    read_only: bool = False,
) -> Step:
    """Declare a saga step that runs a Celery task (and a compensation task).

    The action task is called as ``task(*args(input, results), **kwargs(input, results))``
    — by default ``task(input)``, the run's input. The compensation task is called with the
    action's result first (``None`` when the attempt's outcome is unknown) and then the
    action's own arguments: ``release(result, input)`` by default.

    Args:
        saga: the definition to add the step to.
        name: the step's name.
        task: the task's name (``"shop.reserve"``), a Celery task, or a signature
            (``reserve.s(extra, queue="shop")``: partial arguments are appended, its
            ``queue``, ``time_limit``, ``soft_time_limit`` and ``priority`` are used).
        compensation: the task that undoes it, in the same forms; ``None`` for a step that
            needs none (the pivot, a retriable or read-only step).
        queue: the Celery queue both tasks are sent to (default: the signature's or task's
            own, else ``"celery"``).
        timeout: seconds one attempt may take before it counts as timed out (possibly
            applied); keep it above the task's hard time limit plus queueing.
        retry / compensation_retry: the step's retry policies (attempts after Celery's own
            retries have given up; each attempt is one Celery task message).
        args / kwargs: pure functions ``(input, results) -> arguments`` (``results``: the
            results of the steps that have succeeded, by step name).
        time_limit / soft_time_limit: Celery time limits sent with the task message.
        pivot / retriable / read_only: the step's kind, as for ``Saga.step``.

    Raises:
        DefinitionError: a task reference that cannot be read, a bad queue name, or
            ``timeout`` not above ``time_limit``.
    """
    action_ref = _task_ref(task, f"celery step {name!r}")
    comp_ref = (None if compensation is None
                else _task_ref(compensation, f"compensation of celery step {name!r}"))
    target = queue or action_ref.queue or DEFAULT_QUEUE
    comp_target = queue or (comp_ref.queue if comp_ref else None) or target
    for q in (target, comp_target):
        try:
            check_destination(q)
        except TransportError as exc:
            raise DefinitionError(f"celery step {name!r}: queue: {exc}") from None
    if timeout is None or timeout <= 0:
        raise DefinitionError(f"celery step {name!r}: timeout must be > 0 seconds")
    limit = time_limit or action_ref.options.get("time_limit")
    if limit is not None and timeout <= limit:
        raise DefinitionError(
            f"celery step {name!r}: timeout ({timeout}s) must be above the task's hard "
            f"time_limit ({limit}s), or the saga gives up on attempts a worker still runs"
        )
    options = {k: v for k, v in (("time_limit", time_limit),
                                 ("soft_time_limit", soft_time_limit)) if v is not None}

    def action_call(data: Any, results: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        positional = [data] if args is None else _as_args(args(data, results), name)
        named = {} if kwargs is None else dict(kwargs(data, results))
        if not action_ref.immutable:
            positional += action_ref.args
            named = {**action_ref.kwargs, **named}
        else:
            positional, named = list(action_ref.args), dict(action_ref.kwargs)
        return positional, named

    return _declare(saga, name, action_ref, comp_ref, target, comp_target, action_call,
                    options=options, timeout=timeout, retry=retry,
                    compensation_retry=compensation_retry, pivot=pivot, retriable=retriable,
                    read_only=read_only)


def _declare(saga: Saga, name: str, action_ref: _TaskRef, comp_ref: _TaskRef | None,
             target: str, comp_target: str,
             action_call: Callable[[Any, Mapping[str, Any]], tuple[list[Any], dict[str, Any]]],
             *, options: Mapping[str, Any], timeout: float, retry: RetryPolicy | None,
             compensation_retry: RetryPolicy | None, pivot: bool, retriable: bool,
             read_only: bool) -> Step:
    def action_payload(data: Any, results: Mapping[str, Any]) -> dict[str, Any]:
        try:
            positional, named = action_call(data, results)
        except Exception as exc:
            return _unbuildable(name, exc)
        return _call_payload(action_ref, positional, named, options)

    declare = saga.step(name=name, retry=retry, timeout=timeout, pivot=pivot,
                        retriable=retriable, read_only=read_only)
    step: Step = declare(Command(target, action_ref.name, payload=action_payload))
    if comp_ref is not None:
        ref = comp_ref

        def compensation_payload(data: Any, results: Mapping[str, Any]) -> dict[str, Any]:
            if ref.immutable:
                # .si(): like Celery, call it with its own arguments and nothing else.
                return _call_payload(ref, list(ref.args), dict(ref.kwargs), options)
            try:
                positional, named = action_call(data, results)
            except Exception as exc:
                return _unbuildable(name, exc)
            return _call_payload(ref, [results.get(name), *positional, *ref.args],
                                 {**named, **ref.kwargs}, options)

        step.compensation(retry=compensation_retry, timeout=timeout)(
            Command(comp_target, ref.name, payload=compensation_payload))
    return step


class ChainSaga(Saga):
    """What :func:`saga_chain` returns: a saga definition you can start like a chain."""

    async def start(self, orchestrator: Orchestrator, *args: Any, key: str | None = None,
                    **kwargs: Any) -> RunHandle:
        """Start a run: ``await place_order.start(orch, order)`` is the durable
        ``chain(...).delay(order)``. ``key`` makes starting twice return the same run."""
        return await orchestrator.start(self.name, {"args": list(args), "kwargs": kwargs},
                                        key=key)

    def result(self, run: SagaRun) -> Any:
        """The chain's result: what its last task returned (``None`` until it has)."""
        return run.results.get(self.steps[-1].name)


def _chain_input(data: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(data, dict):
        raise InvalidPayload(_CHAIN_INPUT)
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidPayload(_CHAIN_INPUT)
    return args, kwargs


def saga_chain(
    *links: tuple[Any, Any],
    name: str,
    version: int = 1,
    queue: str | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
) -> ChainSaga:
    """Turn ``chain(a.s(), b.s(), c.s())`` into a durable saga that compensates.

    ``saga_chain((reserve.s(), release.s()), (pay.s(), refund.s()), (ship.s(), None),
    name="place_order")``. Calls follow ``celery.chain``: the first task gets the run's
    arguments (``start(orch, *args, **kwargs)``) followed by its signature's own; every
    next task gets the previous task's result first (unless its signature is immutable,
    ``.si()``). A compensation gets its action's result (``None`` when unknown), then the
    action's arguments, then its own signature's.

    A link without a compensation is the point of no return: the first one is the pivot,
    and the links after it are retried until they succeed (so they may not have
    compensations either). Register the result with the orchestrator like any saga.

    Raises:
        DefinitionError: no links, a link that is not an ``(action, compensation)`` pair,
            a compensation after the pivot, or what :func:`celery_step` refuses.
    """
    if not links:
        raise DefinitionError(f"saga_chain {name!r}: give at least one (task, compensation)")
    saga = ChainSaga(name, version=version)
    used: set[str] = set()
    previous: str | None = None
    pivot_seen = False
    for index, link in enumerate(links):
        if not isinstance(link, tuple) or len(link) != 2:
            raise DefinitionError(
                f"saga_chain {name!r}: link {index + 1} must be a pair (task, compensation "
                f"or None), got {link!r}"
            )
        action, compensation = link
        ref = _task_ref(action, f"saga_chain {name!r} link {index + 1}")
        comp = (None if compensation is None
                else _task_ref(compensation, f"saga_chain {name!r} link {index + 1} "
                                             f"compensation"))
        step_name = _step_name(ref.name, used)
        target = ref.queue or queue or DEFAULT_QUEUE
        comp_target = (comp.queue if comp else None) or queue or target
        for q in (target, comp_target):
            try:
                check_destination(q)
            except TransportError as exc:
                raise DefinitionError(f"saga_chain {name!r} link {index + 1}: {exc}") from None
        limit = ref.options.get("time_limit")
        if limit is not None and timeout <= limit:
            raise DefinitionError(
                f"saga_chain {name!r}: timeout ({timeout}s) must be above the time_limit "
                f"of {ref.name!r} ({limit}s)"
            )
        call = _chain_call(ref, previous)
        pivot = comp is None and not pivot_seen
        retriable = comp is None and pivot_seen
        pivot_seen = pivot_seen or comp is None
        _declare(saga, step_name, ref, comp, target, comp_target, call, options={},
                 timeout=timeout, retry=retry, compensation_retry=compensation_retry,
                 pivot=pivot, retriable=retriable, read_only=False)
        previous = step_name
    saga.validate()
    return saga


def _step_name(task_name: str, used: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in task_name.rsplit(".", 1)[-1])
    base = base if base and not base[0].isdigit() and base[0] != "-" else f"task_{base}"
    base = base[:100]
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate)
    return candidate


def _chain_call(ref: _TaskRef, previous: str | None
                ) -> Callable[[Any, Mapping[str, Any]], tuple[list[Any], dict[str, Any]]]:
    def call(data: Any, results: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        if ref.immutable:
            return list(ref.args), dict(ref.kwargs)
        if previous is None:
            args, kwargs = _chain_input(data)
            return [*args, *ref.args], {**ref.kwargs, **kwargs}
        return [results.get(previous), *ref.args], dict(ref.kwargs)

    return call
