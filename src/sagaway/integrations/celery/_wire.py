"""What the orchestrator's side and the worker's side of the Celery integration agree on:
how a command payload is marked as a Celery call, the keyword argument that carries a task's
saga metadata, and how an error reads in a reply."""

from __future__ import annotations

META_KWARG = "_sagaway"
"""The keyword argument that carries a task's saga metadata (removed before the call)."""
_MARKER = "sagaway.celery"
"""Key of a command payload that is a Celery task call (set by
:func:`~sagaway.integrations.celery.celery_step`)."""
_MAX_ERROR_CHARS = 2000


def _describe(exc: BaseException) -> str:
    text = str(exc)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"
