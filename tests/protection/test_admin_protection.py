"""The admin API (a real uvicorn server) with protected data: it reads encrypted runs with
the keys from SAGAWAY_KEYS (and shows only ciphertext without them), and erases finished
runs for operators."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from admin_server import AS_OPERATOR, AS_VIEWER, TOKENS, serve
from protection_helpers import KEY1, codec

from sagaway import Orchestrator, Saga
from sagaway.admin import create_app


def shop(gate: asyncio.Event) -> Saga:
    s = Saga("shop")

    @s.step(retriable=True)
    async def pay(ctx: Any, data: Any) -> dict[str, Any]:
        if data.get("wait"):
            await gate.wait()
        return {"paid_with": data["card"]}

    return s


async def test_admin_reads_with_env_keys_and_erases(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    gate = asyncio.Event()
    async with Orchestrator(url, sagas=[shop(gate)], codec=codec(),
                            poll_interval=0.05) as worker:
        done = await (await worker.start("shop", {"card": "5500-0000"})).wait(timeout=20)
        busy = await worker.start("shop", {"card": "4111", "wait": True})

        monkeypatch.delenv("SAGAWAY_KEYS", raising=False)
        async with serve(create_app(url, tokens=TOKENS)) as http:
            blind = (await http.get(f"/api/runs/{done.id}", headers=AS_VIEWER)).json()
            assert str(blind["input"]).startswith("sgw1:k1:")
            assert "5500" not in str(blind)

        monkeypatch.setenv("SAGAWAY_KEYS", f"k1:{base64.b64encode(KEY1).decode()}")
        async with serve(create_app(url, tokens=TOKENS)) as http:
            seen = (await http.get(f"/api/runs/{done.id}", headers=AS_VIEWER)).json()
            assert seen["input"] == {"card": "5500-0000"}
            assert seen["results"] == {"pay": {"paid_with": "5500-0000"}}

            path = f"/api/runs/{done.id}/erase"
            body = {"reason": "customer asked (ticket 9)"}
            assert (await http.post(path, json=body)).status_code == 401
            assert (await http.post(path, json=body, headers=AS_VIEWER)).status_code == 403
            assert (await http.post(path, json={}, headers=AS_OPERATOR)).status_code == 422
            busy_answer = await http.post(f"/api/runs/{busy.id}/erase", json=body,
                                          headers=AS_OPERATOR)
            assert busy_answer.status_code == 409
            assert "only finished runs" in busy_answer.json()["detail"]
            assert (await http.post("/api/runs/nope/erase", json=body,
                                    headers=AS_OPERATOR)).status_code == 404
            erased = await http.post(path, json=body, headers=AS_OPERATOR)
            assert erased.status_code == 200, erased.text
            detail = erased.json()
            assert detail["input"] is None and "5500" not in str(detail)
            last = detail["history"][-1]
            assert last["kind"] == "run.erased"
            assert last["data"] == {"actor": "ana", "reason": "customer asked (ticket 9)"}
        gate.set()
        await busy.wait(timeout=20)
