"""Key rotation on SQLite and PostgreSQL: ``rotate_keys`` / ``sagaway rotate-keys`` seal
every stored value again under the active key (plaintext ones too), resumably and
idempotently; afterwards the old key can go."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from protection_helpers import KEY1, KEY2

from sagaway import NonRetryableError, Orchestrator, Saga, SagaStatus
from sagaway.protection import AesGcmCodec, Sealed
from sagaway.protection.erasure import rotate_keys
from sagaway.store import open_store

K1 = AesGcmCodec({"k1": KEY1})
BOTH = AesGcmCodec({"k1": KEY1, "k2": KEY2}, active="k2")
K2_ONLY = AesGcmCodec({"k2": KEY2})


def saga() -> Saga:
    s = Saga("order")

    @s.step
    async def reserve(ctx: Any, data: Any) -> dict[str, Any]:
        return {"reserved": data["card"]}

    @reserve.compensation
    async def release(ctx: Any, data: Any, result: Any) -> None:
        return None

    @s.step(pivot=True)
    async def charge(ctx: Any, data: Any) -> str:
        if data.get("decline"):
            raise NonRetryableError(f"card {data['card']} declined")
        return "ok"

    return s


async def runs(url: str, codec: AesGcmCodec | bool, n: int) -> list[str]:
    async with Orchestrator(url, sagas=[saga()], codec=codec, poll_interval=0.05) as orch:
        ids = []
        for i in range(n):
            handle = await orch.start("order", {"card": f"4111-{i}", "decline": i % 2 == 1},
                                      key=f"key-{i}")
            await handle.wait(timeout=20)
            ids.append(handle.id)
        return sorted(ids)


async def stored_text(url: str) -> str:
    """Every payload-bearing stored text of every run, concatenated."""
    store = open_store(url)
    async with store:
        parts = []
        for run_id in await store.payload_run_ids(after=None, limit=1000):
            p = await store.load_payloads(run_id)
            assert p is not None
            parts += [p.input_json, p.input_hash, p.state_json, p.error or "",
                      *p.history.values(), *p.outbox.values()]
        return "\n".join(parts)


async def test_rotation_moves_everything_to_the_active_key(store_url: str) -> None:
    ids = await runs(store_url, K1, 4)
    text = await stored_text(store_url)
    assert "sgw1:k1:" in text and "hmac:k1:" in text and "sgw1:k2:" not in text
    store = open_store(store_url)
    async with store:
        seen: list[int] = []
        report = await rotate_keys(store, BOTH, batch=3,
                                   progress=lambda r: seen.append(r.scanned))
        assert (report.scanned, report.rewritten, report.unreadable) == (4, 4, {})
        assert seen == [3, 4] and report.last_id == ids[-1]
        again = await rotate_keys(store, BOTH)
        assert (again.scanned, again.rewritten) == (4, 0)  # idempotent
    text = await stored_text(store_url)
    assert "sgw1:k1:" not in text and "hmac:k1:" not in text and "sgw1:k2:" in text
    # The old key can go now: everything reads with k2 alone, keys still deduplicate.
    async with Orchestrator(store_url, sagas=[saga()], codec=K2_ONLY) as orch:
        for run_id in ids:
            run = await orch.get(run_id)
            assert not isinstance(run.input, Sealed)
        listed = {r.id: r for r in await orch.list()}
        assert {listed[i].input["card"] for i in ids} == {f"4111-{n}" for n in range(4)}
        failed = [r for r in listed.values() if r.status is SagaStatus.COMPENSATED]
        assert failed and all("declined" in (r.error or "") for r in failed)
        # Same key, same input: the same run (the fingerprint was re-keyed too).
        first = listed[ids[0]]
        handle = await orch.start("order", first.input, key=first.idempotency_key)
        assert handle.id == first.id and not handle.created


async def test_rotation_resumes_after_a_cursor_and_seals_plaintext(store_url: str) -> None:
    ids = await runs(store_url, False, 3)  # written before the codec was turned on
    assert "sgw1:" not in await stored_text(store_url)
    store = open_store(store_url)
    async with store:
        report = await rotate_keys(store, K1, after=ids[0])
        assert (report.scanned, report.rewritten) == (2, 2)
        first = await store.load_payloads(ids[0])
        assert first is not None and "sgw1:" not in first.input_json
        report = await rotate_keys(store, K1)
        assert (report.scanned, report.rewritten) == (3, 1)
    text = await stored_text(store_url)
    assert "4111-" not in text
    async with Orchestrator(store_url, sagas=[saga()], codec=K1) as orch:
        assert (await orch.get(ids[2])).input == {"card": "4111-2", "decline": False}


async def test_rotation_reports_runs_under_a_missing_key(store_url: str) -> None:
    ids = await runs(store_url, K1, 2)
    store = open_store(store_url)
    async with store:
        report = await rotate_keys(store, K2_ONLY)
    assert report.rewritten == 0 and set(report.unreadable) == set(ids)
    assert all("key 'k1' which is not configured" in why for why in report.unreadable.values())


def cli(*args: str, keys: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGAWAY_KEYS": keys or ""}
    env.pop("SAGAWAY_ACTIVE_KEY", None)
    return subprocess.run([sys.executable, "-m", "sagaway.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def b64(key: bytes) -> str:
    import base64

    return base64.b64encode(key).decode()


async def test_the_cli_rotates_keys(store_url: str) -> None:
    ids = await runs(store_url, K1, 3)
    both = f"k1:{b64(KEY1)},k2:{b64(KEY2)}"
    wrong = cli("rotate-keys", "--store", store_url, keys=f"k2:{b64(KEY2)}")
    assert wrong.returncode == 1 and "could not be re-encrypted" in wrong.stderr
    assert "k1" in wrong.stderr and b64(KEY2) not in wrong.stderr + wrong.stdout
    done = cli("rotate-keys", "--store", store_url, "--batch", "2", keys=both)
    assert done.returncode == 0, done.stderr
    assert "3 run(s) scanned, 3 re-encrypted with key 'k2'" in done.stdout
    assert f"resume with --after {ids[1]}" in done.stderr
    again = cli("rotate-keys", "--store", store_url, keys=both)
    assert "3 run(s) scanned, 0 re-encrypted" in again.stdout
    none = cli("rotate-keys", "--store", store_url, keys=None)
    assert none.returncode == 2 and "no keys" in none.stderr
    assert "sgw1:k1:" not in await stored_text(store_url)


def test_keygen_prints_a_usable_key() -> None:
    out = subprocess.run([sys.executable, "-m", "sagaway.cli", "keygen", "k7"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    kid, _, key = out.stdout.strip().partition(":")
    assert kid == "k7"
    assert AesGcmCodec({kid: key}).open(AesGcmCodec({kid: key}).seal(1, aad="a"), aad="a") == 1
    bad = subprocess.run([sys.executable, "-m", "sagaway.cli", "keygen", "bad:id"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
