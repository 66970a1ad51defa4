"""Flows for the ``sagaway choreography draw`` tests."""

from __future__ import annotations

from sagaway.choreography import Choreography, FlowStep

not_a_flow = object()


def broken() -> Choreography:
    return Choreography("broken", start="Go", steps=[
        FlowStep("a", service="x", on="Went", success="A"),
    ])
