"""The harness with real command steps: Participants on SQLite answer over the in-memory
broker, through crashes of the orchestrator process."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Any

from sagaway import NonRetryableError, Saga, SagaStatus
from sagaway.messaging.base import Transport
from sagaway.participant import Participant
from sagaway.testing import SagaHarness, Schedule, assert_safe, explore_crashes


class Bank:
    """A payments service with its own SQLite database, behind a real Participant."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counter = itertools.count()
        self.path = root / "bank-0.db"

    def fresh(self) -> None:
        self.path = self.root / f"bank-{next(self.counter)}.db"
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE charges (run TEXT PRIMARY KEY, amount INTEGER)")

    def participant(self, transport: Transport) -> Participant:
        p = Participant("payments", transport, db=f"sqlite:///{self.path}")

        @p.handler("charge")
        def charge(cmd: Any) -> int:
            cmd.db.execute("INSERT INTO charges VALUES (?, ?)",
                           (cmd.run_id, cmd.payload["amount"]))
            return int(cmd.payload["amount"])

        @p.handler("refund")
        def refund(cmd: Any) -> None:
            cmd.db.execute("DELETE FROM charges WHERE run = ?", (cmd.run_id,))

        return p

    def charged(self) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT COALESCE(SUM(amount), 0) FROM charges").fetchone()[0])


def checkout() -> Saga:
    saga = Saga("checkout")
    saga.command_step("charge", service="payments", command="charge", compensation="refund",
                      timeout=10)

    @saga.step(pivot=True)
    def confirm(ctx: Any, data: Any) -> str:
        if data.get("refuse"):
            raise NonRetryableError("refused")
        return "ok"

    return saga


def test_a_command_step_runs_against_a_real_participant(tmp_path: Path) -> None:
    bank = Bank(tmp_path)
    bank.fresh()
    harness = SagaHarness(checkout())
    harness.service(bank.participant)
    outcome = harness.run({"amount": 7})
    assert outcome.status is SagaStatus.COMPLETED, outcome.timeline()
    assert outcome.run is not None and outcome.run.results["charge"] == 7
    # The command went out for real: the ledger records it as sent (possibly applied).
    first = outcome.calls[0]
    assert (first.step, first.kind, first.outcome) == ("charge", "command", "sent")
    # Its key is the one the message carried (read back from the outbox).
    assert first.key == f"{outcome.run.id}:charge:action"
    assert bank.charged() == 7
    refused = harness.run({"amount": 7, "refuse": True})
    assert refused.status is SagaStatus.COMPENSATED
    assert bank.charged() == 7  # the refused order's charge was refunded


def test_a_crash_while_the_command_is_out_is_recovered(tmp_path: Path) -> None:
    bank = Bank(tmp_path)
    bank.fresh()
    harness = SagaHarness(checkout())
    harness.service(bank.participant)
    # Transition 1 wrote "charge started" and the command to the outbox; the process dies.
    outcome = harness.run({"amount": 7}, Schedule(crash_after=1))
    assert outcome.crashes == 1
    assert outcome.status is SagaStatus.COMPLETED, outcome.timeline()
    assert bank.charged() == 7


def test_the_explorer_proves_the_command_saga_safe(tmp_path: Path) -> None:
    bank = Bank(tmp_path)
    harness = SagaHarness(checkout())
    harness.service(bank.participant)

    def consistent(outcome: Any) -> None:
        # A FAILED run (a crash cut the pivot: outcome unknown) keeps its charge for an
        # operator; a compensated one must have refunded it.
        want = 0 if outcome.status is SagaStatus.COMPENSATED else 7
        assert bank.charged() == want, f"{outcome.status}: charged {bank.charged()}"

    report = explore_crashes(harness, {"amount": 7}, failures=["confirm"], reset=bank.fresh,
                             check=consistent)
    print(report.summary())
    assert_safe(report)
    assert report.crash_points >= 4
    point = report.points[0]
    assert set(point.statuses) == {"COMPENSATED", "FAILED"}
    assert point.statuses["FAILED"] == point.operator
