"""The e-commerce order saga, choreographed: services react to each other's events.

``orders`` starts a run by emitting ``OrderCreated`` (with the order row, atomically);
``inventory`` reserves stock, ``payment`` charges, ``shipping`` ships; a failure emits an
event that the earlier services undo their step on. A :class:`~sagaway.choreography.Tracker`
records every run in the saga log. See README.md here.

Modules: ``flow`` (the flow, written once), ``services`` (the four services, and the
command line that runs one as a process), ``demo`` (N sagas over real processes).
"""

