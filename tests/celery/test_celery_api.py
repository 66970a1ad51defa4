"""The Celery integration without worker processes: definitions, the task message, errors,
and :class:`SagaTask` run in-process (``task.apply``) answering on a real RabbitMQ queue."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery_helpers import Names, pg_connect

from sagaway import DefinitionError, NonRetryableError, Saga, StepKind
from sagaway.definition.saga import Command
from sagaway.engine.relay import REPLY_TYPE, command_message, parse_reply
from sagaway.engine.state import ActionFailed
from sagaway.errors import MalformedEnvelope, TransportError
from sagaway.integrations.celery import (
    META_KWARG,
    CeleryIntegrationError,
    CeleryTransport,
    celery_step,
    celery_task_message,
    saga_chain,
    saga_context,
    saga_task,
)
from sagaway.messaging import Envelope
from sagaway.messaging.base import Delivery
from sagaway.messaging.rabbitmq import RabbitMQTransport

app = Celery("sagaway_api_tests", set_as_current=False)


@app.task(name="shop.reserve")
def reserve(order: Any) -> Any:
    return order


@app.task(name="shop.release")
def release(result: Any, order: Any) -> None:
    return None


def payload(step_command: Any, data: Any, results: dict[str, Any]) -> Any:
    assert isinstance(step_command, Command) and step_command.payload is not None
    return step_command.payload(data, results)


# -- definitions --------------------------------------------------------------------------


def test_celery_step_calls_and_compensation_arguments() -> None:
    saga = Saga("s")
    step = celery_step(saga, "reserve", task=reserve.s(7).set(queue="shop"),
                       compensation="shop.release", timeout=10, time_limit=5,
                       soft_time_limit=4)
    assert step.action == Command("shop", "shop.reserve")
    call = payload(step.action, {"id": 1}, {})
    assert call["args"] == [{"id": 1}, 7] and call["kwargs"] == {}
    assert call["options"] == {"time_limit": 5, "soft_time_limit": 4}
    comp = payload(step.compensation_fn, {"id": 1}, {"reserve": {"r": 2}})
    assert comp["args"] == [{"r": 2}, {"id": 1}, 7]  # result first, then the action's args
    assert payload(step.compensation_fn, {"id": 1}, {})["args"][0] is None  # result unknown

    custom = celery_step(saga, "pay", task="shop.pay", compensation=None, pivot=True,
                         args=lambda data, results: [data["id"], results["reserve"]["r"]],
                         kwargs=lambda data, results: {"currency": "EUR"})
    assert payload(custom.action, {"id": 3}, {"reserve": {"r": 9}})["args"] == [3, 9]
    assert payload(custom.action, {"id": 3}, {"reserve": {"r": 9}})["kwargs"] == {
        "currency": "EUR"}
    assert custom.action.service == "celery"
    saga.validate()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": 42}, "expected a task name"),
    ({"task": ""}, "empty"),
    ({"task": "t", "queue": "bad queue!"}, "queue"),
    ({"task": "t", "timeout": 0}, "timeout must be > 0"),
    ({"task": "t", "timeout": 5, "time_limit": 5}, "above the task's hard time_limit"),
])
def test_celery_step_refuses_bad_definitions(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        celery_step(Saga("s"), "x", **kwargs)


def test_saga_chain_follows_chain_semantics() -> None:
    chain = saga_chain((reserve.s(), release.s()), ("shop.pay", "shop.refund"),
                       ("shop.ship", None), ("shop.notify", None), name="order")
    kinds = [(s.name, s.kind) for s in chain.steps]
    assert kinds == [("reserve", StepKind.COMPENSATABLE), ("pay", StepKind.COMPENSATABLE),
                     ("ship", StepKind.PIVOT), ("notify", StepKind.RETRIABLE)]
    data = {"args": [{"id": 1}], "kwargs": {"rush": True}}
    first = payload(chain["reserve"].action, data, {})
    assert (first["args"], first["kwargs"]) == ([{"id": 1}], {"rush": True})
    second = payload(chain["pay"].action, data, {"reserve": {"r": 1}})
    assert second["args"] == [{"r": 1}]  # the previous result, as celery.chain passes it
    refund = payload(chain["pay"].compensation_fn, data, {"reserve": {"r": 1}, "pay": "p"})
    assert refund["args"] == ["p", {"r": 1}]
    immutable = saga_chain((reserve.si(5), release.s()), name="imm")
    assert payload(immutable["reserve"].action, data, {})["args"] == [5]
    # An immutable compensation is called as Celery would: with its own arguments only.
    undo_si = saga_chain((reserve.s(), release.si(7, order="x")), name="undo_si")
    undo = payload(undo_si["reserve"].compensation_fn, data, {"reserve": {"r": 1}})
    assert (undo["args"], undo["kwargs"]) == ([7], {"order": "x"})
    step_si = celery_step(Saga("t"), "reserve", task="shop.reserve",
                          compensation=release.si(8))
    assert payload(step_si.compensation_fn, {"id": 1}, {"reserve": 2})["args"] == [8]
    # An input a chain cannot be called with fails the step; it never breaks a commit.
    unbuildable = payload(chain["reserve"].action, ["not", "a", "chain", "input"], {})
    assert "could not be built" in unbuildable["error"]
    assert "{'args': [...]" in unbuildable["error"]


@pytest.mark.parametrize(("links", "message"), [
    ((), "at least one"),
    ((("shop.a",),), "must be a pair"),
    ((("shop.a", None), ("shop.b", "shop.undo_b")), "after the pivot"),
    (((object(), None),), "expected a task name"),
])
def test_saga_chain_refuses_bad_links(links: tuple[Any, ...], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        saga_chain(*links, name="bad")


def test_repeated_tasks_get_distinct_step_names() -> None:
    chain = saga_chain(("shop.a", "shop.u"), ("shop.a", "shop.u"), name="twice")
    assert [s.name for s in chain.steps] == ["a", "a_2"]


# -- the wire -----------------------------------------------------------------------------


def test_celery_task_message_is_protocol_2() -> None:
    row = command_message(run_id="r1", step="pay", key="r1:pay:action", attempt=3,
                          service="shop", command="shop.pay",
                          payload={"sagaway.celery": 1, "args": [1], "kwargs": {"a": 2},
                                   "options": {"time_limit": 9}},
                          reply_to="replies", headers={"traceparent": "00-x"})
    message = celery_task_message(Envelope.from_bytes(row.body.encode()))
    assert message is not None
    headers, properties, body = message
    assert headers["task"] == "shop.pay" and headers["id"] == "r1:pay:action:3"
    assert headers["timelimit"] == [9, None] and headers["traceparent"] == "00-x"
    assert properties["correlation_id"] == "r1:pay:action:3"
    args, kwargs, embed = json.loads(body)
    assert args == [1] and kwargs["a"] == 2 and set(embed) >= {"callbacks", "errbacks"}
    meta = kwargs[META_KWARG]
    assert meta == {"run_id": "r1", "step": "pay", "key": "r1:pay:action", "attempt": 3,
                    "compensation": False, "reply_to": "replies",
                    "correlation_id": "r1:pay:action:3", "headers": {"traceparent": "00-x"}}
    plain = command_message(run_id="r1", step="pay", key="r1:pay:action", attempt=1,
                            service="svc", command="pay", payload={"id": 1}, reply_to="r")
    assert celery_task_message(Envelope.from_bytes(plain.body.encode())) is None
    broken = Envelope(type="shop.pay", payload={"sagaway.celery": 1})
    with pytest.raises(MalformedEnvelope):
        celery_task_message(broken)


def test_reply_may_say_maybe_applied() -> None:
    env = Envelope(type=REPLY_TYPE, correlation_id="r1:pay:action:2",
                   payload={"ok": False, "error": "limit", "retryable": True,
                            "maybe_applied": True})
    event = parse_reply(env).event(1.0)
    assert isinstance(event, ActionFailed) and event.maybe_applied and event.retryable
    plain = Envelope(type=REPLY_TYPE, correlation_id="r1:pay:action:2",
                     payload={"ok": False, "error": "no"})
    assert not parse_reply(plain).maybe_applied


def test_misuse_gets_typed_errors() -> None:
    with pytest.raises(CeleryIntegrationError, match="only available inside"):
        saga_context()
    with pytest.raises(CeleryIntegrationError, match="sqlite"):
        saga_task(app, db="mysql://u@h/db")
    with pytest.raises(CeleryIntegrationError, match="base"):
        saga_task(app, base=object)
    with pytest.raises(TransportError, match="amqp"):
        CeleryTransport("memory://")


# -- SagaTask in-process, answering on RabbitMQ -----------------------------------------


class Replies:
    def __init__(self) -> None:
        self.got: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(self, delivery: Delivery) -> None:
        await self.got.put(delivery.envelope)

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(15):
            env = await self.got.get()
        assert env.type == REPLY_TYPE
        return {"correlation_id": env.correlation_id, **env.payload}


@pytest.fixture
async def replies(amqp_url: str, names: Names) -> AsyncIterator[Replies]:
    r = Replies()
    transport = RabbitMQTransport(amqp_url)
    async with transport:
        await transport.subscribe(names.replies, r.handler)
        yield r


def meta(names: Names, step: str, *, compensation: bool = False, attempt: int = 1
         ) -> dict[str, Any]:
    kind = "compensation" if compensation else "action"
    return {"run_id": "run1", "step": step, "key": f"run1:{step}:{kind}", "attempt": attempt,
            "compensation": compensation, "reply_to": names.replies,
            "correlation_id": f"run1:{step}:{kind}:{attempt}", "headers": {}}


@pytest.fixture(params=["sqlite", "postgres"])
def task_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The tasks' database URL: an SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'svc.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def rows(url: str) -> list[tuple[str, str]]:
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return conn.execute("SELECT key, what FROM ledger ORDER BY seq").fetchall()
    conn = await pg_connect(url)
    try:
        return [(r[0], r[1]) for r in await conn.fetch(
            "SELECT key, what FROM ledger ORDER BY seq")]
    finally:
        await conn.close()


async def test_saga_task_applies_once_fences_and_says_no(amqp_url: str, names: Names,
                                                        replies: Replies,
                                                        task_db: str) -> None:
    local = Celery("inproc", broker=amqp_url, set_as_current=False)
    calls: list[Any] = []
    if task_db.startswith("postgres"):
        conn = await pg_connect(task_db)
        await conn.execute("CREATE TABLE ledger (seq SERIAL, key TEXT, what TEXT)")
        await conn.close()
    else:
        with closing(sqlite3.connect(task_db.removeprefix("sqlite:///"))) as conn:
            conn.execute("CREATE TABLE ledger (seq INTEGER PRIMARY KEY, key TEXT, what TEXT)")

    def write(what: str) -> None:
        ctx = saga_context()
        if isinstance(ctx.db, sqlite3.Connection):
            ctx.db.execute("INSERT INTO ledger (key, what) VALUES (?, ?)",
                           (ctx.idempotency_key, what))
        else:
            ctx.db.execute("INSERT INTO ledger (key, what) VALUES ($1, $2)",
                           ctx.idempotency_key, what)

    @saga_task(local, name="t.act", db=task_db)
    def act(order: dict[str, Any]) -> dict[str, Any]:
        calls.append(order)
        write("act")
        if order.get("no"):
            raise NonRetryableError("out of stock")
        if order.get("boom"):
            raise RuntimeError("transient")
        return {"done": order["id"]}

    @saga_task(local, name="t.undo", db=task_db)
    def undo(result: Any, order: dict[str, Any]) -> None:
        write(f"undo:{result}:{saga_context().action_applied}")

    @saga_task(local, name="t.echo")
    def echo(x: int) -> int:
        return x

    assert echo(5) == 5  # a plain call: no saga, no reply
    # Applied once: a redelivery answers the recorded reply without running again.
    await asyncio.to_thread(act.apply, ({"id": 1},), {META_KWARG: meta(names, "a")})
    await asyncio.to_thread(act.apply, ({"id": 1},), {META_KWARG: meta(names, "a", attempt=2)})
    first, second = await replies.next(), await replies.next()
    assert first["ok"] and first["result"] == {"done": 1}
    assert second["ok"] and second["result"] == {"done": 1}
    assert second["correlation_id"] == "run1:a:action:2"
    # The compensation learns the result the orchestrator never heard from the inbox.
    await asyncio.to_thread(undo.apply, (None, {"id": 1}),
                            {META_KWARG: meta(names, "a", compensation=True)})
    assert (await replies.next())["ok"]

    # A compensation that runs first fences its action: the action then never applies.
    await asyncio.to_thread(undo.apply, (None, {"id": 2}),
                            {META_KWARG: meta(names, "b", compensation=True)})
    assert (await replies.next())["ok"]
    await asyncio.to_thread(act.apply, ({"id": 2},), {META_KWARG: meta(names, "b")})
    fenced = await replies.next()
    assert not fenced["ok"] and not fenced["retryable"] and "compensated" in fenced["error"]

    # A business "no" is recorded (its writes undone); a crash-like error is not.
    await asyncio.to_thread(act.apply, ({"id": 3, "no": True},), {META_KWARG: meta(names, "c")})
    no = await replies.next()
    assert not no["ok"] and not no["retryable"] and "out of stock" in no["error"]
    await asyncio.to_thread(act.apply, ({"id": 4, "boom": True},), {META_KWARG: meta(names, "d")})
    boom = await replies.next()
    assert not boom["ok"] and boom["retryable"] and "transient" in boom["error"]

    assert await rows(task_db) == [("run1:a:action", "act"),
                        ("run1:a:compensation", "undo:{'done': 1}:True"),
                        ("run1:b:compensation", "undo:None:False")]
    assert [c["id"] for c in calls] == [1, 3, 4]


async def test_saga_task_without_db_replies_and_flags_unknown(amqp_url: str, names: Names,
                                                             replies: Replies) -> None:
    local = Celery("inproc2", broker=amqp_url, set_as_current=False)

    @saga_task(local, name="t.plain", non_retryable=(KeyError,))
    def plain(order: dict[str, Any]) -> Any:
        assert saga_context().db is None
        if order.get("missing"):
            raise KeyError("sku")
        if order.get("object"):
            return object()
        return saga_context().idempotency_key

    await asyncio.to_thread(plain.apply, ({},), {META_KWARG: meta(names, "p")})
    assert (await replies.next())["result"] == "run1:p:action"
    await asyncio.to_thread(plain.apply, ({"missing": True},),
                            {META_KWARG: meta(names, "q", attempt=2)})
    no = await replies.next()
    # Without an inbox, a "no" on attempt 2 cannot vouch for attempt 1.
    assert not no["ok"] and not no["retryable"] and no["maybe_applied"]
    await asyncio.to_thread(plain.apply, ({"object": True},), {META_KWARG: meta(names, "r")})
    bad = await replies.next()
    assert not bad["ok"] and "JSON" in bad["error"] and bad["maybe_applied"]


async def test_transport_routes_tasks_and_refuses_undeclared_queues(amqp_url: str,
                                                                    names: Names) -> None:
    """A Celery call to a queue no worker declared is returned by the broker: TransportError
    (the relay keeps the row and retries); anything else goes through the wrapped
    transport."""
    task = command_message(run_id="r1", step="pay", key="r1:pay:action", attempt=1,
                           service=names.queue, command="shop.pay",
                           payload={"sagaway.celery": 1, "args": [], "kwargs": {}},
                           reply_to=names.replies)
    plain = command_message(run_id="r1", step="pay", key="r1:pay:action", attempt=1,
                            service=names.replies, command="pay", payload={"id": 1},
                            reply_to=names.replies)
    got: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        await got.put(delivery.envelope)

    async with CeleryTransport(amqp_url) as transport:
        await transport.subscribe(names.replies, handler)
        with pytest.raises(TransportError, match=f"-Q {names.queue}"):
            await transport.publish_raw(names.queue, task.body.encode(), message_id=task.id)
        await transport.publish_raw(names.replies, plain.body.encode(), message_id=plain.id)
        async with asyncio.timeout(10):
            received = await got.get()
    assert received.id == plain.id and received.payload == {"id": 1}
    assert transport.published_tasks == 0



def test_close_inboxes_closes_the_pool_and_stops_its_thread(postgres_url: str) -> None:
    import threading

    from sagaway.integrations.celery import _open_inbox, _PostgresInbox, close_inboxes

    inbox = _open_inbox(postgres_url)
    assert isinstance(inbox, _PostgresInbox)
    inbox.transaction()  # the first task opens the pool on its own loop thread
    db = inbox.db
    threads = [t for t in threading.enumerate() if t.name == "sagaway-celery-inbox"]
    assert threads and db is not None
    close_inboxes()
    assert not any(t.is_alive() for t in threads)
    assert inbox.db is None and db._pool is None  # the pool was closed, not dropped
