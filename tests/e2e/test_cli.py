"""The ``sagaway`` command, run as a real process: demo, fail, crash + resume, runs, show.

Each test works in its own directory, where the demo's default store
(``sqlite:///sagaway-demo.db``) lands. Argument errors are checked in-process with typer's
CliRunner, which is fast and needs no store.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagaway.cli import app

TIMEOUT = 60.0
RUN_ID = re.compile(r"^run\s+([0-9a-f]{8}-[0-9a-f-]{27})\b", re.MULTILINE)
RESUME = re.compile(r"sagaway demo --resume \S+ --store \S+")


def sagaway(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("SAGAWAY_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "sagaway.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )


def run_id_of(output: str) -> str:
    found = RUN_ID.search(output)
    assert found, output
    return found.group(1)


def ledger(cwd: Path, run_id: str) -> dict[str, int]:
    """The demo services' ledger for one run: idempotency key -> invocations that carried it."""
    with closing(sqlite3.connect(cwd / "sagaway-demo.db")) as conn:
        rows = conn.execute("SELECT key, calls FROM demo_ledger WHERE key LIKE ?",
                            (f"{run_id}:%",)).fetchall()
    return dict(rows)


def timeline_rows(show_output: str, step: str) -> list[str]:
    return [line for line in show_output.splitlines() if f" {step} " in f" {line} "]


@pytest.mark.e2e
def test_demo_completes_and_runs_and_show_read_it(tmp_path: Path) -> None:
    demo = sagaway(tmp_path, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    run_id = run_id_of(demo.stdout)
    assert "run finished COMPLETED" in demo.stdout
    assert (tmp_path / "sagaway-demo.db").exists()
    assert ledger(tmp_path, run_id) == {f"{run_id}:{step}:action": 1 for step in
                                        ("reserve_inventory", "charge_payment",
                                         "arrange_shipping")}

    runs = sagaway(tmp_path, "runs")
    assert runs.returncode == 0, runs.stderr
    row = next(line for line in runs.stdout.splitlines() if run_id in line)
    assert "order" in row and "COMPLETED" in row

    only_failed = sagaway(tmp_path, "runs", "--status", "failed")
    assert only_failed.returncode == 0 and run_id not in only_failed.stdout

    show = sagaway(tmp_path, "show", run_id)
    assert show.returncode == 0, show.stderr
    assert run_id in show.stdout and "COMPLETED" in show.stdout
    for kind in ("run.started", "step.started", "step.succeeded", "run.finished"):
        assert kind in show.stdout
    assert len(timeline_rows(show.stdout, "arrange_shipping")) >= 2  # started, succeeded
    assert '"order_id"' in show.stdout  # the input
    assert "ch_" in show.stdout and "TRK_" in show.stdout  # the results


@pytest.mark.e2e
def test_demo_fail_at_the_pivot_compensates(tmp_path: Path) -> None:
    demo = sagaway(tmp_path, "demo", "--fail-at", "charge_payment")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    run_id = run_id_of(demo.stdout)
    assert "card declined" in demo.stdout
    assert "compensation started (release_inventory)" in demo.stdout
    assert "run finished COMPENSATED" in demo.stdout
    assert ledger(tmp_path, run_id) == {f"{run_id}:reserve_inventory:action": 1,
                                        f"{run_id}:reserve_inventory:compensation": 1}

    show = sagaway(tmp_path, "show", run_id)
    assert show.returncode == 0, show.stderr
    assert "COMPENSATED" in show.stdout
    undo = [r for r in timeline_rows(show.stdout, "reserve_inventory") if "compensation." in r]
    assert any("compensation.started" in r for r in undo), show.stdout
    assert any("compensation.succeeded" in r for r in undo), show.stdout
    assert "NonRetryableError: card declined" in show.stdout


@pytest.mark.e2e
def test_demo_fail_after_the_pivot_retries_and_completes(tmp_path: Path) -> None:
    demo = sagaway(tmp_path, "demo", "--fail-at", "arrange_shipping")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "never compensated" in demo.stdout
    assert "retry scheduled, next attempt 3" in demo.stdout
    assert "run finished COMPLETED" in demo.stdout
    assert "compensation started" not in demo.stdout
    run_id = run_id_of(demo.stdout)
    assert ledger(tmp_path, run_id)[f"{run_id}:arrange_shipping:action"] == 1


@pytest.mark.e2e
def test_demo_crash_at_the_pivot_then_resume_finishes_the_same_run(tmp_path: Path) -> None:
    crashed = sagaway(tmp_path, "demo", "--crash-at", "charge_payment")
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    run_id = run_id_of(crashed.stdout)
    command = RESUME.search(crashed.stdout)
    assert command, crashed.stdout
    assert f"--resume {run_id} " in command.group(0)
    # The card was charged before the kill; the saga log only knows the step started.
    key = f"{run_id}:charge_payment:action"
    assert ledger(tmp_path, run_id)[key] == 1

    resumed = sagaway(tmp_path, *shlex.split(command.group(0))[1:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "lease to expire" in resumed.stdout
    assert run_id_of(resumed.stdout) == run_id
    assert f"show {run_id}" in resumed.stdout
    assert "run finished COMPLETED" in resumed.stdout
    assert "seen before" in resumed.stdout
    # Invoked again with the same key, applied once.
    assert ledger(tmp_path, run_id)[key] == 2

    show = sagaway(tmp_path, "show", run_id)
    assert show.returncode == 0, show.stderr
    charge = timeline_rows(show.stdout, "charge_payment")
    started = [r for r in charge if "step.started" in r]
    assert len(started) == 2, show.stdout
    assert any("step.interrupted" in r for r in charge), show.stdout
    assert "COMPLETED" in show.stdout

    runs = sagaway(tmp_path, "runs")
    assert sum(run_id in line for line in runs.stdout.splitlines()) == 1


@pytest.mark.e2e
def test_show_an_unknown_run_is_a_clear_error(tmp_path: Path) -> None:
    assert sagaway(tmp_path, "demo").returncode == 0
    result = sagaway(tmp_path, "show", "no-such-run")
    assert result.returncode == 1
    assert "no saga run with id 'no-such-run'" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_reading_a_store_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    for args in (("runs",), ("show", "x"), ("demo", "--resume", "x")):
        result = sagaway(tmp_path, *args)
        assert result.returncode == 1, args
        assert "no saga store" in result.stderr
    assert not (tmp_path / "sagaway-demo.db").exists()


@pytest.mark.e2e
def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("sagaway")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    result = subprocess.run([script, "--version"], capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert result.returncode == 0 and result.stdout.startswith("sagaway ")


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "--status", "bogus"],
        ["runs", "--limit", "0"],
        ["demo", "--fail-at", "no_such_step"],
        ["demo", "--fail-at", "charge_payment", "--crash-at", "charge_payment"],
        ["demo", "--resume", "x", "--crash-at", "charge_payment"],
        ["demo", "--store", "ftp://nowhere"],
        ["show"],
    ],
)
def test_argument_errors_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Usage" in result.output


def test_a_bad_status_lists_the_known_ones() -> None:
    result = CliRunner().invoke(app, ["runs", "--status", "bogus"])
    assert "completed" in result.output.lower() and "compensated" in result.output.lower()


@pytest.mark.parametrize("status", ["COMPLETED", "completed", "Failed"])
def test_status_is_case_insensitive(status: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["runs", "--status", status])
    # Parsed fine; it then stops because this directory has no store yet.
    assert result.exit_code == 1, result.output
    assert "no saga store" in result.output
