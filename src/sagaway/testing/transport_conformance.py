"""The transport conformance suite: the behaviour every ``sagaway.messaging.base.Transport`` has.

Importing this module requires pytest and pytest-asyncio (dev dependencies, not runtime
ones): it is a base class of pytest tests. A backend's test module subclasses
:class:`TransportConformance` under a name pytest collects (``Test...``) and provides a
``transport_factory`` fixture: a callable that builds a new, **unopened** transport on the
broker under test (the suite opens and closes what it builds). Every call must reach the
same broker, so two transports built by one factory share destinations::

    import pytest
    from sagaway.testing.transport_conformance import TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def transport_factory(self, namespace):
            yield lambda: MyTransport("my://127.0.0.1")
            delete_everything_named(namespace)  # every destination starts with it

Every destination a test uses starts with ``namespace`` (unique per test), so tests never
see each other's messages and a backend can clean up after each one. The suite waits for
messages up to :data:`WAIT` seconds and watches :data:`QUIET` seconds to see that nothing
(more) arrives. The helpers (:class:`Recorder`, :func:`eventually`, :func:`full_envelope`)
are public too, for a backend's own extra tests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from sagaway.errors import PayloadTooLarge, TransportError
from sagaway.messaging.base import Delivery, Subscription, Transport
from sagaway.messaging.envelope import DEAD_LETTER_TYPE, DeadLetter, Envelope

__all__ = [
    "AWKWARD_PAYLOAD",
    "MALFORMED",
    "QUIET",
    "WAIT",
    "Recorder",
    "TransportConformance",
    "eventually",
    "full_envelope",
]

WAIT = 20.0
"""Seconds a test waits for messages that must arrive."""
QUIET = 0.6
"""Seconds a test watches to see that no (further) message arrives."""

AWKWARD_PAYLOAD: dict[str, Any] = {
    "unicode": "Zürich \u2013 東京 \u2013 مرحبا \u2013 🦄 \u2013 e\u0301 \u2013 \u2028",
    "escapes": 'quote " backslash \\ newline \n tab \t nul \x00',
    "ints": [0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, -(10**30)],
    "floats": [0.1, -2.5, 1e-300, 1.7976931348623157e308, 5e-324, -0.0],
    "bools": [True, False],
    "null": None,
    "empty": {"list": [], "dict": {}, "str": ""},
    "nested": {"a": [{"b": [{"c": [1, [2, [3, {"d": None}]]]}]}]},
    "": "empty key",
}

MALFORMED: list[tuple[bytes, str]] = [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (b'{"type": "order.reserve", "payload": {}}', "'id' is missing"),
    (b'{"id": "m-1", "type": "t", "created_at": NaN}', "NaN is not JSON"),
    (b'{"id": "m-1", "type": "t", "type": "u"}', "duplicate key 'type'"),
    (b'{"id": "m-1", "type": "t", "headers": {"traceparent": 7}}', "'headers'"),
    (b'{"id": 12, "type": "t"}', "'id' must be a non-empty string"),
    (b"", "not JSON"),
]
"""Bytes that are not envelopes, with a fragment of the reason each must be dead-lettered with."""


def full_envelope(**changes: Any) -> Envelope:
    """An envelope with every field set, awkward values and two unknown fields."""
    fields: dict[str, Any] = {
        "id": f"msg-{uuid.uuid4().hex}",
        "type": "payment.charge",
        "payload": AWKWARD_PAYLOAD,
        "run_id": "run-7",
        "step": "charge 🦄",
        "idempotency_key": "run-7:charge:action",
        "reply_to": "orders.replies",
        "correlation_id": "req-41",
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "tracestate": "vendor=é"},
        "created_at": 1_700_000_000.123456,
        "extra": {"schema_version": 3, "x-future": {"nested": [1, "two", None]}},
    }
    fields.update(changes)
    return Envelope(**fields)


async def eventually(
    check: Callable[[], bool], *, timeout: float | None = None, what: str = "condition"
) -> None:
    """Wait until ``check()`` is true, failing the test after ``timeout`` (:data:`WAIT`)."""
    timeout = WAIT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """A handler that records its deliveries.

    Args:
        fail: raise ``RuntimeError`` for deliveries this returns True for.
        gate: when given, each handler call waits for it before returning.
    """

    def __init__(
        self,
        *,
        fail: Callable[[Delivery], bool] | None = None,
        gate: asyncio.Event | None = None,
        delay: float = 0.0,
    ) -> None:
        self.fail = fail
        self.gate = gate
        self.delay = delay
        self.deliveries: list[Delivery] = []
        self.done: list[Delivery] = []
        """Deliveries whose handler returned normally."""
        self.active = 0
        self.max_active = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail is not None and self.fail(delivery):
                raise RuntimeError(f"card declined on attempt {delivery.attempt}")
        finally:
            self.active -= 1
        self.done.append(delivery)

    @property
    def ids(self) -> list[str]:
        return [d.envelope.id for d in self.deliveries]

    async def wait_for(self, count: int, *, timeout: float | None = None) -> list[Delivery]:
        """Wait until at least ``count`` deliveries have arrived; return them all."""
        await eventually(lambda: len(self.deliveries) >= count, timeout=timeout,
                         what=f"{count} deliveries (got {len(self.deliveries)})")
        return self.deliveries


async def _quiet() -> None:
    await asyncio.sleep(QUIET)


class TransportConformance:
    """The contract of the transport port, as tests. Subclass it to test a backend.

    Fixtures:
        transport_factory: **provided by the subclass** (see the module docstring).
        namespace: unique per test; every destination the test uses starts with it.
        transport: one transport from the factory, opened, closed after the test.
        names: ``names("orders")`` gives ``"<namespace>.orders"``.
    """

    @pytest.fixture
    def namespace(self) -> str:
        return f"t{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def names(self, namespace: str) -> Callable[[str], str]:
        return lambda label: f"{namespace}.{label}"

    @pytest.fixture
    def transport_factory(self, namespace: str) -> Iterator[Callable[[], Transport]]:
        raise NotImplementedError(
            f"{type(self).__name__} must override the `transport_factory` fixture: yield a "
            f"callable building a new, unopened transport on the broker under test"
        )
        yield  # pragma: no cover - makes this a generator, like the overrides

    @pytest.fixture
    async def transport(
        self, transport_factory: Callable[[], Transport]
    ) -> AsyncIterator[Transport]:
        transport = transport_factory()
        await transport.open()
        try:
            yield transport
        finally:
            await transport.aclose()

    # -- envelopes travel whole ------------------------------------------------------------

    async def test_round_trip_preserves_every_field(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("orders")
        sent = full_envelope()
        rec = Recorder()
        await transport.subscribe(source, rec)
        await transport.publish(source, sent)

        [delivery] = await rec.wait_for(1)
        got = delivery.envelope
        assert got == sent
        assert json.dumps(got.to_json(), sort_keys=True) == json.dumps(sent.to_json(),
                                                                      sort_keys=True)
        assert got.extra == {"schema_version": 3, "x-future": {"nested": [1, "two", None]}}
        assert (delivery.attempt, delivery.source) == (1, source)
        assert Envelope.from_bytes(delivery.raw) == sent
        assert delivery.dead_letter is None

    async def test_unknown_fields_of_a_foreign_producer_survive(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("events")
        doc = {"id": "ext-1", "type": "stock.reserved", "payload": [1, 2.5, "x"],
               "producer": "legacy-svc", "ttl": 30, "meta": {"k": ["v"]}}
        rec = Recorder()
        await transport.subscribe(source, rec)
        await transport.publish_raw(source, json.dumps(doc).encode())

        [delivery] = await rec.wait_for(1)
        env = delivery.envelope
        assert (env.id, env.type, env.payload) == ("ext-1", "stock.reserved", [1, 2.5, "x"])
        assert env.extra == {"producer": "legacy-svc", "ttl": 30, "meta": {"k": ["v"]}}
        assert (env.run_id, env.reply_to, dict(env.headers)) == (None, None, {})
        again = json.loads(env.to_bytes())
        assert {k: again[k] for k in ("producer", "ttl", "meta")} == {
            "producer": "legacy-svc", "ttl": 30, "meta": {"k": ["v"]}
        }
        assert delivery.raw == json.dumps(doc).encode()

    async def test_too_large_envelope_is_refused_before_sending(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("big")
        transport.max_message_bytes = 2048
        rec = Recorder()
        await transport.subscribe(source, rec)
        with pytest.raises(PayloadTooLarge) as info:
            await transport.publish(source, full_envelope(payload="x" * 4096))
        assert info.value.limit == 2048 and info.value.size > 4096
        await transport.publish(source, full_envelope(payload="small"))
        await rec.wait_for(1)
        await _quiet()
        assert [d.envelope.payload for d in rec.deliveries] == ["small"]

    # -- at least once ---------------------------------------------------------------------

    async def test_message_published_before_anyone_subscribes_is_kept(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("early")
        sent = [full_envelope(payload=i) for i in range(3)]
        for env in sent:
            await transport.publish(source, env)
        rec = Recorder()
        await transport.subscribe(source, rec)
        await rec.wait_for(3)
        assert sorted(rec.ids) == sorted(e.id for e in sent)

    async def test_every_confirmed_message_is_delivered(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("many")
        rec = Recorder()
        await transport.subscribe(source, rec, prefetch=16)
        sent = [full_envelope(payload={"n": i}) for i in range(60)]
        await asyncio.gather(*(transport.publish(source, env) for env in sent))
        await rec.wait_for(60)
        await _quiet()
        assert sorted(rec.ids) == sorted(e.id for e in sent)  # each once: all were acked

    async def test_an_acked_message_is_not_delivered_again(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("acked")
        first = Recorder()
        sub = await transport.subscribe(source, first)
        done = full_envelope(payload="done")
        await transport.publish(source, done)
        await first.wait_for(1)
        await eventually(lambda: len(first.done) == 1, what="the handler to return")
        await sub.stop()

        second = Recorder()
        await transport.subscribe(source, second)
        marker = full_envelope(payload="marker")
        await transport.publish(source, marker)
        await second.wait_for(1)
        await _quiet()
        assert second.ids == [marker.id]

    async def test_a_failed_handler_gets_the_message_again(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("flaky")
        rec = Recorder(fail=lambda d: d.attempt < 3)
        dead = Recorder()
        await transport.subscribe(source, rec, max_deliveries=5)
        await transport.subscribe(source + ".dead-letter", dead)
        sent = full_envelope()
        await transport.publish(source, sent)

        await rec.wait_for(3)
        await _quiet()
        assert [d.attempt for d in rec.deliveries] == [1, 2, 3]
        assert all(d.envelope == sent for d in rec.deliveries)
        assert [d.attempt for d in rec.done] == [3]
        assert dead.deliveries == []

    # -- dead letters ----------------------------------------------------------------------

    async def test_dead_lettered_after_max_deliveries_with_the_reason(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("poison")
        rec = Recorder(fail=lambda d: True)
        dead = Recorder()
        await transport.subscribe(source, rec, max_deliveries=3)
        await transport.subscribe(source + ".dead-letter", dead)
        sent = full_envelope()
        await transport.publish(source, sent)

        [letter] = await dead.wait_for(1)
        await _quiet()
        assert [d.attempt for d in rec.deliveries] == [1, 2, 3]
        assert letter.envelope.type == DEAD_LETTER_TYPE
        info = letter.dead_letter
        assert info is not None
        assert (info.source, info.attempts, info.truncated) == (source, 3, False)
        assert "RuntimeError: card declined on attempt 3" in info.reason
        assert "3 of 3" in info.reason
        assert info.envelope() == sent
        # The saga fields travel on the dead letter, so operators can find the run.
        env = letter.envelope
        assert (env.run_id, env.step, env.idempotency_key, env.correlation_id) == (
            sent.run_id, sent.step, sent.idempotency_key, sent.id
        )
        assert len(dead.deliveries) == 1

    async def test_dead_letters_go_where_the_subscription_says(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source, parking = names("cmds"), names("parking-lot")
        await transport.subscribe(source, Recorder(fail=lambda d: True), max_deliveries=1,
                                  dead_letter=parking)
        dead = Recorder()
        await transport.subscribe(parking, dead)
        sent = full_envelope()
        await transport.publish(source, sent)
        [letter] = await dead.wait_for(1)
        assert letter.dead_letter is not None
        assert letter.dead_letter.attempts == 1
        assert letter.dead_letter.envelope() == sent

    async def test_a_dead_letter_can_be_replayed(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("replay")
        broken = asyncio.Event()
        rec = Recorder(fail=lambda d: not broken.is_set())
        dead = Recorder()
        await transport.subscribe(source, rec, max_deliveries=1)
        await transport.subscribe(source + ".dead-letter", dead)
        sent = full_envelope()
        await transport.publish(source, sent)
        [letter] = await dead.wait_for(1)
        assert letter.dead_letter is not None

        broken.set()  # the bug is fixed: put the message back where it came from
        await transport.publish_raw(source, letter.dead_letter.body, message_id="replay-1")
        await eventually(lambda: len(rec.done) == 1, what="the replayed message")
        assert rec.done[0].envelope == sent

    async def test_malformed_bytes_are_dead_lettered_and_the_consumer_goes_on(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("mixed")
        rec = Recorder()
        dead = Recorder()
        await transport.subscribe(source, rec, max_deliveries=5)
        await transport.subscribe(source + ".dead-letter", dead, prefetch=len(MALFORMED))
        for body, _ in MALFORMED:
            await transport.publish_raw(source, body)
        good = full_envelope()
        await transport.publish(source, good)

        letters = await dead.wait_for(len(MALFORMED))
        await rec.wait_for(1)
        await _quiet()
        assert rec.ids == [good.id]  # the handler never saw the garbage
        found: dict[bytes, DeadLetter] = {}
        for letter in letters:
            info = letter.dead_letter
            assert info is not None
            found[info.body] = info
        assert sorted(found) == sorted(body for body, _ in MALFORMED)
        for body, fragment in MALFORMED:
            info = found[body]
            assert info.reason.startswith("malformed envelope: "), info.reason
            assert fragment in info.reason, (body, info.reason)
            assert (info.source, info.attempts) == (source, 1)
        assert len(dead.deliveries) == len(MALFORMED)

    # -- flow control and sharing ----------------------------------------------------------

    async def test_prefetch_bounds_the_messages_in_flight(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("bounded")
        gate = asyncio.Event()
        rec = Recorder(gate=gate)
        await transport.subscribe(source, rec, prefetch=3)
        sent = [full_envelope(payload=i) for i in range(8)]
        for env in sent:
            await transport.publish(source, env)

        try:
            await rec.wait_for(3)
            await _quiet()
            assert (len(rec.deliveries), rec.active) == (3, 3)
        finally:
            gate.set()
        await rec.wait_for(8)
        await eventually(lambda: len(rec.done) == 8, what="all handlers to return")
        assert rec.max_active == 3
        assert sorted(rec.ids) == sorted(e.id for e in sent)

    async def test_consumers_of_one_source_share_the_work(
        self,
        transport: Transport,
        transport_factory: Callable[[], Transport],
        names: Callable[[str], str],
    ) -> None:
        source = names("shared")
        a, b = Recorder(delay=0.05), Recorder(delay=0.05)
        async with transport_factory() as other:
            await transport.subscribe(source, a, prefetch=1)
            await other.subscribe(source, b, prefetch=1)
            sent = [full_envelope(payload=i) for i in range(20)]
            for env in sent:
                await transport.publish(source, env)
            await eventually(lambda: len(a.done) + len(b.done) >= 20, what="20 handled")
            await _quiet()
        assert a.deliveries and b.deliveries, (len(a.deliveries), len(b.deliveries))
        assert sorted(a.ids + b.ids) == sorted(e.id for e in sent)

    # -- lifecycle -------------------------------------------------------------------------

    async def test_a_stopped_subscription_stops_consuming(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("stoppable")
        rec = Recorder()
        sub = await transport.subscribe(source, rec)
        assert isinstance(sub, Subscription)
        assert (sub.source, sub.stopped) == (source, False)
        first = full_envelope(payload=1)
        await transport.publish(source, first)
        await rec.wait_for(1)
        await sub.stop()
        await sub.stop()  # idempotent
        assert sub.stopped

        later = full_envelope(payload=2)
        await transport.publish(source, later)
        await _quiet()
        assert rec.ids == [first.id]

        resumed = Recorder()
        await transport.subscribe(source, resumed)
        await resumed.wait_for(1)
        assert resumed.ids == [later.id]  # kept for the next consumer, not lost

    async def test_stop_lets_the_running_handler_finish_and_ack(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("draining")
        gate = asyncio.Event()
        rec = Recorder(gate=gate)
        sub = await transport.subscribe(source, rec)
        sent = full_envelope()
        await transport.publish(source, sent)
        await rec.wait_for(1)

        stopping = asyncio.create_task(sub.stop())
        try:
            await asyncio.sleep(0.1)
            assert not stopping.done(), "stop() returned while a handler was still running"
        finally:
            gate.set()
        await asyncio.wait_for(stopping, WAIT)
        assert [d.envelope.id for d in rec.done] == [sent.id]

        after = Recorder()
        await transport.subscribe(source, after)
        await _quiet()
        assert after.deliveries == []  # it was acked, not handed back

    async def test_stop_gives_back_the_message_of_a_handler_stuck_past_the_grace(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        source = names("stuck")
        stuck = Recorder(gate=asyncio.Event())  # never opened
        sub = await transport.subscribe(source, stuck)
        sent = full_envelope()
        await transport.publish(source, sent)
        await stuck.wait_for(1)
        await asyncio.wait_for(sub.stop(grace=0.2), WAIT)
        assert stuck.done == []

        rec = Recorder()
        await transport.subscribe(source, rec)
        [delivery] = await rec.wait_for(1)
        assert (delivery.envelope, delivery.attempt) == (sent, 2)

    async def test_close_is_idempotent_and_stops_subscriptions(
        self, transport_factory: Callable[[], Transport], names: Callable[[str], str]
    ) -> None:
        transport = transport_factory()
        await transport.open()
        await transport.open()  # idempotent too
        assert transport.is_open
        sub = await transport.subscribe(names("closing"), Recorder())
        await transport.aclose()
        await transport.aclose()
        assert sub.stopped and not transport.is_open
        with pytest.raises(TransportError, match="closed"):
            await transport.publish(names("closing"), full_envelope())
        with pytest.raises(TransportError, match="closed"):
            await transport.subscribe(names("closing"), Recorder())
        with pytest.raises(TransportError, match="closed"):
            await transport.open()

    async def test_use_before_open_is_a_transport_error(
        self, transport_factory: Callable[[], Transport], names: Callable[[str], str]
    ) -> None:
        transport = transport_factory()
        with pytest.raises(TransportError, match="not open"):
            await transport.publish(names("early"), full_envelope())
        with pytest.raises(TransportError, match="not open"):
            await transport.publish_raw(names("early"), b"{}")
        with pytest.raises(TransportError, match="not open"):
            await transport.subscribe(names("early"), Recorder())
        await transport.aclose()  # closing a never-opened transport is fine

    async def test_bad_arguments_are_transport_errors(
        self, transport: Transport, names: Callable[[str], str]
    ) -> None:
        for bad in ("", "has space", "a..b", ".a", "a.", "a/b", "x" * 201, "a*", "a>"):
            with pytest.raises(TransportError, match="bad destination name"):
                await transport.publish(bad, full_envelope())
        source = names("args")
        with pytest.raises(TransportError, match="prefetch"):
            await transport.subscribe(source, Recorder(), prefetch=0)
        with pytest.raises(TransportError, match="max_deliveries"):
            await transport.subscribe(source, Recorder(), max_deliveries=0)
        with pytest.raises(TransportError, match="own dead-letter"):
            await transport.subscribe(source, Recorder(), dead_letter=source)
