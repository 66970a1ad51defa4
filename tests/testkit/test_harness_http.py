"""Fakes for HTTP steps: the harness replaces the request, keeps the step's policies."""

from __future__ import annotations

from typing import Any

import pytest

from sagaway import RetryPolicy, Saga, SagaStatus
from sagaway.testing import HarnessError, SagaHarness, check, explore_crashes


def booking() -> Saga:
    trip = Saga("trip")
    trip.http_step("hotel", "POST", "{hotels}/bookings", timeout=4,
                   compensation=("DELETE", "{hotels}/bookings/{result[id]}"),
                   compensation_retry=RetryPolicy(max_attempts=9))
    trip.http_step("pay", "POST", "{payments}/charges", timeout=6, pivot=True)
    return trip


def test_a_faked_http_step_keeps_its_timeout_and_policies() -> None:
    harness = SagaHarness(booking())
    harness.fake("hotel").returns({"id": "h-1"})
    harness.fake("pay").times_out(times=None)
    outcome = harness.run({"guest": "ada"})
    # pay never answers: 3 attempts x its own 6 s timeout, then its outcome is unknown.
    assert outcome.status is SagaStatus.FAILED
    assert outcome.run is not None and "unknown outcome" in (outcome.run.error or "")
    errors = [e.data["error"] for e in outcome.run.history
              if e.kind == "step.failed" and e.step == "pay" and e.data]
    assert errors == ["timed out after 6s (may have taken effect)"] * 3
    assert outcome.run.results["hotel"] == {"id": "h-1"}


def test_a_faked_http_step_failing_compensates_the_earlier_one() -> None:
    harness = SagaHarness(booking()).fake_all()
    harness.fake("hotel").fails(times=1).returns({"id": "h-2"})
    harness.fake("pay").fails(times=None)
    outcome = harness.run({"guest": "ada"})
    assert outcome.status is SagaStatus.COMPENSATED
    assert outcome.run is not None
    assert harness.fakes["hotel"].state(outcome.run.id) == "compensated"
    assert [c.outcome for c in outcome.calls if c.step == "hotel"] == ["failed", "ok", "ok"]


def test_an_http_step_that_is_not_faked_is_a_clear_error() -> None:
    harness = SagaHarness(booking())
    harness.fake("hotel")
    with pytest.raises(HarnessError, match=r"step 'pay' is a HttpCall \(POST "
                                           r"\{payments\}/charges\).*harness.fake\('pay'\)"):
        harness.run({})


def test_the_explorer_on_http_steps_all_faked() -> None:
    report = explore_crashes(booking(), {"guest": "ada"}, fakes="all")
    print(report.summary())
    assert report.ok, str(report)
    assert report.failure_points == 7


def test_check_names_http_steps() -> None:
    trip = booking()
    trip["hotel"].timeout = None
    found: list[Any] = [f for f in check(trip) if f.step == "hotel"]
    assert any("a remote step (HTTP call) without a timeout" in f.message for f in found)
