"""Structured logs: every record from a run carries its run id, saga, step and attempt (sync
steps on threads too), JSON lines parse, tracebacks are redacted, bad options are refused."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from obs_helpers import CANARY, order, shop_saga

from sagaway import Listener, Orchestrator, Saga, StepContext, Transition
from sagaway.observability import configure_logging

log = logging.getLogger("obs.test")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", fmt="json", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class Broken(Listener):
    def on_transition(self, transition: Transition) -> None:
        raise RuntimeError("listener bug")


async def test_records_carry_the_run_step_and_attempt(tmp_path: Path,
                                                      json_logs: io.StringIO) -> None:
    saga = Saga("logs", sensitive=["card.number"])

    @saga.step(read_only=True)
    def sync_step(ctx: StepContext, data: Any) -> None:
        log.info("in a sync step", extra={"order_ref": "o-1"})

    @saga.step(read_only=True)
    async def async_step(ctx: StepContext, data: Any) -> None:
        if ctx.attempt == 1:
            try:
                raise ValueError(f"bad card {data['card']['number']}")
            except ValueError:
                log.exception("step failed, will retry")
            raise RuntimeError("again")
        log.warning("in an async step, attempt %d", ctx.attempt)

    log.info("outside any run")
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[saga],
                            listeners=[Broken()]) as orch:
        run = await orch.start("logs", {"card": {"number": CANARY}})
        assert (await run.wait(timeout=10)).status.value == "COMPLETED"
    got = records(json_logs)
    assert CANARY not in json_logs.getvalue()
    by_message = {r["message"]: r for r in got}

    outside = by_message["outside any run"]
    assert (outside["run_id"], outside["saga"], outside["step"]) == (None, None, None)
    sync = by_message["in a sync step"]
    assert (sync["run_id"], sync["saga"], sync["step"], sync["attempt"]) == (
        run.id, "logs", "sync_step", 1)
    assert sync["order_ref"] == "o-1"  # extra= fields are kept
    assert sync["logger"] == "obs.test" and sync["level"] == "INFO"
    retried = by_message["in an async step, attempt 2"]
    assert (retried["run_id"], retried["step"], retried["attempt"]) == (run.id, "async_step", 2)
    failed = by_message["step failed, will retry"]
    assert failed["attempt"] == 1
    assert "ValueError: bad card ***" in failed["exc"]  # the traceback is redacted too
    # The runtime's own records about the run (a listener failing) name it, step aside.
    engine = [r for r in got if r["logger"] == "sagaway.engine" and "listener" in r["message"]]
    assert engine and all(r["run_id"] == run.id and r["saga"] == "logs" for r in engine)
    assert "RuntimeError: listener bug" in engine[0]["exc"]


async def test_text_format_names_the_run(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging(logging.INFO, stream=stream)
        async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga()]) as orch:
            run = await orch.start("shop", order())
            await run.wait(timeout=10)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = [line for line in stream.getvalue().splitlines() if "reserving sku-1" in line]
    assert lines and f"run={run.id} saga=shop step=reserve attempt=1" in lines[0]


def test_a_bad_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be 'text' or 'json'"):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


async def test_the_worker_refuses_a_bad_log_format() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaway.cli", "worker", "--app", "x:y", "--log-format", "xml",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "--log-format" in err.decode()
