"""The transport conformance kit itself: it imports cleanly, and it can fail.

Each mutant below is a MemoryTransport that breaks one promise of the port; the named
conformance test must fail on it, and pass on the real MemoryTransport.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from sagaway.messaging.base import Delivery, Handler, Subscription, Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport, _MemorySubscription
from sagaway.testing import transport_conformance
from sagaway.testing.transport_conformance import TransportConformance


def test_importing_the_kit_or_messaging_imports_no_driver() -> None:
    code = (
        "import sys, sagaway, sagaway.messaging, sagaway.messaging.memory\n"
        "import sagaway.testing.transport_conformance\n"
        "bad = [m for m in ('aio_pika', 'nats', 'redis') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_messaging_imports_neither_pytest_nor_the_kit() -> None:
    code = (
        "import sys, sagaway.messaging, sagaway.messaging.memory\n"
        "assert 'pytest' not in sys.modules\n"
        "assert not [m for m in sys.modules if m.startswith('sagaway.testing')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_base_class_is_not_collected_on_its_own() -> None:
    assert not TransportConformance.__name__.startswith("Test")


class Forgetful(MemoryTransport):
    """Drops the fields it does not know."""

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        doc = json.loads(body)
        known = {"id", "type", "run_id", "step", "idempotency_key", "reply_to",
                 "correlation_id", "headers", "created_at", "payload"}
        body = json.dumps({k: v for k, v in doc.items() if k in known}).encode()
        await super()._publish(destination, body, message_id=message_id)


class Swallowing(MemoryTransport):
    """Acks a message whose handler raised."""

    async def _subscribe(self, source: str, handler: Handler, **kw: Any) -> Subscription:
        async def swallow(delivery: Delivery) -> None:
            with contextlib.suppress(Exception):
                await handler(delivery)

        return await super()._subscribe(source, swallow, **kw)


class Relentless(MemoryTransport):
    """Never gives up on a message: no dead letters."""

    async def _subscribe(self, source: str, handler: Handler, **kw: Any) -> Subscription:
        kw["max_deliveries"] = 10**9
        return await super()._subscribe(source, handler, **kw)


class Greedy(MemoryTransport):
    """Ignores the prefetch."""

    async def _subscribe(self, source: str, handler: Handler, **kw: Any) -> Subscription:
        kw["prefetch"] = 1000
        return await super()._subscribe(source, handler, **kw)


class Dropping(MemoryTransport):
    """Drops bytes that are not JSON instead of dead-lettering them."""

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        try:
            json.loads(body)
        except ValueError:
            return
        await super()._publish(destination, body, message_id=message_id)


class _Hasty(_MemorySubscription):
    async def _stop(self) -> None:
        async with self._queue.changed:
            self._queue.changed.notify_all()


class Hasty(MemoryTransport):
    """Returns from stop() while handlers still run."""

    async def _subscribe(self, source: str, handler: Handler, **kw: Any) -> Subscription:
        sub = _Hasty(self, handler, source=source, **kw)
        sub.start()
        return sub


MUTANTS: list[tuple[type[MemoryTransport], str]] = [
    (Forgetful, "test_round_trip_preserves_every_field"),
    (Forgetful, "test_unknown_fields_of_a_foreign_producer_survive"),
    (Swallowing, "test_a_failed_handler_gets_the_message_again"),
    (Relentless, "test_dead_lettered_after_max_deliveries_with_the_reason"),
    (Greedy, "test_prefetch_bounds_the_messages_in_flight"),
    (Dropping, "test_malformed_bytes_are_dead_lettered_and_the_consumer_goes_on"),
    (Hasty, "test_stop_lets_the_running_handler_finish_and_ack"),
]


async def _run(build: Callable[[MemoryBroker], Transport], test_name: str) -> None:
    suite = TransportConformance()
    test: Callable[..., Any] = getattr(suite, test_name)
    broker = MemoryBroker()
    transport = build(broker)
    await transport.open()
    kwargs = {
        "transport": transport,
        "transport_factory": lambda: build(broker),
        "names": lambda label: f"kit.{label}",
    }
    params = test.__code__.co_varnames[1 : test.__code__.co_argcount]
    try:
        await test(**{p: kwargs[p] for p in params})
    finally:
        await transport.aclose()


@pytest.mark.parametrize(("mutant", "test_name"), MUTANTS,
                         ids=[f"{m.__name__}-{t}" for m, t in MUTANTS])
async def test_the_suite_fails_a_broken_transport(
    mutant: type[MemoryTransport], test_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_conformance, "WAIT", 1.5)
    with pytest.raises(AssertionError):
        await _run(mutant, test_name)
    # and the same test passes on the real MemoryTransport, so it is the mutation that failed
    await _run(MemoryTransport, test_name)
