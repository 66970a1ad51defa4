"""Signed envelopes over the memory transport and a real RabbitMQ: a signed saga runs end
to end; unsigned, forged, stale and replayed messages never reach the handler, are
dead-lettered at once with the reason and counted; keys rotate by id."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from protection_helpers import codec, delete_queues, eventually, fresh, spy_on

from sagaway import Orchestrator, Saga, SagaStatus, UntrustedMessage
from sagaway.messaging import Delivery, Envelope
from sagaway.messaging.base import Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.participant import Command, Participant
from sagaway.protection.signing import (
    SIGNATURE_HEADER,
    SIGNED_AT_HEADER,
    EnvelopeSigner,
    signer_from_env,
)

S1, S2 = os.urandom(32), os.urandom(32)


def signer(*, keys: dict[str, bytes] | None = None, active: str | None = None,
           clock: Callable[[], float] = time.time, window: float = 60.0) -> EnvelopeSigner:
    return EnvelopeSigner(keys or {"s1": S1}, active=active, window=window, clock=clock)


@pytest.fixture(params=["memory", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("amqp_url")
    return url


@pytest.fixture
async def transports(broker_url: str | None) -> AsyncIterator[Callable[[], Transport]]:
    broker = MemoryBroker()
    made: list[Transport] = []
    url = broker_url

    def make() -> Transport:
        if url is None:
            made.append(MemoryTransport(broker))
        else:
            from sagaway.messaging.rabbitmq import RabbitMQTransport

            made.append(RabbitMQTransport(url))
        return made[-1]

    yield make
    for t in made:
        await t.aclose()
    if url is not None:
        await delete_queues(url, {q for t in made for q in getattr(t, "declared", ())})


def command_saga(service: str) -> Saga:
    s = Saga("signed")
    s.command_step("reserve", service=service, command="reserve", timeout=20, pivot=True)
    return s


async def test_a_signed_saga_runs_end_to_end(transports: Callable[[], Transport],
                                             tmp_path: Path) -> None:
    service, replies = fresh("signed.inventory"), fresh("signed.replies")
    ours, theirs = transports(), transports()
    seen: list[bytes] = []
    spy_on(theirs, seen)
    orch_signer, svc_signer = signer(), signer()
    svc = Participant(service, theirs, db=f"sqlite:///{tmp_path}/svc.db", signer=svc_signer,
                      codec=codec())

    @svc.handler("reserve")
    async def reserve(cmd: Command) -> dict[str, Any]:
        return {"for": cmd.payload["sku"]}

    async with svc, Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[command_saga(service)],
                                 transport=ours, reply_to=replies, signer=orch_signer,
                                 codec=codec(), poll_interval=0.1) as orch:
        run = await (await orch.start("signed", {"sku": "A-1"})).wait(timeout=30)
    assert run.status is SagaStatus.COMPLETED and run.results["reserve"] == {"for": "A-1"}
    assert orch_signer.counts["accepted"] >= 1 and svc_signer.counts["accepted"] >= 1
    assert sum(v for k, v in orch_signer.counts.items() if k != "accepted") == 0
    headers = json.loads(seen[0])["headers"]
    assert headers[SIGNATURE_HEADER].startswith("s1:") and float(headers[SIGNED_AT_HEADER])


async def test_untrusted_messages_are_dead_lettered_with_the_reason(
        transports: Callable[[], Transport]) -> None:
    queue = fresh("signed.inbox")
    consumer_signer = signer(keys={"s1": S1, "s2": S2}, active="s1")
    consumer, sender = transports(), transports()
    consumer.signer = consumer_signer
    await consumer.open()
    await sender.open()
    handled: list[str] = []
    dead: list[tuple[str, str]] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(str(delivery.envelope.payload))

    async def dead_letters(delivery: Delivery) -> None:
        letter = delivery.dead_letter
        assert letter is not None
        dead.append((str(letter.envelope().payload), letter.reason))

    await consumer.subscribe(queue, handle)
    await consumer.subscribe(f"{queue}.dead-letter", dead_letters)

    async def send(payload: str, with_signer: EnvelopeSigner | None) -> bytes:
        sender.signer = with_signer
        envelope = Envelope(type="t", payload=payload)
        if with_signer is not None:
            envelope = with_signer.sign(envelope)
        body = envelope.to_bytes()
        sender.signer = None
        await sender.publish_raw(queue, body, message_id=envelope.id)
        return body

    good = await send("good", signer())
    await eventually(lambda: handled == ["good"], timeout=20)
    await send("unsigned", None)
    await send("wrong secret", signer(keys={"s1": os.urandom(32)}))
    await send("unknown key id", signer(keys={"s9": S1}))
    await send("stale", signer(clock=lambda: time.time() - 3600))
    await send("from the future", signer(clock=lambda: time.time() + 3600))
    tampered = json.loads(await send_later(signer(), "tampered"))
    tampered["payload"] = "tampered!"
    await sender.publish_raw(queue, json.dumps(tampered).encode())
    await sender.publish_raw(queue, good)  # the same signed bytes again: a replay
    await send("rotated", signer(keys={"s1": S1, "s2": S2}, active="s2"))
    await eventually(lambda: len(dead) == 7 and "rotated" in handled, timeout=30)
    reasons = dict(dead)
    assert handled == ["good", "rotated"]
    assert reasons["unsigned"].startswith("malformed envelope: unsigned message")
    assert "forged message" in reasons["wrong secret"]
    assert "does not match" in reasons["wrong secret"]
    assert "key id 's9', which is not configured" in reasons["unknown key id"]
    assert "stale message" in reasons["stale"] and "outside the 60s window" in reasons["stale"]
    assert "stale message" in reasons["from the future"]
    assert "forged message" in reasons["tampered!"]
    assert "replayed message" in reasons["good"]
    counts = consumer_signer.counts
    assert (counts["unsigned"], counts["forged"], counts["stale"], counts["replayed"]) == (
        1, 3, 2, 1)
    # The dead letters themselves were signed by the consumer's transport and accepted.
    assert counts["accepted"] == 2 + 7


async def send_later(s: EnvelopeSigner, payload: str) -> bytes:
    return s.sign(Envelope(type="t", payload=payload)).to_bytes()


async def test_a_redelivery_after_a_handler_failure_is_not_a_replay() -> None:
    transport = MemoryTransport()
    transport.signer = signer()
    await transport.open()
    attempts: list[int] = []

    async def flaky(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise RuntimeError("not yet")

    await transport.subscribe("q", flaky)
    await transport.publish("q", Envelope(type="t", payload=1))
    await eventually(lambda: attempts == [1, 2, 3])
    assert transport.signer.counts["replayed"] == 0
    await transport.aclose()


def test_the_replay_guard_is_bounded_and_forgets_after_the_window() -> None:
    s = signer(window=10.0)
    guard = s.guard()
    for i in range(5):
        guard.remember(f"sig{i}", 100.0)
    assert guard.seen("sig0", 105.0) and not guard.seen("sig0", 111.0)
    small = EnvelopeSigner({"s1": S1}, replay_cache=3)
    g = small.guard()
    for i in range(5):
        g.remember(f"sig{i}", 100.0)
    assert len(g) == 3 and not g.seen("sig0", 100.0) and g.seen("sig4", 100.0)


def test_signed_bodies_and_verification() -> None:
    s = signer()
    env = Envelope(type="t", payload={"a": 1}, headers={"traceparent": "00-x"})
    signed = s.sign(env)
    assert signed.headers["traceparent"] == "00-x"
    assert s.verify(Envelope.from_bytes(signed.to_bytes())).startswith("s1:")
    # A raw body missing optional fields hashes the same once parsed.
    raw = s.sign_body(b'{"id":"m1","type":"t","created_at":5,"payload":null}')
    assert s.verify(Envelope.from_bytes(raw))
    assert s.sign_body(b"not json") == b"not json"
    with pytest.raises(UntrustedMessage) as info:
        s.verify(Envelope(type="t"))
    assert info.value.kind == "unsigned"


@pytest.mark.parametrize(("keys", "problem"), [({}, "at least one"),
                                               ({"s1": b"short"}, "at least 16"),
                                               ({"a:b": S1}, "bad signing key id")])
def test_bad_signing_keys(keys: dict[str, bytes], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        EnvelopeSigner(keys)
    with pytest.raises(ValueError, match="window"):
        EnvelopeSigner({"s1": S1}, window=0)


def test_signing_keys_from_the_environment() -> None:
    assert signer_from_env({}) is None
    s = signer_from_env({"SAGAWAY_SIGNING_KEYS": "s1:" + "x" * 32 + ",s2:" + "y" * 32,
                         "SAGAWAY_SIGNING_WINDOW": "30"})
    assert s is not None and s.active == "s2" and s.window == 30.0


async def test_memory_transport_smoke() -> None:
    # A plain publish from a signed transport to a signed consumer: accepted.
    t = MemoryTransport()
    t.signer = signer()
    await t.open()
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def handle(d: Delivery) -> None:
        await got.put(d.envelope.payload)

    await t.subscribe("q", handle)
    await t.publish("q", Envelope(type="t", payload="hi"))
    async with asyncio.timeout(5):
        assert await got.get() == "hi"
    await t.aclose()
