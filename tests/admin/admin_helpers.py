"""What the admin tests share: tokens, small sagas, runs in each state, and real servers in
background threads (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from sagaway import (
    NonRetryableError,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaRun,
    SagaStatus,
    StepContext,
)
from sagaway.admin import Role, Token
from sagaway.admin.api import AdminState

T = TypeVar("T")

OPERATOR_SECRET = "op-secret-0123456789abcdef"
VIEWER_SECRET = "view-secret-0123456789abcdef"
TOKENS = [Token("ana", Role.OPERATOR, OPERATOR_SECRET), Token("vic", Role.VIEWER, VIEWER_SECRET)]
AUTH = {
    "none": {},
    "bad": {"Authorization": "Bearer not-a-real-token-0123456789"},
    "viewer": {"Authorization": f"Bearer {VIEWER_SECRET}"},
    "operator": {"Authorization": f"Bearer {OPERATOR_SECRET}"},
}
FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01)
CARD = "4111111111111111"


@dataclass
class Faults:
    """Switches the test sagas read at call time, so a fault can be fixed mid-test."""

    release_broken: bool = True
    calls: list[tuple[str, int]] = field(default_factory=list)


def sagas(faults: Faults) -> list[Saga]:
    """The test sagas.

    ``shop``: reserve → charge (declines on ``{"decline": true}``) → confirm (pivot); the
    release fails while ``faults.release_broken`` unless ``{"release_ok": true}``.
    ``parked``: its step waits an hour between attempts. ``leaky``: puts secrets in results
    and errors.
    """
    shop = Saga("shop")

    @shop.step(retry=FAST)
    async def reserve(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        faults.calls.append(("reserve", ctx.attempt))
        return {"reservation": "r-1"}

    @reserve.compensation(retry=FAST)
    async def release(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        faults.calls.append(("release", ctx.attempt))
        if faults.release_broken and not data.get("release_ok"):
            raise RuntimeError("inventory service down")

    @shop.step(retry=FAST)
    async def charge(ctx: StepContext, data: dict[str, Any]) -> None:
        if data.get("decline"):
            raise NonRetryableError("card declined")

    @charge.compensation
    async def refund(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        pass

    @shop.step(pivot=True)
    async def confirm(ctx: StepContext, data: dict[str, Any]) -> None:
        return None

    parked = Saga("parked")

    @parked.step(retry=RetryPolicy(max_attempts=3, initial_backoff=3600, max_backoff=3600))
    async def flaky(ctx: StepContext, data: Any) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("try again later")
        return f"done on attempt {ctx.attempt}"

    @flaky.compensation
    async def undo(ctx: StepContext, data: Any, result: Any) -> None:
        pass

    leaky = Saga("leaky")

    @leaky.step
    async def tokenize(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        return {"token": "tok_live_7f3a9c2e", "iban": "DE89370400440532013000", "ok": True}

    @tokenize.compensation
    async def forget(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        pass

    @leaky.step
    async def pay(ctx: StepContext, data: dict[str, Any]) -> None:
        raise NonRetryableError(f"gateway said: card {data['payment']['card_number']} "
                                f"declined, password=hunter2-secret")

    @pay.compensation
    async def void(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        pass

    return [shop, parked, leaky]


def orphan_saga() -> Saga:
    """Registered by clients only: its runs stay PENDING (no worker claims them)."""
    orphan = Saga("orphan")

    @orphan.step
    async def nothing(ctx: StepContext, data: Any) -> None:
        return None

    @nothing.compensation
    async def nothing_back(ctx: StepContext, data: Any, result: Any) -> None:
        pass

    return orphan


LEAKY_INPUT = {"customer": "c-7", "payment": {"card_number": CARD, "cvv": "123",
                                               "note": f"card {CARD}"},
               "password": "hunter2-secret", "dob": "1990-01-01"}
SECRET_VALUES = [CARD, "hunter2-secret", "tok_live_7f3a9c2e", "DE89370400440532013000",
                 "1990-01-01"]


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the condition lives in the store
            await asyncio.sleep(0.02)


async def make_run(worker: Orchestrator, state: str) -> SagaRun:
    """A run in ``state``: completed, failed, compensated, parked (RUNNING, waiting an hour
    for its retry) — driven by ``worker``."""
    if state == "parked":
        handle = await worker.start("parked", {})

        async def waiting() -> bool:
            run = await worker.get(handle.id)
            return any(h.kind == "step.retry_scheduled" for h in run.history)

        await eventually(waiting)
        return await worker.get(handle.id)
    data = {"decline": state in ("failed", "compensated"), "release_ok": state == "compensated"}
    run = await (await worker.start("shop", data)).wait(timeout=10)
    expected = {"completed": SagaStatus.COMPLETED, "failed": SagaStatus.FAILED,
                "compensated": SagaStatus.COMPENSATED}[state]
    assert run.status is expected, (state, run.status, run.error)
    return run


@dataclass
class Env:
    """The fast path's world: a worker, the admin app and an httpx client on it."""

    url: str
    worker: Orchestrator
    admin: AdminState
    app: FastAPI
    http: httpx.AsyncClient
    faults: Faults


class ThreadLoop:
    """An event loop in a background thread, for sync tests that need async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ThreadWorker(ThreadLoop):
    """A worker orchestrator driving the test sagas in a background thread."""

    def __init__(self, url: str, faults: Faults) -> None:
        super().__init__()

        async def open_() -> Orchestrator:
            orch = Orchestrator(url, sagas=sagas(faults), poll_interval=0.05)
            await orch.open()
            return orch

        self.orch = self.call(open_())

    def run(self, state: str) -> SagaRun:
        return self.call(make_run(self.orch, state))

    def wait(self, run_id: str) -> SagaRun:
        return self.call(self.orch.wait(run_id, timeout=15))

    def close(self) -> None:
        self.call(self.orch.aclose())
        super().close()


class ThreadServer:
    """A real uvicorn server on 127.0.0.1, on a port the OS picked, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, ws="none", lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn exited at startup"
            time.sleep(0.01)
        self._sock = sock

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
