"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A real uvicorn server runs the admin app over a SQLite store holding completed, compensated,
failed and running runs, made by a real worker orchestrator in a background thread. The
browser signs in with a token, filters the list to FAILED, opens the failed run, retries it
with a reason once the broken compensation is fixed, and sees it end COMPENSATED. It saves
``runs.png`` and ``run.png`` (1280x800) on the way: into the test's temporary folder, or into
``docs/screenshots/`` (the README's pictures) with ``SAGAWAY_UPDATE_SCREENSHOTS=1``.

Needs ``playwright`` (the dev extra) and ``/usr/bin/chromium`` (``apt-get install chromium``;
``.ci/run`` installs it). Playwright's own browser downloads are never used. Without them the
test skips with a message; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sagaway import NonRetryableError, Orchestrator, RetryPolicy, Saga, SagaStatus, StepContext

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}
SECRET = "dashboard-operator-0123456789"
TIMEOUT_MS = 20_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the dashboard browser test needs {reason} under CI=true", pytrace=False)
    pytest.skip(f"{reason} is missing; install it to run the dashboard browser test")


# -- the sagas the runs come from --------------------------------------------------------


@dataclass
class Faults:
    """Read by the sagas at call time, so the test can fix a fault mid-run."""

    release_broken: bool = True
    calls: list[tuple[str, int]] = field(default_factory=list)


