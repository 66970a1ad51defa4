"""Writing a choreography down: validation (typed errors naming the fix), topology, drawing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from examples.ecommerce.choreography.flow import order_flow
from typer.testing import CliRunner

from sagaway import DefinitionError, SagawayError
from sagaway.choreography import ChoreographedService, Choreography, Emit, FlowStep
from sagaway.cli import app


def steps(**overrides: dict[str, Any]) -> list[FlowStep]:
    base: dict[str, dict[str, Any]] = {
        "reserve": dict(service="inventory", on="Created", success="Reserved",
                        failure="Rejected", compensate_on=("Declined", "Refunded"),
                        compensated="Released"),
        "charge": dict(service="payment", on="Reserved", success="Charged",
                       failure="Declined", compensate_on="ShipFailed", compensated="Refunded"),
        "ship": dict(service="shipping", on="Charged", success="Shipped",
                     failure="ShipFailed"),
    }
    for name, change in overrides.items():
        base[name] = {**base[name], **change}
    return [FlowStep(name, **kw) for name, kw in base.items()]


def flow(**kw: Any) -> Choreography:
    args: dict[str, Any] = {"start": "Created", "steps": steps()}
    args.update(kw)
    return Choreography("order", **args)


def test_the_example_flow_validates_and_knows_its_topology() -> None:
    f = order_flow(prefix="shop.order")
    assert f.services == ["inventory", "orders", "payment", "shipping"]
    assert f.completed_events == ("ShippingArranged",)
    assert f.subscribers("OrderCreated") == ("shop.order.inventory", "shop.order.tracker")
    assert f.subscribers("StockReleased") == ("shop.order.orders", "shop.order.tracker")
    assert f.subscribers("PaymentFailed") == ("shop.order.inventory", "shop.order.tracker")
    assert f.subscribers("Nope") == ()
    assert [s.name for s in f.cascade("ShippingFailed")] == ["charge_payment", "reserve_stock"]
    assert [s.name for s in f.cascade("PaymentFailed")] == ["reserve_stock"]
    assert f.cascade("StockRejected") == []
    inventory = f.reactions("inventory")
    assert inventory["OrderCreated"].role == "action"
    assert inventory["OrderCreated"].emits == ("StockReserved", "StockRejected")
    assert inventory["PaymentRefunded"].role == "compensation"
    assert inventory["PaymentRefunded"].emits == ("StockReleased",)
    assert f.reactions("orders")["StockRejected"].role == "notify"
    assert f.producer("PaymentRefunded") == (f.step("charge_payment"), "compensated")
    assert f.producer("OrderCreated") == (None, "start")


def test_mermaid_and_text_drawings_show_every_path() -> None:
    f = order_flow()
    mermaid = f.to_mermaid()
    assert mermaid.startswith("flowchart LR\n")
    for line in ('e_OrderCreated[/"OrderCreated"/]',
                 "e_OrderCreated --> s_reserve_stock",
                 "s_charge_payment -.->|fails| e_PaymentFailed",
                 "e_ShippingFailed -.-> s_charge_payment_undo",
                 "s_reserve_stock_undo -.->|undone| e_StockReleased",
                 'e_ShippingArranged(["ShippingArranged ✔"])',
                 "e_StockRejected -.-> n_orders"):
        assert f"  {line}\n" in mermaid, line
    text = f.describe()
    assert "if arrange_shipping fails: undo charge_payment -> reserve_stock" in text
    assert "if reserve_stock fails: undo nothing" in text


BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown trigger", {"steps": steps(ship={"on": "Charged!"})},
     ["step 'ship' starts on 'Charged!', an unknown event", "known events"]),
    ("unknown undo event", {"steps": steps(charge={"compensate_on": "Nope"})},
     ["step 'charge' is undone on 'Nope', an unknown event"]),
    ("starts on a failure", {"steps": steps(ship={"on": "Declined"})},
     ["starts on 'Declined', the failure event of step 'charge'"]),
    ("undone on a success", {"steps": steps(charge={"compensate_on": "Shipped"})},
     ["undone on 'Shipped', a success event"]),
    ("two producers", {"steps": steps(ship={"failure": "Declined"})},
     ["event 'Declined' is emitted by both", "give each outcome its own event"]),
    ("missing compensation", {"steps": steps(reserve={"compensate_on": None,
                                                      "compensated": None})},
     ["when step 'charge' fails ('Declined'), step 'reserve' may already have taken "
      "effect and has no compensation", "compensate_on=('Declined',)"]),
    ("nothing undoes it", {"steps": steps(reserve={"compensate_on": "Declined"})},
     ["when step 'ship' fails ('ShipFailed'), step 'reserve' may already have taken effect "
      "but nothing undoes it", "add one of ['ShipFailed', 'Refunded'] to the compensate_on "
      "of 'reserve'"]),
    ("compensated without trigger", {"steps": steps(ship={"compensated": "Unshipped"})},
     ["has compensated='Unshipped' but nothing undoes it"]),
    ("trigger without compensated", {"steps": steps(ship={"compensate_on": "Declined"})},
     ["is undone on ['Declined'] but emits nothing when undone"]),
    ("unreachable (a cycle)", {"steps": [*steps(), FlowStep("a", service="x", on="B",
                                                          success="A"),
                                        FlowStep("b", service="x", on="A", success="B")]},
     ["step 'a' is unreachable"]),
    ("no steps", {"steps": []}, ["has no steps"]),
    ("bad deadline", {"deadline": 0}, ["deadline must be a number of seconds > 0"]),
    ("bad version", {"version": 0}, ["version must be an integer >= 1"]),
    ("completed not a success", {"completed": "Declined"},
     ["completed event 'Declined' is not the success event of a step"]),
    ("tracker as a service", {"steps": steps(ship={"service": "tracker"})},
     ["'tracker' is the tracker's queue"]),
    ("notify of an unknown event", {"notify": {"orders": ("Shipped", "Gone")}},
     ["notify['orders'] lists 'Gone', an unknown event"]),
    ("one service, one event, twice", {"notify": {"inventory": ("Created",)}},
     ["service 'inventory' reacts to 'Created' twice"]),
    ("duplicate step names", {"steps": [*steps(), FlowStep("ship", service="x", on="Shipped",
                                                            success="Z")]},
     ["two steps named 'ship'"]),
    ("bad prefix", {"prefix": "a..b"}, ["prefix 'a..b' must be dot-separated words"]),
]


@pytest.mark.parametrize(("case", "kw", "fragments"), BAD, ids=[c[0] for c in BAD])
def test_a_malformed_flow_is_a_definition_error_naming_the_fix(
        case: str, kw: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(DefinitionError) as info:
        flow(**kw)
    assert isinstance(info.value, SagawayError)
    for fragment in fragments:
        assert fragment in str(info.value), (case, str(info.value))


def test_a_step_that_cannot_fail_needs_no_compensation_before_it() -> None:
    f = flow(steps=[FlowStep("a", service="x", on="Go", success="A"),
                    FlowStep("b", service="y", on="A", success="B")], start="Go")
    assert f.completed_events == ("B",)


def test_parallel_steps_must_undo_their_siblings() -> None:
    # After Created, two steps run at once; if one fails, the other may have taken effect.
    with pytest.raises(DefinitionError, match="step 'b' may already have taken effect"):
        Choreography("p", start="Go", steps=[
            FlowStep("a", service="x", on="Go", success="A", failure="AFailed"),
            FlowStep("b", service="y", on="Go", success="B", compensate_on="Other",
                     compensated="BUndone"),
            FlowStep("c", service="z", on="A", success="C", failure="Other"),
        ])
    ok = Choreography("p", start="Go", steps=[
        FlowStep("a", service="x", on="Go", success="A", failure="AFailed",
                 compensate_on="BFailed", compensated="AUndone"),
        FlowStep("b", service="y", on="Go", success="B", failure="BFailed",
                 compensate_on="AFailed", compensated="BUndone"),
    ])
    assert ok.completed_events == ("A", "B")


def test_a_service_declares_only_the_reactions_the_flow_gives_it(tmp_path: Path) -> None:
    f = order_flow(prefix="unit.order")
    svc = ChoreographedService("inventory", "memory://", f"sqlite:///{tmp_path}/i.db", flow=f)
    with pytest.raises(DefinitionError, match="does not react to 'PaymentCharged'"):
        svc.on("PaymentCharged")
    with pytest.raises(DefinitionError, match=r"emits=\['StockReserved'\] but"):
        svc.on("OrderCreated", emits="StockReserved")
    with pytest.raises(DefinitionError, match=r"register reactions with @service\.on"):
        svc.handler("reserve")
    svc.on("OrderCreated", emits=("StockRejected", "StockReserved"))(lambda e: None)
    with pytest.raises(DefinitionError, match="already has a handler for 'OrderCreated'"):
        svc.on("OrderCreated")(lambda e: None)
    assert svc.missing == ["PaymentFailed", "PaymentRefunded"]
    with pytest.raises(DefinitionError, match="takes no part in choreography"):
        ChoreographedService("billing", "memory://", f"sqlite:///{tmp_path}/b.db", flow=f)
    assert svc.service == "unit.order.inventory"
    assert Emit("StockReserved", {"a": 1}).payload == {"a": 1}


async def test_a_service_with_a_missing_handler_refuses_to_open(tmp_path: Path) -> None:
    f = order_flow(prefix="unit.order")
    svc = ChoreographedService("payment", "memory://", f"sqlite:///{tmp_path}/p.db", flow=f)
    svc.on("StockReserved")(lambda e: None)
    with pytest.raises(DefinitionError, match=r"no handler for \['ShippingFailed'\]"):
        await svc.open()
    assert not svc.transport.is_open


runner = CliRunner()


def flat(output: str) -> str:
    """CLI output without rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_cli_draw_prints_mermaid_or_text() -> None:
    result = runner.invoke(app, ["choreography", "draw",
                                 "examples.ecommerce.choreography.flow:FLOW"])
    assert result.exit_code == 0, result.output
    assert "flowchart LR" in result.output and "s_arrange_shipping" in result.output
    result = runner.invoke(app, ["choreography", "draw", "--text",
                                 "examples.ecommerce.choreography.flow:order_flow()"])
    assert result.exit_code == 0, result.output
    assert "if charge_payment fails: undo reserve_stock" in result.output


def test_cli_draw_reports_a_bad_spec_and_an_invalid_flow() -> None:
    result = runner.invoke(app, ["choreography", "draw", "no_colon"])
    assert result.exit_code == 2 and "package.module:flow" in flat(result.output)
    result = runner.invoke(app, ["choreography", "draw", "choreo_flows:missing"])
    assert result.exit_code == 2 and "has no attribute 'missing'" in flat(result.output)
    result = runner.invoke(app, ["choreography", "draw", "choreo_flows:not_a_flow"])
    assert result.exit_code == 2 and "not a Choreography" in flat(result.output)
    result = runner.invoke(app, ["choreography", "draw", "choreo_flows:broken()"])
    assert result.exit_code == 1
    assert "the flow is invalid" in flat(result.output)
    assert "starts on 'Went', an unknown event" in flat(result.output)
