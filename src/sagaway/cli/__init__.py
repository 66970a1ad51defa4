"""The ``sagaway`` command line: ``demo``, ``runs``, ``show``.

Thin: it parses arguments and calls the public API (``Orchestrator``, ``SagaRun``).
"""

from sagaway.cli.app import app, main

__all__ = ["app", "main"]
