"""Flood limits: payload size, steps per definition, starts per second per saga — each a
clear typed error, counted, and 413 / 429 with Retry-After on the admin API (a real
uvicorn server)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from admin_server import AS_OPERATOR, AS_VIEWER, TOKENS, serve

from sagaway import (
    DefinitionError,
    IdempotencyConflict,
    Orchestrator,
    PayloadTooLarge,
    RateLimited,
    Saga,
)
from sagaway.admin import create_app
from sagaway.protection import StartLimiter


def saga(name: str = "order", steps: int = 1) -> Saga:
    s = Saga(name)
    for i in range(steps):
        async def step(ctx: Any, data: Any) -> int:
            return len(str(data))

        step.__name__ = f"s{i}"
        s.step(retriable=True)(step)
    return s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket() -> None:
    clock = Clock()
    limiter = StartLimiter({"order": 2, "slow": 0.5}, clock=clock)
    assert [limiter.take("order") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("order") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.take("order") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("order") == 0.0
    assert limiter.take("other") == 0.0  # not limited
    assert limiter.take("slow") == 0.0
    assert limiter.take("slow") == pytest.approx(2.0)
    everyone = StartLimiter(1, clock=clock)
    assert everyone.take("x") == 0.0 and everyone.take("y") == 0.0 and everyone.take("x") > 0
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="start_rate"):
            StartLimiter({"order": bad})


async def test_starts_over_the_rate_are_refused_and_counted(tmp_path: Path) -> None:
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga(), saga("free")],
                            start_rate={"order": 5}) as orch:
        for _ in range(5):
            await orch.start("order", {})
        with pytest.raises(RateLimited, match="faster than its start_rate of 5/s") as info:
            await orch.start("order", {})
        assert 0 < info.value.retry_after <= 0.2 and info.value.saga == "order"
        for _ in range(20):
            await orch.start("free", {})
        assert orch.rejections["rate_limited"] == 1
        await asyncio.sleep(info.value.retry_after + 0.01)
        await orch.start("order", {})
        assert len(await orch.list(saga="order")) == 6  # the refused one wrote nothing


async def test_a_retried_start_gets_its_run_even_over_the_rate(tmp_path: Path) -> None:
    """A client retrying a start with its key (say, after a timeout) must get the run it
    already has, not a 429: asking for it starts nothing."""
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga()],
                            start_rate={"order": 1}) as orch:
        first = await orch.start("order", {"n": 1}, key="order-1")
        again = await orch.start("order", {"n": 1}, key="order-1")
        assert again.id == first.id and first.created and not again.created
        with pytest.raises(IdempotencyConflict):
            await orch.start("order", {"n": 2}, key="order-1")
        with pytest.raises(RateLimited):
            await orch.start("order", {"n": 2}, key="order-2")
        assert orch.rejections["rate_limited"] == 1
        assert len(await orch.list(saga="order")) == 1


async def test_payloads_over_the_limit_are_refused_and_counted(tmp_path: Path) -> None:
    big = Saga("big")

    @big.step(retriable=True)
    async def grow(ctx: Any, data: Any) -> str:
        return "x" * 500

    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[big],
                            max_payload_bytes=200) as orch:
        with pytest.raises(PayloadTooLarge, match="over the limit of 200 bytes"):
            await orch.start("big", {"blob": "y" * 300})
        assert orch.rejections["payload_too_large"] == 1
        assert await orch.list() == []
        run = await (await orch.start("big", {})).wait(timeout=20)
        assert "over the limit of 200 bytes" in str(run.steps)
        assert orch.rejections["payload_too_large"] == 2


def test_definitions_with_too_many_steps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="has 4 steps, over the limit of 3"):
        Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga(steps=4)], max_steps=3)
    orch = Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga(steps=3)], max_steps=3)
    with pytest.raises(DefinitionError, match="over the limit of 3"):
        orch.register(saga("long", steps=5))
    assert orch.rejections["too_many_steps"] == 1
    with pytest.raises(DefinitionError, match="over the limit of 100"):
        Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga(steps=101)])


async def test_the_admin_api_maps_limits_to_413_and_429(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    client = Orchestrator(url, sagas=[saga()], worker=False, start_rate={"order": 2},
                          max_payload_bytes=1000)
    app = create_app(client, tokens=TOKENS)
    async with Orchestrator(url, sagas=[saga()], poll_interval=0.05), client, \
            serve(app) as http:
        ok = await http.post("/api/sagas/order/runs", json={"input": {"n": 1}, "key": "a"},
                             headers=AS_OPERATOR)
        assert ok.status_code == 202, ok.text
        assert ok.json()["created"] is True
        same = await http.post("/api/sagas/order/runs", json={"input": {"n": 1}, "key": "a"},
                               headers=AS_OPERATOR)
        assert same.status_code == 202 and same.json() == {**ok.json(), "created": False}
        limited = await http.post("/api/sagas/order/runs", json={"input": {}},
                                  headers=AS_OPERATOR)
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "1"
        assert "start_rate of 2/s" in limited.json()["detail"]
        await asyncio.sleep(1.0)
        big = await http.post("/api/sagas/order/runs", json={"input": "x" * 2000},
                              headers=AS_OPERATOR)
        assert big.status_code == 413 and "over the limit" in big.json()["detail"]
        huge = await http.post("/api/sagas/order/runs", content=b"[" * 10_000_000,
                               headers={**AS_OPERATOR, "Content-Type": "application/json"})
        assert huge.status_code == 413
        async def chunks() -> Any:  # no Content-Length: streamed
            for _ in range(100):
                yield b"x" * 4096

        streamed = await http.post("/api/sagas/order/runs", content=chunks(),
                                   headers=AS_OPERATOR)
        assert streamed.status_code == 413
        assert (await http.post("/api/sagas/nope/runs", json={},
                                headers=AS_OPERATOR)).status_code == 404
        assert (await http.post("/api/sagas/order/runs", json={"input": 1},
                                headers=AS_VIEWER)).status_code == 403
        for body in (b"not json", b'{"input": 1, "extra": 2}', b'{"key": 5}', b"[]"):
            bad = await http.post("/api/sagas/order/runs", content=body, headers=AS_OPERATOR)
            assert bad.status_code == 422, body
        conflict = await http.post("/api/sagas/order/runs", json={"input": {"n": 2},
                                                                  "key": "a"},
                                   headers=AS_OPERATOR)
        assert conflict.status_code in (409, 429)
        assert client.rejections["rate_limited"] >= 1
        assert client.rejections["payload_too_large"] >= 1
