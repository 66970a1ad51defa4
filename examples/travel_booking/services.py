"""The flight, hotel and car services: each sells a limited number of places per item.

Run one of them::

    FLIGHT_DB=sqlite:///flight.db uvicorn --factory examples.travel_booking.services:flight_app
    HOTEL_DB=sqlite:///hotel.db   uvicorn --factory examples.travel_booking.services:hotel_app
    CAR_DB=sqlite:///car.db       uvicorn --factory examples.travel_booking.services:car_app

``POST /bookings`` takes a place (idempotent by ``Idempotency-Key``; 422 when none is left),
``DELETE /bookings/{trip_id}`` gives it back. A booking is keyed by its trip, and a
cancellation that arrives first leaves a ``cancelled`` row so the late booking is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from examples.servicedb import Sql, service_app
from sagaway.participant.fastapi import IdempotentRequest

__all__ = ["CAPACITY", "BookIn", "Booking", "car_app", "create_app", "flight_app", "hotel_app"]

CAPACITY: dict[str, dict[str, int]] = {
    "flight": {"LH400": 1000, "BA117": 1000, "SOLDOUT": 0},
    "hotel": {"Ritz": 1000, "Savoy": 1000, "SOLDOUT": 0},
    "car": {"compact": 1000, "van": 1000, "SOLDOUT": 0},
}
"""Places per item each service starts with (``SOLDOUT`` has none: a booking of it fails)."""


class BookIn(BaseModel):
    trip_id: str = Field(min_length=1, max_length=200)
    item: str
    traveler: str


class Booking(BaseModel):
    booking_id: str
    service: str
    item: str


def create_app(kind: str, db_url: str, *, capacity: dict[str, int] | None = None) -> FastAPI:
    """The ``kind`` (flight, hotel, car) service over ``db_url``."""
    seed = CAPACITY[kind] if capacity is None else capacity

    async def setup(db: Sql) -> None:
        await db.script(
            "CREATE TABLE IF NOT EXISTS places (item TEXT PRIMARY KEY, "
            "free INTEGER NOT NULL CHECK (free >= 0))",
            "CREATE TABLE IF NOT EXISTS bookings (trip_id TEXT PRIMARY KEY, item TEXT NOT NULL, "
            "traveler TEXT NOT NULL, status TEXT NOT NULL)",
        )
        for item, free in seed.items():
            await db.execute(
                "INSERT INTO places VALUES ($1, $2) ON CONFLICT DO NOTHING", item, free
            )

    app, idem = service_app(kind, db_url, setup)

    @app.post("/bookings", status_code=201)
    @idem.endpoint
    async def book(body: BookIn, req: IdempotentRequest) -> Booking:
        db = Sql(req.db)
        status = await db.fetchval("SELECT status FROM bookings WHERE trip_id = $1", body.trip_id)
        if status == "cancelled":
            raise HTTPException(422, f"trip {body.trip_id} was cancelled before this arrived")
        if status is None:
            taken = await db.execute(
                "UPDATE places SET free = free - 1 WHERE item = $1 AND free > 0", body.item
            )
            if not taken:
                known = await db.fetchval("SELECT free FROM places WHERE item = $1", body.item)
                what = "no such" if known is None else "no place left on"
                raise HTTPException(422, f"{what} {kind} {body.item!r}")
            await db.execute(
                "INSERT INTO bookings VALUES ($1, $2, $3, 'booked')",
                body.trip_id,
                body.item,
                body.traveler,
            )
        return Booking(booking_id=body.trip_id, service=kind, item=body.item)

    @app.delete("/bookings/{trip_id}")
    @idem.endpoint
    async def cancel(trip_id: str, req: IdempotentRequest) -> Any:
        db = Sql(req.db)
        row = await db.fetchrow("SELECT item, status FROM bookings WHERE trip_id = $1", trip_id)
        if row is None:
            await db.execute("INSERT INTO bookings VALUES ($1, '', '', 'cancelled')", trip_id)
            return JSONResponse({"detail": f"no {kind} booking for trip {trip_id}"}, 404)
        item, status = row
        if status == "booked":
            await db.execute("UPDATE places SET free = free + 1 WHERE item = $1", item)
            await db.execute("UPDATE bookings SET status = 'cancelled' WHERE trip_id = $1", trip_id)
        return {"trip_id": trip_id, "cancelled": status == "booked"}

    @app.get("/places")
    async def places() -> dict[str, int]:
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch("SELECT item, free FROM places ORDER BY item")
        return {item: free for item, free in rows}

    @app.get("/bookings")
    async def booked() -> dict[str, Any]:
        """The trips holding a place, and how many places each item has booked."""
        async with idem.connection() as conn:
            rows = await Sql(conn).fetch(
                "SELECT trip_id, item FROM bookings WHERE status = 'booked' ORDER BY trip_id"
            )
        per_item: dict[str, int] = {}
        for _, item in rows:
            per_item[item] = per_item.get(item, 0) + 1
        return {"trips": [r[0] for r in rows], "booked": per_item}

    return app


def _from_env(kind: str) -> FastAPI:
    capacity = os.environ.get(f"{kind.upper()}_CAPACITY")
    return create_app(
        kind,
        os.environ.get(f"{kind.upper()}_DB", f"sqlite:///{kind}.db"),
        capacity=json.loads(capacity) if capacity else None,
    )


def flight_app() -> FastAPI:
    """``FLIGHT_DB`` (default ``sqlite:///flight.db``), ``FLIGHT_CAPACITY`` (JSON)."""
    return _from_env("flight")


def hotel_app() -> FastAPI:
    """``HOTEL_DB``, ``HOTEL_CAPACITY``."""
    return _from_env("hotel")


def car_app() -> FastAPI:
    """``CAR_DB``, ``CAR_CAPACITY``."""
    return _from_env("car")
