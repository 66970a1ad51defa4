"""Erasure and retention on SQLite and PostgreSQL: a finished run's payloads go (input,
results, error texts, message payloads) and its timeline stays, with who erased it and why;
unfinished and FAILED runs are refused; retention purges old finished runs, from the API,
the CLI and a worker's periodic task."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from protection_helpers import codec, eventually, file_hits, postgres_hits

from sagaway import (
    InvalidTransition,
    NonRetryableError,
    Orchestrator,
    RunNotFound,
    Saga,
    SagaStatus,
)
from sagaway.engine.relay import REPLY_TYPE
from sagaway.messaging import Delivery, Envelope
from sagaway.messaging.memory import MemoryTransport
from sagaway.protection.erasure import ERASED, erase_run, parse_age, purge_finished


def shop(canary: str, gate: Any = None) -> Saga:
    s = Saga("shop")

    @s.step
    async def reserve(ctx: Any, data: Any) -> dict[str, Any]:
        return {"for": data["card"]}

    @reserve.compensation
    async def release(ctx: Any, data: Any, result: Any) -> None:
        return None

    s.command_step("notify", service=f"mail-{canary[-8:]}", command="notify",
                   compensation="unnotify", timeout=10)

    @s.step(pivot=True)
    async def charge(ctx: Any, data: Any) -> str:
        if gate is not None:
            await gate.wait()
        if data.get("decline"):
            raise NonRetryableError(f"card {data['card']} declined")
        return f"charged {data['card']}"

    return s


async def mail_service(transport: MemoryTransport, name: str) -> None:
    async def handle(delivery: Delivery) -> None:
        env = delivery.envelope
        await transport.publish(env.reply_to or "", Envelope(
            type=REPLY_TYPE, payload={"ok": True, "result": {"sent_to": env.payload}},
            run_id=env.run_id, step=env.step, idempotency_key=env.idempotency_key,
            correlation_id=env.correlation_id))

    await transport.subscribe(name, handle)


async def scan(store_url: str, tmp_path: Path, canary: str) -> int:
    if store_url.startswith("sqlite"):
        return sum(file_hits(tmp_path / "log", canary.encode()).values())
    return sum((await postgres_hits(store_url, canary)).values())


async def test_erase_removes_payloads_and_keeps_the_timeline(
        store_url: str, tmp_path: Path) -> None:
    canary = f"CANARY{uuid.uuid4().hex}"
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[shop(canary)], transport=transport,
                            codec=False, poll_interval=0.05) as orch:
        await mail_service(transport, f"mail-{canary[-8:]}")
        done = await orch.start("shop", {"card": canary})
        declined = await orch.start("shop", {"card": canary, "decline": True})
        assert (await done.wait(timeout=20)).status is SagaStatus.COMPLETED
        assert (await declined.wait(timeout=20)).status is SagaStatus.COMPENSATED
        before = {h.id: await orch.get(h.id) for h in (done, declined)}
        assert await scan(store_url, tmp_path, canary) > 0  # the scan sees plaintext
        for handle in (done, declined):
            erased = await orch.erase(handle.id, reason="GDPR request 42", actor="dpo")
            old = before[handle.id]
            assert erased.input is None
            assert all(v is None for v in erased.results.values())
            assert canary not in str(erased.steps) and canary not in str(erased.error)
            # The timeline: same kinds, steps, attempts and times, then run.erased.
            assert [(h.at, h.kind, h.step, h.attempt) for h in erased.history[:-1]] == [
                (h.at, h.kind, h.step, h.attempt) for h in old.history]
            assert erased.history[-1].kind == "run.erased"
            assert erased.history[-1].data == {"actor": "dpo", "reason": "GDPR request 42"}
            assert erased.status is old.status and erased.created_at == old.created_at
            assert canary not in str([h.data for h in erased.history])
            stored = await orch.store.load_payloads(handle.id)
            assert stored is not None and stored.outbox
            assert all(canary not in body for body in stored.outbox.values())
        assert ERASED in str((await orch.get(declined.id)).history)
        # Twice is a no-op: no second entry.
        assert not await erase_run(orch.store, done.id, actor="dpo", reason="again")
        assert [h.kind for h in (await orch.get(done.id)).history].count("run.erased") == 1
        # Nothing of it is left in the database: rows, pages, WAL.
        assert await scan(store_url, tmp_path, canary) == 0


async def test_erase_refuses_what_is_not_finished(store_url: str) -> None:
    import asyncio

    gate = asyncio.Event()
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[shop("x" * 8, gate)], transport=transport,
                            codec=False, poll_interval=0.05) as orch:
        await mail_service(transport, "mail-xxxxxxxx")
        running = await orch.start("shop", {"card": "4111"})
        with pytest.raises(InvalidTransition, match="it is RUNNING; only finished runs"):
            await orch.erase(running.id, reason="r", actor="a")
        with pytest.raises(RunNotFound):
            await orch.erase("nope", reason="r", actor="a")
        with pytest.raises(Exception, match="a reason is required"):
            await orch.erase(running.id, reason=" ", actor="a")
        gate.set()
        assert (await running.wait(timeout=20)).status is SagaStatus.COMPLETED
        assert (await orch.erase(running.id, reason="r", actor="a")).input is None


async def test_a_failed_run_cannot_be_erased_until_resolved(tmp_path: Path) -> None:
    s = Saga("bad")

    @s.step(pivot=True, retry=None)
    async def only(ctx: Any, data: Any) -> None:
        raise TimeoutError("unknown outcome")

    async with Orchestrator(f"sqlite:///{tmp_path}/f.db", sagas=[s], poll_interval=0.05) as orch:
        run = await (await orch.start("bad", {"card": "4111"})).wait(timeout=20)
        assert run.status is SagaStatus.FAILED
        with pytest.raises(InvalidTransition, match="it is FAILED"):
            await orch.erase(run.id, reason="r", actor="a")
        await orch.resolve(run.id, reason="refunded by hand", actor="ops")
        await eventually(lambda: orch.get(run.id), timeout=10)

        async def resolved() -> bool:
            return (await orch.get(run.id)).status is SagaStatus.RESOLVED

        await eventually(resolved)
        assert (await orch.erase(run.id, reason="r", actor="a")).input is None


async def test_erasure_works_on_encrypted_runs(store_url: str, tmp_path: Path) -> None:
    canary = f"CANARY{uuid.uuid4().hex}"
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[shop(canary)], transport=transport,
                            codec=codec(), poll_interval=0.05) as orch:
        await mail_service(transport, f"mail-{canary[-8:]}")
        run = await (await orch.start("shop", {"card": canary})).wait(timeout=20)
        assert (await orch.get(run.id)).input == {"card": canary}
        erased = await orch.erase(run.id, reason="gdpr", actor="dpo")
        assert erased.input is None and erased.history[-1].kind == "run.erased"
        stored = await orch.store.load_payloads(run.id)
        assert stored is not None and "sgw1:" not in stored.input_json + stored.state_json


async def test_purge_erases_only_old_finished_runs(store_url: str) -> None:
    import asyncio

    gate = asyncio.Event()
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[shop("y" * 8, gate)], transport=transport,
                            codec=False, poll_interval=0.05) as orch:
        await mail_service(transport, "mail-yyyyyyyy")
        gate.set()
        old = [await orch.start("shop", {"card": str(i)}) for i in range(3)]
        for h in old:
            await h.wait(timeout=20)
        gate.clear()
        active = await orch.start("shop", {"card": "active"})
        # Nothing is older than an hour yet.
        assert await purge_finished(orch.store, older_than=3600) == 0
        later = time.time() + 7200
        assert await purge_finished(orch.store, older_than=3600, now=later, batch=2) == 3
        assert await purge_finished(orch.store, older_than=3600, now=later) == 0  # idempotent
        for h in old:
            run = await orch.get(h.id)
            assert run.input is None and run.history[-1].kind == "run.erased"
            assert run.history[-1].data is not None
            assert run.history[-1].data["actor"] == "retention"
        assert (await orch.get(active.id)).input == {"card": "active"}
        gate.set()
        await active.wait(timeout=20)


async def test_a_worker_with_retention_days_purges_by_itself(tmp_path: Path) -> None:
    transport = MemoryTransport()
    url = f"sqlite:///{tmp_path}/r.db"
    async with Orchestrator(url, sagas=[shop("z" * 8)], transport=transport, codec=False,
                            poll_interval=0.05, retention_days=0,
                            retention_interval=0.05) as orch:
        await mail_service(transport, "mail-zzzzzzzz")
        run = await (await orch.start("shop", {"card": "4111"})).wait(timeout=20)

        async def erased() -> bool:
            return (await orch.get(run.id)).input is None

        await eventually(erased, timeout=10)
    with pytest.raises(ValueError, match="retention_days"):
        Orchestrator(url, retention_days=-1)


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200),
                                               ("90m", 5400), ("45s", 45), ("2w", 1209600),
                                               ("3600", 3600)])
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "-1d", "soon", "nand", "infd"])
def test_bad_ages(text: str) -> None:
    with pytest.raises(ValueError):
        parse_age(text)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sagaway.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


async def test_the_cli_erases_and_purges(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    transport = MemoryTransport()
    async with Orchestrator(url, sagas=[shop("c" * 8)], transport=transport, codec=False,
                            poll_interval=0.05) as orch:
        await mail_service(transport, "mail-cccccccc")
        runs = [await (await orch.start("shop", {"card": f"card-{i}"})).wait(timeout=20)
                for i in range(3)]
    done = cli("erase", runs[0].id, "--store", url, "--reason", "ticket 7", "--actor", "dpo")
    assert done.returncode == 0, done.stderr
    assert "erased the payloads" in done.stdout
    again = cli("erase", runs[0].id, "--store", url, "--reason", "ticket 7")
    assert again.returncode == 0 and "already erased" in again.stdout
    missing = cli("erase", "nope", "--store", url, "--reason", "x")
    assert missing.returncode == 1 and "no saga run with id 'nope'" in missing.stderr
    bad = cli("purge", "--older-than", "soon", "--store", url)
    assert bad.returncode == 2 and "not an age" in bad.stderr
    young = cli("purge", "--older-than", "1d", "--store", url)
    assert young.returncode == 0 and "of 0 run(s)" in young.stdout
    purged = cli("purge", "--older-than", "0s", "--store", url)
    assert purged.returncode == 0 and "of 2 run(s)" in purged.stdout, purged.stdout
    async with Orchestrator(url, worker=False, codec=False) as reader:
        for run in runs:
            got = await reader.get(run.id)
            assert got.input is None and got.history[-1].kind == "run.erased"
        assert (await reader.get(runs[0].id)).history[-1].data == {
            "actor": "dpo", "reason": "ticket 7"}
