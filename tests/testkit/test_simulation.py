"""Seeded message chaos for command-step sagas: real Participants survive it; a participant
without an inbox is caught, and Hypothesis shrinks the plan that breaks it to one fault."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings

from sagaway import NonRetryableError, Saga, SagaStatus
from sagaway.messaging.base import Transport
from sagaway.participant import Participant
from sagaway.testing import SafetyError
from sagaway.testing.simulation import (
    FakeService,
    FaultPlan,
    SimulationReport,
    assert_simulation_safe,
    fault_plans,
    seeds,
    simulate,
)


def order_saga() -> Saga:
    order = Saga("order")
    order.command_step("reserve", service="inventory", command="reserve",
                       compensation="release", timeout=10)
    order.command_step("charge", service="payments", command="charge",
                       compensation="refund", timeout=10)
    order.command_step("ship", service="shipping", command="ship", timeout=10, pivot=True)
    return order


ORDERS = [{"n": i, "amount": 5, "refuse": i % 3 == 0} for i in range(6)]


class SqliteShop:
    """Three real Participants, each with its own SQLite database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counter = itertools.count()
        self.dbs: dict[str, Path] = {}

    def fresh(self) -> list[Any]:
        n = next(self.counter)
        self.dbs = {name: self.root / f"{name}-{n}.db"
                    for name in ("inventory", "payments", "shipping")}
        with sqlite3.connect(self.dbs["inventory"]) as db:
            db.execute("CREATE TABLE stock (qty INTEGER)")
            db.execute("INSERT INTO stock VALUES (100)")
            db.execute("CREATE TABLE held (run TEXT PRIMARY KEY)")
        with sqlite3.connect(self.dbs["payments"]) as db:
            db.execute("CREATE TABLE balance (total INTEGER)")
            db.execute("INSERT INTO balance VALUES (0)")
            db.execute("CREATE TABLE charges (run TEXT PRIMARY KEY, amount INTEGER)")
        return [self.inventory, self.payments, self.shipping]

    def inventory(self, transport: Transport) -> Participant:
        p = Participant("inventory", transport, db=f"sqlite:///{self.dbs['inventory']}")

        @p.handler("reserve")
        def reserve(cmd: Any) -> int:
            cmd.db.execute("INSERT INTO held VALUES (?)", (cmd.run_id,))
            cmd.db.execute("UPDATE stock SET qty = qty - 1")
            return 1

        @p.handler("release")
        def release(cmd: Any) -> None:
            # A release may come for a reservation never made (its command was lost, or
            # timed out): undo only what is there.
            if cmd.db.execute("DELETE FROM held WHERE run = ?", (cmd.run_id,)).rowcount:
                cmd.db.execute("UPDATE stock SET qty = qty + 1")

        return p

    def payments(self, transport: Transport) -> Participant:
        p = Participant("payments", transport, db=f"sqlite:///{self.dbs['payments']}")

        @p.handler("charge")
        def charge(cmd: Any) -> int:
            cmd.db.execute("INSERT INTO charges VALUES (?, ?)",
                           (cmd.run_id, cmd.payload["amount"]))
            cmd.db.execute("UPDATE balance SET total = total + ?", (cmd.payload["amount"],))
            return int(cmd.payload["amount"])

        @p.handler("refund")
        def refund(cmd: Any) -> None:
            row = cmd.db.execute("SELECT amount FROM charges WHERE run = ?",
                                 (cmd.run_id,)).fetchone()
            if row is not None:
                cmd.db.execute("DELETE FROM charges WHERE run = ?", (cmd.run_id,))
                cmd.db.execute("UPDATE balance SET total = total - ?", (row[0],))

        return p

    def shipping(self, transport: Transport) -> Participant:
        p = Participant("shipping", transport, db=f"sqlite:///{self.dbs['shipping']}")

        @p.handler("ship")
        def ship(cmd: Any) -> str:
            if cmd.payload["refuse"]:
                raise NonRetryableError("no courier")
            return "shipped"

        return p

    def check(self, report: SimulationReport) -> None:
        # A FAILED run (the pivot's outcome unknown) keeps its effects for an operator.
        done = sum(r.status is not SagaStatus.COMPENSATED for r in report.runs)
        with sqlite3.connect(self.dbs["inventory"]) as db:
            (qty,) = db.execute("SELECT qty FROM stock").fetchone()
        with sqlite3.connect(self.dbs["payments"]) as db:
            (total,) = db.execute("SELECT total FROM balance").fetchone()
        assert (qty, total) == (100 - done, 5 * done), (
            f"{done} runs not compensated, but stock is {qty} and the balance {total}")


