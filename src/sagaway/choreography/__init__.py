"""Choreography: sagas without a central orchestrator, as safe and as visible as orchestrated ones.

Write the flow down once (:class:`Choreography` of :class:`FlowStep` s: which service reacts
to which event, what it emits, which event undoes it); it is validated when built and can be
drawn (:meth:`Choreography.to_mermaid`, ``sagaway choreography draw module:flow``). Each
service declares its reactions on a :class:`ChoreographedService` (a participant: inbox
dedup, outbox in the service's own database, retries and dead letters from the transport);
a :class:`Tracker` projects the events into the saga log, so choreographed runs show up in
``sagaway runs``, ``sagaway show``, the admin API and metrics like orchestrated ones.
"""

from __future__ import annotations

from sagaway.choreography.flow import TRACKER, Choreography, FlowStep, Reaction
from sagaway.choreography.service import ChoreographedService, Emit, emit_event
from sagaway.choreography.tracker import Tracker

__all__ = [
    "TRACKER",
    "ChoreographedService",
    "Choreography",
    "Emit",
    "FlowStep",
    "Reaction",
    "Tracker",
    "emit_event",
]
