"""The pytest plugin: a user's test of a few lines works, and a bug fails it with the report."""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_SAGA = '''
from sagaway import Saga

db = {"stock": 10, "refunds": 0, "charges": {}}

order = Saga("order")

@order.step
def charge(ctx, data):
    db["charges"].setdefault(ctx.idempotency_key, data["amount"])
    return {"amount": data["amount"]}

@charge.compensation
def refund(ctx, data, result):
    REFUND

@order.step(pivot=True)
def ship(ctx, data):
    return "shipped"
'''

CORRECT_REFUND = 'db["charges"].pop(f"{ctx.run_id}:charge:action", None)'
BUGGY_REFUND = 'db["refunds"] += 1'

USER_TEST = '''
from sagaway import SagaStatus
from shop import db, order

def reset():
    db.update(stock=10, refunds=0, charges={})

def test_order_pays_after_two_failures(saga_harness):
    harness = saga_harness(order)
    harness.fake("charge").fails(times=2)
    assert harness.run({"amount": 5}).status is SagaStatus.COMPLETED

def test_order_is_crash_safe(crash_explorer):
    def check(outcome):
        if outcome.status is SagaStatus.COMPENSATED:
            assert not db["charges"], f"charges left: {db['charges']}"
    crash_explorer(order, {"amount": 5}, reset=reset, check=check)

def test_participants_are_idempotent(double_invoker):
    double_invoker(order, {"amount": 5}, state=lambda: (dict(db["charges"]), db["refunds"]),
                   reset=reset)
'''


def installed() -> bool:
    return any(ep.value == "sagaway.testing.pytest_plugin"
               for ep in entry_points(group="pytest11"))


@pytest.fixture
def plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the plugin load the way an installed sagaway makes it load: through the
    ``pytest11`` entry point (a distribution's metadata on the path, when this checkout is
    not installed with its current pyproject)."""
    if installed():
        return
    site = pytester.path / "site"
    dist = site / "sagaway_entry_point-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sagaway-entry-point\n"
                                   "Version: 0\n")
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    lines = [f"{k} = {v}" for k, v in project["project"]["entry-points"]["pytest11"].items()]
    (dist / "entry_points.txt").write_text("[pytest11]\n" + "\n".join(lines) + "\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))


def write(pytester: pytest.Pytester, refund: str) -> None:
    pytester.makepyfile(shop=USER_SAGA.replace("REFUND", refund), test_user=USER_TEST)


@pytest.mark.usefixtures("plugin")
def test_a_users_tests_pass_with_the_fixtures(pytester: pytest.Pytester) -> None:
    write(pytester, CORRECT_REFUND)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*crash explorer: saga 'order': * crash points x 7 failure "
                                 "points explored in * runs, 0 violations*"])


@pytest.mark.usefixtures("plugin")
def test_a_bug_fails_the_users_test_with_the_report(pytester: pytest.Pytester) -> None:
    write(pytester, BUGGY_REFUND)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*SafetyError*",
        "*VIOLATION 1: Schedule(failure='charge'*",
        "*compensation of 'charge' is not idempotent*",
    ])


def test_without_the_plugin_the_fixtures_are_missing(pytester: pytest.Pytester) -> None:
    # The control: the passing tests above got their fixtures from the entry point, so
    # with the plugin disabled by its entry point's name the same file cannot run.
    write(pytester, CORRECT_REFUND)
    args = ["-p", "no:cacheprovider"] + (["-p", "no:sagaway"] if installed() else [])
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*fixture 'saga_harness' not found*"])


def test_the_plugin_is_a_pytest11_entry_point() -> None:
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {
        "sagaway": "sagaway.testing.pytest_plugin"}
    assert "hypothesis>=6.100" in project["project"]["optional-dependencies"]["testing"]