def shop_sagas(faults: Faults) -> list[Saga]:
    """``place_order``: reserve → authorize → charge (the pivot) → ship; ``sync_contact``:
    a step that waits an hour before its second attempt (a run left RUNNING)."""
    order = Saga("place_order", version=2)
    quick = RetryPolicy(max_attempts=3, initial_backoff=0.08, jitter=False)

    @order.step(retry=quick)
    async def reserve_inventory(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        faults.calls.append(("reserve_inventory", ctx.attempt))
        await asyncio.sleep(0.12)
        if ctx.attempt <= data.get("flaky", 0):
            raise RuntimeError("inventory service: 503 Service Unavailable")
        return {"reservation_id": f"r-{data['order_id']}"}

    @reserve_inventory.compensation(retry=RetryPolicy(max_attempts=2, initial_backoff=0.08,
                                                      jitter=False))
    async def release_inventory(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        faults.calls.append(("release_inventory", ctx.attempt))
        await asyncio.sleep(0.08)
        if faults.release_broken and not data.get("release_ok"):
            raise RuntimeError("inventory service down: connection refused")

    @order.step(retry=quick)
    async def authorize_card(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        await asyncio.sleep(0.1)
        return {"authorization": "auth-7f3a"}

    @authorize_card.compensation
    async def void_authorization(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        await asyncio.sleep(0.07)

    @order.step(pivot=True)
    async def charge_payment(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        await asyncio.sleep(0.15)
        if data.get("decline"):
            raise NonRetryableError("card declined: insufficient funds")
        return {"charge_id": "ch_3PZx"}

    @order.step
    async def arrange_shipping(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        await asyncio.sleep(0.1)
        return {"tracking": "1Z999AA10123456784"}

    contact = Saga("sync_contact")

    @contact.step(retry=RetryPolicy(max_attempts=3, initial_backoff=3600, max_backoff=3600))
    async def push_to_crm(ctx: StepContext, data: dict[str, Any]) -> None:
        await asyncio.sleep(0.02)
        raise RuntimeError("CRM rate limit exceeded (429)")

    @push_to_crm.compensation
    async def delete_from_crm(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        pass

    return [order, contact]


# -- servers in background threads ----------------------------------------------------------


class LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits."""

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


class Worker(LoopThread):
    """A worker orchestrator: makes the runs, and carries out the operator's retry."""

    def __init__(self, url: str, faults: Faults) -> None:
        super().__init__()
        self.orch = Orchestrator(url, sagas=shop_sagas(faults), poll_interval=0.05)
        self.call(self.orch.open())

    def finished(self, saga: str, data: dict[str, Any], expected: SagaStatus) -> str:
        return self.all_finished(saga, [data], expected)[0]

    def all_finished(self, saga: str, inputs: list[dict[str, Any]], expected: SagaStatus
                     ) -> list[str]:
        """Start runs (concurrently, in order) and wait until each has ended as expected."""

        async def go() -> list[str]:
            handles = [await self.orch.start(saga, data) for data in inputs]
            runs = [await h.wait(timeout=15) for h in handles]
            for data, run in zip(inputs, runs, strict=True):
                assert run.status is expected, (data, run.status, run.error)
            return [run.id for run in runs]

        return self.call(go())

    def parked(self) -> str:
        async def go() -> str:
            handle = await self.orch.start("sync_contact", {"contact_id": 5521})
            deadline = time.monotonic() + 15
            while not any(h.kind == "step.retry_scheduled" for h in (await handle.get()).history):
                assert time.monotonic() < deadline, "the parked run never scheduled its retry"
                await asyncio.sleep(0.02)
            return handle.id

        return self.call(go())

    def close(self) -> None:
        self.call(self.orch.aclose())
        super().close()


class Server:
    """uvicorn serving the admin app on 127.0.0.1, on a port the OS picked."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, ws="none", lifespan="on",
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited at startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@dataclass
class Shop:
    url: str
    faults: Faults
    failed_id: str
    worker: Worker


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    try:
        from sagaway.admin import Role, Token, create_app
        create_app  # noqa: B018 - resolves the lazy import: FastAPI must be installed
    except ImportError as exc:
        _unavailable(f"the admin API ({exc})")
    store = f"sqlite:///{tmp_path}/dashboard.db"
    faults = Faults()
    worker = Worker(store, faults)
    server = None
    try:
        worker.all_finished("place_order", [
            {"order_id": 1040, "customer": "c-311"},
            {"order_id": 1041, "customer": "c-207", "flaky": 1},
        ], SagaStatus.COMPLETED)
        worker.finished("place_order", {"order_id": 1042, "decline": True, "release_ok": True},
                        SagaStatus.COMPENSATED)
        failed_id = worker.finished(
            "place_order",
            {"order_id": 1043, "customer": "c-118", "flaky": 1, "decline": True,
             "items": [{"sku": "KB-87", "qty": 1}, {"sku": "MS-12", "qty": 2}]},
            SagaStatus.FAILED)
        worker.finished("place_order", {"order_id": 1044, "customer": "c-502"},
                        SagaStatus.COMPLETED)
        worker.parked()
        worker.all_finished("place_order", [
            {"order_id": 1045 + n, "customer": f"c-6{n}"} for n in range(4)
        ], SagaStatus.COMPLETED)
        app = create_app(store, tokens=[Token("ana", Role.OPERATOR, SECRET)],
                         sagas=shop_sagas(Faults()))
        server = Server(app)
        yield Shop(server.url, faults, failed_id, worker)
    finally:
        if server is not None:
            server.close()
        worker.close()


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT, device_scale_factor=1,
            timezone_id="UTC", locale="en-US",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # The browser logs every 4xx response (the 401 before signing in is expected);
            # what matters is the page's own errors.
            page.on("console", lambda msg: errors.append(msg.text)
                    if msg.type == "error" and "status of 4" not in msg.text else None)
            yield page
            assert errors == [], f"the dashboard logged errors: {errors}"
        finally:
            context.close()


def test_filter_open_and_retry_a_failed_run(shop: Shop, browser_page: Any,
                                            tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    shots = (DOCS_SCREENSHOTS if os.environ.get("SAGAWAY_UPDATE_SCREENSHOTS") == "1"
             else tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    # The API wants a token: the dashboard asks for one, then lists the runs.
    page.goto(f"{shop.url}/#/runs")
    page.fill("#token", SECRET)
    page.click("form.login button[type=submit]")
    rows = page.locator("tr.run-row")
    expect(rows).to_have_count(10)
    expect(page.locator(".who")).to_contain_text("ana")
    expect(page.locator(".chip[data-status=FAILED] .count")).to_have_text("1")
    expect(page.locator(".chip[data-status=COMPLETED] .count")).to_have_text("7")
    expect(page.locator(".chip[data-status=COMPENSATED] .count")).to_have_text("1")
    expect(page.locator(".chip[data-status=RUNNING] .count")).to_have_text("1")
    page.mouse.move(0, 0)
    page.screenshot(path=str(shots / "runs.png"))

    # Filter to FAILED: one run, in the URL too.
    page.click(".chip[data-status=FAILED]")
    expect(page).to_have_url(f"{shop.url}/#/runs?status=FAILED")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-status", "FAILED")
    expect(rows.first).to_contain_text("inventory service down")

    # Open it: the header, the error, the timeline with its pivot and lanes.
    rows.first.locator("a").click()
    expect(page).to_have_url(f"{shop.url}/#/runs/{shop.failed_id}")
    expect(page.locator(".run-head .pill")).to_have_text("Failed")
    expect(page.locator("#run-id")).to_have_text(shop.failed_id)
    expect(page.locator(".banner.err")).to_contain_text("inventory service down")
    expect(page.locator(".tl-step.is-pivot")).to_contain_text("charge_payment")
    reserve = page.locator(".tl-lanes[data-step=reserve_inventory]")
    expect(reserve.locator(".lane.fwd .bar")).to_have_count(2)  # a failed try, then success
    expect(reserve.locator(".lane.fwd .wait")).to_have_count(1)  # the backoff between them
    expect(reserve.locator(".lane.comp .bar.o-failed")).to_have_count(2)

    # Hover shows an attempt; a click pins it with the error and idempotency key.
    reserve.locator(".lane.comp .bar").first.click()
    tip = page.locator("#tooltip")
    expect(tip).to_be_visible()
    expect(tip).to_contain_text("Compensation · attempt 1")
    expect(tip).to_contain_text("inventory service down")
    expect(tip).to_contain_text(f"{shop.failed_id}:reserve_inventory:compensation")
    page.keyboard.press("Escape")
    expect(tip).to_be_hidden()

    # Only the actions a FAILED run allows; a reason is required.
    retry = page.locator("button[data-action=retry]")
    expect(retry).to_be_enabled()
    expect(page.locator("button[data-action=resolve]")).to_be_enabled()
    expect(page.locator("button[data-action=resume]")).to_be_disabled()
    retry.click()
    expect(page.locator("#action-msg")).to_contain_text("reason")

    # The inventory service is back: retry with a reason; a worker carries it out.
    shop.faults.release_broken = False
    page.fill("#reason", "inventory service is back (INC-4211)")
    retry.click()
    expect(page.locator("#action-msg")).to_contain_text("carried out", timeout=30_000)
    expect(page.locator(".run-head .pill")).to_have_text("Compensated")
    expect(page.locator(".run-page")).to_have_attribute("data-status", "COMPENSATED")
    retried = page.locator("tr.ev[data-kind='operator.retry']")
    expect(retried).to_contain_text("by ana")
    expect(retried).to_contain_text("inventory service is back (INC-4211)")
    expect(reserve.locator(".lane.comp .bar.o-ok")).to_have_count(1)
    assert shop.faults.calls[-1] == ("release_inventory", 3)
    page.mouse.move(0, 0)
    page.screenshot(path=str(shots / "run.png"))

    # Back in the list, the counts follow.
    page.click("a.back")
    expect(page.locator(".chip[data-status=FAILED] .count")).to_have_text("0")
    expect(page.locator(".chip[data-status=COMPENSATED] .count")).to_have_text("2")
