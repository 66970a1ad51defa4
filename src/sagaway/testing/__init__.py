"""sagaway's public test kit: what sagaway's own suite uses, shipped for yours.

* :class:`FakeClock` — a clock that moves only when a test says so. Stores take a
  ``clock=`` callable; give them one of these to expire leases without sleeping.
* :class:`StoreConformance` (in ``sagaway.testing.conformance``) — the store conformance
  suite. Every backend, the in-memory one included, passes it; a third-party backend
  subclasses it in one of its own test modules and provides a ``store`` fixture.

``import sagaway.testing`` needs nothing beyond sagaway itself. The conformance suite is a
set of pytest tests, so ``StoreConformance`` (imported lazily, on first use) needs pytest
and pytest-asyncio. Nothing in sagaway imports this package: it is for tests only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagaway.testing.conformance import StoreConformance

__all__ = ["FakeClock", "StoreConformance"]


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
