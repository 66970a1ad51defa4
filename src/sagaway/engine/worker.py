"""Running an orchestrator as a long-lived worker process (``sagaway worker``).

The worker opens the orchestrator (which starts recovering runs at once), serves until
SIGTERM or SIGINT, then closes it: in-flight attempts are cut and every lease is released,
so another worker resumes those runs at once instead of after the lease expires.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys

from sagaway.engine.runtime import Orchestrator
from sagaway.errors import SagawayError

__all__ = ["load_app", "serve"]

log = logging.getLogger("sagaway.worker")


def load_app(spec: str) -> Orchestrator:
    """Import ``module:attribute`` (or ``module:factory()``) and return the Orchestrator."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app must look like 'package.module:orchestrator', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    target = getattr(module, attr.removesuffix("()"), None)
    if target is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr.removesuffix('()')!r}")
    if call:
        target = target()
    if not isinstance(target, Orchestrator):
        raise ValueError(f"{spec!r} is a {type(target).__name__}, not a sagaway Orchestrator")
    return target


async def serve(orch: Orchestrator, *, stop: asyncio.Event | None = None,
                metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> None:
    """Drive runs until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    With ``metrics_port``, also serve Prometheus metrics at ``/metrics`` (the orchestrator's
    own ``PrometheusMetrics`` listener if it has one, else one added here).
    """
    stop = stop or asyncio.Event()
    metrics = None
    if metrics_port is not None:
        from sagaway.observability.metrics import PrometheusMetrics

        metrics = next((m for m in orch.listeners if isinstance(m, PrometheusMetrics)), None)
        if metrics is None:
            metrics = PrometheusMetrics()
            orch.listeners.append(metrics)
        metrics.watch(orch)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with orch:
            server = None
            if metrics is not None and metrics_port is not None:
                from sagaway.observability.metrics import serve_metrics

                try:
                    server = await serve_metrics(metrics, host=metrics_host, port=metrics_port)
                except OSError as exc:
                    raise SagawayError(f"cannot serve metrics on {metrics_host}:"
                                       f"{metrics_port}: {exc.strerror or exc}") from None
                bound = server.sockets[0].getsockname()
                log.info("metrics at http://%s:%d/metrics", bound[0], bound[1])
            log.info("worker %s started on %s (%d saga definitions)", orch.worker_id,
                     orch.store.url.split("@")[-1], len(orch.sagas))
            try:
                await stop.wait()
            finally:
                if server is not None:
                    server.close()
            log.info("worker %s stopping: releasing leases", orch.worker_id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
