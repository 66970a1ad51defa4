"""The travel system as processes: flight, hotel, car and the agency on free ports.

Used by ``sagaway demo travel`` and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from examples.launch import SagaFront, Service, System
from examples.travel_booking.services import CAPACITY

__all__ = ["FAILING_TRIPS", "KINDS", "Invariants", "TravelSystem"]

KINDS = {"book_flight": "flight", "book_hotel": "hotel", "rent_car": "car"}
FAILING_TRIPS: dict[str, dict[str, Any]] = {step: {kind: "SOLDOUT"} for step, kind in KINDS.items()}
"""What to change in a trip to make each step fail (``--fail-at``)."""


@dataclass
class Invariants:
    completed: set[str]
    compensated: set[str]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class TravelSystem(System):
    """Flight, hotel, car and agency services in ``workdir`` (SQLite files there unless
    ``db_urls`` names other databases)."""

    def __init__(self, workdir: Path, *, db_urls: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.capacity = {k: dict(v) for k, v in CAPACITY.items()}
        urls = {n: f"sqlite:///{self.workdir / n}.db" for n in ("flight", "hotel", "car", "trips")}
        urls.update(db_urls or {})
        self.db_urls = urls
        logs = self.workdir / "logs"
        self.kinds: dict[str, Service] = {
            kind: Service(
                kind,
                f"examples.travel_booking.services:{kind}_app",
                log_dir=logs,
                env={
                    f"{kind.upper()}_DB": urls[kind],
                    f"{kind.upper()}_CAPACITY": json.dumps(self.capacity[kind]),
                },
            )
            for kind in ("flight", "hotel", "car")
        }
        self.agency = Service(
            "agency",
            "examples.travel_booking.agency:from_env",
            log_dir=logs,
            env={
                "TRIPS_DB": urls["trips"],
                **{f"SAGAWAY_SERVICE_{k.upper()}": s.url for k, s in self.kinds.items()},
            },
        )
        self.services = [*self.kinds.values(), self.agency]
        self.client = httpx.Client(timeout=30.0)
        self.front = SagaFront(self.agency, "trips", self.client)

    def trip(self, fail_at: str | None = None, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"traveler": "ada", "flight": "LH400", "hotel": "Ritz",
                                "car": "compact"}  # fmt: skip
        if fail_at is not None:
            body.update(FAILING_TRIPS[fail_at])
        body.update(fields)
        return body

    def place(self, body: dict[str, Any], *, key: str | None = None) -> str:
        return self.front.place(body, key=key)

    def wait(self, ids: Iterable[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        return self.front.wait(ids, timeout)

    def check(self, trips: dict[str, dict[str, Any]] | None = None) -> Invariants:
        """No place created or lost, and exactly the completed trips hold bookings."""
        # Default: every trip placed through this system.
        if trips is None:
            trips = self.wait(self.front.placed)
        completed = {i for i, t in trips.items() if t["status"] == "COMPLETED"}
        compensated = {i for i, t in trips.items() if t["status"] == "COMPENSATED"}
        report = Invariants(completed, compensated)
        other = {i: t["status"] for i, t in trips.items() if i not in completed | compensated}
        if other:
            report.problems.append(f"trips neither completed nor compensated: {other}")
        for kind, service in self.kinds.items():
            free = self.client.get(service.url + "/places").json()
            booked = self.client.get(service.url + "/bookings").json()
            for item, initial in self.capacity[kind].items():
                held = booked["booked"].get(item, 0)
                if free.get(item, 0) + held != initial:
                    report.problems.append(
                        f"{kind} {item}: {free.get(item)} free + {held} booked != {initial}"
                    )
            if set(booked["trips"]) != completed:
                stray = sorted(set(booked["trips"]) - completed)
                missing = sorted(completed - set(booked["trips"]))
                report.problems.append(
                    f"{kind}: bookings of unfinished or compensated trips {stray[:5]}, "
                    f"completed trips without one {missing[:5]}"
                )
        return report
