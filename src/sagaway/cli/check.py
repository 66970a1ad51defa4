"""``sagaway check module:saga``: print a definition's findings; exit 1 on errors (for CI)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from sagaway import Orchestrator, Saga
from sagaway.definition.checks import Finding, Severity, check

__all__ = ["load_sagas", "report"]

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def load_sagas(spec: str) -> list[Saga]:
    """Import ``module:attribute``: a Saga, an Orchestrator (its sagas) or a list of Sagas.

    Raises:
        ValueError: the spec is malformed or names something else.
        ImportError: the module cannot be imported.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:saga', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    target = getattr(module, attr, None)
    if target is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if isinstance(target, Saga):
        return [target]
    if isinstance(target, Orchestrator):
        return target.sagas
    if isinstance(target, list | tuple) and target and all(isinstance(t, Saga) for t in target):
        return list(target)
    raise ValueError(f"{spec!r} is a {type(target).__name__}, not a Saga, a list of Sagas "
                     f"or an Orchestrator")


def report(sagas: Iterable[Saga], console: Console) -> int:
    """Print each saga's findings; return how many are errors."""
    errors = 0
    for saga in sagas:
        findings: list[Finding] = check(saga)
        errors += sum(f.severity is Severity.ERROR for f in findings)
        if not findings:
            console.print(f"[green]✓[/green] saga [bold]{saga.name}[/bold] "
                          f"v{saga.version}: no findings")
            continue
        table = Table(title=f"saga {saga.name} v{saga.version}", title_justify="left",
                      show_lines=True)
        table.add_column("severity")
        table.add_column("step")
        table.add_column("finding", overflow="fold")
        table.add_column("fix", overflow="fold")
        for f in findings:
            table.add_row(f"[{_STYLE[f.severity]}]{f.severity.value}[/]", f.step or "—",
                          f.message, f.fix)
        console.print(table)
    return errors
