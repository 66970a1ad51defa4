"""sagaway's pytest plugin (registered as the ``pytest11`` entry point ``sagaway``).

Fixtures:

* ``saga_harness`` — a factory: ``saga_harness(order)`` returns a
  :class:`~sagaway.testing.SagaHarness` (virtual time, fakes, crashes).
* ``crash_explorer`` — ``crash_explorer(order, {"id": 1}, ...)`` runs
  :func:`~sagaway.testing.explore_crashes`, prints its summary line, and fails the test with
  the whole report (replayable schedules included) if any run broke an invariant.
* ``double_invoker`` — the same for :func:`~sagaway.testing.double_invoke`.

Without the entry point (a source checkout), enable it with
``pytest_plugins = ["sagaway.testing.pytest_plugin"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sagaway.definition.saga import Saga
from sagaway.testing.explorer import SafetyReport, assert_safe, double_invoke, explore_crashes
from sagaway.testing.harness import SagaHarness


@pytest.fixture
def saga_harness() -> Callable[..., SagaHarness]:
    """A factory of harnesses: ``saga_harness(saga, lease_seconds=10, ...)``."""

    def make(saga: Saga, **options: Any) -> SagaHarness:
        return SagaHarness(saga, **options)

    return make


@pytest.fixture
def crash_explorer() -> Callable[..., SafetyReport]:
    """``crash_explorer(saga_or_harness, input, failures=..., check=..., reset=...)``: explore,
    print the figure, fail the test with the report on any violation."""

    def explore(saga: Saga | SagaHarness, input: Any = None, **options: Any) -> SafetyReport:
        report = explore_crashes(saga, input, **options)
        print(report.summary())
        assert_safe(report)
        return report

    return explore


@pytest.fixture
def double_invoker() -> Callable[..., SafetyReport]:
    """``double_invoker(saga, input, state=lambda: dict(db), reset=...)``: fail the test
    naming every step whose participant is not idempotent."""

    def run(saga: Saga | SagaHarness, input: Any = None, **options: Any) -> SafetyReport:
        report = double_invoke(saga, input, **options)
        print(report.summary())
        assert_safe(report)
        return report

    return run
