"""Group commit: many runs' transitions in one store transaction.

Each driver hands its transition to the committer and awaits the outcome. While one batch is
being written, new transitions queue up; the next batch takes all of them. No artificial
delay is added: at low load a transition is written alone and at once, at high load batches
grow by themselves, so throughput is the store's commit rate times the batch size.
Durability is unchanged: a caller resumes only after its own transaction committed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sagaway.errors import OrchestratorClosed, StoreError
from sagaway.store.base import CreateResult, NewRun, RunUpdate, Store

__all__ = ["GroupCommitter"]

log = logging.getLogger("sagaway.engine")


@dataclass(slots=True)
class _Pending:
    op: NewRun | RunUpdate
    future: asyncio.Future[CreateResult | bool]


class GroupCommitter:
    """Batches creations and fenced updates into single ``Store.commit`` calls."""

    def __init__(self, store: Store, *, owner: str, lease_seconds: float,
                 max_batch: int = 512, lanes: int = 1) -> None:
        self._store = store
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._max_batch = max_batch
        # Batches in flight at once (on separate connections): while the database works on
        # one, the event loop prepares the next. Runs never have two writes in flight.
        self._lanes = lanes
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0
        self.operations = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sagaway-group-commit")

    async def aclose(self) -> None:
        """Write what is queued, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def create(self, new: NewRun) -> CreateResult:
        result = await self._submit(new)
        assert isinstance(result, CreateResult)
        return result

    async def update(self, update: RunUpdate) -> bool:
        result = await self._submit(update)
        assert isinstance(result, bool)
        return result

    async def _submit(self, op: NewRun | RunUpdate) -> CreateResult | bool:
        if self._closed:
            raise OrchestratorClosed("the orchestrator is closing; no new transitions")
        future: asyncio.Future[CreateResult | bool] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(op, future))
        self._wakeup.set()
        # A caller cancelled while waiting only stops listening: the write still happens (or
        # not) as part of its batch, and recovery reads whatever became durable.
        return await future

    async def _loop(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            if not self._queue or len(in_flight) >= self._lanes:
                if self._closed and not self._queue:
                    await asyncio.gather(*in_flight)
                    return
                self._wakeup.clear()
                if in_flight and (self._queue or len(in_flight) >= self._lanes):
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await self._wakeup.wait()
                continue
            # Split a large queue across the lanes; a small one goes whole (more, smaller
            # commits would cost the database more than the overlap saves).
            pending = len(self._queue)
            size = pending if pending < 32 else -(-pending // self._lanes)
            size = min(self._max_batch, size)
            batch = self._queue[:size]
            del self._queue[:size]
            task = asyncio.create_task(self._write(batch))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def _write(self, batch: list[_Pending]) -> None:
        creates = [p for p in batch if isinstance(p.op, NewRun)]
        updates = [p for p in batch if isinstance(p.op, RunUpdate)]
        try:
            result = await self._store.commit(
                [p.op for p in creates],  # type: ignore[misc]
                [p.op for p in updates],  # type: ignore[misc]
                owner=self._owner,
                lease_seconds=self._lease_seconds,
            )
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else StoreError(f"commit failed: {exc!r}")
            log.error("group commit of %d transitions failed: %s", len(batch), error)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        self.batches += 1
        self.operations += len(batch)
        for p, created in zip(creates, result.created, strict=True):
            if not p.future.done():
                p.future.set_result(created)
        for p, ok in zip(updates, result.updated, strict=True):
            if not p.future.done():
                p.future.set_result(ok)
