"""sagaway's public test kit: what sagaway's own suite uses, shipped for yours.

* :class:`FakeClock` — a clock that moves only when a test says so. Stores take a
  ``clock=`` callable; give them one of these to expire leases without sleeping.
* :class:`StoreConformance` (in ``sagaway.testing.conformance``) — the store conformance
  suite. Every backend, the in-memory one included, passes it; a third-party backend
  subclasses it in one of its own test modules and provides a ``store`` fixture.

For saga authors (see ``docs/testing.md``):

* :class:`SagaHarness` — run a saga on the memory store in virtual time, with
  :class:`Fake` participants (``harness.fake("charge").fails(times=2)``) and crashes.
* :func:`explore_crashes` — crash the saga at every durable transition and after every
  effect, for each failure point, and check the invariants; :func:`assert_safe` fails a
  test with the report.
* :func:`double_invoke` — invoke every action and compensation twice: names the steps
  whose participants are not idempotent.
* :func:`check` — the definition checks behind ``sagaway check module:saga``.
* ``sagaway.testing.simulation`` — seeded chaos (drop, duplicate, delay, reorder) for
  message-driven sagas, with a Hypothesis strategy.
* ``sagaway.testing.pytest_plugin`` — fixtures ``saga_harness``, ``crash_explorer``,
  ``double_invoker`` (a pytest11 entry point).

``import sagaway.testing`` needs nothing beyond sagaway itself. The conformance suite is a
set of pytest tests, so ``StoreConformance`` (imported lazily, on first use) needs pytest
and pytest-asyncio. Nothing in sagaway imports this package: it is for tests only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagaway.definition.checks import Finding, Severity, check
from sagaway.testing.explorer import (
    SafetyError,
    SafetyReport,
    Violation,
    assert_safe,
    double_invoke,
    explore_crashes,
)
from sagaway.testing.faults import Call, Failure, Fake, InjectedFailure
from sagaway.testing.harness import HarnessError, Outcome, SagaHarness, Schedule
from sagaway.testing.virtual import VirtualClock, VirtualTimeLoop, run_virtual

if TYPE_CHECKING:
    from sagaway.testing.conformance import StoreConformance

__all__ = [
    "Call",
    "Failure",
    "Fake",
    "FakeClock",
    "Finding",
    "HarnessError",
    "InjectedFailure",
    "Outcome",
    "SafetyError",
    "SafetyReport",
    "SagaHarness",
    "Schedule",
    "Severity",
    "StoreConformance",
    "Violation",
    "VirtualClock",
    "VirtualTimeLoop",
    "assert_safe",
    "check",
    "double_invoke",
    "explore_crashes",
    "run_virtual",
]


class FakeClock:
    """A settable clock: calling it returns :attr:`time`, which moves only by :meth:`advance`.

    It fits every ``clock: Callable[[], float]`` argument (``MemoryStore(clock=...)``,
    ``SQLiteStore(path, clock=...)``).

    Args:
        start: the initial time, in seconds since the epoch.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.time = start

    def __call__(self) -> float:
        return self.time

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got advance({seconds!r})")
        self.time += seconds
        return self.time

    def __repr__(self) -> str:
        return f"FakeClock(time={self.time!r})"


def __getattr__(name: str) -> object:
    # Lazy, so importing the package (for FakeClock) does not require pytest.
    if name == "StoreConformance":
        from sagaway.testing.conformance import StoreConformance

        return StoreConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
