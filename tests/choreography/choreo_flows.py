"""Flows for the ``sagaway choreography draw`` tests."""

from __future__ import annotations

import os

from examples.ecommerce.choreography.flow import order_flow

from sagaway.choreography import Choreography, FlowStep

not_a_flow = object()


def broken() -> Choreography:
    return Choreography("broken", start="Go", steps=[
        FlowStep("a", service="x", on="Went", success="A"),
    ])


def from_env() -> Choreography:
    """The example's flow on the queues of ``CHOREO_TEST_PREFIX`` (one test's own)."""
    return order_flow(prefix=os.environ["CHOREO_TEST_PREFIX"])
