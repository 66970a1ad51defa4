"""The tracker: projects a choreography's events into the run records orchestrated sagas use.

It consumes the flow's tracker queue (``{prefix}.tracker``; every event of the flow is
written there too) and, per event, writes one transition of the run named by the
envelope's ``run_id``: the first event creates the run (under the flow's name and version),
each later one appends its timeline line and sets the status the flow gives the events seen
so far (see :mod:`sagaway.choreography.projection`). So ``sagaway runs``, ``sagaway show``,
the admin API, the dashboard and metrics listeners show choreographed sagas as they show
orchestrated ones.

**One writer per run.** Several trackers may consume one queue. Every write to an existing
run is made under the store's lease: ``claim_run`` (which bumps the row version, fencing
anyone else) then one fenced ``commit`` that also releases the lease. A claim that loses
waits a moment and tries again; in one process, events of one run are projected one at a
time. A duplicate (the same envelope id) is found in the run's state and writes nothing.

**Stuck.** Each write sets the run's ``wake_at`` to the flow's deadline after the event.
A run still active then is claimed by ``claim_due`` (the flow's name and version are the
"definition" the tracker drives) and reported stuck: a ``run.stuck`` timeline line and an
``error`` saying how long it has been silent and which services it waits for. Its status
stays RUNNING or COMPENSATING, because a late event still moves it on (the service was
only down), and its ``updated_at`` stays the time of its last event, so
``Orchestrator.list(stuck_for=…)``, ``sagaway runs`` and the admin API's ``stuck`` flag
agree with it. A stuck run is checked again every ``recheck`` seconds, with no new line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagaway.choreography.flow import Choreography
from sagaway.choreography.projection import project, stuck_reason
from sagaway.engine.listener import Listener, Transition
from sagaway.errors import LeaseLost, StoreError
from sagaway.messaging import open_transport
from sagaway.messaging.base import (
    DEFAULT_GRACE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_PREFETCH,
    Delivery,
    Subscription,
    Transport,
)
from sagaway.participant.core import CommandRejected
from sagaway.run import HistoryEntry, SagaStatus
from sagaway.store import open_store
from sagaway.store.base import NewRun, RunRecord, RunUpdate, Store

if TYPE_CHECKING:
    from sagaway.protection.codec import PayloadCodec

__all__ = ["Tracker"]

log = logging.getLogger("sagaway.choreography")


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Tracker:
    """Keeps the run records of one or more choreographies.

    Args:
        store: the saga log (a :class:`~sagaway.Store` or a URL), the one your orchestrators
            and admin API use.
        transport: a :class:`~sagaway.messaging.Transport` or a transport URL.
        flows: the choreographies to track.
        listeners: :class:`~sagaway.Listener` s told of each committed transition (metrics,
            logs), as the orchestrator tells them.
        owner: this tracker's lease owner id (default: host and pid).
        lease: seconds a run is held for one write.
        poll_interval: seconds between looks for runs past their deadline.
        recheck: seconds between looks at a run already reported stuck.
        store_patience: seconds an event waits out store errors (unacknowledged) before it
            is given back to the broker, which counts it towards ``max_deliveries``.
        prefetch, max_deliveries, grace: the tracker queue's consumer settings.

    A store or transport built from a URL, or a transport it opened, it closes in ``aclose``.
    """

    def __init__(
        self,
        store: Store | str,
        transport: Transport | str,
        flows: Sequence[Choreography],
        *,
        listeners: Sequence[Listener] = (),
        owner: str | None = None,
        lease: float = 10.0,
        poll_interval: float = 1.0,
        recheck: float = 3600.0,
        store_patience: float = 60.0,
        prefetch: int = DEFAULT_PREFETCH,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        grace: float | None = DEFAULT_GRACE,
        codec: PayloadCodec | bool | None = None,
    ) -> None:
        if not flows:
            raise ValueError("a Tracker needs at least one choreography to track")
        self.store = open_store(store) if isinstance(store, str) else store
        self._own_store = isinstance(store, str)
        self.transport = open_transport(transport) if isinstance(transport, str) else transport
        self.flows = {f.name: f for f in flows}
        if len(self.flows) != len(flows):
            raise ValueError("two of the tracked choreographies have the same name")
        self.listeners = tuple(listeners)
        if codec is None or codec is True:
            from sagaway.protection.codec import codec_from_env

            codec = codec_from_env()
        self.codec: PayloadCodec | None = codec or None
        """Opens the events' sealed payloads (the services' codec; ``SAGAWAY_KEYS`` when
        None). Give the tracker an EncryptedStore to keep them sealed at rest."""
        self.owner = owner or f"tracker-{socket.gethostname()}-{os.getpid()}"
        self.lease = lease
        self.poll_interval = poll_interval
        self.recheck = recheck
        self.store_patience = store_patience
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.grace = grace
        self._subscriptions: list[Subscription] = []
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._close_store = False
        self._close_transport = False
        self._stop = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store and transport, subscribe to each flow's tracker queue and start
        looking for stuck runs. Idempotent."""
        if self._subscriptions:
            return
        self._stop.clear()
        try:
            await self.store.open()  # idempotent
            self._close_store = self._own_store
            if not self.transport.is_open:
                await self.transport.open()
                self._close_transport = True
            for flow in self.flows.values():
                self._subscriptions.append(await self.transport.subscribe(
                    flow.tracker_destination,
                    lambda d, flow=flow: self._on_delivery(flow, d),  # type: ignore[misc]
                    prefetch=self.prefetch,
                    max_deliveries=self.max_deliveries,
                ))
            self._poller = asyncio.create_task(self._poll_loop(), name="sagaway-tracker-poll")
        except BaseException:
            await self.aclose()
            raise
        log.info("tracker %s: tracking %s", self.owner, sorted(self.flows))

    async def aclose(self) -> None:
        """Stop consuming (running projections finish), stop polling, close. Idempotent."""
        subs, self._subscriptions = self._subscriptions, []
        poller, self._poller = self._poller, None
        try:
            for sub in subs:
                await sub.stop(grace=self.grace)
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
        finally:
            if self._close_transport:
                self._close_transport = False
                await self.transport.aclose()
            if self._close_store:
                self._close_store = False
                await self.store.aclose()
            self._stop.set()

    async def run(self) -> None:
        """Open, track until :meth:`stop` is called or the task is cancelled, then close."""
        await self.open()
        try:
            await self._stop.wait()
        finally:
            await self.aclose()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    async def __aenter__(self) -> Tracker:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- projecting one event ---------------------------------------------------------------

    async def _on_delivery(self, flow: Choreography, delivery: Delivery) -> None:
        env = delivery.envelope
        if not env.run_id:
            raise CommandRejected(
                f"event {env.type!r} {env.id} on {delivery.source} carries no run_id (saga "
                f"id), so the tracker cannot tell which run it belongs to"
            )
        # Events of one run are projected one at a time here (a claim would serialise them
        # anyway, but with sleeps); the entry goes when its last user leaves.
        lock, users = self._locks.get(env.run_id, (asyncio.Lock(), 0))
        self._locks[env.run_id] = (lock, users + 1)
        try:
            payload = env.payload
            if self.codec is not None:
                payload = self.codec.open(payload, aad=f"msg:{env.id}")
            async with lock:
                await self._project_patiently(flow, env.run_id, env.type, env.id,
                                              payload, env.created_at)
        finally:
            lock, users = self._locks[env.run_id]
            if users <= 1:
                del self._locks[env.run_id]
            else:
                self._locks[env.run_id] = (lock, users - 1)

    async def _project_patiently(self, flow: Choreography, run_id: str, event: str,
                                 event_id: str, payload: Any, at: float) -> None:
        # A store that is briefly unreachable (a database restart) is waited out here, the
        # event held unacknowledged, rather than raised: the broker would redeliver at once
        # and the event would reach the dead letter within milliseconds.
        delay, waited = 0.1, 0.0
        while True:
            try:
                await self._project(flow, run_id, event, event_id, payload, at)
                return
            except StoreError as exc:
                if isinstance(exc, LeaseLost) or waited >= self.store_patience:
                    raise
                log.warning("tracker: the store failed projecting %s of run %s, retrying "
                            "in %.1fs: %s", event, run_id, delay, exc)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    async def _project(self, flow: Choreography, run_id: str, event: str, event_id: str,
                       payload: Any, at: float) -> None:
        delay = 0.01
        deadline = time.monotonic() + max(self.lease * 3, 5.0)
        while True:
            # Read before claiming: a claim bumps the row version, so claiming a run of
            # another saga (an event carrying a foreign run id) would fence its worker.
            record = await self.store.get_run(run_id, history=False)
            if record is None:
                if await self._create(flow, run_id, event, event_id, payload, at):
                    return
                continue  # another tracker created it first: claim it
            if record.saga != flow.name:
                raise CommandRejected(
                    f"run {run_id} belongs to saga {record.saga!r}, not to choreography "
                    f"{flow.name!r}: an event carried a run id it does not own"
                )
            if self._seen(record, event_id):
                return
            if record.status.finished:
                log.info("tracker: %s (%s) for run %s arrived after it finished %s; not "
                         "recorded", event, event_id, run_id, record.status.value)
                return
            claimed = await self.store.claim_run(run_id, owner=self.owner,
                                                 lease_seconds=self.lease)
            if claimed is not None:
                if await self._update(flow, claimed, event, event_id, payload, at):
                    return
            elif time.monotonic() > deadline:
                raise LeaseLost(
                    f"run {run_id} stayed claimed by another writer; the event goes back to "
                    f"the queue to be projected again"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    @staticmethod
    def _seen(record: RunRecord, event_id: str) -> bool:
        section = record.state.get("choreography") or {}
        return any(e[1] == event_id for e in section.get("events", ())) or \
            event_id in section.get("ignored", ())

    async def _create(self, flow: Choreography, run_id: str, event: str, event_id: str,
                      payload: Any, at: float) -> bool:
        now = time.time()
        p = project(flow, None, event=event, event_id=event_id, payload=payload, at=at,
                    received_at=now)
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        result = await self.store.commit(
            [NewRun(
                id=run_id, saga=flow.name, version=flow.version, status=p.status,
                input_json=text, input_hash=_fingerprint(text), state=p.state,
                idempotency_key=run_id, wake_at=self._wake(flow, p.status, now), now=now,
                history=p.entries, leased=False,
            )],
            [], owner=self.owner, lease_seconds=self.lease,
        )
        created = result.created[0]
        if created.record.id != run_id:
            raise StoreError(f"run {run_id}: the store returned run {created.record.id}")
        if created.created:
            self._notify(flow, run_id, p.status, p.entries, 1, created_at=now)
        return created.created

    async def _update(self, flow: Choreography, record: RunRecord, event: str, event_id: str,
                      payload: Any, at: float) -> bool:
        now = time.time()
        p = project(flow, record.state, event=event, event_id=event_id, payload=payload,
                    at=at, received_at=now)
        result = await self.store.commit(
            [], [RunUpdate(
                run_id=record.id, expected_version=record.row_version, status=p.status,
                state=p.state, error=p.error, wake_at=self._wake(flow, p.status, now), now=now,
                history=p.entries, release=True,
            )],
            owner=self.owner, lease_seconds=self.lease,
        )
        if not result.updated[0]:
            return False
        if p.entries:
            self._notify(flow, record.id, p.status, p.entries, record.row_version + 1,
                         created_at=record.created_at)
        return True

    @staticmethod
    def _wake(flow: Choreography, status: SagaStatus, now: float) -> float | None:
        # A finished run needs no timer; an active one is due for the stuck check at its
        # deadline (never None: claim_due takes active runs without a timer at once).
        return None if status.finished else now + flow.deadline

    def _notify(self, flow: Choreography, run_id: str, status: SagaStatus,
                entries: Sequence[HistoryEntry], seq: int, *, created_at: float | None
                ) -> None:
        if not self.listeners:
            return
        # created_at lets duration metrics cover choreographed runs as well.
        transition = Transition(run_id=run_id, saga=flow.name, version=flow.version,
                                status=status, entries=tuple(entries), seq=seq,
                                created_at=created_at)
        for listener in self.listeners:
            try:
                listener.on_transition(transition)
            except Exception:
                log.exception("tracker: listener %r failed on a transition", listener)

    # -- stuck runs ---------------------------------------------------------------------------

    async def check_stuck(self) -> int:
        """Claim the runs past their deadline and report them stuck; return how many."""
        definitions = [(f.name, f.version) for f in self.flows.values()]
        records = await self.store.claim_due(owner=self.owner, lease_seconds=self.lease,
                                             limit=100, definitions=definitions)
        for record in records:
            if record.request is not None:
                await self._answer_request(self.flows[record.saga], record)
            else:
                await self._mark_stuck(self.flows[record.saga], record)
        return len(records)

    async def _answer_request(self, flow: Choreography, record: RunRecord) -> None:
        """Carry out an operator's request on a choreographed run, as far as one can.

        ``resolve`` (a FAILED run settled by hand) is applied. ``retry``, ``resume`` and
        ``compensate`` would need the services to act, and no orchestrator drives them:
        the request is recorded as ignored, with what to do instead, and cleared.
        """
        now = time.time()
        request = record.request or {}
        action = str(request.get("action"))
        status, wake = record.status, record.wake_at
        if action == "resolve" and record.status is SagaStatus.FAILED:
            status, wake = SagaStatus.RESOLVED, None
            entries = [HistoryEntry(at=now, kind="operator.resolve",
                                    data={"actor": request.get("actor"),
                                          "reason": request.get("reason")}),
                       HistoryEntry(at=now, kind="run.finished",
                                    data={"status": SagaStatus.RESOLVED.value})]
        else:
            entries = [HistoryEntry(at=now, kind="event.ignored", data={
                "request": request,
                "reason": (f"{action!r} cannot be carried out on a choreographed run: its "
                           f"services act on events, not on an orchestrator's commands. Emit "
                           f"the event the run waits for (sagaway.choreography.emit_event), "
                           f"or fix it in the services and resolve the run once FAILED"),
            })]
            if not status.finished and wake is None:
                wake = now + flow.deadline
        state = dict(record.state, status=status.value)
        ok = (await self.store.commit(
            [], [RunUpdate(
                run_id=record.id, expected_version=record.row_version, status=status,
                state=state, error=record.error, wake_at=wake, now=now, history=entries,
                release=True, clear_request=True,
            )],
            owner=self.owner, lease_seconds=self.lease,
        )).updated[0]
        if ok:
            self._notify(flow, record.id, status, entries, record.row_version + 1,
                         created_at=record.created_at)

    async def _mark_stuck(self, flow: Choreography, record: RunRecord) -> None:
        now = time.time()
        state = dict(record.state)
        section = dict(state.get("choreography") or {})
        last = float(section.get("last_event_at") or record.updated_at)
        entries: list[HistoryEntry] = []
        error = record.error
        if not section.get("stuck"):
            error = stuck_reason(flow, state, now - last)
            section["stuck"] = True
            section["stuck_at"] = now
            state["choreography"] = section
            state["error"] = error
            entries.append(HistoryEntry(at=now, kind="run.stuck",
                                        data={"reason": error, "silent_for": round(now - last, 3)}))
        # updated_at stays the time of the last event, so stuck_for filters agree.
        ok = (await self.store.commit(
            [], [RunUpdate(
                run_id=record.id, expected_version=record.row_version, status=record.status,
                state=state, error=error, wake_at=now + max(self.recheck, flow.deadline),
                now=last, history=entries, release=True,
            )],
            owner=self.owner, lease_seconds=self.lease,
        )).updated[0]
        if ok and entries:
            log.warning("tracker: run %s of %s is %s", record.id, flow.name, error)
            self._notify(flow, record.id, record.status, entries, record.row_version + 1,
                         created_at=record.created_at)

    async def _poll_loop(self) -> None:
        while True:
            try:
                while await self.check_stuck():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tracker: looking for stuck runs failed; trying again")
            await asyncio.sleep(self.poll_interval)

    def __repr__(self) -> str:
        state = "running" if self._subscriptions else "stopped"
        return f"<Tracker {sorted(self.flows)} {state}>"
