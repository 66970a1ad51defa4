"""How runs come to this worker, and how it notices losing them: recovery and leases.

A run started here is adopted at once. Any other run is claimed: by the recovery poll when
it is unowned or its lease expired (a worker died), or at once when a participant's reply
for it arrives (command steps park their run in the store while they wait). One background
task renews all of this worker's leases in one statement and stops driving the runs whose
lease is gone.

:class:`Recovery` is a part of :class:`~sagaway.engine.runtime.Orchestrator` (a base class
kept in its own module); it works on the Orchestrator's table of drivers.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from sagaway.definition.saga import Saga
from sagaway.engine.clock import Clock
from sagaway.engine.committer import GroupCommitter
from sagaway.engine.driver import Driver
from sagaway.engine.relay import parse_reply
from sagaway.engine.state import Event, Operator, Recover, RunState, StepStatus
from sagaway.errors import OrchestratorClosed, StoreError, TransportError, UnknownSaga
from sagaway.messaging.base import Delivery
from sagaway.run import HistoryEntry, SagaStatus
from sagaway.store.base import RunRecord, RunUpdate, Store

if TYPE_CHECKING:
    from sagaway.protection.store import RunSealer

__all__ = ["Recovery"]

log = logging.getLogger("sagaway.engine")


class Recovery:
    """Claiming runs (recovery poll, replies), adopting them, renewing leases."""

    # Set by Orchestrator.__init__.
    store: Store
    worker_id: str
    lease_seconds: float
    poll_interval: float
    max_runs: int
    clock: Clock
    _open: bool
    _sealer: RunSealer | None
    _definitions: dict[tuple[str, int], Saga]
    _drivers: dict[str, Driver]
    _claim_seq: int
    _poll_now: asyncio.Event
    _background_writes: set[asyncio.Task[None]]

    if TYPE_CHECKING:  # the Orchestrator's own methods
        def _drive(self, d: Driver, commands: builtins.list[Any], first: Event | None = None
                   ) -> Coroutine[Any, Any, None]: ...

        def _stop_driver(self, d: Driver) -> None: ...

        def _abandon(self, d: Driver) -> None: ...

        def _require_open(self) -> GroupCommitter: ...

    # -- recovery and leases ----------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._claim_due()
            except StoreError as exc:
                log.warning("recovery poll failed, retrying in %.1fs: %s",
                            self.poll_interval, exc)
            except Exception:
                log.exception("recovery poll crashed; retrying")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and close() would then wait on this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._poll_now.wait()
            self._poll_now.clear()

    async def _claim_due(self) -> None:
        capacity = self.max_runs - len(self._drivers)
        if capacity <= 0 or not self._open:
            return
        records = await self.store.claim_due(
            owner=self.worker_id,
            lease_seconds=self.lease_seconds,
            limit=min(capacity, 500),
            definitions=list(self._definitions),
        )
        for record in records:
            self._adopt(record)

    def _adopt(self, record: RunRecord, first: Event | None = None) -> None:
        old = self._drivers.get(record.id)
        if old is not None:
            # Our own lease expired (renewal stalled) and we claimed the run again: the old
            # driver is fenced by the new row version, so replace it.
            self._stop_driver(old)
        saga = self._definitions[(record.saga, record.version)]
        if record.payload_error is not None:
            self._fail_unreadable(record)
            return
        d = Driver(
            run_id=record.id,
            saga=saga,
            state=RunState.from_json(record.state),
            row_version=record.row_version,
            input=record.input,
            idempotency_key=record.idempotency_key,
            created_at=record.created_at,
            updated_at=record.updated_at,
            history=None,
            committed=True,
            claim_seq=self._claim_seq + 1,
        )
        self._claim_seq += 1
        self._drivers[record.id] = d
        if first is not None:
            pass
        elif record.request is not None:
            req = record.request
            log.info("run %s (%s v%s): carrying out operator %s's %r", record.id, record.saga,
                     record.version, req.get("actor"), req.get("action"),
                     extra={"run_id": record.id, "saga": record.saga})
            d.clear_request = True
            first = Operator(str(req.get("action")), str(req.get("reason", "")),
                             str(req.get("actor", "operator")), self.clock.now())
        else:
            log.info("run %s (%s v%s): resuming from %s", record.id, record.saga,
                     record.version, record.status.value,
                     extra={"run_id": record.id, "saga": record.saga})
            first = Recover(self.clock.now())
        d.task = asyncio.create_task(self._drive(d, [], first),
                                     name=f"sagaway-run-{record.id}")

    def _fail_unreadable(self, record: RunRecord) -> None:
        """The run's payloads cannot be decrypted here (a key that is not configured): end
        it FAILED with the reason, its sealed data untouched, so an operator can restore the
        key and then compensate or resolve it. Other runs are not affected."""
        error = (f"cannot read this run's data: {record.payload_error}; configure the key, "
                 f"then compensate or resolve the run")
        log.error("run %s (%s v%s): %s", record.id, record.saga, record.version, error)
        now = self.clock.now()
        state = dict(record.state)
        state["status"] = SagaStatus.FAILED.value
        state["error"] = error
        history: builtins.list[HistoryEntry] = []
        # As an operator's takeover would: attempts in flight were cut (possibly applied),
        # timers are off; `compensate` or `retry` later reopens the run from here.
        steps = {name: dict(step) for name, step in state.get("steps", {}).items()}
        for name, step in steps.items():
            if step.get("status") == StepStatus.RUNNING.value:
                history.append(HistoryEntry(now, "step.interrupted", name,
                                            step.get("attempts")))
                step.update(status=StepStatus.FAILED.value, maybe_applied=True,
                            error="interrupted: the run's data could not be read")
            elif step.get("status") == StepStatus.WAITING.value:
                step["status"] = StepStatus.FAILED.value
            elif step.get("status") == StepStatus.COMPENSATING.value:
                step["status"] = StepStatus.COMPENSATION_WAITING.value
            step.pop("wake_at", None)
        state["steps"] = steps
        history.append(HistoryEntry(now, "run.finished",
                                    data={"status": SagaStatus.FAILED.value, "error": error,
                                          "cause": "payload_unreadable"}))
        update = RunUpdate(
            run_id=record.id, expected_version=record.row_version, status=SagaStatus.FAILED,
            state=state, error=error, wake_at=None, now=now, history=history,
            release=True, clear_request=record.request is not None,
        )

        async def write() -> None:
            try:
                ok = await self._require_open().update(update)
            except (StoreError, OrchestratorClosed) as exc:
                log.warning("run %s: could not record its failure (%s); releasing it",
                            record.id, exc)
                ok = False
            if not ok:
                with contextlib.suppress(Exception):
                    await self.store.release_leases(owner=self.worker_id,
                                                    run_ids=[record.id])

        task = asyncio.create_task(write(), name=f"sagaway-fail-{record.id}")
        self._background_writes.add(task)
        task.add_done_callback(self._background_writes.discard)

    async def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            seq = self._claim_seq
            try:
                held = await self.store.renew_leases(owner=self.worker_id,
                                                     lease_seconds=self.lease_seconds)
            except StoreError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            # Drivers whose lease is gone: another worker has the run. Only runs that were
            # ours before the renewal was sent count; later claims are not in its answer.
            lost = [d for rid, d in self._drivers.items()
                    if rid not in held and d.committed and d.claim_seq <= seq
                    and not d.done.is_set() and not d.state.status.finished
                    and not d.releasing]
            for d in lost:
                log.warning("run %s: lease lost; stopping", d.run_id)
                self._stop_driver(d)
                self._abandon(d)
            # Leases held with no driver (a driver that hit a store error): let them go.
            orphans = held - set(self._drivers)
            if orphans:
                with contextlib.suppress(StoreError):
                    await self.store.release_leases(owner=self.worker_id, run_ids=orphans)
                self._poll_now.set()
    # -- replies to command steps -----------------------------------------------------------

    async def _on_reply(self, delivery: Delivery) -> None:
        """A participant answered: wake the run with the answer as its next event."""
        envelope = delivery.envelope
        if self._sealer is not None:
            # A reply sealed by a participant with the same keys (a plaintext one passes).
            envelope = dataclasses.replace(
                envelope, payload=self._sealer.open_payload(envelope.id, envelope.payload))
        reply = parse_reply(envelope)
        event = reply.event(self.clock.now())
        # The run may be held for a moment (it is parking, or a worker drives a sibling
        # step): keep the reply and try again until a lease could have run out, rather than
        # handing it back and burning its deliveries.
        deadline = time.monotonic() + self.lease_seconds + self.poll_interval
        pause = 0.02
        while True:
            d = self._drivers.get(reply.run_id)
            if d is not None and not d.releasing and not d.done.is_set():
                d.events.put_nowait(event)
                return
            record = await self.store.claim_run(reply.run_id, owner=self.worker_id,
                                                lease_seconds=self.lease_seconds)
            if record is not None:
                break
            existing = await self.store.get_run(reply.run_id, history=False)
            if existing is None or existing.status.finished:
                log.info("reply for %s step %s: the run is %s; nothing to wake", reply.run_id,
                         reply.step, existing.status.value if existing else "unknown")
                return
            if time.monotonic() > deadline:
                raise TransportError(f"run {reply.run_id} is held by {existing.owner}; "
                                     f"redeliver")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        if (record.saga, record.version) not in self._definitions:
            await self.store.release_leases(owner=self.worker_id, run_ids=[record.id])
            raise UnknownSaga(f"a reply for run {record.id} of {record.saga} v{record.version}, "
                              f"which this worker does not register")
        self._adopt(record, first=event)
