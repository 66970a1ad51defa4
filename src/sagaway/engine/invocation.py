"""Carrying out one attempt of a step's action or compensation, in this worker.

The Orchestrator hands each InvokeAction / InvokeCompensation command that is not a command
step (those go out as messages, see ``commands``) to the :class:`StepInvoker`: it builds the
StepContext, calls a local function (``async def`` on the loop, plain ``def`` in a thread
pool) or hands an HTTP step to ``sagaway.invokers.http``, and turns the outcome into the
event the decider expects (ActionSucceeded with the encoded result, ActionFailed, …).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sagaway.definition.http import HttpCall
from sagaway.definition.saga import Saga, StepContext, idempotency_key
from sagaway.engine.clock import Clock
from sagaway.engine.driver import Driver, run_secrets
from sagaway.engine.listener import Invocation, Listener, RunContext, current_run
from sagaway.engine.payload import encode
from sagaway.engine.state import (
    ActionFailed,
    ActionSucceeded,
    Command,
    CompensationFailed,
    CompensationSucceeded,
    Event,
    InvokeAction,
    InvokeCompensation,
)
from sagaway.errors import InvalidPayload, OrchestratorClosed, PayloadTooLarge, SagawayError
from sagaway.invokers import InvocationFailed

if TYPE_CHECKING:
    from sagaway.invokers.http import HttpInvoker

__all__ = ["NonRetryableError", "StepInvoker"]

log = logging.getLogger("sagaway.engine")


class NonRetryableError(Exception):
    """Raise from a step to fail it at once, without further attempts (a business "no")."""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StepInvoker:
    """Runs step attempts for an Orchestrator; owns the step thread pool and HTTP pools.

    Args:
        clock: the time source the events are stamped with.
        listeners: the Orchestrator's listeners (the same list: added ones count too),
            asked for headers before each attempt.
        max_payload_bytes: the limit for a step result, encoded as JSON.
        rejections: the Orchestrator's counters of refused work (the same dict).
        max_threads: threads for synchronous (plain ``def``) steps.
        http_connections: the most HTTP connections open at once to one service.
    """

    def __init__(self, *, clock: Clock, listeners: list[Listener], max_payload_bytes: int,
                 rejections: dict[str, int], max_threads: int, http_connections: int) -> None:
        self.clock = clock
        self.listeners = listeners
        self.max_payload_bytes = max_payload_bytes
        self.rejections = rejections
        self._max_threads = max_threads
        self._http_connections = http_connections
        self.threads: ThreadPoolExecutor | None = None
        self._http: HttpInvoker | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        self.threads = ThreadPoolExecutor(self._max_threads, thread_name_prefix="sagaway-step")

    def close_threads(self) -> None:
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
            self.threads = None

    async def aclose_http(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def open_http(self, sagas: Iterable[Saga], services: Mapping[str, str]) -> None:
        """Resolve the base URLs HTTP steps need (DefinitionError if one is missing) and
        open the HTTP invoker (its connection pools) on first need."""
        if not any(s.http or isinstance(s.compensation_fn, HttpCall)
                   for saga in sagas for s in saga.steps):
            return
        from sagaway.invokers.http import HttpInvoker, resolve_services

        resolved = resolve_services(sagas, services)
        if self._http is None:
            self._http = HttpInvoker(resolved, max_connections=self._http_connections)
        else:
            self._http.add_services(resolved)

    def _http_invoker(self) -> HttpInvoker:
        if self._http is None:
            raise OrchestratorClosed("the orchestrator is closed")
        return self._http

    # -- headers and context ----------------------------------------------------------------

    def headers_for(self, invocation: Invocation) -> dict[str, str]:
        """The headers listeners want this attempt to carry (trace context, mostly)."""
        headers: dict[str, str] = {}
        for listener in self.listeners:
            try:
                extra: Mapping[str, str] | None = listener.on_invoke(invocation)
            except Exception:
                log.exception("listener %r failed on invoke of %s/%s", listener,
                              invocation.run_id, invocation.step,
                              extra={"run_id": invocation.run_id, "saga": invocation.saga,
                                     "step": invocation.step, "attempt": invocation.attempt})
                continue
            if extra:
                headers.update(extra)
        return headers

    def _context(self, d: Driver, step: str, attempt: int, *, compensating: bool,
                 http: bool = False) -> StepContext:
        headers = (self.headers_for(Invocation(d.run_id, d.saga.name, step, attempt,
                                               compensating, "http" if http else "local"))
                   if self.listeners else {})
        return StepContext(
            run_id=d.run_id,
            saga=d.saga.name,
            step=step,
            attempt=attempt,
            idempotency_key=idempotency_key(d.run_id, step, compensation=compensating),
            results=d.state.results,
            input=d.input,
            compensating=compensating,
            headers=headers,
        )

    # -- calling ------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self.threads is None:
            raise OrchestratorClosed("the orchestrator is closed")
        loop = asyncio.get_running_loop()
        # In this task's context, so the step's logs and spans know their run.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        result = await loop.run_in_executor(self.threads, call)
        if asyncio.iscoroutine(result):  # a plain def that returned a coroutine
            return await result
        return result

    async def _call_within(self, timeout: float | None, fn: Callable[..., Any], *args: Any
                           ) -> Any:
        if timeout is None:
            return await self._call(fn, *args)
        async with asyncio.timeout(timeout):
            return await self._call(fn, *args)

    async def invoke(self, d: Driver, cmd: Command) -> Event:
        """Carry out one attempt of an action or compensation; the event that reports it."""
        compensating = not isinstance(cmd, InvokeAction)
        token = current_run.set(RunContext(d.run_id, d.saga.name, cmd.step, cmd.attempt,
                                           compensating, run_secrets(d)))
        try:
            if isinstance(cmd, InvokeAction):
                return await self._invoke_action(d, cmd)
            return await self._invoke_compensation(d, cmd)
        finally:
            current_run.reset(token)

    async def _invoke_action(self, d: Driver, cmd: InvokeAction) -> Event:
        step = d.saga[cmd.step]
        action = step.action
        ctx = self._context(d, step.name, cmd.attempt, compensating=False,
                            http=isinstance(action, HttpCall))
        event: Event
        try:
            if isinstance(action, HttpCall):
                result = await self._http_invoker().act(action, ctx, d.input)
            else:
                result = await self._call_within(step.timeout, step.action, ctx, d.input)
        except InvocationFailed as exc:
            event = ActionFailed(step.name, cmd.attempt, exc.message, self.clock.now(),
                                 retryable=exc.retryable, maybe_applied=exc.maybe_applied,
                                 retry_after=exc.retry_after)
        except TimeoutError as exc:
            # Our timeout, or the step's own (a client timeout): either way the effect may
            # have happened.
            what = f"timed out after {step.timeout}s" if step.timeout else describe(exc)
            event = ActionFailed(step.name, cmd.attempt, f"{what} (may have taken effect)",
                                 self.clock.now(), retryable=True, maybe_applied=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = not (isinstance(exc, NonRetryableError | SagawayError)
                             or step.retry.is_non_retryable(exc))
            event = ActionFailed(step.name, cmd.attempt, describe(exc), self.clock.now(),
                                 retryable=retryable)
        else:
            try:
                plain, _ = encode(result, what=f"the result of step {step.name!r}",
                                  limit=self.max_payload_bytes)
            except InvalidPayload as exc:
                if isinstance(exc, PayloadTooLarge):
                    self.rejections["payload_too_large"] += 1
                # The action ran, so its effect may stand: fail it as possibly applied.
                event = ActionFailed(step.name, cmd.attempt, str(exc), self.clock.now(),
                                     retryable=False, maybe_applied=True)
            else:
                event = ActionSucceeded(step.name, cmd.attempt, plain, self.clock.now())
        return event

    async def _invoke_compensation(self, d: Driver, cmd: InvokeCompensation) -> Event:
        step = d.saga[cmd.step]
        fn = step.compensation_fn
        assert fn is not None
        ctx = self._context(d, step.name, cmd.attempt, compensating=True,
                            http=isinstance(fn, HttpCall))
        state = d.state.steps.get(step.name)
        # The action's result if an attempt succeeded; None if it timed out or was cut.
        known = state is not None and state.succeeded
        result = state.result if state is not None and known else None
        event: Event
        try:
            if isinstance(fn, HttpCall):
                await self._http_invoker().undo(fn, ctx, d.input, result, known=known,
                                                action=step.action)
            else:
                await self._call_within(step.compensation_timeout, fn, ctx, d.input, result)
        except InvocationFailed as exc:
            event = CompensationFailed(step.name, cmd.attempt, exc.message, self.clock.now(),
                                       retryable=exc.retryable, retry_after=exc.retry_after)
        except TimeoutError as exc:
            what = (f"timed out after {step.compensation_timeout}s"
                    if step.compensation_timeout else describe(exc))
            event = CompensationFailed(step.name, cmd.attempt, what, self.clock.now())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = not step.compensation_retry.is_non_retryable(exc)
            event = CompensationFailed(step.name, cmd.attempt, describe(exc),
                                       self.clock.now(), retryable=retryable)
        else:
            event = CompensationSucceeded(step.name, cmd.attempt, self.clock.now())
        return event
