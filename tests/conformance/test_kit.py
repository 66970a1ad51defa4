"""The conformance kit itself: it imports cleanly, nothing depends on it, and it can fail."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import pytest

import sagaway
import sagaway.testing
from sagaway import MemoryStore, Store
from sagaway.run import SagaStatus
from sagaway.store.base import BatchResult, NewRun, RunRecord, RunUpdate
from sagaway.testing import FakeClock
from sagaway.testing.conformance import T0, StoreConformance

SRC = Path(sagaway.__file__).parent


def test_fake_clock() -> None:
    clock = FakeClock(100.0)
    assert clock() == 100.0
    assert clock.advance(2.5) == 102.5
    assert clock() == 102.5
    assert clock.advance(0) == 102.5
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    assert clock() == 102.5
    assert FakeClock()() == T0


def test_the_package_exports_the_suite_lazily() -> None:
    assert sagaway.testing.StoreConformance is StoreConformance
    assert sorted(sagaway.testing.__all__) == [
        "Call", "Failure", "Fake", "FakeClock", "Finding", "HarnessError", "InjectedFailure",
        "Outcome",
        "SafetyError", "SafetyReport", "SagaHarness", "Schedule", "Severity",
        "StoreConformance", "Violation", "VirtualClock", "VirtualTimeLoop", "assert_safe",
        "check", "double_invoke", "explore_crashes", "run_virtual",
    ]
    with pytest.raises(AttributeError):
        _ = sagaway.testing.NoSuchThing  # type: ignore[attr-defined]
    code = (
        "import sys, sagaway, sagaway.testing\n"
        "assert 'pytest' not in sys.modules, 'sagaway.testing imported pytest'\n"
        "sagaway.testing.FakeClock().advance(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_sagaway_does_not_import_the_kit() -> None:
    code = (
        "import sys, sagaway, sagaway.store, sagaway.store.sqlite\n"
        "assert not [m for m in sys.modules if m.startswith('sagaway.testing')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nothing_in_sagaway_imports_the_kit() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        if (SRC / "testing") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(SRC)}: {n}"
                for n in names
                if n == "sagaway.testing" or n.startswith("sagaway.testing.")
            ]
    assert offenders == []


def test_the_base_class_is_not_collected_on_its_own() -> None:
    assert not StoreConformance.__name__.startswith("Test")


# -- the suite catches broken backends ------------------------------------------------------
# A test that cannot fail is worse than none: each mutant breaks one promise of the port and
# must make the named test fail.


class Unfenced(MemoryStore):
    """Ignores the expected row version."""

    async def commit(
        self,
        creates: Sequence[NewRun],
        updates: Sequence[RunUpdate],
        *,
        owner: str,
        lease_seconds: float,
    ) -> BatchResult:
        fixed = []
        for u in updates:
            current = await self.get_run(u.run_id, history=False)
            version = current.row_version if current else u.expected_version
            fixed.append(dataclasses.replace(u, expected_version=version))
        return await super().commit(creates, fixed, owner=owner, lease_seconds=lease_seconds)


class Greedy(MemoryStore):
    """Claims runs whose leases are still live."""

    async def claim_due(
        self,
        *,
        owner: str,
        lease_seconds: float,
        limit: int,
        definitions: Collection[tuple[str, int]],
    ) -> list[RunRecord]:
        for run in await self.list_runs(limit=10_000):
            if run.owner is not None:
                await self.release_leases(owner=run.owner)
        return await super().claim_due(
            owner=owner, lease_seconds=lease_seconds, limit=limit, definitions=definitions
        )


class Lossy(MemoryStore):
    """Reads integers back as floats, as a careless REAL/float column would."""

    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        record = await super().get_run(run_id, history=history)
        if record is None:
            return None
        return dataclasses.replace(
            record, state=json.loads(json.dumps(record.state), parse_int=float)
        )


class Forgetful(MemoryStore):
    """Reports leases on finished runs as held."""

    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        held = await super().renew_leases(owner=owner, lease_seconds=lease_seconds)
        finished = {
            r.id
            for r in await self.list_runs(
                status={SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.COMPENSATED},
                limit=10_000,
            )
        }
        return held | finished


MUTANTS: list[tuple[Callable[[FakeClock], Store], str]] = [
    (lambda c: Unfenced(clock=c), "test_update_with_a_stale_version_is_fenced"),
    (lambda c: Greedy(clock=c), "test_claim_due_leaves_live_leases_alone"),
    (lambda c: Lossy(clock=c), "test_state_and_input_round_trip_exactly"),
    (lambda c: Forgetful(clock=c), "test_renew_leases_extends_the_owners_active_leases"),
]


@pytest.mark.parametrize(("build", "test_name"), MUTANTS, ids=[m[1] for m in MUTANTS])
async def test_the_suite_fails_a_broken_store(
    build: Callable[[FakeClock], Store], test_name: str
) -> None:
    clock = FakeClock(T0)
    test: Callable[..., Any] = getattr(StoreConformance(), test_name)
    params = test.__code__.co_varnames[1 : test.__code__.co_argcount]
    kwargs = {"store": build(clock), "clock": clock}
    with pytest.raises(AssertionError):
        await test(**{p: kwargs[p] for p in params})
    # and the same test passes on the real MemoryStore, so it is the mutation that failed it
    clock = FakeClock(T0)
    kwargs = {"store": MemoryStore(clock=clock), "clock": clock}
    await test(**{p: kwargs[p] for p in params})
