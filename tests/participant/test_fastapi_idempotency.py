"""sagaway.participant.fastapi: each Idempotency-Key is applied once, on SQLite and PostgreSQL.

In-process (httpx over ASGI) for the rules, and real uvicorn processes sharing one database
for duplicates that arrive at two replicas at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from idem_app import STOCK, create_app

from sagaway.participant.fastapi import (
    IDEMPOTENCY_HEADER,
    REPLAYED_HEADER,
    EndpointError,
    Idempotency,
    fingerprint,
)

HERE = Path(__file__).parent


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/service.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(db_url)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        yield client


def key(k: str) -> dict[str, str]:
    return {IDEMPOTENCY_HEADER: k}


async def state(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/state")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


async def test_a_repeated_key_replays_the_recorded_response_without_running_again(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post("/take", json={"qty": 3}, headers=key("k1"))
    assert first.status_code == 201
    assert first.json() == {"left": STOCK - 3, "key": "k1"}
    assert REPLAYED_HEADER not in first.headers
    again = await client.post("/take", json={"qty": 3}, headers=key("k1"))
    assert (again.status_code, again.content) == (201, first.content)
    assert again.headers[REPLAYED_HEADER] == "true"
    assert await state(client) == {"stock": STOCK - 3, "applied": [["k1", "take"]]}
    other = await client.post("/take", json={"qty": 3}, headers=key("k2"))
    assert other.json() == {"left": STOCK - 6, "key": "k2"}


async def test_the_same_json_spelled_differently_is_the_same_request(
    client: httpx.AsyncClient,
) -> None:
    a = await client.post(
        "/take",
        content=b'{"qty": 2, "sku": "BOOK-42"}',
        headers={**key("k"), "content-type": "application/json"},
    )
    b = await client.post(
        "/take",
        content=b'{"sku":"BOOK-42","qty":2}',
        headers={**key("k"), "content-type": "application/json"},
    )
    assert (a.status_code, b.status_code) == (201, 201)
    assert b.headers[REPLAYED_HEADER] == "true"
    assert (await state(client))["stock"] == STOCK - 2


async def test_a_key_reused_with_another_body_or_path_is_422_and_runs_nothing(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.post("/take", json={"qty": 1}, headers=key("k"))).status_code == 201
    other_body = await client.post("/take", json={"qty": 5}, headers=key("k"))
    assert other_body.status_code == 422
    assert "'k' was already used for a different request" in other_body.json()["detail"]
    other_path = await client.post("/refuse", json={"qty": 1}, headers=key("k"))
    assert other_path.status_code == 422
    other_method = await client.delete("/take/x", headers=key("k"))
    assert other_method.status_code == 422
    assert await state(client) == {"stock": STOCK - 1, "applied": [["k", "take"]]}


async def test_concurrent_duplicates_apply_once_and_all_get_the_same_answer(
    client: httpx.AsyncClient,
) -> None:
    async def post() -> httpx.Response:
        return await client.post("/take", json={"qty": 1, "delay": 0.2}, headers=key("dup"))

    responses = await asyncio.gather(*(post() for _ in range(8)))
    assert {r.status_code for r in responses} == {201}
    assert {r.content for r in responses} == {
        json.dumps({"left": STOCK - 1, "key": "dup"}, separators=(",", ":")).encode()
    }
    assert sum(REPLAYED_HEADER in r.headers for r in responses) == 7
    assert await state(client) == {"stock": STOCK - 1, "applied": [["dup", "take"]]}


async def test_a_business_no_undoes_its_writes_and_is_recorded(client: httpx.AsyncClient) -> None:
    first = await client.post("/refuse", json={"qty": 4}, headers=key("no"))
    assert first.status_code == 409
    assert first.json() == {"detail": "not enough BOOK-42"}
    again = await client.post("/refuse", json={"qty": 4}, headers=key("no"))
    assert (again.status_code, again.content) == (409, first.content)
    assert again.headers[REPLAYED_HEADER] == "true"
    # The handler's writes were rolled back both times it could have run: it ran once.
    assert await state(client) == {"stock": STOCK, "applied": []}


async def test_a_crash_records_nothing_so_the_retry_runs_the_handler(
    app: FastAPI,
    client: httpx.AsyncClient,
) -> None:
    app.state.fail = 1
    crashed = await client.post("/flaky", json={"qty": 7}, headers=key("f"))
    assert crashed.status_code == 500
    assert await state(client) == {"stock": STOCK, "applied": []}
    retried = await client.post("/flaky", json={"qty": 7}, headers=key("f"))
    assert (retried.status_code, retried.json()) == (200, {"ok": True})
    assert REPLAYED_HEADER not in retried.headers
    replayed = await client.post("/flaky", json={"qty": 7}, headers=key("f"))
    assert replayed.headers[REPLAYED_HEADER] == "true"
    assert await state(client) == {"stock": STOCK - 7, "applied": [["f", "flaky"]]}


async def test_a_request_fastapi_rejects_records_nothing(client: httpx.AsyncClient) -> None:
    bad = await client.post("/take", json={"qty": "many"}, headers=key("v"))
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "qty"]
    good = await client.post("/take", json={"qty": 1}, headers=key("v"))
    assert good.status_code == 201


async def test_a_missing_or_oversized_key_is_400(client: httpx.AsyncClient) -> None:
    missing = await client.post("/take", json={"qty": 1})
    assert missing.status_code == 400
    assert "POST /take is idempotent: send an Idempotency-Key header" in missing.json()["detail"]
    long = await client.post("/take", json={"qty": 1}, headers=key("x" * 256))
    assert long.status_code == 400
    assert "1 to 255 characters" in long.json()["detail"]
    assert await state(client) == {"stock": STOCK, "applied": []}


async def test_path_parameters_and_the_openapi_schema_are_the_endpoints_own(
    client: httpx.AsyncClient,
    app: FastAPI,
) -> None:
    r = await client.delete("/take/abc", headers=key("d"))
    assert r.json() == {"deleted": "abc"}
    spec = app.openapi()
    params = [p["name"] for p in spec["paths"]["/take/{name}"]["delete"]["parameters"]]
    assert params == ["name"]
    take = spec["paths"]["/take"]["post"]
    assert [p["name"] for p in take["parameters"]] == ["x-stall"]
    assert "requestBody" in take


async def test_purge_forgets_old_keys_only(app: FastAPI, client: httpx.AsyncClient) -> None:
    idem: Idempotency = app.state.idem
    assert (await client.post("/take", json={"qty": 1}, headers=key("old"))).status_code == 201
    assert await idem.purge(3600) == 0
    await asyncio.sleep(0.05)
    assert await idem.purge(0.01) == 1
    assert await idem.purge(0) == 0
    # Forgotten: the same key now runs again.
    again = await client.post("/take", json={"qty": 1}, headers=key("old"))
    assert REPLAYED_HEADER not in again.headers
    assert (await state(client))["stock"] == STOCK - 2
    with pytest.raises(ValueError, match="older_than"):
        await idem.purge(-1)


def test_a_sync_endpoint_is_refused(tmp_path: Path) -> None:
    idem = Idempotency(f"sqlite:///{tmp_path}/x.db")

    def handler() -> dict[str, int]:
        return {}

    with pytest.raises(EndpointError, match="needs an `async def` endpoint"):
        idem.endpoint(handler)


def test_the_fingerprint_ignores_json_spelling_and_query_order() -> None:
    a = fingerprint("post", "/p", "a=1&b=2", b'{"x": 1, "y": [1, 2]}')
    assert a == fingerprint("POST", "/p", "b=2&a=1", b'{"y":[1,2],"x":1}')
    assert a != fingerprint("POST", "/p", "a=1&b=2", b'{"x": 2, "y": [1, 2]}')
    assert a != fingerprint("POST", "/q", "a=1&b=2", b'{"x": 1, "y": [1, 2]}')
    assert fingerprint("POST", "/p", "", b"\xff") != fingerprint("POST", "/p", "", b"\xfe")


# -- two replicas (real uvicorn processes) sharing one database -----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def replicas(db_url: str) -> Iterator[list[str]]:
    env = {
        **os.environ,
        "IDEM_DB": db_url,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    procs, urls = [], []
    try:
        # One after the other: the app creates its business tables at startup, and two
        # concurrent CREATE TABLE IF NOT EXISTS can collide on PostgreSQL's catalog.
        for _ in range(2):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "--factory",
                        "idem_app:from_env",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                    cwd=HERE,
                )
            )
            url, proc = f"http://127.0.0.1:{port}", procs[-1]
            urls.append(url)
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, f"the service at {url} exited"
                try:
                    if httpx.get(url + "/state", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"the service at {url} did not start"
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.mark.e2e
async def test_duplicates_sent_to_two_replicas_at_once_apply_once(replicas: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(5):
            k = f"rep-{n}"
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{replicas[i % 2]}/take", json={"qty": 1, "delay": 0.1}, headers=key(k)
                    )
                    for i in range(6)
                )
            )
            assert {r.status_code for r in responses} == {201}
            assert len({r.content for r in responses}) == 1
        final = (await client.get(replicas[0] + "/state")).json()
    assert final["stock"] == STOCK - 5
    assert final["applied"] == [[f"rep-{n}", "take"] for n in range(5)]


@pytest.mark.e2e
def test_a_service_killed_inside_a_handler_keeps_neither_the_change_nor_the_key(
    tmp_path: Path,
) -> None:
    """SIGKILL while the handler's write is done but not committed: after a restart the
    write is gone and the key unrecorded, so the retry with the same key applies it once."""
    db = f"sqlite:///{tmp_path}/service.db"
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "IDEM_DB": db, "PYTHONPATH": path}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "idem_app:from_env", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env, cwd=HERE)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the service exited"
            try:
                if httpx.get(url + "/state", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)

    proc = start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            # The handler writes, then stalls 30 s inside the transaction.
            httpx.post(url + "/take", json={"qty": 5}, headers={**key("kill"), "X-Stall": "30"},
                       timeout=1.5)  # fmt: skip
        proc.kill()
        proc.wait(10)
        proc = start()
        assert httpx.get(url + "/state").json() == {"stock": STOCK, "applied": []}
        retried = httpx.post(url + "/take", json={"qty": 5}, headers=key("kill"), timeout=10)
        assert retried.status_code == 201 and REPLAYED_HEADER not in retried.headers
        again = httpx.post(url + "/take", json={"qty": 5}, headers=key("kill"), timeout=10)
        assert (again.content, again.headers[REPLAYED_HEADER]) == (retried.content, "true")
        assert httpx.get(url + "/state").json() == {"stock": STOCK - 5,
                                                     "applied": [["kill", "take"]]}  # fmt: skip
    finally:
        proc.kill()
        proc.wait(10)
