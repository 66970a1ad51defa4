"""Shared fixtures for the Orchestrator integration tests.

Every test that takes ``store_url`` runs twice: against the memory store and against a real
SQLite file in ``tmp_path``. Tests that need a second orchestrator on the *same* saga log use
``shared_store``, which hands out the same MemoryStore object (a ``memory://`` URL would
build a fresh, empty store) or the SQLite URL again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sagaway import MemoryStore, Store

BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> str:
    return "memory://" if backend == "memory" else f"sqlite:///{tmp_path}/sagas.db"


@pytest.fixture
def shared_store(backend: str, tmp_path: Path) -> Callable[[], str | Store]:
    """What to pass as ``store`` to every orchestrator that must share one saga log."""
    if backend == "memory":
        memory = MemoryStore()
        return lambda: memory
    url = f"sqlite:///{tmp_path}/sagas.db"
    return lambda: url

