"""Reading runs: the detail view, pagination, filters, masking, hostile filters, errors."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from admin_helpers import AUTH, LEAKY_INPUT, SECRET_VALUES, Env, make_run, orphan_saga

from sagaway import Orchestrator, StoreError

OP = AUTH["operator"]
VIEW = AUTH["viewer"]
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class FixedClock:
    """A settable clock, so runs can start at chosen (and equal) times."""

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


async def start_at(env: Env, times: list[float]) -> list[str]:
    """Orphan runs (PENDING for good) started at the given times, via a client."""
    clock = FixedClock(T0)
    ids = []
    async with Orchestrator(env.url, sagas=[orphan_saga()], worker=False,
                            clock=clock) as client:
        for t in times:
            clock.t = t
            ids.append((await client.start("orphan", {"at": t})).id)
    return ids


async def page_ids(env: Env, query: str) -> list[str]:
    response = await env.http.get(f"/api/runs?{query}", headers=VIEW)
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["runs"]]


async def test_a_run_in_detail(env: Env) -> None:
    failed = await make_run(env.worker, "failed")
    response = await env.http.get(f"/api/runs/{failed.id}", headers=VIEW)
    assert response.status_code == 200
    run = response.json()
    assert (run["status"], run["saga"], run["version"]) == ("FAILED", "shop", 1)
    assert run["allowed_actions"] == ["retry", "compensate", "resolve"]
    assert run["duration_ms"] > 0 and run["stuck"] is False
    assert run["input"] == {"decline": True, "release_ok": False}
    assert [h["kind"] for h in run["history"]] == [h.kind for h in failed.history]
    offsets = [h["offset_ms"] for h in run["history"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert run["history"][0]["time"].endswith("Z")

    steps = {s["name"]: s for s in run["steps"]}
    assert list(steps) == ["reserve", "charge", "confirm"]
    assert [s["kind"] for s in steps.values()] == ["compensatable", "compensatable", "pivot"]
    reserve, charge, confirm = steps["reserve"], steps["charge"], steps["confirm"]
    assert (reserve["attempts"], reserve["compensation_attempts"]) == (1, 2)
    assert reserve["last_error"] == "RuntimeError: inventory service down"
    assert [(a["phase"], a["attempt"], a["outcome"]) for a in reserve["timeline"]] == [
        ("action", 1, "succeeded"), ("compensation", 1, "failed"),
        ("compensation", 2, "failed")]
    for attempt in reserve["timeline"]:
        assert attempt["duration_ms"] == pytest.approx(
            (attempt["ended_at"] - attempt["started_at"]) * 1000, abs=0.01)
    assert reserve["compensation_ms"] > 0
    assert reserve["idempotency_keys"] == {"action": f"{failed.id}:reserve:action",
                                           "compensation": f"{failed.id}:reserve:compensation"}
    assert charge["last_error"] == "NonRetryableError: card declined"
    assert confirm["attempts"] == 0 and confirm["timeline"] == []
    assert confirm["idempotency_keys"]["compensation"] is None  # a pivot has none


async def test_without_definitions_step_kinds_are_unknown(env: Env) -> None:
    from sagaway.admin import create_app

    done = await make_run(env.worker, "completed")
    app = create_app(env.worker, tokens=None)  # a worker passed in: its definitions count
    bare = create_app(env.url, tokens=None)
    try:
        for target, kind in ((app, "compensatable"), (bare, "unknown")):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=target),
                                         base_url="http://a") as http:
                steps = (await http.get(f"/api/runs/{done.id}")).json()["steps"]
            assert steps[0]["kind"] == kind
            assert steps[0]["idempotency_keys"]["action"] == f"{done.id}:reserve:action"
    finally:
        await bare.state.sagaway.aclose()


async def test_pagination_through_250_runs_with_equal_start_times(env: Env) -> None:
    # Groups of 10 runs share a start time, so the cursor's id tie-break is exercised.
    ids = await start_at(env, [T0 + i // 10 for i in range(250)])
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=37" + (f"&cursor={cursor}" if cursor else "")
        response = await env.http.get(f"/api/runs?{query}", headers=VIEW)
        assert response.status_code == 200
        page = response.json()
        seen += page["runs"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            assert len(page["runs"]) <= 37
            break
        assert len(page["runs"]) == 37
    assert pages == 7  # 6 full pages and 28 on the last: no empty trailing page
    got = [r["id"] for r in seen]
    assert len(got) == len(set(got)) == 250 and set(got) == set(ids)
    keys = [(r["created_at"], r["id"]) for r in seen]
    assert keys == sorted(keys, reverse=True)

    exact = await env.http.get("/api/runs?limit=250", headers=VIEW)
    assert len(exact.json()["runs"]) == 250 and exact.json()["next_cursor"] is None
    assert len((await env.http.get("/api/runs?limit=500", headers=VIEW)).json()["runs"]) == 250
    for bad in ("0", "501", "-1", "x"):
        assert (await env.http.get(f"/api/runs?limit={bad}", headers=VIEW)).status_code == 422
    for bad in ("zzz", "e30", base64.urlsafe_b64encode(b'["a", 1]').decode()):
        tampered = await env.http.get(f"/api/runs?cursor={bad}", headers=VIEW)
        assert tampered.status_code == 400 and "cursor" in tampered.json()["detail"]


async def test_filters(env: Env) -> None:
    old = await start_at(env, [T0, T0 + 60, T0 + 120, T0 + 180])
    completed = await make_run(env.worker, "completed")
    failed = await make_run(env.worker, "failed")
    parked = await make_run(env.worker, "parked")

    assert await page_ids(env, "saga=shop") == [failed.id, completed.id]
    assert await page_ids(env, "saga=nope") == []
    assert await page_ids(env, "status=FAILED") == [failed.id]
    assert await page_ids(env, "status=failed,completed") == [failed.id, completed.id]
    assert await page_ids(env, "status=RUNNING&status=completed") == [parked.id, completed.id]
    assert await page_ids(env, "status=PENDING&saga=orphan") == old[::-1]
    iso = datetime.fromtimestamp(T0 + 60, UTC).isoformat().replace("+00:00", "Z")
    assert await page_ids(env, f"started_from={iso}&started_to={T0 + 180}") == [old[2], old[1]]
    assert await page_ids(env, "started_from=2023-11-14T22:15:20") == [  # no zone: UTC
        parked.id, failed.id, completed.id, old[3], old[2]]
    # Stuck: active with no transition for stuck_after (300 s): the old PENDING runs only.
    assert await page_ids(env, "stuck=true") == old[::-1]
    assert await page_ids(env, "stuck=true&status=FAILED") == []
    assert await page_ids(env, "stuck=true&status=PENDING&saga=shop") == []
    listed = (await env.http.get("/api/runs?stuck=true&limit=1", headers=VIEW)).json()
    assert listed["runs"][0]["stuck"] is True and listed["next_cursor"]
    for bad in ("started_from=yesterday", "started_to=nan", "status=DONE", "stuck=maybe"):
        response = await env.http.get(f"/api/runs?{bad}", headers=VIEW)
        assert response.status_code == 422, bad
        assert isinstance(response.json()["detail"], str)

    counts = (await env.http.get("/api/runs/counts", headers=VIEW)).json()
    assert counts["total"] == 7
    assert counts["counts"] == {"PENDING": 4, "RUNNING": 1, "COMPENSATING": 0,
                                "COMPLETED": 1, "COMPENSATED": 0, "FAILED": 1, "RESOLVED": 0}
    shop = (await env.http.get("/api/runs/counts?saga=shop", headers=VIEW)).json()
    assert shop["total"] == 2


async def test_sensitive_fields_are_masked_everywhere(env: Env) -> None:
    run = await (await env.worker.start("leaky", LEAKY_INPUT)).wait(timeout=10)
    assert run.error and "hunter2-secret" in run.error  # the store keeps the truth
    detail = await env.http.get(f"/api/runs/{run.id}", headers=VIEW)
    listing = await env.http.get("/api/runs", headers=VIEW)
    for response in (detail, listing):
        assert response.status_code == 200
        for secret in SECRET_VALUES:
            assert secret not in response.text, secret
    body = detail.json()
    assert body["input"] == {"customer": "c-7", "password": "***", "dob": "***",
                             "payment": {"card_number": "***", "cvv": "***",
                                         "note": "card ***"}}
    assert body["results"] == {"tokenize": {"token": "***", "iban": "***", "ok": True}}
    assert "card *** declined, password=***" in body["error"]
    pay = next(s for s in body["steps"] if s["name"] == "pay")
    assert pay["last_error"] == body["steps"][1]["timeline"][0]["error"]
    assert "***" in pay["last_error"]
    failed = next(h for h in body["history"] if h["kind"] == "step.failed")
    assert "card *** declined" in failed["data"]["error"]


INJECTIONS = ["' OR 1=1 --", "x'; DROP TABLE sagaway_runs; --", "\" OR \"\"=\"",
              "shop' UNION SELECT * FROM sagaway_runs --", "%' OR '%'='", "1) OR (1=1"]


@pytest.mark.parametrize("payload", INJECTIONS)
async def test_hostile_filters_return_no_extra_rows_and_no_sql(env: Env, payload: str) -> None:
    await make_run(env.worker, "completed")
    await make_run(env.worker, "failed")
    forged = base64.urlsafe_b64encode(json.dumps([0, payload]).encode()).decode()
    attempts = [
        ("/api/runs", {"saga": payload}, [200], 0),
        ("/api/runs", {"status": payload}, [422], None),
        ("/api/runs", {"started_from": payload}, [422], None),
        ("/api/runs", {"started_to": payload}, [422], None),
        ("/api/runs", {"cursor": payload}, [400], None),
        ("/api/runs", {"cursor": forged}, [200], 0),
        ("/api/runs", {"stuck": payload}, [422], None),
        ("/api/runs", {"limit": payload}, [422], None),
        ("/api/runs/counts", {"saga": payload}, [200], None),
        (f"/api/runs/{payload}", {}, [404], None),
    ]
    for path, params, statuses, rows in attempts:
        response = await env.http.get(path, params=params, headers=VIEW)
        assert response.status_code in statuses, (path, params, response.text)
        for leak in ("sqlite", "SQL", "syntax", "OperationalError", "near \"", "Traceback"):
            assert leak not in response.text, (path, params, response.text)
        if rows is not None:
            assert len(response.json()["runs"]) == rows
        if path.endswith("counts"):
            assert response.json()["total"] == 0
    still = (await env.http.get("/api/runs/counts", headers=VIEW)).json()
    assert still["total"] == 2


async def test_store_errors_are_503_without_driver_text(env: Env,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    orch = await env.admin.orch()

    async def broken(*args: object, **kwargs: object) -> None:
        raise StoreError('SQLite error on /srv/sagas.db: near "OR": syntax error')

    monkeypatch.setattr(orch, "list", broken)
    for path in ("/api/runs", "/healthz"):
        response = await env.http.get(path, headers=VIEW)
        assert response.status_code == 503
        assert response.json() == {
            "detail": "the saga store is unavailable; see the admin server's log"}

    async def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("internal detail that must not leak")

    monkeypatch.setattr(orch, "counts", crash)
    transport = httpx.ASGITransport(app=env.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
        response = await http.get("/api/runs/counts", headers=VIEW)
    assert response.status_code == 500
    assert "must not leak" not in response.text


async def test_openapi_describes_every_endpoint(env: Env) -> None:
    spec = (await env.http.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/api/runs", "/api/runs/counts", "/api/runs/{run_id}", "/api/whoami", "/healthz",
        *(f"/api/runs/{{run_id}}/{a}" for a in ("retry", "resume", "compensate", "resolve")),
    }
    retry = spec["paths"]["/api/runs/{run_id}/retry"]["post"]
    assert {"202", "401", "403", "404", "409", "422"} <= set(retry["responses"])
    assert retry["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    params = {p["name"] for p in spec["paths"]["/api/runs"]["get"]["parameters"]}
    assert params == {"saga", "status", "started_from", "started_to", "stuck", "limit",
                      "cursor"}


async def test_control_characters_are_a_client_error_not_a_store_error(env: Env) -> None:
    forged = base64.urlsafe_b64encode(json.dumps([0, "a\x00b"]).encode()).decode()
    for path, params, status in [("/api/runs", {"saga": "a\x00b"}, 422),
                                 ("/api/runs/counts", {"saga": "a\nb"}, 422),
                                 ("/api/runs/a%00b", {}, 422),
                                 ("/api/runs", {"cursor": forged}, 400)]:
        response = await env.http.get(path, params=params, headers=VIEW)
        assert response.status_code == status, (path, response.text)
