"""The pure parts of HTTP steps: declaring them (and every mistake), URL templates, the
classification of answers, and where base URLs come from."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from sagaway import DefinitionError, Orchestrator, Saga, StepKind
from sagaway.definition.http import HttpCall, TemplateError, render_path
from sagaway.invokers.http import classify, env_var, parse_retry_after, resolve_services


class Out(BaseModel):
    id: str


def declare(url: str = "{inv}/r", method: str = "POST", **kw: Any) -> Saga:
    saga = Saga("s")
    saga.http_step("reserve", method, url, **kw)
    return saga


# -- declaring ------------------------------------------------------------------------------


def test_http_step_builds_markers_not_callables() -> None:
    saga = Saga("s")
    step = saga.http_step("reserve", "post", "{inventory}/reservations",
                          compensation=("delete", "{inventory}/reservations/{result[id]}"),
                          timeout=2, response_model=Out)
    saga.validate()
    assert step.kind is StepKind.COMPENSATABLE and step.http and not step.remote
    action, undo = step.action, step.compensation_fn
    assert isinstance(action, HttpCall) and isinstance(undo, HttpCall)
    assert (action.method, action.service, action.timeout, action.response_model) == (
        "POST", "inventory", 2.0, Out)
    assert (undo.method, undo.service, undo.compensating, undo.uses_result) == (
        "DELETE", "inventory", True, True)
    assert step.compensation_timeout == 2
    with pytest.raises(TypeError, match="HTTP request"):
        step(None, None)


def test_a_read_only_http_step_needs_no_compensation() -> None:
    saga = declare("{orders}/orders/{input[id]}", "GET", read_only=True)
    saga.validate()


def test_a_compensatable_http_step_without_compensation_is_an_error() -> None:
    with pytest.raises(DefinitionError,
                       match=r"must be undoable: pass compensation=\(method, url\)"):
        declare().validate()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "TRACE"}, "method 'TRACE' is not supported"),
    ({"method": 5}, "is not supported"),
    ({"url": "http://inv/r"}, "must start with a service name in braces"),
    ({"url": "/r"}, "must start with a service name"),
    ({"url": "{input}/r"}, "must start with a service name"),
    ({"url": "{inv!r}/r"}, "must start with a service name"),
    ({"url": "{inv}/r/{order_id}"}, "field {order_id} in '{inv}/r/{order_id}' is unknown"),
    ({"url": "{inv}/r/{result[id]}"}, "only known to a compensation"),
    ({"url": "{inv}/r/{input.id}"}, "not attributes"),
    ({"url": "{inv}/r/{}"}, "is not a field"),
    ({"url": "{inv}/r/{0}"}, "is not a field"),
    ({"url": "{inv}/r/{input[id]:>5}"}, "format spec"),
    ({"url": "{inv}/r/{run_id[x]}"}, "takes no index"),
    ({"url": "{inv}/r/{results}"}, "needs a step name"),
    ({"url": "{inv}/r/{input[]}"}, "empty index"),
    ({"url": "{inv}/r/{"}, "not a valid template"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"timeout": None}, "timeout must be > 0"),
    ({"json": {"a": 1}}, "json must be a function"),
    ({"response_model": dict}, "response_model must be a pydantic model"),
    ({"compensation": ("DELETE",)}, r"compensation must be \(method, url\)"),
    ({"compensation": "DELETE {inv}/r"}, r"compensation must be \(method, url\)"),
    ({"compensation": ("NOPE", "{inv}/r")}, r"\(compensation\): method 'NOPE'"),
    ({"compensation": ("DELETE", "{inv}/r/{result}")}, "needs a key"),
    ({"compensation": ("DELETE", "{inv}/r/{nope[x]}")}, "is unknown"),
    ({"compensation_json": lambda *a: None}, "compensation_json needs a compensation"),
    ({"compensation": ("DELETE", "{inv}/r"), "pivot": True}, "is the pivot"),
    ({"compensation": ("DELETE", "{inv}/r"), "read_only": True}, "is read_only"),
])
def test_declaration_mistakes_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        declare(**kwargs)


def test_http_step_names_are_checked_like_any_step() -> None:
    saga = declare(compensation=("DELETE", "{inv}/r"))
    with pytest.raises(DefinitionError, match="already has a step named 'reserve'"):
        saga.http_step("reserve", "POST", "{inv}/r", compensation=("DELETE", "{inv}/r"))


# -- templates ------------------------------------------------------------------------------


def call(url: str, *, compensation: bool = False) -> HttpCall:
    saga = Saga("s")
    step = saga.http_step("x", "DELETE", "{svc}/a", compensation=("DELETE", url)) \
        if compensation else saga.http_step("x", "DELETE", url, read_only=True)
    target = step.compensation_fn if compensation else step.action
    assert isinstance(target, HttpCall)
    return target


VALUES = {"input": {"id": "a/b c", "n": 3, "ok": True, "items": [{"sku": "x?y"}]},
          "results": {"reserve": {"rid": 7}}, "run_id": "r-1", "step": "x",
          "result": {"id": "€5"}}


@pytest.mark.parametrize(("url", "path"), [
    ("{svc}", ""),
    ("{svc}/orders", "/orders"),
    ("{svc}/o/{input[id]}", "/o/a%2Fb%20c"),
    ("{svc}/o/{input[n]}/{input[ok]}", "/o/3/true"),
    ("{svc}/o/{input[items][0][sku]}", "/o/x%3Fy"),
    ("{svc}/o/{input[items][-1][sku]}", "/o/x%3Fy"),
    ("{svc}/o/{results[reserve][rid]}?run={run_id}&s={step}", "/o/7?run=r-1&s=x"),
    ("{svc}/{{literal}}", "/{literal}"),
])
def test_templates_render_each_value_as_one_encoded_segment(url: str, path: str) -> None:
    assert render_path(call(url), VALUES) == path


def test_a_compensation_template_can_name_the_result() -> None:
    undo = call("{svc}/r/{result[id]}", compensation=True)
    assert render_path(undo, VALUES) == "/r/%E2%82%AC5"
    without = {k: v for k, v in VALUES.items() if k != "result"}
    with pytest.raises(TemplateError, match="not known") as err:
        render_path(undo, without)
    assert err.value.root == "result"


@pytest.mark.parametrize(("url", "message"), [
    ("{svc}/{input[missing]}", r"\{input\[missing\]\} is missing"),
    ("{svc}/{input[items][5][sku]}", "is missing"),
    ("{svc}/{input[id][x]}", "is missing"),
    ("{svc}/{input[items]}", "is list, not a value"),
    ("{svc}/{results[later][id]}", "is missing"),
])
def test_a_missing_value_is_a_template_error(url: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render_path(call(url), VALUES)


def test_an_input_of_null_cannot_fill_a_url() -> None:
    with pytest.raises(TemplateError, match="is null"):
        render_path(call("{svc}/{input}"), {**VALUES, "input": None})
    assert render_path(call("{svc}/{input}"), {**VALUES, "input": "o 1"}) == "/o%201"


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "ok", "retryable", "maybe_applied"), [
    (200, True, False, True), (201, True, False, True), (204, True, False, True),
    (400, False, False, False), (401, False, False, False), (404, False, False, False),
    (410, False, False, False), (422, False, False, False),
    (408, False, True, False), (409, False, True, False), (425, False, True, False),
    (429, False, True, False),
    (500, False, True, True), (502, False, True, True), (503, False, True, True),
    (504, False, True, True),
    (301, False, False, False), (304, False, False, False), (101, False, False, False),
])
def test_action_answers(status: int, ok: bool, retryable: bool, maybe_applied: bool) -> None:
    v = classify(status, compensating=False)
    assert (v.ok, v.retryable, v.maybe_applied) == (ok, retryable, maybe_applied)


@pytest.mark.parametrize(("status", "ok", "retryable"), [
    (200, True, False), (204, True, False), (404, True, False), (410, True, False),
    (400, False, False), (403, False, False), (422, False, False),
    (408, False, True), (409, False, True), (429, False, True), (500, False, True),
    (503, False, True), (302, False, False),
])
def test_compensation_answers(status: int, ok: bool, retryable: bool) -> None:
    v = classify(status, compensating=True)
    assert (v.ok, v.retryable) == (ok, retryable)


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), ("", None), ("7", 7.0), (" 120 ", 120.0), ("-3", None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # 30 s after `now` below
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
    ("Wed, 21 Oct 2015 07:28:30", None),  # no zone: not an HTTP date
])
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now) == seconds


# -- base URLs ------------------------------------------------------------------------------


def test_env_var_names() -> None:
    assert env_var("inventory") == "SAGAWAY_SERVICE_INVENTORY"
    assert env_var("car-rental") == "SAGAWAY_SERVICE_CAR_RENTAL"


def test_resolve_services_prefers_configuration_and_names_every_missing_one() -> None:
    saga = Saga("trip")
    saga.http_step("a", "POST", "{flights}/b", compensation=("DELETE", "{refunds}/b"))
    saga.http_step("c", "POST", "{cars}/b", compensation=("DELETE", "{cars}/b"))
    found = resolve_services([saga], {"flights": "http://f:1/", "cars": "http://c"},
                             {"SAGAWAY_SERVICE_FLIGHTS": "http://ignored",
                              "SAGAWAY_SERVICE_REFUNDS": "https://r/api"})
    assert found == {"flights": "http://f:1", "refunds": "https://r/api", "cars": "http://c"}
    with pytest.raises(DefinitionError) as err:
        resolve_services([saga], {}, {})
    text = str(err.value)
    for name in ("'cars'", "'flights'", "'refunds'", "SAGAWAY_SERVICE_CARS", "trip.c"):
        assert name in text


def test_an_orchestrator_without_http_steps_needs_no_services() -> None:
    saga = Saga("local")

    @saga.step(read_only=True)
    def look(ctx: Any, data: Any) -> None:
        return None

    Orchestrator("memory://", sagas=[saga])
    assert resolve_services([saga], {}, {}) == {}
