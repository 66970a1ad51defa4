"""``sagaway demo ecommerce|travel|bank``: runs an example system from ``examples/``.

The examples are real services (FastAPI apps, their own databases, RabbitMQ for the bank)
that live at the root of a sagaway checkout, not in the installed package: this module
finds the checkout (the working directory, or the one an editable install points at),
puts it on ``sys.path`` and hands over to ``examples.demo``.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

import sagaway

__all__ = ["EXAMPLE_STEPS", "ExampleUnavailable", "find_checkout", "run_example"]

EXAMPLE_STEPS = {
    "ecommerce": ("reserve_inventory", "charge_payment", "arrange_shipping"),
    "travel": ("book_flight", "book_hotel", "rent_car"),
    "bank": ("debit", "credit"),
}
"""Each example's steps, for ``--fail-at`` (pinned against the examples by the tests)."""


class ExampleUnavailable(Exception):
    """The example cannot run here (the message says why and what to do)."""


def find_checkout(start: Path | None = None) -> Path:
    """The sagaway checkout whose ``examples/`` to run.

    Raises:
        ExampleUnavailable: neither the working directory (or a parent) nor the installed
            package's source tree holds the examples.
    """
    here = (start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(sagaway.__file__).resolve().parents[2]]
    for root in candidates:
        if all((root / "examples" / f).is_file() for f in ("demo.py", "launch.py")):
            return root
    raise ExampleUnavailable(
        "the example systems live in examples/ of a sagaway checkout, which was not found "
        "from here: git clone the repository, pip install -e '.[dev]', and run this from "
        "inside it"
    )


def run_example(console: Console, name: str, *, sagas: int, fail_at: str | None,
                amqp_url: str, workdir: Path | None = None) -> bool:
    """Run one example (see ``examples.demo.run_example``); True when it all held.

    Raises:
        ExampleUnavailable: no checkout, a missing extra, a broker down, a service that
            does not start.
    """
    root = find_checkout()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        demo: Any = importlib.import_module("examples.demo")
    except ImportError as exc:
        raise ExampleUnavailable(
            f"the examples need FastAPI, uvicorn and httpx ({exc}): pip install "
            f"'sagaway[admin]' (and 'sagaway[rabbitmq]' for the bank)"
        ) from None
    directory = workdir or Path(tempfile.mkdtemp(prefix=f"sagaway-{name}-"))
    try:
        ok: bool = demo.run_example(console, name, sagas=sagas, fail_at=fail_at,
                                    workdir=directory, amqp_url=amqp_url)
    except demo.ExampleError as exc:
        raise ExampleUnavailable(str(exc)) from None
    return ok
