"""Structured logs: every record names its run, and never carries a sensitive value.

The runtime sets :data:`sagaway.engine.listener.current_run` while it drives a run and
around each step attempt (sync steps on threads included). :class:`RunContextFilter`, put
on a handler, copies the run id, saga, step and attempt onto each record passing through
it and cuts the run's sensitive values (``Saga(sensitive=…)``) out of the message and the
traceback. :class:`JsonFormatter` writes one JSON object per line. ``configure_logging``
sets both up on the root logger; ``sagaway worker --log-format json`` calls it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

from sagaway.definition.sensitive import Redactor
from sagaway.engine.listener import current_run

__all__ = ["RUN_FIELDS", "JsonFormatter", "RunContextFilter", "configure_logging"]

RUN_FIELDS = ("run_id", "saga", "step", "attempt")
"""The attributes every record gets (None outside a run)."""

TEXT_FORMAT = ("%(asctime)s %(levelname)s %(name)s [%(process)d] run=%(run_id)s "
               "saga=%(saga)s step=%(step)s attempt=%(attempt)s %(message)s")

# LogRecord's own attributes: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", *RUN_FIELDS,
}


class RunContextFilter(logging.Filter):
    """Adds ``run_id``/``saga``/``step``/``attempt`` to records and redacts sensitive values.

    Put it on a handler (``handler.addFilter(RunContextFilter())``), not a logger: a
    logger's filters do not see records propagated from its children. Values passed with
    ``extra=`` win over the context's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_run.get()
        values: tuple[Any, ...] = (
            (ctx.run_id, ctx.saga, ctx.step, ctx.attempt) if ctx else (None,) * 4
        )
        for name, value in zip(RUN_FIELDS, values, strict=True):
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        if ctx is not None and ctx.secrets:
            message = record.getMessage()
            clean = Redactor.text(message, ctx.secrets)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = Redactor.text(record.exc_text, ctx.secrets)
            if record.stack_info:
                record.stack_info = Redactor.text(record.stack_info, ctx.secrets)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the run fields, ``extra=``
    fields, and the traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in RUN_FIELDS:
            doc[name] = getattr(record, name, None)
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                doc[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure_logging(level: int | str = "INFO", *, fmt: Literal["text", "json"] = "text",
                      stream: IO[str] | None = None) -> logging.Handler:
    """Log to ``stream`` (stderr) from the root logger, with run fields and redaction.

    Replaces the root logger's handlers; returns the handler it installed.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RunContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