@pytest.mark.parametrize("seed", range(4))
def test_real_participants_survive_seeded_chaos(tmp_path: Path, seed: int) -> None:
    shop = SqliteShop(tmp_path)
    report = simulate(order_saga(), ORDERS, services=shop.fresh(),
                      plan=FaultPlan.from_seed(seed, drop=0.15, duplicate=0.15, delay=0.3),
                      check=shop.check)
    print(report)
    assert_simulation_safe(report)
    assert len(report.runs) == 6
    # The refused orders never complete (they compensate, or end FAILED for an operator
    # when every "ship" command or its answer was lost: the pivot's outcome is unknown).
    for r in report.runs:
        if r.input["refuse"]:
            assert r.status is not SagaStatus.COMPLETED, r
    assert any("drop" in m for m in report.messages)
    assert any("duplicate" in m for m in report.messages)


class DictShop:
    """FakeServices over dicts; ``idempotent=False`` is a participant without an inbox."""

    def __init__(self, *, idempotent: bool, tolerant: bool = True, fence: bool = True) -> None:
        self.idempotent = idempotent
        self.fence = fence
        self.tolerant = tolerant
        """Undo only what was done (``False``: refund and release whatever happened)."""
        self.world = {"stock": 100, "balance": 0}
        self.done: set[str] = set()

    def fresh(self) -> list[Any]:
        self.world = {"stock": 100, "balance": 0}
        self.done = set()
        w, done, tolerant = self.world, self.done, self.tolerant

        def add(field: str, amount: int) -> Any:
            def handle(payload: Any, key: str) -> int:
                run, step, kind = key.rsplit(":", 2)
                if kind == "compensation":
                    if tolerant and f"{run}:{step}" not in done:
                        return 0  # nothing to undo
                    done.discard(f"{run}:{step}")
                else:
                    done.add(f"{run}:{step}")
                w[field] += amount if field == "stock" else amount * payload["amount"]
                return 1
            return handle

        def ship(payload: Any, key: str) -> str:
            if payload["refuse"]:
                raise NonRetryableError("no courier")
            return "shipped"

        idem, fence = self.idempotent, self.fence
        return [
            lambda t: FakeService("inventory", t, {"reserve": add("stock", -1),
                                                   "release": add("stock", 1)},
                                  idempotent=idem, fence=fence),
            lambda t: FakeService("payments", t, {"charge": add("balance", 1),
                                                  "refund": add("balance", -1)},
                                  idempotent=idem, fence=fence),
            lambda t: FakeService("shipping", t, {"ship": ship}, idempotent=idem, fence=fence),
        ]

    def check(self, report: SimulationReport) -> None:
        # A FAILED run (the pivot's outcome unknown) keeps its effects for an operator.
        done = sum(r.status is not SagaStatus.COMPENSATED for r in report.runs)
        assert self.world == {"stock": 100 - done, "balance": 5 * done}, (
            f"{done} not compensated but the world is {self.world}")


def run(shop: DictShop, plan: FaultPlan, orders: list[Any] | None = None) -> SimulationReport:
    return simulate(order_saga(), orders or [ORDERS[1]], services=shop.fresh(), plan=plan,
                    check=shop.check)


def test_a_participant_without_an_inbox_is_caught_and_the_plan_replays() -> None:
    shop = DictShop(idempotent=False)
    report = run(shop, FaultPlan(faults=("duplicate",)))
    assert not report.ok
    assert "1 not compensated but the world is {'stock': 98" in report.violations[0]
    with pytest.raises(SafetyError, match=r"replay: simulate\(\.\.\., plan=FaultPlan\("
                                          r"faults=\('duplicate',\)\)\)"):
        assert_simulation_safe(report)
    again = run(shop, FaultPlan(faults=("duplicate",)))
    assert again.messages == report.messages and again.violations == report.violations
    # The same participants with an inbox are fine.
    assert run(DictShop(idempotent=True), FaultPlan(faults=("duplicate",))).ok


