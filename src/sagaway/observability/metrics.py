"""Prometheus metrics (the ``[prometheus]`` extra): a runtime listener plus store gauges.

Counters and histograms come from the transitions this process commits (the listener);
gauges about the whole saga log (runs in flight, stuck runs, runs awaiting an operator,
the outbox backlog) are read from the store when ``/metrics`` is scraped, at most every
``cache_seconds`` and within ``timeout`` seconds, so a slow database cannot hang a scrape:
the last values are served with ``sagaway_store_up 0``. Labels hold saga names, step names,
phases, statuses and destinations only, never a run id, a key or payload data.

Example::

    metrics = PrometheusMetrics()
    orch = Orchestrator(url, sagas=[order], listeners=[metrics])
    metrics.watch(orch)                       # store gauges, dead letters
    server = await serve_metrics(metrics, port=9464)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sagaway.engine.listener import Listener, Transition
from sagaway.messaging.base import Transport
from sagaway.messaging.envelope import DeadLetter
from sagaway.run import ACTIVE_STATUSES, SagaStatus
from sagaway.store.base import Store

if TYPE_CHECKING:
    from sagaway.engine.runtime import Orchestrator

__all__ = ["METRIC_NAMES", "PrometheusMetrics", "RejectionCounters", "StoreGauges",
           "serve_metrics"]

log = logging.getLogger("sagaway.observability")

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0, 300.0)
RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
               900.0, 3600.0, 21600.0, 86400.0)

METRIC_NAMES = (
    "sagaway_runs_started_total",
    "sagaway_runs_completed_total",
    "sagaway_runs_compensated_total",
    "sagaway_runs_failed_total",
    "sagaway_runs_resolved_total",
    "sagaway_step_attempts_total",
    "sagaway_step_failures_total",
    "sagaway_step_duration_seconds",
    "sagaway_run_duration_seconds",
    "sagaway_leases_lost_total",
    "sagaway_messages_dead_lettered_total",
    "sagaway_runs_in_flight",
    "sagaway_runs_stuck",
    "sagaway_runs_stuck_threshold_seconds",
    "sagaway_runs_awaiting_operator",
    "sagaway_outbox_backlog",
    "sagaway_outbox_oldest_unsent_age_seconds",
    "sagaway_store_up",
    "sagaway_store_stats_age_seconds",
    "sagaway_starts_rejected_total",
    "sagaway_envelopes_checked_total",
)
"""Every metric family this module exports (histograms add _bucket/_sum/_count)."""

_ENDINGS = {"succeeded": "succeeded", "failed": "failed", "interrupted": "interrupted"}
_FINISHED = {
    SagaStatus.COMPLETED.value: "completed",
    SagaStatus.COMPENSATED.value: "compensated",
    SagaStatus.FAILED.value: "failed",
    SagaStatus.RESOLVED.value: "resolved",
}
_MAX_OPEN_RUNS = 100_000


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "sagaway's Prometheus metrics need prometheus_client: pip install "
            "'sagaway[prometheus]'"
        ) from exc
    return prometheus_client


class StoreGauges:
    """The gauges read from the store, cached; a prometheus_client collector.

    ``refresh()`` (async, on the store's loop) queries at most every ``cache_seconds`` and
    gives up after ``timeout``; ``collect()`` (what the registry calls) only reads the cache.
    """

    def __init__(self, store: Store, *, stuck_after: float = 300.0, cache_seconds: float = 5.0,
                 timeout: float = 2.0, clock: Callable[[], float] = time.time,
                 sagas: Iterable[str] = ()) -> None:
        if stuck_after <= 0 or timeout <= 0 or cache_seconds < 0:
            raise ValueError("stuck_after and timeout must be > 0, cache_seconds >= 0")
        self.store = store
        self.stuck_after = stuck_after
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.clock = clock
        self.sagas: set[str] = set(sagas)
        self._counts: dict[tuple[str, SagaStatus], tuple[int, int]] = {}
        self._backlog: tuple[int, float] = (0, 0.0)
        self._up = 0.0
        self._at: float | None = None  # monotonic time of the last attempt
        self._read_at: float | None = None  # monotonic time of the last success
        self._lock: asyncio.Lock | None = None

    async def refresh(self) -> None:
        """Query the store unless the cache is fresh; never raises, never waits past
        ``timeout`` (then the previous values stay and ``sagaway_store_up`` is 0)."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._at is not None and time.monotonic() - self._at < self.cache_seconds:
                return
            try:
                async with asyncio.timeout(self.timeout):
                    now = self.clock()
                    counts = await self.store.open_counts(updated_before=now - self.stuck_after)
                    unsent, oldest = await self.store.outbox_backlog()
            except Exception as exc:
                self._up = 0.0
                why = (f"no answer within {self.timeout}s" if isinstance(exc, TimeoutError)
                       else f"{type(exc).__name__}: {exc}")
                log.warning("metrics: could not read the saga store (%s); serving the last "
                            "values", why)
            else:
                self._counts = counts
                self._backlog = (unsent, max(now - oldest, 0.0) if oldest is not None else 0.0)
                self._up = 1.0
                self._read_at = time.monotonic()
            self._at = time.monotonic()

    def describe(self) -> Iterator[Any]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        return self._families()

    def _families(self) -> Iterator[Any]:
        _prometheus()
        from prometheus_client.core import GaugeMetricFamily

        in_flight = GaugeMetricFamily(
            "sagaway_runs_in_flight", "Runs not finished, by saga and status (whole store).",
            labels=["saga", "status"])
        stuck = GaugeMetricFamily(
            "sagaway_runs_stuck", "Active runs with no transition for longer than "
            "sagaway_runs_stuck_threshold_seconds.", labels=["saga"])
        waiting = GaugeMetricFamily(
            "sagaway_runs_awaiting_operator", "FAILED runs: a compensation or a step after "
            "the pivot gave up; an operator must retry, compensate or resolve them.",
            labels=["saga"])
        sagas = sorted(self.sagas | {saga for saga, _ in self._counts})
        for saga in sagas:
            stuck_n = 0
            for status in ACTIVE_STATUSES:
                n, old = self._counts.get((saga, status), (0, 0))
                in_flight.add_metric([saga, status.value], n)
                stuck_n += old
            stuck.add_metric([saga], stuck_n)
            waiting.add_metric([saga], self._counts.get((saga, SagaStatus.FAILED), (0, 0))[0])
        yield in_flight
        yield stuck
        yield waiting
        yield GaugeMetricFamily("sagaway_runs_stuck_threshold_seconds",
                                "How long without a transition makes an active run stuck.",
                                value=self.stuck_after)
        yield GaugeMetricFamily("sagaway_outbox_backlog",
                                "Outbox messages written but not yet confirmed by the broker.",
                                value=self._backlog[0])
        yield GaugeMetricFamily("sagaway_outbox_oldest_unsent_age_seconds",
                                "Age of the oldest unsent outbox message (0 when none).",
                                value=self._backlog[1])
        yield GaugeMetricFamily("sagaway_store_up",
                                "1 if the last read of the store's gauges succeeded in time.",
                                value=self._up)
        age = -1.0 if self._read_at is None else time.monotonic() - self._read_at
        yield GaugeMetricFamily("sagaway_store_stats_age_seconds",
                                "Seconds since the store gauges were read (-1: never).",
                                value=age)


class RejectionCounters:
    """Exports counters that live as plain dicts elsewhere, read at scrape time: the
    orchestrators' refused starts (``Orchestrator.rejections``: payload too large, rate
    limited, too many steps) and the signature checks of signed transports
    (``EnvelopeSigner.counts``: accepted, unsigned, forged, stale, replayed)."""

    def __init__(self) -> None:
        self.rejections: list[dict[str, int]] = []
        self.signers: list[dict[str, int]] = []

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        if self.rejections:
            starts = CounterMetricFamily(
                "sagaway_starts_rejected", "Saga starts or registrations refused by a limit.",
                labels=["reason"])
            for reason, n in _summed(self.rejections).items():
                starts.add_metric([reason], n)
            yield starts
        if self.signers:
            checked = CounterMetricFamily(
                "sagaway_envelopes_checked", "Signature checks of consumed envelopes, by "
                "outcome (anything but accepted is dead-lettered).", labels=["outcome"])
            for outcome, n in _summed(self.signers).items():
                checked.add_metric([outcome], n)
            yield checked


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for key, n in list(c.items()):
            total[key] = total.get(key, 0) + n
    return total


class PrometheusMetrics(Listener):
    """Counts runs, steps and dead letters from the runtime's transitions.

    Args:
        registry: a ``prometheus_client.CollectorRegistry`` (default: a new one, so two
            orchestrators in one process do not collide; pass ``prometheus_client.REGISTRY``
            to share the default one).
        stuck_after: seconds without a transition that make an active run stuck.
        cache_seconds / timeout: how often, and how long at most, scrapes read the store.
    """

    def __init__(self, *, registry: Any = None, stuck_after: float = 300.0,
                 cache_seconds: float = 5.0, timeout: float = 2.0) -> None:
        prom = _prometheus()
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.stuck_after = stuck_after
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.store_gauges: StoreGauges | None = None
        r = self.registry
        self.runs_started = prom.Counter("sagaway_runs_started", "Runs started.", ["saga"],
                                         registry=r)
        self._finished = {
            name: prom.Counter(f"sagaway_runs_{name}", f"Runs that ended {name.upper()}.",
                               ["saga"], registry=r)
            for name in _FINISHED.values()
        }
        self.step_attempts = prom.Counter(
            "sagaway_step_attempts", "Attempts of step actions and compensations started.",
            ["saga", "step", "phase"], registry=r)
        self.step_failures = prom.Counter(
            "sagaway_step_failures", "Attempts that failed (raised, timed out, declined, or "
            "were interrupted by a crash).", ["saga", "step", "phase"], registry=r)
        self.step_duration = prom.Histogram(
            "sagaway_step_duration_seconds", "Duration of step attempts (action or "
            "compensation), from started to its outcome.", ["saga", "step", "phase", "outcome"],
            buckets=STEP_BUCKETS, registry=r)
        self.run_duration = prom.Histogram(
            "sagaway_run_duration_seconds", "Duration of runs, from start to their end.",
            ["saga", "status"], buckets=RUN_BUCKETS, registry=r)
        self.leases_lost = prom.Counter(
            "sagaway_leases_lost", "Runs another worker took over from this one.", registry=r)
        self.dead_letters = prom.Counter(
            "sagaway_messages_dead_lettered", "Messages this process's consumers gave up on "
            "and published to a dead-letter destination.", ["source"], registry=r)
        self.rejection_counters = RejectionCounters()
        r.register(self.rejection_counters)
        # When each attempt in flight started, by run: (step, phase, attempt) -> time.
        self._open: dict[str, dict[tuple[str, str, int], float]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- wiring ---------------------------------------------------------------------------

    def watch(self, orchestrator: Orchestrator) -> PrometheusMetrics:
        """Read store gauges from the orchestrator's store, count its transport's dead
        letters, and start every counter of its sagas at zero."""
        if orchestrator.transport is not None:
            self.watch_transport(orchestrator.transport)
        rejections = getattr(orchestrator, "rejections", None)
        if isinstance(rejections, dict) and not any(
                rejections is r for r in self.rejection_counters.rejections):
            self.rejection_counters.rejections.append(rejections)
        self.watch_store(orchestrator.store, clock=orchestrator.clock.now,
                         sagas=[s.name for s in orchestrator.sagas])
        for saga in orchestrator.sagas:
            self.runs_started.labels(saga.name)
            for counter in self._finished.values():
                counter.labels(saga.name)
            for step in saga.steps:
                phases = ["action"] + (["compensation"] if step.compensation_fn else [])
                for phase in phases:
                    self.step_attempts.labels(saga.name, step.name, phase)
                    self.step_failures.labels(saga.name, step.name, phase)
        return self

    def watch_store(self, store: Store, *, clock: Callable[[], float] = time.time,
                    sagas: Iterable[str] = ()) -> StoreGauges:
        """Export the store gauges (once per metrics object)."""
        if self.store_gauges is None:
            self.store_gauges = StoreGauges(store, stuck_after=self.stuck_after,
                                            cache_seconds=self.cache_seconds,
                                            timeout=self.timeout, clock=clock, sagas=sagas)
            self.registry.register(self.store_gauges)
        else:
            self.store_gauges.sagas.update(sagas)
        return self.store_gauges

    def watch_transport(self, transport: Transport) -> None:
        """Count the messages this transport's consumers dead-letter (a participant's too)."""
        if self._on_dead_letter not in transport.dead_letter_observers:
            transport.dead_letter_observers.append(self._on_dead_letter)
        signer = transport.signer
        if signer is not None and not any(
                signer.counts is c for c in self.rejection_counters.signers):
            self.rejection_counters.signers.append(signer.counts)

    async def render(self) -> bytes:
        """The exposition text (refreshing the store gauges first, within the timeout)."""
        if self.store_gauges is not None:
            await self.store_gauges.refresh()
        prom = _prometheus()
        body: bytes = prom.generate_latest(self.registry)
        return body

    # -- the listener ---------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_transition(self, transition: Transition) -> None:
        saga = transition.saga
        for e in transition.entries:
            phase, _, what = e.kind.partition(".")
            if phase in ("step", "compensation") and e.step is not None:
                phase = "action" if phase == "step" else phase
                key = (e.step, phase, e.attempt or 0)
                if what == "started":
                    self._child(self.step_attempts, saga, e.step, phase).inc()
                    attempts = self._open.get(transition.run_id)
                    if attempts is None:
                        if len(self._open) >= _MAX_OPEN_RUNS:  # runs that ended elsewhere
                            self._open.pop(next(iter(self._open)))
                        attempts = self._open[transition.run_id] = {}
                    attempts[key] = e.at
                elif what in _ENDINGS:
                    if what != "succeeded":
                        self._child(self.step_failures, saga, e.step, phase).inc()
                    started = self._open.get(transition.run_id, {}).pop(key, None)
                    if started is not None:
                        self._child(self.step_duration, saga, e.step, phase,
                                    _ENDINGS[what]).observe(max(e.at - started, 0.0))
            elif e.kind == "run.started":
                self._child(self.runs_started, saga).inc()
            elif e.kind == "run.finished":
                status = str((e.data or {}).get("status", transition.status.value))
                name = _FINISHED.get(status)
                if name is not None:
                    self._child(self._finished[name], saga).inc()
                if transition.created_at is not None:
                    self._child(self.run_duration, saga, status).observe(
                        max(e.at - transition.created_at, 0.0))
                self._forget(transition.run_id)

    def on_lease_lost(self, run_id: str) -> None:
        self.leases_lost.inc()
        self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        self._open.pop(run_id, None)

    def _on_dead_letter(self, dead: DeadLetter) -> None:
        self._child(self.dead_letters, dead.source).inc()


async def serve_metrics(metrics: PrometheusMetrics, *, host: str = "0.0.0.0", port: int = 9464
                        ) -> asyncio.Server:
    """Serve ``GET /metrics`` on this event loop (where the store lives); returns the server.

    A deliberately small HTTP/1.0 responder: one request per connection, no body.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif path.split("?", 1)[0] != "/metrics":
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                body = await metrics.render()
                status, ctype = "200 OK", _prometheus().CONTENT_TYPE_LATEST
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                f"\r\nConnection: close\r\n\r\n".encode("latin-1")
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:
            log.exception("metrics: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    return server
