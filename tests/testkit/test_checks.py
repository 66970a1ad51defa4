"""Definition checks and ``sagaway check``: each finding, never a raise, exit status for CI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from testkit_sagas import Shop, correct_saga

from sagaway import RetryPolicy, Saga, StepContext
from sagaway.testing import Severity, check


def findings(saga: Saga) -> list[tuple[str, str | None, str]]:
    return [(f.severity.value, f.step, f.message) for f in check(saga)]


def test_a_correct_saga_has_no_errors_or_warnings() -> None:
    found = check(correct_saga(Shop()))
    assert [f for f in found if f.severity is not Severity.INFO] == []


def test_a_step_before_the_pivot_without_compensation_is_an_error_not_a_raise() -> None:
    s = Saga("s")

    @s.step
    def reserve(ctx: StepContext, data: Any) -> None: ...

    @s.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> None: ...

    (f,) = [f for f in check(s) if f.severity is Severity.ERROR]
    assert f.step == "reserve" and "no compensation" in f.message
    assert "@reserve.compensation" in f.fix


def test_retry_budgets_and_compensation_policies() -> None:
    s = Saga("s")

    @s.step(retry=RetryPolicy(max_attempts=None))
    def hold(ctx: StepContext, data: Any) -> None: ...

    @hold.compensation(retry=RetryPolicy(max_attempts=1))
    def unhold(ctx: StepContext, data: Any, result: Any) -> None: ...

    @s.step
    def book(ctx: StepContext, data: Any) -> None: ...

    @book.compensation(retry=RetryPolicy(max_attempts=3, non_retryable=(KeyError,)))
    def unbook(ctx: StepContext, data: Any, result: Any) -> None: ...

    @s.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> None: ...

    @s.step(retry=RetryPolicy(max_attempts=4))
    def notify(ctx: StepContext, data: Any) -> None: ...

    got = findings(s)
    assert ("error", "hold", "its compensation has no retry (1 attempt): one transient error "
            "ends the run FAILED with the effect in place") in got
    assert any(sev == "warning" and step == "hold" and "retried without limit" in msg
               for sev, step, msg in got)
    assert any(sev == "warning" and step == "book" and "gives up after 3 attempts" in msg
               for sev, step, msg in got)
    assert any(sev == "warning" and step == "book" and "at once on KeyError" in msg
               for sev, step, msg in got)
    assert any(sev == "warning" and step == "notify" and "finite retry budget (4" in msg
               for sev, step, msg in got)
    # Errors come first.
    assert [f[0] for f in got] == sorted((f[0] for f in got),
                                         key=["error", "warning", "info"].index)


def test_remote_steps_without_timeouts_and_unreachable_compensations() -> None:
    s = Saga("s")
    step = s.command_step("reserve", service="inventory", compensation="release", timeout=5)
    step.timeout = None  # what an HTTP step declared without a timeout looks like
    step.compensation_timeout = None

    @s.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> None: ...

    @s.step
    def ship(ctx: StepContext, data: Any) -> None: ...

    @ship.compensation
    def unship(ctx: StepContext, data: Any, result: Any) -> None: ...

    got = findings(s)
    assert any(sev == "error" and step == "reserve" and "remote step (command) without a "
               "timeout" in msg for sev, step, msg in got)
    assert any(sev == "error" and step == "reserve" and "remote compensation without a "
               "timeout" in msg for sev, step, msg in got)
    assert any(sev == "error" and step == "ship" and "unreachable" in msg
               for sev, step, msg in got)


def test_wrong_signatures_and_an_empty_saga() -> None:
    s = Saga("s")

    @s.step(read_only=True)
    def look(data: Any) -> None: ...

    got = findings(s)
    assert ("error", "look", "its action does not take (ctx, data)") in got
    assert findings(Saga("empty")) == [("error", None, "the saga has no steps")]


SAGAS = """
from sagaway import Orchestrator, RetryPolicy, Saga

good = Saga("good")

@good.step(read_only=True)
def look(ctx, data):
    return 1

bad = Saga("bad")

@bad.step
def reserve(ctx, data):
    pass

@bad.step(pivot=True)
def pay(ctx, data):
    pass

orch = Orchestrator("memory://", sagas=[good])
both = [good, bad]
"""


def sagaway_check(tmp_path: Path, spec: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "user_sagas.py").write_text(textwrap.dedent(SAGAS))
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sagaway.cli", "check", spec], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_exits_1_on_errors_with_the_table(tmp_path: Path) -> None:
    done = sagaway_check(tmp_path, "user_sagas:bad")
    assert done.returncode == 1, done.stderr
    assert "saga bad v1" in done.stdout
    assert "reserve" in done.stdout and "no compensation" in done.stdout
    assert "@reserve.compensation" in done.stdout
    assert "1 error(s)" in done.stderr


def test_cli_exits_0_on_a_clean_saga_an_orchestrator_or_a_list(tmp_path: Path) -> None:
    done = sagaway_check(tmp_path, "user_sagas:good")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "saga good v1: no findings" in done.stdout
    assert sagaway_check(tmp_path, "user_sagas:orch").returncode == 0
    both = sagaway_check(tmp_path, "user_sagas:both")
    assert both.returncode == 1 and "good v1: no findings" in both.stdout


def test_cli_bad_spec_is_a_usage_error(tmp_path: Path) -> None:
    for spec, says in [("user_sagas", "expected 'package.module:saga'"),
                       ("user_sagas:nope", "has no attribute 'nope'"),
                       ("no_such_module:x", "No module named 'no_such_module'"),
                       ("user_sagas:SAGAS_NOT_THERE", "has no attribute")]:
        done = sagaway_check(tmp_path, spec)
        assert done.returncode == 2, (spec, done.stdout, done.stderr)
        assert says in done.stderr, done.stderr
