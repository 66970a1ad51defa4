"""Metrics, traces and logs for sagaway, attached to the runtime as listeners.

* :class:`PrometheusMetrics` and :func:`serve_metrics` (``pip install 'sagaway[prometheus]'``)
* :class:`TracingListener` and :func:`participant_tracing` (``pip install 'sagaway[otel]'``)
* :func:`configure_logging`, :class:`JsonFormatter`, :class:`RunContextFilter` (stdlib)

The Prometheus and OpenTelemetry libraries are imported only when their classes are used,
with an install hint if they are missing. The engine never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagaway.observability.logs import JsonFormatter, RunContextFilter, configure_logging

if TYPE_CHECKING:
    from sagaway.observability.metrics import PrometheusMetrics, StoreGauges, serve_metrics
    from sagaway.observability.tracing import TracingListener, participant_tracing

__all__ = [
    "JsonFormatter",
    "PrometheusMetrics",
    "RunContextFilter",
    "StoreGauges",
    "TracingListener",
    "configure_logging",
    "participant_tracing",
    "serve_metrics",
]

_LAZY = {
    "PrometheusMetrics": "sagaway.observability.metrics",
    "StoreGauges": "sagaway.observability.metrics",
    "serve_metrics": "sagaway.observability.metrics",
    "TracingListener": "sagaway.observability.tracing",
    "participant_tracing": "sagaway.observability.tracing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sagaway.observability' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
