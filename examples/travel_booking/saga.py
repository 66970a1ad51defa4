"""The trip saga: flight, hotel and car booked at the same time; one failure cancels the rest.

::

    book_flight  POST {flight}/bookings  ┐            undo DELETE {flight}/bookings/{run_id}
    book_hotel   POST {hotel}/bookings   ├ parallel   undo DELETE {hotel}/bookings/{run_id}
    rent_car     POST {car}/bookings     ┘            undo DELETE {car}/bookings/{run_id}

If one fails, the others are let finish and every one that booked is cancelled. The trip
id is the run id, so a cancellation finds its booking even when the booking's answer was
lost.

Import :data:`trip` and :func:`build_orchestrator` (the agency does; so do tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from sagaway import Listener, Orchestrator, RetryPolicy, Saga, StepContext

__all__ = ["STEPS", "TripIn", "build_orchestrator", "trip"]


class TripIn(BaseModel):
    """What ``POST /trips`` takes (the run's input)."""

    traveler: str = "ada"
    flight: str = "LH400"
    hotel: str = "Ritz"
    car: str = "compact"


class Booking(BaseModel):
    booking_id: str
    service: str
    item: str


RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.2, max_backoff=2.0)
TIMEOUT = 5.0
STEPS = ("book_flight", "book_hotel", "rent_car")

trip = Saga("book_trip", description="flight, hotel and car, all or nothing")


def _booking(field: str) -> Any:
    def body(ctx: StepContext, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"trip_id": ctx.run_id, "item": data[field], "traveler": data["traveler"]}

    return body


book_flight = trip.http_step(
    "book_flight", "POST", "{flight}/bookings",
    compensation=("DELETE", "{flight}/bookings/{run_id}"),
    json=_booking("flight"), response_model=Booking, timeout=TIMEOUT, retry=RETRY,
)  # fmt: skip
book_hotel = trip.http_step(
    "book_hotel", "POST", "{hotel}/bookings",
    compensation=("DELETE", "{hotel}/bookings/{run_id}"),
    json=_booking("hotel"), response_model=Booking, timeout=TIMEOUT, retry=RETRY,
)  # fmt: skip
rent_car = trip.http_step(
    "rent_car", "POST", "{car}/bookings",
    compensation=("DELETE", "{car}/bookings/{run_id}"),
    json=_booking("car"), response_model=Booking, timeout=TIMEOUT, retry=RETRY,
)  # fmt: skip
trip.parallel(book_flight, book_hotel, rent_car)


def build_orchestrator(
    store: str = "sqlite:///trips.db",
    *,
    services: Mapping[str, str] | None = None,
    listeners: Iterable[Listener] = (),
    **options: Any,
) -> Orchestrator:
    """An orchestrator that runs :data:`trip`; ``services`` gives the base URLs of
    ``flight``, ``hotel`` and ``car`` (default: ``SAGAWAY_SERVICE_FLIGHT`` … variables)."""
    return Orchestrator(
        store, sagas=[trip], services=dict(services or {}), listeners=listeners, **options
    )
