"""``sagaway demo ecommerce|travel|bank``: the example systems run by the CLI, as a user runs
them (the ``sagaway`` script in a subprocess, outside the checkout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from examples.bank_transfer.saga import STEPS as BANK_STEPS
from examples.demo import EXAMPLES
from examples.ecommerce.saga import STEPS as SHOP_STEPS
from examples.travel_booking.saga import STEPS as TRAVEL_STEPS
from typer.testing import CliRunner

import sagaway
from sagaway.cli.app import app
from sagaway.cli.examples import EXAMPLE_STEPS, ExampleUnavailable, find_checkout

SCRIPT = shutil.which("sagaway", path=str(Path(sys.executable).parent)) or "sagaway"


def sagaway_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )  # fmt: skip


def test_the_cli_knows_each_examples_steps() -> None:
    assert EXAMPLE_STEPS == {"ecommerce": SHOP_STEPS, "travel": TRAVEL_STEPS, "bank": BANK_STEPS}
    assert {name: e.steps for name, e in EXAMPLES.items()} == EXAMPLE_STEPS


def pids(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"http://127\.0\.0\.1:\d+\s+(\d+)", output)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text(
    ).split()[2]  # fmt: skip


def row(output: str, name: str) -> str:
    found = re.search(rf"│ {name}\s+│ ([^│]+)│", output)
    assert found, output
    return found.group(1).strip()


@pytest.mark.e2e
@pytest.mark.parametrize(("example", "step"), [("ecommerce", "charge_payment"),
                                               ("travel", "rent_car")])  # fmt: skip
def test_demo_runs_an_example_and_stops_its_services(
    example: str, step: str, tmp_path: Path
) -> None:
    result = sagaway_cli(tmp_path, "demo", example, "--sagas", "6", "--fail-at", step)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert row(out, "completed") == "3" and row(out, "compensated") == "3"
    assert row(out, "other") == "0"
    assert "✓ holds" in out
    started = pids(out)
    assert len(started) == 4
    assert not [p for p in started if alive(p)], "services left running"


@pytest.mark.e2e
def test_demo_bank_over_rabbitmq(amqp_url: str, tmp_path: Path) -> None:
    result = sagaway_cli(tmp_path, "demo", "bank", "--sagas", "4", "--fail-at", "credit",
                         env={"SAGAWAY_AMQP_URL": amqp_url})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert row(result.stdout, "completed") == "2" and row(result.stdout, "compensated") == "2"
    assert "✓ holds" in result.stdout


@pytest.mark.e2e
def test_demo_bank_without_a_broker_says_so(tmp_path: Path) -> None:
    result = sagaway_cli(tmp_path, "demo", "bank", "--amqp", "amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 1
    assert "the bank example needs RabbitMQ: cannot reach RabbitMQ at" in result.stderr
    assert "--amqp / SAGAWAY_AMQP_URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "travel", "--fail-at", "debit"],
        ["demo", "ecommerce", "--crash-at", "charge_payment"],
        ["demo", "bank", "--resume", "x"],
        ["demo", "nowhere"],
        ["demo", "bank", "--sagas", "0"],
        ["demo", "--fail-at", "rent_car"],
    ],
)
def test_example_argument_errors_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Usage" in result.output


def test_outside_a_checkout_the_examples_are_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_checkout() == Path(__file__).resolve().parents[2]
    monkeypatch.setattr(sagaway, "__file__", str(tmp_path / "site" / "sagaway" / "__init__.py"))
    with pytest.raises(ExampleUnavailable, match="examples/ of a sagaway checkout"):
        find_checkout(tmp_path)
