"""The travel agency: ``POST /trips`` starts the trip saga, ``GET /trips/{id}`` shows it.

Run::

    TRIPS_DB=sqlite:///trips.db SAGAWAY_SERVICE_FLIGHT=http://127.0.0.1:8011 \
    SAGAWAY_SERVICE_HOTEL=http://127.0.0.1:8012 SAGAWAY_SERVICE_CAR=http://127.0.0.1:8013 \
    uvicorn --factory examples.travel_booking.agency:from_env --port 8010
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from examples.sagaapi import create_saga_api
from examples.travel_booking.saga import TripIn, build_orchestrator, trip


def create_app(store: str, *, services: dict[str, str] | None = None) -> FastAPI:
    return create_saga_api(
        title="agency",
        resource="trips",
        saga=trip.name,
        model=TripIn,
        build=lambda: build_orchestrator(store, services=services, poll_interval=0.5),
    )


def from_env() -> FastAPI:
    """``TRIPS_DB`` (default ``sqlite:///trips.db``) and ``SAGAWAY_SERVICE_<NAME>``."""
    return create_app(os.environ.get("TRIPS_DB", "sqlite:///trips.db"))