def test_hypothesis_shrinks_a_failing_plan_to_the_fewest_faults() -> None:
    shop = DictShop(idempotent=False)
    smallest = find(fault_plans(max_messages=12), lambda plan: not run(shop, plan).ok,
                    settings=settings(max_examples=300, database=None, deadline=None,
                                      suppress_health_check=list(HealthCheck)))
    # One fault is all it takes (Hypothesis removed every other): a duplicated command, or a
    # lost reply that makes the orchestrator send the command again; a participant without
    # an inbox applies it twice.
    assert smallest.faults is not None
    faults = [f for f in smallest.faults if f != "deliver"]
    assert faults in (["duplicate"], ["drop"]), smallest
    assert smallest.faults[-1] == faults[0]  # only the deliveries before it are needed
    report = run(shop, smallest)
    assert not report.ok and "the world is {'stock': 98" in report.violations[0]


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=fault_plans(max_messages=30))
def test_an_idempotent_shop_survives_any_plan(plan: FaultPlan) -> None:
    shop = DictShop(idempotent=True)
    assert_simulation_safe(run(shop, plan, ORDERS[:3]))


def test_a_refund_that_cannot_take_nothing_to_undo_is_caught_with_a_minimal_plan() -> None:
    # Idempotent (an inbox) but it refunds even when the charge never happened: a lost
    # charge command (the step times out, possibly applied) is compensated all the same.
    shop = DictShop(idempotent=True, tolerant=False)
    assert run(shop, FaultPlan()).ok
    smallest = find(fault_plans(max_messages=12), lambda plan: not run(shop, plan).ok,
                    settings=settings(max_examples=300, database=None, deadline=None,
                                      suppress_health_check=list(HealthCheck)))
    assert smallest.faults is not None
    # Minimal: the reserve command lost three times, so the step gives up "possibly
    # applied" and is compensated: the release for a reservation never made breaks stock.
    assert smallest == FaultPlan(faults=("drop", "drop", "drop")), smallest
    report = run(shop, smallest)
    print(report)
    assert "the world is" in report.violations[0]


@settings(max_examples=15, deadline=None, database=None)
@given(plan=seeds(drop=0.2, duplicate=0.2, delay=0.3))
def test_an_idempotent_shop_survives_seeded_plans(plan: FaultPlan) -> None:
    shop = DictShop(idempotent=True)
    report = run(shop, plan, ORDERS)
    assert_simulation_safe(report)
    assert report.messages  # the orders went through the chaos network


def test_a_late_command_after_its_compensation_is_caught_without_a_fence() -> None:
    # Found by the seeded simulation itself: every attempt of a step goes unanswered in
    # time, the step is compensated (nothing to undo yet), then a delayed command arrives
    # and is applied for good. A participant must fence the action when its compensation
    # runs.
    plans = (FaultPlan.from_seed(seed, drop=0.2, duplicate=0.2, delay=0.3)
             for seed in range(300))
    failing = next(p for p in plans if not run(DictShop(idempotent=True, fence=False), p,
                                               ORDERS).ok)
    report = run(DictShop(idempotent=True, fence=False), failing, ORDERS)
    print(report)
    assert "not compensated but the world is" in report.violations[0]
    # The printed plan replays: the same messages meet the same fates, the same violation.
    again = run(DictShop(idempotent=True, fence=False), eval(repr(failing)), ORDERS)
    assert (again.messages, again.violations) == (report.messages, report.violations)
    # The fence fixes it.
    assert run(DictShop(idempotent=True), failing, ORDERS).ok
    late = [m for m in report.messages if "-> delay_30" in m and "action" in m]
    assert late, report.messages


def test_a_seeded_plan_is_reproducible_and_prints_as_code() -> None:
    plan = FaultPlan.from_seed(42)
    assert repr(plan) == "FaultPlan.from_seed(42, drop=0.1, duplicate=0.1, delay=0.2)"
    a, b = plan.fates(), plan.fates()
    assert [a() for _ in range(50)] == [b() for _ in range(50)]
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        FaultPlan(faults=("explode",))
