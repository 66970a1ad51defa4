"""HTTP steps against a real uvicorn service on 127.0.0.1, on the memory store and a SQLite
file: success, every class of answer, timeouts (possibly applied, so compensated), a service
that comes up late, response schemas, the headers the service receives, compensation
answers, parallel HTTP steps, and configuration errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from http_service import Reply, Script, ThreadServer, free_port
from integration_helpers import kinds
from pydantic import BaseModel

from sagaway import (
    DefinitionError,
    Invocation,
    Listener,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaRun,
    SagaStatus,
)

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.0, jitter=0)
ONCE = RetryPolicy(max_attempts=1)
ORDER = {"order_id": "o-1", "sku": "book", "amount": 5}


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def service(script: Script) -> Iterator[ThreadServer]:
    server = ThreadServer(script)
    yield server
    server.close()


class Payment(BaseModel):
    payment_id: str
    amount: int


def shop(*, charge_retry: RetryPolicy = FAST, timeout: float = 2.0,
         compensation_retry: RetryPolicy | None = None, name: str = "shop") -> Saga:
    """reserve (POST) -> charge (POST, checked by Payment) -> confirm (GET, read-only)."""
    saga = Saga(name)
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("DELETE", "{shop}/reservations/{result[reservation_id]}"),
                   timeout=timeout, retry=FAST)
    saga.http_step("charge", "POST", "{shop}/payments/{results[reserve][reservation_id]}",
                   compensation=("POST", "{shop}/refunds/{input[order_id]}"),
                   response_model=Payment, timeout=timeout, retry=charge_retry,
                   compensation_retry=compensation_retry)
    saga.http_step("confirm", "GET", "{shop}/orders/{input[order_id]}", read_only=True,
                   timeout=timeout)
    return saga


def plan_happy(script: Script) -> None:
    script.plan("POST", "/reservations", Reply(201, {"reservation_id": "r 1/x"}))
    script.plan("POST", "/payments/r%201%2Fx", Reply(200, {"payment_id": "p-1", "amount": 5,
                                                           "extra": "dropped"}))
    script.plan("GET", "/orders/o-1", Reply(200, {"order": "o-1", "state": "ok"}))


async def run_shop(store_url: str, service: ThreadServer, saga: Saga, *,
                   listeners: tuple[Listener, ...] = (), data: Any = ORDER) -> SagaRun:
    async with Orchestrator(store_url, sagas=[saga], services={"shop": service.url},
                            listeners=listeners) as orch:
        handle = await orch.start(saga.name, data)
        return await handle.wait(timeout=20)


def errors(run: SagaRun, step: str) -> list[str]:
    return [str((h.data or {}).get("error")) for h in run.history
            if h.kind == "step.failed" and h.step == step]


# -- success --------------------------------------------------------------------------------


async def test_success_sends_input_and_keeps_each_response(store_url: str, script: Script,
                                                           service: ThreadServer) -> None:
    plan_happy(script)
    run = await run_shop(store_url, service, shop())
    assert run.status is SagaStatus.COMPLETED, run.error
    assert run.results == {
        "reserve": {"reservation_id": "r 1/x"},
        # Validated by the model: the result is the model's JSON (unknown fields dropped).
        "charge": {"payment_id": "p-1", "amount": 5},
        "confirm": {"order": "o-1", "state": "ok"},
    }
    [reserve] = script.to("POST", "/reservations")
    assert reserve.body == ORDER
    # A result's value is one percent-encoded path segment: it cannot reshape the URL.
    [charge] = script.to("POST", "/payments/r%201%2Fx")
    assert charge.body == ORDER
    [confirm] = script.to("GET", "/orders/o-1")
    assert confirm.body is None
    assert [c.key for c in (reserve, charge, confirm)] == [
        f"{run.id}:reserve:action", f"{run.id}:charge:action", f"{run.id}:confirm:action"]
    for call in (reserve, charge, confirm):
        assert call.headers["x-correlation-id"] == run.id
        assert call.headers["x-sagaway-run-id"] == run.id
        assert call.headers["x-sagaway-saga"] == "shop"
        assert call.headers["x-sagaway-attempt"] == "1"
        assert call.headers["user-agent"].startswith("sagaway/")
    assert [c.headers["x-sagaway-step"] for c in script.calls] == ["reserve", "charge",
                                                                   "confirm"]
    assert not [c for c in script.calls if c.method == "DELETE"]


# -- every class of answer ------------------------------------------------------------------

# status -> (retried, possibly applied: the failed step is compensated too)
CLASSES = {
    400: (False, False),
    404: (False, False),
    422: (False, False),
    408: (True, False),
    409: (True, False),
    429: (True, False),
    500: (True, True),
    503: (True, True),
}


@pytest.mark.parametrize("status", sorted(CLASSES))
async def test_each_class_of_failure(status: int, store_url: str, script: Script,
                                     service: ThreadServer) -> None:
    retried, maybe_applied = CLASSES[status]
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx",
                Reply(status, {"detail": f"no ({status})", "secret": "x" * 500},
                      headers={"Retry-After": "0"}))
    run = await run_shop(store_url, service, shop())

    assert run.status is SagaStatus.COMPENSATED, run.error
    attempts = script.to("POST", "/payments/r%201%2Fx")
    assert len(attempts) == (2 if retried else 1)
    assert run.steps["charge"]["attempts"] == len(attempts)
    # The earlier step is undone whatever the class; the failed one only if it may have
    # taken effect.
    assert len(script.to("DELETE", "/reservations/r%201%2Fx")) == 1
    assert len(script.to("POST", "/refunds/o-1")) == (1 if maybe_applied else 0)
    assert not script.to("GET", "/orders/o-1")
    error = errors(run, "charge")[0]
    assert error.startswith(f"POST shop /payments/r%201%2Fx -> {status} ")
    assert f"no ({status})" in error and "Retry-After: 0" in error
    assert len(error) < 400  # a short excerpt of the body, not all of it
    assert ("may have taken effect" in error) is maybe_applied
    failed = [h for h in run.history if h.kind == "step.failed"]
    assert all((h.data or {}).get("retryable") is retried for h in failed)


async def test_a_retried_answer_then_success_completes(store_url: str, script: Script,
                                                       service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(503, {"detail": "busy"}),
                Reply(429, {"detail": "slow down"}),
                Reply(201, {"payment_id": "p-2", "amount": 5}))
    run = await run_shop(store_url, service,
                         shop(charge_retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)))
    assert run.status is SagaStatus.COMPLETED, run.error
    assert run.results["charge"] == {"payment_id": "p-2", "amount": 5}
    attempts = script.to("POST", "/payments/r%201%2Fx")
    # One idempotency key on every attempt, so the service can apply the charge once.
    assert {c.key for c in attempts} == {f"{run.id}:charge:action"}
    assert [c.headers["x-sagaway-attempt"] for c in attempts] == ["1", "2", "3"]
    assert run.steps["charge"]["maybe_applied"] is True


async def test_retry_after_delays_the_next_attempt(store_url: str, script: Script,
                                                  service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(429, {"detail": "slow"},
                                                     headers={"Retry-After": "1"}),
                Reply(201, {"payment_id": "p-1", "amount": 5}))
    run = await run_shop(store_url, service,
                         shop(charge_retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)))
    assert run.status is SagaStatus.COMPLETED, run.error
    first, second = script.to("POST", "/payments/r%201%2Fx")
    assert second.started - first.started >= 0.95
    [scheduled] = [h for h in run.history if h.kind == "step.retry_scheduled"]
    assert scheduled.data == {"delay": 1.0}


async def test_a_timeout_is_possibly_applied_so_it_is_compensated(
        store_url: str, script: Script, service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx",
                Reply(201, {"payment_id": "p-1", "amount": 5}, delay=1.0))
    run = await run_shop(store_url, service, shop(timeout=0.3))
    assert run.status is SagaStatus.COMPENSATED, run.error
    assert len(script.to("POST", "/payments/r%201%2Fx")) == 2  # retried, same key
    assert run.steps["charge"]["maybe_applied"] is True
    assert all("timed out after 0.3s (may have taken effect)" in e
               for e in errors(run, "charge"))
    # The refund goes out although no attempt answered: the charge may have happened.
    [refund] = script.to("POST", "/refunds/o-1")
    assert refund.body == {"input": ORDER, "result": None}
    assert refund.key == f"{run.id}:charge:compensation"
    assert refund.headers["x-sagaway-compensation"] == "true"


async def test_a_compensation_that_needs_an_unknown_result_replays_the_action(
        store_url: str, script: Script, service: ThreadServer) -> None:
    saga = Saga("replay")
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("DELETE", "{shop}/reservations/{result[reservation_id]}"),
                   timeout=0.3, retry=ONCE)
    # The first attempt takes effect but answers too late; the replay (same key) gets the
    # answer an idempotent service stored for that key.
    script.plan("POST", "/reservations", Reply(201, {"reservation_id": "r-9"}, delay=0.8),
                Reply(201, {"reservation_id": "r-9"}))
    run = await run_shop(store_url, service, saga)
    assert run.status is SagaStatus.COMPENSATED, run.error
    first, replay = script.to("POST", "/reservations")
    assert first.key == replay.key == f"{run.id}:reserve:action"
    assert replay.headers["x-sagaway-replay"] == "true"
    assert "x-sagaway-replay" not in first.headers
    [undo] = script.to("DELETE", "/reservations/r-9")
    assert undo.key == f"{run.id}:reserve:compensation"


async def test_a_replay_refused_by_the_service_means_nothing_to_undo(
        store_url: str, script: Script, service: ThreadServer) -> None:
    saga = Saga("replay")
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("DELETE", "{shop}/reservations/{result[reservation_id]}"),
                   timeout=0.3, retry=ONCE)
    script.plan("POST", "/reservations", Reply(500, {"detail": "crashed"}),
                Reply(409, {"detail": "out of stock"}), Reply(422, {"detail": "out of stock"}))
    run = await run_shop(store_url, service, saga)
    assert run.status is SagaStatus.COMPENSATED, run.error
    # 500: possibly applied -> compensate; the replay's 409 is retried, its 422 settles it.
    assert len(script.to("POST", "/reservations")) == 3
    assert run.steps["reserve"]["compensation_attempts"] == 2
    assert not [c for c in script.calls if c.method == "DELETE"]


async def test_a_service_that_comes_up_late_is_retried_until_it_answers(
        store_url: str, script: Script) -> None:
    port = free_port()
    saga = Saga("late")
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("DELETE", "{shop}/reservations/{result[id]}"),
                   retry=RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.1))
    script.plan("POST", "/reservations", Reply(201, {"id": "r-1"}))
    async with Orchestrator(store_url, sagas=[saga],
                            services={"shop": f"http://127.0.0.1:{port}"}) as orch:
        handle = await orch.start("late", ORDER)
        await asyncio.sleep(0.5)
        refused = await orch.get(handle.id)
        assert refused.steps["reserve"]["attempts"] >= 2
        server = await asyncio.to_thread(ThreadServer, script, port=port)
        try:
            run = await handle.wait(timeout=20)
        finally:
            await asyncio.to_thread(server.close)
    assert run.status is SagaStatus.COMPLETED, run.error
    assert run.results == {"reserve": {"id": "r-1"}}
    first_error = errors(run, "reserve")[0]
    assert "not sent (ConnectError" in first_error
    # Refused connections were never sent, so they are not "possibly applied".
    assert not any("may have taken effect" in e for e in errors(run, "reserve"))
    [call] = script.to("POST", "/reservations")
    assert call.headers["x-sagaway-attempt"] == str(run.steps["reserve"]["attempts"])


async def test_a_connection_cut_after_sending_is_possibly_applied(store_url: str) -> None:
    # A real socket server that reads the whole request, then hangs up without answering:
    # the request reached the service, so it may have taken effect.
    requests: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                           if ln.lower().startswith(b"content-length:")), b"0"))
        requests.append(head + await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    saga = Saga("cut")
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("POST", "{shop}/cancellations/{input[order_id]}"), retry=FAST,
                   compensation_retry=ONCE)
    try:
        async with Orchestrator(store_url, sagas=[saga],
                                services={"shop": f"http://127.0.0.1:{port}"}) as orch:
            run = await (await orch.start("cut", ORDER)).wait(timeout=20)
    finally:
        server.close()
        await server.wait_closed()
    # The compensation is cut too (and gets one attempt here), so the run ends FAILED;
    # what matters is that the cut attempts were read as possibly applied and undone.
    assert run.status is SagaStatus.FAILED
    assert "POST shop /cancellations/o-1: connection lost" in (run.error or "")
    failures = errors(run, "reserve")
    assert len(failures) == 2
    assert all("connection lost" in e for e in failures)
    assert all("may have taken effect" in e for e in failures)
    assert run.steps["reserve"]["maybe_applied"] is True
    assert any(r.startswith(b"POST /cancellations/o-1 ") for r in requests)


async def test_a_body_that_does_not_match_the_model_fails_and_is_compensated(
        store_url: str, script: Script, service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(201, {"payment": "p-1"}))
    run = await run_shop(store_url, service, shop())
    assert run.status is SagaStatus.COMPENSATED, run.error
    assert len(script.to("POST", "/payments/r%201%2Fx")) == 1  # not retried
    [error] = errors(run, "charge")
    assert "does not match Payment" in error and "payment_id" in error
    assert "may have taken effect" in error
    assert len(script.to("POST", "/refunds/o-1")) == 1  # the service acted: undo it
    assert "charge" not in run.results


async def test_a_text_body_against_a_model_is_a_mismatch(store_url: str, script: Script,
                                                        service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(200, text="OK, charged"))
    run = await run_shop(store_url, service, shop())
    assert run.status is SagaStatus.COMPENSATED
    assert "OK, charged" in errors(run, "charge")[0]


async def test_bodies_built_by_the_definition(store_url: str, script: Script,
                                             service: ThreadServer) -> None:
    saga = Saga("bodies")
    saga.http_step("reserve", "PUT", "{shop}/reservations/{input[order_id]}",
                   json=lambda ctx, data: {"sku": data["sku"], "step": ctx.step},
                   compensation=("PATCH", "{shop}/reservations/{input[order_id]}"),
                   compensation_json=lambda ctx, data, result: {"cancel": result["rid"]})
    saga.http_step("charge", "POST", "{shop}/payments", json=lambda ctx, data: 1 / 0,
                   compensation=("DELETE", "{shop}/payments/{input[order_id]}"))
    script.plan("PUT", "/reservations/o-1", Reply(200, {"rid": "r-5"}))
    run = await run_shop(store_url, service, saga)
    assert run.status is SagaStatus.COMPENSATED, run.error
    [put] = script.to("PUT", "/reservations/o-1")
    assert put.body == {"sku": "book", "step": "reserve"}
    [patch] = script.to("PATCH", "/reservations/o-1")
    assert patch.body == {"cancel": "r-5"}
    # A body builder that raises fails the step before anything is sent: not retried,
    # nothing to undo.
    assert not script.to("POST", "/payments") and not script.to("DELETE", "/payments/o-1")
    [error] = errors(run, "charge")
    assert "json= raised ZeroDivisionError" in error and "nothing was sent" in error


async def test_a_worker_that_stops_mid_request_hands_the_same_key_to_the_next(
        shared_store: Any, script: Script, service: ThreadServer) -> None:
    saga = Saga("handover")
    saga.http_step("reserve", "POST", "{shop}/reservations",
                   compensation=("DELETE", "{shop}/reservations/{result[id]}"), timeout=5)
    script.plan("POST", "/reservations", Reply(201, {"id": "r-1"}, delay=1.0),
                Reply(201, {"id": "r-1"}))
    first = Orchestrator(shared_store(), sagas=[saga], services={"shop": service.url},
                         poll_interval=0.05)
    await first.open()
    handle = await first.start("handover", ORDER)
    while not script.to("POST", "/reservations"):  # noqa: ASYNC110 - a thread fills it
        await asyncio.sleep(0.01)
    await first.aclose()  # cuts the request in flight and releases the lease
    async with Orchestrator(shared_store(), sagas=[saga], services={"shop": service.url},
                            poll_interval=0.05) as second:
        run = await second.wait(handle.id, timeout=20)
    assert run.status is SagaStatus.COMPLETED, run.error
    cut, retried = script.to("POST", "/reservations")
    assert cut.key == retried.key == f"{run.id}:reserve:action"
    assert [cut.headers["x-sagaway-attempt"], retried.headers["x-sagaway-attempt"]] == [
        "1", "2"]
    assert "step.interrupted" in kinds(run)


# -- headers --------------------------------------------------------------------------------


class Tracing(Listener):
    def __init__(self) -> None:
        self.seen: list[Invocation] = []

    def on_invoke(self, invocation: Invocation) -> Mapping[str, str] | None:
        self.seen.append(invocation)
        span = f"{len(self.seen):016x}"
        return {"traceparent": f"00-{'ab' * 16}-{span}-01",
                "Idempotency-Key": "a listener cannot override the key"}


async def test_listener_headers_reach_the_service(store_url: str, script: Script,
                                                  service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(502, {"detail": "gateway"}))
    tracing = Tracing()
    run = await run_shop(store_url, service, shop(), listeners=(tracing,))
    assert run.status is SagaStatus.COMPENSATED
    assert [(i.step, i.attempt, i.compensating, i.kind) for i in tracing.seen] == [
        ("reserve", 1, False, "http"), ("charge", 1, False, "http"),
        ("charge", 2, False, "http"), ("charge", 1, True, "http"),
        ("reserve", 1, True, "http")]
    assert [c.headers["traceparent"] for c in script.calls] == [
        f"00-{'ab' * 16}-{n:016x}-01" for n in range(1, 6)]
    assert [c.key for c in script.calls] == [
        f"{run.id}:reserve:action", f"{run.id}:charge:action", f"{run.id}:charge:action",
        f"{run.id}:charge:compensation", f"{run.id}:reserve:compensation"]


# -- compensation answers -------------------------------------------------------------------


async def test_compensation_answers(store_url: str, script: Script,
                                    service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(500, {"detail": "boom"}))
    # Nothing to undo (404) is undone; a 503 then a 200 is retried.
    script.plan("POST", "/refunds/o-1", Reply(404, {"detail": "no such charge"}))
    script.plan("DELETE", "/reservations/r%201%2Fx", Reply(503, {"detail": "busy"}),
                Reply(204))
    run = await run_shop(store_url, service,
                         shop(compensation_retry=RetryPolicy(max_attempts=5,
                                                             initial_backoff=0.01)))
    assert run.status is SagaStatus.COMPENSATED, run.error
    assert run.steps["charge"]["compensation_attempts"] == 1
    assert run.steps["reserve"]["compensation_attempts"] == 2


async def test_a_refused_compensation_fails_the_run_at_once(store_url: str, script: Script,
                                                            service: ThreadServer) -> None:
    plan_happy(script)
    script.plan("POST", "/payments/r%201%2Fx", Reply(500, {"detail": "boom"}))
    script.plan("POST", "/refunds/o-1", Reply(400, {"detail": "refund window closed"}))
    run = await run_shop(store_url, service, shop())
    assert run.status is SagaStatus.FAILED
    assert run.steps["charge"]["compensation_attempts"] == 1
    assert "refund window closed" in (run.error or "")
    assert "POST shop /refunds/o-1 -> 400" in (run.error or "")
    # The run stops for an operator: the reservation is left for them to settle.
    assert not script.to("DELETE", "/reservations/r%201%2Fx")


# -- parallel HTTP steps --------------------------------------------------------------------


async def test_parallel_http_steps_compensate_even_the_slow_sibling(
        store_url: str, script: Script, service: ThreadServer) -> None:
    saga = Saga("trip")
    saga.http_step("hold", "POST", "{shop}/holds",
                   compensation=("DELETE", "{shop}/holds/{result[id]}"))
    for name in ("flight", "hotel", "car"):
        saga.http_step(name, "POST", f"{{shop}}/{name}s",
                       compensation=("DELETE", f"{{shop}}/{name}s/{{result[id]}}"), retry=ONCE)
    saga.parallel(saga["flight"], saga["hotel"], saga["car"])
    script.plan("POST", "/holds", Reply(201, {"id": "h"}))
    script.plan("POST", "/flights", Reply(201, {"id": "f"}, delay=0.2))
    script.plan("POST", "/hotels", Reply(201, {"id": "h2"}, delay=0.6))
    script.plan("POST", "/cars", Reply(400, {"detail": "no cars"}, delay=0.2))
    run = await run_shop(store_url, service, saga)

    assert run.status is SagaStatus.COMPENSATED, run.error
    [flight, hotel, car] = (script.to("POST", f"/{n}s")[0] for n in ("flight", "hotel", "car"))
    # The three ran concurrently.
    assert max(c.started for c in (flight, hotel, car)) < min(
        c.finished or 0 for c in (flight, hotel, car))
    [undo_hotel] = script.to("DELETE", "/hotels/h2")
    [undo_flight] = script.to("DELETE", "/flights/f")
    [undo_hold] = script.to("DELETE", "/holds/h")
    assert not [c for c in script.calls if c.path.startswith("/cars/")]
    # The slow hotel was still running when the car failed: it is undone once it lands,
    # and the earlier stage only after the whole group.
    assert hotel.finished is not None and undo_hotel.started > hotel.finished
    assert undo_hold.started > max(undo_hotel.started, undo_flight.started)
    order = kinds(run)
    assert order.index("run.compensating") < order.index("step.succeeded", order.index(
        "run.compensating"))


async def test_a_hanging_service_does_not_hold_other_services_connections(
        store_url: str, script: Script, service: ThreadServer) -> None:
    slow, fast = Saga("slow"), Saga("fast")
    slow.http_step("look", "GET", "{slow}/hang", read_only=True)
    fast.http_step("look", "GET", "{fast}/quick", read_only=True)
    script.plan("GET", "/hang", Reply(200, {"late": True}, delay=1.5))
    async with Orchestrator(store_url, sagas=[slow, fast], http_connections=1,
                            services={"slow": service.url, "fast": service.url}) as orch:
        hanging = await orch.start("slow")
        while not script.to("GET", "/hang"):  # noqa: ASYNC110 - a thread fills it
            await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        quick = await (await orch.start("fast")).wait(timeout=20)
        took = asyncio.get_running_loop().time() - started
        assert quick.status is SagaStatus.COMPLETED, quick.error
        assert took < 1.0  # it did not wait for the slow service's one connection
        assert (await hanging.wait(timeout=20)).status is SagaStatus.COMPLETED


# -- configuration errors -------------------------------------------------------------------


async def test_a_missing_base_url_is_an_error_at_open(store_url: str) -> None:
    orch = Orchestrator(store_url, sagas=[shop()])
    with pytest.raises(DefinitionError) as err:
        await orch.open()
    text = str(err.value)
    assert "'shop'" in text and "SAGAWAY_SERVICE_SHOP" in text and "services=" in text
    assert "shop.reserve" in text
    # A client (worker=False) sends no requests, so it needs no base URLs.
    async with Orchestrator(store_url, sagas=[shop()], worker=False):
        pass


async def test_a_base_url_from_the_environment(store_url: str, script: Script,
                                               service: ThreadServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    plan_happy(script)
    monkeypatch.setenv("SAGAWAY_SERVICE_SHOP", service.url + "/")
    async with Orchestrator(store_url, sagas=[shop()]) as orch:
        run = await (await orch.start("shop", ORDER)).wait(timeout=20)
    assert run.status is SagaStatus.COMPLETED, run.error
    # Configuration wins over the environment.
    monkeypatch.setenv("SAGAWAY_SERVICE_SHOP", "http://127.0.0.1:9")
    plan_happy(script)
    run = await run_shop(store_url, service, shop())
    assert run.status is SagaStatus.COMPLETED, run.error


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host", "http://", "http://h/?a=1"])
async def test_a_malformed_base_url_is_an_error_at_open(store_url: str, url: str) -> None:
    orch = Orchestrator(store_url, sagas=[shop()], services={"shop": url})
    with pytest.raises(DefinitionError, match="base URL of HTTP service 'shop'"):
        await orch.open()


async def test_registering_on_an_open_orchestrator_checks_base_urls(store_url: str) -> None:
    async with Orchestrator(store_url, sagas=[]) as orch:
        with pytest.raises(DefinitionError, match="SAGAWAY_SERVICE_SHOP"):
            orch.register(shop())
        with pytest.raises(Exception, match="no saga named"):
            orch.definition("shop")
