"""OpenTelemetry traces (the ``[otel]`` extra): a span per run and per step attempt.

:class:`TracingListener` opens a span for each run (``saga <name>``, a child of whatever
span was current when ``orch.start()`` was called, e.g. the HTTP request that placed the
order) and one per attempt of a step's action or compensation (``step <saga>.<step>`` /
``compensate <saga>.<step>``), a child of the run's span. Attributes: ``sagaway.saga``,
``sagaway.run_id``, ``sagaway.step``, ``sagaway.attempt``, ``sagaway.phase``,
``sagaway.outcome`` (``sagaway.status`` on the run span). Retries, give-ups and operator
requests are events on the run span. Error texts come from the run's history, where the
runtime has already cut the saga's sensitive values out.

Propagation: before each attempt the listener returns a W3C ``traceparent`` (and
``tracestate``) for the step's span; the runtime sends it as HTTP headers, in command
envelopes' headers, and hands it to local steps as ``ctx.headers`` for the calls they make.
On the other side, :func:`participant_tracing` continues the trace in a
:class:`~sagaway.participant.Participant` (``Participant(..., around_command=…)``).

A run resumed by another worker (after a crash, or when a reply lands there) gets a new run
span on that worker; every span carries ``sagaway.run_id`` to find them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sagaway.engine.listener import Invocation, Listener, Transition
from sagaway.messaging.envelope import Envelope

__all__ = ["TracingListener", "participant_tracing"]

_ENDINGS = ("succeeded", "failed", "interrupted", "cancelled")
_EVENT_KINDS = frozenset({
    "step.retry_scheduled", "step.gave_up", "compensation.retry_scheduled",
    "compensation.gave_up", "run.compensating", "run.recovered", "event.ignored",
})


def _otel() -> tuple[Any, Any]:
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "sagaway's tracing needs OpenTelemetry: pip install 'sagaway[otel]' (then set up "
            "a TracerProvider with an exporter, e.g. opentelemetry-exporter-otlp)"
        ) from exc
    return trace, TraceContextTextMapPropagator


def _scalar_attributes(data: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (data or {}).items():
        if isinstance(v, str | bool | int | float):
            out[f"sagaway.{k}"] = v
    return out


class TracingListener(Listener):
    """Spans for runs and step attempts (see the module docstring).

    Args:
        tracer_provider: the provider to use (default: the global one).
        propagator: a ``TextMapPropagator`` (default: W3C trace context).
        max_open_runs: runs whose spans are kept open at once; the oldest are ended (with
            ``sagaway.outcome=evicted``) beyond that, e.g. runs parked here whose reply
            woke them on another worker.
    """

    def __init__(self, tracer_provider: Any = None, *, propagator: Any = None,
                 max_open_runs: int = 10_000) -> None:
        from sagaway import __version__

        trace, propagator_cls = _otel()
        self._trace = trace
        self._status = trace.Status
        self._code = trace.StatusCode
        self._tracer = trace.get_tracer("sagaway", __version__, tracer_provider=tracer_provider)
        self._propagator = propagator or propagator_cls()
        self.max_open_runs = max_open_runs
        self._runs: dict[str, Any] = {}
        # Open attempt spans, by run: (step, compensating, attempt) -> span.
        self._steps: dict[str, dict[tuple[str, bool, int], Any]] = {}

    # -- spans ----------------------------------------------------------------------------

    def _run_span(self, run_id: str, saga: str) -> Any:
        span = self._runs.get(run_id)
        if span is None:
            while len(self._runs) >= self.max_open_runs:
                self._end_run(next(iter(self._runs)), outcome="evicted")
            span = self._tracer.start_span(
                f"saga {saga}", attributes={"sagaway.saga": saga, "sagaway.run_id": run_id})
            self._runs[run_id] = span
        return span

    def _step_span(self, run_id: str, saga: str, step: str, attempt: int,
                   compensating: bool) -> Any:
        key = (step, compensating, attempt)
        span = self._steps.get(run_id, {}).get(key)
        if span is None:
            parent = self._trace.set_span_in_context(self._run_span(run_id, saga))
            verb = "compensate" if compensating else "step"
            span = self._tracer.start_span(
                f"{verb} {saga}.{step}", context=parent,
                attributes={"sagaway.saga": saga, "sagaway.run_id": run_id,
                            "sagaway.step": step, "sagaway.attempt": attempt,
                            "sagaway.phase": "compensation" if compensating else "action"})
            self._steps.setdefault(run_id, {})[key] = span
        return span

    def _end_run(self, run_id: str, *, outcome: str | None = None,
                 status: str | None = None) -> None:
        for span in self._steps.pop(run_id, {}).values():
            span.set_attribute("sagaway.outcome", outcome or "unfinished")
            span.end()
        span = self._runs.pop(run_id, None)
        if span is None:
            return
        if outcome is not None:
            span.set_attribute("sagaway.outcome", outcome)
        if status is not None:
            span.set_attribute("sagaway.status", status)
            if status == "FAILED":
                span.set_status(self._status(self._code.ERROR, "the run FAILED"))
        span.end()

    # -- the listener ---------------------------------------------------------------------

    def on_transition(self, transition: Transition) -> None:
        run_id, saga = transition.run_id, transition.saga
        for e in transition.entries:
            phase, _, what = e.kind.partition(".")
            if e.kind == "run.started":
                self._run_span(run_id, saga).set_attribute("sagaway.version",
                                                           transition.version)
            elif e.kind == "run.finished":
                status = str((e.data or {}).get("status", transition.status.value))
                self._end_run(run_id, status=status)
            elif phase in ("step", "compensation") and e.step is not None and (
                    what == "started" or what in _ENDINGS):
                compensating = phase == "compensation"
                span = self._step_span(run_id, saga, e.step, e.attempt or 0, compensating)
                if what == "started":
                    continue
                self._steps.get(run_id, {}).pop((e.step, compensating, e.attempt or 0), None)
                span.set_attribute("sagaway.outcome", what)
                data = e.data or {}
                if data.get("maybe_applied"):
                    span.set_attribute("sagaway.maybe_applied", True)
                if what != "succeeded":
                    error = data.get("error")
                    span.set_status(self._status(self._code.ERROR,
                                                 str(error) if error else what))
                span.end()
            elif e.kind in _EVENT_KINDS or phase == "operator":
                attributes = _scalar_attributes(e.data)
                if e.step is not None:
                    attributes["sagaway.step"] = e.step
                if e.attempt is not None:
                    attributes["sagaway.attempt"] = e.attempt
                self._run_span(run_id, saga).add_event(e.kind, attributes)

    def on_invoke(self, invocation: Invocation) -> Mapping[str, str] | None:
        span = self._step_span(invocation.run_id, invocation.saga, invocation.step,
                               invocation.attempt, invocation.compensating)
        span.set_attribute("sagaway.invoke", invocation.kind)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier

    def on_lease_lost(self, run_id: str) -> None:
        self._end_run(run_id, outcome="lease_lost")


def participant_tracing(tracer_provider: Any = None, *, propagator: Any = None
                        ) -> Callable[[str, Envelope], contextlib.AbstractContextManager[Any]]:
    """A ``Participant(around_command=…)`` hook: each command is handled in a span that is a
    child of the orchestrator's step span (read from the envelope's ``traceparent``).

    The span records the exception type of a failing handler, not its message (which may
    repeat payload data the participant cannot tell is sensitive).
    """
    from sagaway import __version__

    trace, propagator_cls = _otel()
    tracer = trace.get_tracer("sagaway.participant", __version__,
                              tracer_provider=tracer_provider)
    prop = propagator or propagator_cls()

    @contextlib.contextmanager
    def around(service: str, envelope: Envelope) -> Iterator[Any]:
        parent = prop.extract(dict(envelope.headers))
        attributes = {"sagaway.service": service, "sagaway.command": envelope.type}
        if envelope.run_id:
            attributes["sagaway.run_id"] = envelope.run_id
        if envelope.step:
            attributes["sagaway.step"] = envelope.step
        with tracer.start_as_current_span(
                f"handle {service}.{envelope.type}", context=parent,
                kind=trace.SpanKind.CONSUMER, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                raise

    return around
