"""Broker control and the restart scenario shared by the per-broker resilience tests.

The brokers are the machine's own servers at their standard ports. A restart test stops one
and always starts it again (in ``finally``), with the same commands ``.ci/run`` uses, and
waits for its port before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sagaway.errors import TransportError
from sagaway.messaging.base import Transport
from sagaway.testing.transport_conformance import Recorder, eventually, full_envelope

RABBITMQ_PORT, NATS_PORT, REDIS_PORT = 5672, 4222, 6379

START_RABBITMQ_APP = ["rabbitmqctl", "start_app"]
STOP_RABBITMQ_APP = ["rabbitmqctl", "stop_app"]
START_NATS = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
    "/usr/sbin/nats-server", "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd",
    "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
]
START_REDIS = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile",
    "/var/log/redis/ci.log",
]
STOP_REDIS = ["redis-cli", "-p", "6379", "shutdown", "nosave"]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def wait_port(port: int, *, open: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while port_open(port) != open:
        if time.monotonic() > deadline:
            state = "open" if open else "closed"
            raise AssertionError(f"port {port} is not {state} after {timeout}s")
        await asyncio.sleep(0.1)


async def run(*cmd: str, timeout: float = 120.0, check: bool = True) -> str:
    """Run a command without blocking the event loop (consumers keep running meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {text}")
    return text


def _pids(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == name:
                    pids.append(int(entry))
    return pids


@contextlib.asynccontextmanager
async def rabbitmq_down() -> AsyncIterator[None]:
    """``rabbitmqctl stop_app`` … ``start_app``: the node's broker stops, its data stays."""
    try:
        await run(*STOP_RABBITMQ_APP)
        await wait_port(RABBITMQ_PORT, open=False)
        yield
    finally:
        await run(*START_RABBITMQ_APP)
        await wait_port(RABBITMQ_PORT, open=True)


@contextlib.asynccontextmanager
async def nats_down() -> AsyncIterator[None]:
    """The nats-server process killed (SIGKILL, a crash), then started again."""
    try:
        pids = _pids("nats-server")
        assert pids, "no nats-server process to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await wait_port(NATS_PORT, open=False)
        yield
    finally:
        if not port_open(NATS_PORT):
            await run(*START_NATS)
        await wait_port(NATS_PORT, open=True)


@contextlib.asynccontextmanager
async def redis_down() -> AsyncIterator[None]:
    """``redis-cli shutdown nosave``, then the server started again (it keeps nothing)."""
    try:
        await run(*STOP_REDIS, check=False)  # the connection drops as the server exits
        await wait_port(REDIS_PORT, open=False)
        yield
    finally:
        if not port_open(REDIS_PORT):
            await run(*START_REDIS)
        await wait_port(REDIS_PORT, open=True)


@dataclass
class RestartReport:
    confirmed: list[str] = field(default_factory=list)
    confirmed_after_restart: int = 0
    failed_publishes: int = 0
    received: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    outage_seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{len(self.confirmed)} confirmed ({self.confirmed_after_restart} after the "
            f"restart), {self.failed_publishes} publishes refused during the "
            f"{self.outage_seconds:.1f}s outage, {self.received} received, "
            f"{self.duplicates} duplicates, {len(self.lost)} lost"
        )


async def publish_through_a_restart(
    publisher: Transport,
    consumer: Transport,
    source: str,
    broker_down: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    *,
    drain_before_stop: bool = False,
    outage: float = 1.0,
    settle_timeout: float = 60.0,
) -> RestartReport:
    """Publish and consume continuously while the broker goes down and comes back.

    The publisher sends envelopes ``m-0``, ``m-1``, … in order; a publish that raises
    TransportError is retried (same id) until it is confirmed. Returns once publishing has
    resumed after the restart and every confirmed message was received, or the timeout ran
    out (then ``lost`` lists what never arrived). ``drain_before_stop`` pauses publishing
    and waits for the consumer to catch up before the broker is stopped: for a broker
    configured to keep nothing across a restart.
    """
    report = RestartReport()
    rec = Recorder()
    await consumer.subscribe(source, rec, prefetch=10)
    running = asyncio.Event()
    running.set()
    stop = asyncio.Event()
    restarted = asyncio.Event()

    async def publish_forever() -> None:
        i = 0
        while not stop.is_set():
            await running.wait()
            env = full_envelope(id=f"m-{i}", payload={"i": i})
            try:
                await publisher.publish(source, env)
            except TransportError:
                report.failed_publishes += 1
                await asyncio.sleep(0.2)
                continue
            report.confirmed.append(env.id)
            if restarted.is_set():
                report.confirmed_after_restart += 1
            i += 1
            await asyncio.sleep(0.01)

    def received() -> set[str]:
        return set(rec.ids)

    task = asyncio.create_task(publish_forever())
    try:
        await eventually(lambda: len(report.confirmed) >= 20 and len(received()) >= 20,
                         what="traffic before the restart")
        if drain_before_stop:
            running.clear()
            await asyncio.sleep(0.3)  # a publish in flight finishes
            await eventually(lambda: set(report.confirmed) <= received(),
                             what="the consumer to catch up")
            running.set()
        began = time.monotonic()
        async with broker_down():
            await asyncio.sleep(outage)  # the publisher keeps trying meanwhile
        report.outage_seconds = time.monotonic() - began
        restarted.set()
        await eventually(lambda: report.confirmed_after_restart >= 20, timeout=settle_timeout,
                         what="publishing to resume after the restart")
        stop.set()
        await asyncio.wait_for(task, 30)
        with contextlib.suppress(AssertionError):
            await eventually(lambda: set(report.confirmed) <= received(),
                             timeout=settle_timeout, what="every confirmed message")
    finally:
        stop.set()
        running.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    ids = rec.ids
    report.received = len(set(ids))
    report.duplicates = len(ids) - len(set(ids))
    report.lost = sorted(set(report.confirmed) - set(ids))
    return report


async def wait_for_broker(check: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    """Retry ``check`` (a connection attempt) until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
