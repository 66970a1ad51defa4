"""The travel example as real processes: flight, hotel and car services and the agency (which
runs the saga, the three bookings in one parallel stage) under uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest
from examples.travel_booking.saga import trip
from examples.travel_booking.system import KINDS, TravelSystem

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def travel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TravelSystem]:
    with TravelSystem(tmp_path_factory.mktemp("travel")) as system:
        yield system


@pytest.fixture(scope="module")
def trips(travel: TravelSystem) -> dict[str, dict[str, Any]]:
    ids = {
        "ok": travel.place(travel.trip()),
        "ok-2": travel.place(travel.trip(flight="BA117", hotel="Savoy", car="van")),
        **{step: travel.place(travel.trip(fail_at=step)) for step in KINDS},
        "two-fail": travel.place(travel.trip(hotel="SOLDOUT", car="SOLDOUT")),
    }
    finished = travel.wait(ids.values(), timeout=60)
    return {name: finished[i] for name, i in ids.items()}


def statuses(t: dict[str, Any]) -> dict[str, str]:
    return {name: s["status"] for name, s in t["steps"].items()}


def test_the_three_bookings_are_one_parallel_stage() -> None:
    assert [tuple(s.name for s in stage) for stage in trip.stages] == [
        ("book_flight", "book_hotel", "rent_car")
    ]


def test_a_trip_books_flight_hotel_and_car(trips: dict[str, dict[str, Any]]) -> None:
    for name in ("ok", "ok-2"):
        t = trips[name]
        assert t["status"] == "COMPLETED"
        assert statuses(t) == dict.fromkeys(KINDS, "SUCCEEDED")
        assert {r["service"] for r in t["results"].values()} == {"flight", "hotel", "car"}
    assert trips["ok-2"]["results"]["rent_car"]["item"] == "van"


def test_car_fails_so_flight_and_hotel_are_cancelled(trips: dict[str, dict[str, Any]]) -> None:
    t = trips["rent_car"]
    assert t["status"] == "COMPENSATED"
    assert "no place left on car 'SOLDOUT'" in t["error"]
    assert statuses(t) == {"book_flight": "COMPENSATED", "book_hotel": "COMPENSATED",
                           "rent_car": "FAILED"}  # fmt: skip


@pytest.mark.parametrize("step", ["book_flight", "book_hotel"])
def test_any_failure_cancels_the_others(trips: dict[str, dict[str, Any]], step: str) -> None:
    t = trips[step]
    assert t["status"] == "COMPENSATED"
    assert statuses(t) == {s: ("FAILED" if s == step else "COMPENSATED") for s in KINDS}


def test_two_failures_at_once_still_cancel_the_one_that_booked(
    trips: dict[str, dict[str, Any]],
) -> None:
    t = trips["two-fail"]
    assert t["status"] == "COMPENSATED"
    assert statuses(t) == {"book_flight": "COMPENSATED", "book_hotel": "FAILED",
                           "rent_car": "FAILED"}  # fmt: skip


def test_no_booking_is_left_without_its_trip_completing(
    travel: TravelSystem, trips: dict[str, dict[str, Any]]
) -> None:
    by_id = {t["id"]: t for t in trips.values()}
    report = travel.check(by_id)
    assert report.problems == []
    assert len(report.completed) == 2 and len(report.compensated) == 4
    # And straight from each service's own database.
    for kind in ("flight", "hotel", "car"):
        path = travel.workdir / f"{kind}.db"
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            booked = {r[0] for r in conn.execute(
                "SELECT trip_id FROM bookings WHERE status = 'booked'")}  # fmt: skip
            free = dict(conn.execute("SELECT item, free FROM places").fetchall())
        assert booked == report.completed, kind
        assert sum(travel.capacity[kind].values()) - sum(free.values()) == 2, kind
