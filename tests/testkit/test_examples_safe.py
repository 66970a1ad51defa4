"""The crash explorer on every example saga (examples/<name>/saga.py), every step faked.

Prints the figure for each: crash points x failure points explored, violations 0.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from sagaway import Saga
from sagaway.testing import assert_safe, check, explore_crashes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/saga.py"))


def example_sagas(name: str) -> list[Saga]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"examples.{name}.saga")
    found = {id(v): v for v in vars(module).values() if isinstance(v, Saga)}
    return list(found.values())


def test_there_are_examples_to_explore() -> None:
    if not EXAMPLES:
        if os.environ.get("CI") == "true":
            pytest.fail("no examples/<name>/saga.py found: the examples are part of CI")
        pytest.skip("no examples/<name>/saga.py in this checkout yet")
    assert set(EXAMPLES) >= {"ecommerce", "bank_transfer", "travel_booking"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_saga_is_crash_safe(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    sagas = example_sagas(name)
    assert sagas, f"examples/{name}/saga.py defines no Saga"
    for saga in sagas:
        report = explore_crashes(saga, {"example": name}, fakes="all")
        with capsys.disabled():
            print(f"\nexamples/{name}: {report.summary()}")
        assert_safe(report)
        assert report.failure_points == 3 * len(saga.steps) + 1
        assert report.crash_points >= 3 * len(saga.steps)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_saga_has_no_definition_errors(name: str) -> None:
    for saga in example_sagas(name):
        errors = [f for f in check(saga) if f.severity.value == "error"]
        assert errors == [], errors
