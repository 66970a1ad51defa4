"""How the CLI draws runs: status colours, timeline lines and tables, run details.

Pure formatting: every function takes public snapshots (``SagaRun``, ``HistoryEntry``) and
returns rich renderables; nothing here reads a store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.json import JSON
from rich.table import Table
from rich.text import Text

from sagaway import HistoryEntry, SagaRun, SagaStatus

__all__ = [
    "STATUS_STYLE",
    "clock_time",
    "compact_json",
    "duration_ms",
    "entry_line",
    "results_grid",
    "run_details",
    "runs_table",
    "service_line",
    "status_text",
    "timeline_table",
    "when",
]

STATUS_STYLE: Mapping[SagaStatus, str] = {
    SagaStatus.PENDING: "bright_black",
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "yellow",
    SagaStatus.COMPLETED: "bold green",
    SagaStatus.COMPENSATED: "bold yellow",
    SagaStatus.FAILED: "bold red",
    SagaStatus.RESOLVED: "bold blue",
}

# kind -> (marker, style, what the line says)
_KINDS: Mapping[str, tuple[str, str, str]] = {
    "run.started": ("▶", "bold cyan", "run started"),
    "run.recovered": ("↯", "bold magenta", "run recovered by a new worker"),
    "run.compensating": ("↩", "bold yellow", "compensating"),
    "run.finished": ("■", "bold", "run finished"),
    "step.started": ("→", "cyan", "started"),
    "step.succeeded": ("✔", "green", "succeeded"),
    "step.failed": ("✘", "red", "failed"),
    "step.retry_scheduled": ("⟳", "yellow", "retry scheduled"),
    "step.gave_up": ("✘", "bold red", "gave up"),
    "step.cancelled": ("·", "bright_black", "retry cancelled"),
    "step.interrupted": ("↯", "magenta", "interrupted: the worker died mid-attempt"),
    "compensation.started": ("↩", "yellow", "compensation started"),
    "compensation.succeeded": ("↩", "green", "compensated"),
    "compensation.failed": ("✘", "red", "compensation failed"),
    "compensation.retry_scheduled": ("⟳", "yellow", "compensation retry scheduled"),
    "compensation.gave_up": ("✘", "bold red", "compensation gave up"),
    "compensation.interrupted": ("↯", "magenta", "compensation interrupted"),
    "event.ignored": ("·", "bright_black", "ignored"),
    "run.stuck": ("⏸", "bold red", "stuck: no event within the flow's deadline"),
    "run.submitted": ("·", "bright_black", "run submitted (waiting for a worker)"),
    "operator.requested": ("✋", "bold blue", "operator request recorded"),
    "operator.retry": ("✋", "bold blue", "operator: retry"),
    "operator.resume": ("✋", "bold blue", "operator: resume"),
    "operator.compensate": ("✋", "bold blue", "operator: force-compensate"),
    "operator.resolve": ("✋", "bold blue", "operator: resolved"),
}

_STEP_WIDTH = 18


def status_text(status: SagaStatus) -> Text:
    return Text(status.value, style=STATUS_STYLE.get(status, ""))


def clock_time(at: float, *, date: bool = False) -> str:
    """Local time of a timestamp: ``14:03:07.120`` (or ``2024-05-01 14:03:07``)."""
    local = time.localtime(at)
    if date:
        return time.strftime("%Y-%m-%d %H:%M:%S", local)
    return f"{time.strftime('%H:%M:%S', local)}.{int((at % 1) * 1000):03d}"


def when(at: float, now: float | None = None) -> str:
    """A short local time for listings: ``14:03:07`` today, ``May 01 14:03`` this year."""
    local, today = time.localtime(at), time.localtime(time.time() if now is None else now)
    if local[:3] == today[:3]:
        return time.strftime("%H:%M:%S", local)
    if local.tm_year == today.tm_year:
        return time.strftime("%b %d %H:%M", local)
    return time.strftime("%Y-%m-%d", local)


def _status(entry: HistoryEntry) -> SagaStatus | None:
    """The status a ``run.finished`` entry records (None for another kind, or an unknown one)."""
    value = (entry.data or {}).get("status") if entry.kind == "run.finished" else None
    try:
        return None if value is None else SagaStatus(value)
    except ValueError:
        return None


def duration_ms(history: Sequence[HistoryEntry]) -> float:
    return (history[-1].at - history[0].at) * 1000 if history else 0.0


def _details(entry: HistoryEntry) -> str:
    data = dict(entry.data or {})
    parts: list[str] = []
    if _status(entry) is not None:
        data.pop("status", None)
    if entry.kind == "step.gave_up":
        data.pop("error", None)  # the failure just before it says why
    if entry.kind == "run.started":
        saga, version = data.pop("saga", None), data.pop("version", None)
        if saga is not None:
            parts.append(f"{saga} v{version}")
    delay = data.pop("delay", None)
    if isinstance(delay, int | float):
        parts.append(f"in {delay * 1000:.0f} ms")
    if data.pop("maybe_applied", None):
        parts.append("may have taken effect")
    data.pop("retryable", None)
    for name in ("error", "reason"):
        value = data.pop(name, None)
        if value is not None:
            parts.append(str(value))
    parts.extend(f"{k}={json.dumps(v, default=str)}" for k, v in data.items())
    return "; ".join(parts)


def _what(entry: HistoryEntry, compensations: Mapping[str, str]) -> tuple[str, str, str]:
    marker, style, what = _KINDS.get(entry.kind, ("·", "", entry.kind))
    status = _status(entry)
    if status is not None:
        return marker, STATUS_STYLE.get(status, style), f"run finished {status.value}"
    undo = compensations.get(entry.step or "")
    if entry.kind.startswith("compensation.") and undo:
        what = f"{what} ({undo})"
    if entry.attempt is not None and entry.kind != "event.ignored":
        label = "attempt" if not entry.kind.endswith("retry_scheduled") else "next attempt"
        what = f"{what}, {label} {entry.attempt}"
    return marker, style, what


def entry_line(entry: HistoryEntry, t0: float,
               compensations: Mapping[str, str] | None = None) -> Text:
    """One timeline entry as a single aligned line, for a live (streaming) timeline."""
    marker, style, what = _what(entry, compensations or {})
    line = Text()
    line.append(f"{(entry.at - t0) * 1000:>8.0f} ms  ", style="bright_black")
    line.append(f"{marker} ", style=style)
    line.append(f"{entry.step or '':<{_STEP_WIDTH}} ", style="bold")
    line.append(what, style=style)
    details = _details(entry)
    if details:
        line.append(f"  {details}", style="bright_black" if entry.kind != "step.failed" else "red")
    return line


def service_line(service: str, message: str) -> Text:
    """Something a (pretend) service did, indented under the timeline."""
    line = Text(" " * 13 + "│ ", style="bright_black")
    line.append(f"{service:<10}", style="blue")
    line.append(message, style="bright_black")
    return line


def timeline_table(history: Sequence[HistoryEntry],
                   compensations: Mapping[str, str] | None = None) -> Table:
    """A run's whole timeline as a table: time, +ms, kind, step, attempt, details."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True)
    table.add_column("time", style="bright_black", no_wrap=True)
    table.add_column("+ms", justify="right", style="bright_black", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("step", style="bold", no_wrap=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("details", overflow="fold", ratio=1)
    t0 = history[0].at if history else 0.0
    names = compensations or {}
    for entry in history:
        marker, style, _ = _what(entry, names)
        details = Text(_details(entry), style="bright_black")
        status = _status(entry)
        if status is not None:
            details = Text.assemble(status_text(status), " ", details)
        elif entry.kind.startswith("compensation.") and names.get(entry.step or ""):
            details = Text.assemble((names[entry.step or ""], "yellow"), " ", details)
        table.add_row(
            clock_time(entry.at),
            f"{(entry.at - t0) * 1000:.0f}",
            Text(f"{marker} {entry.kind}", style=style),
            entry.step or "",
            "" if entry.attempt is None else str(entry.attempt),
            details,
        )
    return table


def _snippet(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def runs_table(runs: Sequence[SagaRun], width: int = 120) -> Table:
    """The ``sagaway runs`` listing, newest first as given, fitted to ``width`` columns.

    Every column but the error is shown whole; the error gets what is left of the width
    (and is left out on a terminal too narrow for a useful snippet).
    """
    rows = [
        [
            Text(run.id, style="cyan"),
            Text(run.saga),
            Text(str(run.version)),
            status_text(run.status),
            Text(when(run.created_at), style="bright_black"),
            Text(when(run.updated_at), style="bright_black"),
        ]
        for run in runs
    ]
    headers = ["id", "saga", "v", "status", "created", "updated"]
    widths = [max([len(h), *(cell.cell_len for cell in cells)])
              for h, *cells in zip(headers, *rows, strict=True)]
    room = width - sum(widths) - len(widths)
    table = Table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False,
                  header_style="bold underline")
    for header, w in zip(headers, widths, strict=True):
        table.add_column(header, no_wrap=True, min_width=w,
                         justify="right" if header == "v" else "left")
    if room >= 12:
        table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=room)
    for run, cells in zip(runs, rows, strict=True):
        # An unfinished run's error is the orchestrator's note about who can drive it, not
        # a failure of the run, so only finished runs show one here.
        error = Text(_snippet(run.error, room) if run.finished else "", style="red")
        table.add_row(*cells, *([error] if room >= 12 else []))
    return table


def compact_json(data: Any) -> JSON:
    return JSON.from_data(data, indent=None, default=str)


def results_grid(results: Mapping[str, Any]) -> Table:
    """Each step's result on one line."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for step, result in results.items():
        grid.add_row(step, compact_json(result))
    return grid


def _lease_note(run: SagaRun) -> Text | None:
    if run.finished:
        return None
    if run.owner and run.lease_expires:
        left = run.lease_expires - time.time()
        if left > 0:
            return Text(f"held by worker {run.owner}; its lease runs out in {left:.1f} s",
                        style="cyan")
        return Text(f"the lease of worker {run.owner} expired {-left:.1f} s ago: the next "
                    f"worker that registers {run.saga} v{run.version} resumes it",
                    style="yellow")
    return Text(f"unowned: the next worker that registers {run.saga} v{run.version} "
                f"claims it", style="yellow")


def run_details(run: SagaRun, compensations: Mapping[str, str] | None = None
                ) -> RenderableType:
    """Everything ``sagaway show`` prints about one run."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("run", Text(run.id, style="cyan"))
    head.add_row("saga", f"{run.saga} v{run.version}")
    head.add_row("status", status_text(run.status))
    head.add_row("created", clock_time(run.created_at, date=True))
    head.add_row("updated", clock_time(run.updated_at, date=True))
    if run.history and run.finished:
        head.add_row("duration", f"{duration_ms(run.history):.0f} ms")
    if run.idempotency_key:
        head.add_row("start key", run.idempotency_key)
    note = _lease_note(run)
    if note is not None:
        head.add_row("worker", note)
    elif run.error:
        head.add_row("error", Text(run.error, style="red"))
    head.add_row("input", compact_json(run.input))
    head.add_row("results", results_grid(run.results) if run.results
                 else Text("none", style="bright_black"))
    timeline = (timeline_table(run.history, compensations) if run.history
                else Text("(no history)", style="bright_black"))
    return Group(head, Text(), Text("timeline", style="bold"), timeline)
