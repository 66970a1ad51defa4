"""The ``sagaway`` command line: ``demo``, ``runs``, ``show``, ``worker``, ``migrate``,
``admin`` and the operator commands ``retry``, ``compensate``, ``resume``, ``resolve``.

Thin: it parses arguments and calls the public API (``Orchestrator``, ``SagaRun``).
"""

from sagaway.cli import admin as _admin  # noqa: F401 - registers its commands on app
from sagaway.cli.app import app, main

__all__ = ["app", "main"]
