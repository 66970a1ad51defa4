"""The store conformance suite: the behaviour every ``sagaway.store.base.Store`` must have.

Importing this module requires pytest and pytest-asyncio (dev dependencies, not runtime
ones): it is a base class of pytest tests. A backend's test module subclasses
:class:`StoreConformance` under a name pytest collects (``Test...``) and provides a
``store`` fixture; pytest then runs every test below against that backend::

    import pytest
    from sagaway.testing import FakeClock
    from sagaway.testing.conformance import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def store(self, clock: FakeClock, tmp_path):
            async with MyStore(tmp_path / "sagas.db", clock=clock) as store:
                yield store

The tests run with pytest-asyncio (``asyncio_mode = "auto"``, or mark the subclass with
``pytest.mark.asyncio``). The helpers (``new_run``, ``update``, ``create``, ``apply``,
``fetch``) and constants are public too, for a backend's own extra tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from sagaway.errors import SagawayError, StoreError
from sagaway.run import HistoryEntry, SagaStatus
from sagaway.store.base import (
    NewRun,
    OutboxMessage,
    PayloadRewrite,
    RunRecord,
    RunUpdate,
    Store,
    StoredPayloads,
)
from sagaway.testing import FakeClock

__all__ = [
    "AWKWARD_HISTORY",
    "AWKWARD_JSON",
    "DEFS",
    "LEASE",
    "OTHER",
    "OWNER",
    "T0",
    "StoreConformance",
    "apply",
    "canonical",
    "create",
    "fetch",
    "new_run",
    "update",
]

T0 = 1_700_000_000.0
"""Where every test's clock starts."""
LEASE = 30.0
OWNER = "worker-a"
OTHER = "worker-b"
THIRD = "worker-c"
SAGA = "order"
DEFS = [(SAGA, 1)]
"""The ``definitions`` a worker driving only ``order`` v1 passes to ``claim_due``."""
DEFAULT_INPUT: dict[str, Any] = {"sku": "A-1", "qty": 2}

ACTIVE = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
FINISHED = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)

# JSON a store must give back exactly: every kind of value, awkward strings, integers past
# 64 bits, floats that need all 17 digits.
AWKWARD_JSON: dict[str, Any] = {
    "unicode": "Zürich \u2013 東京 \u2013 مرحبا \u2013 🦄 \u2013 e\u0301 \u2013 \u2028",
    "escapes": 'quote " backslash \\ slash / newline \n tab \t bell \x07',
    "ints": [0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, -(10**30)],
    "floats": [0.1, -2.5, 1e-300, 1.7976931348623157e308, 5e-324, 123456789.12345679, -0.0],
    "bools": [True, False],
    "null": None,
    "empty": {"list": [], "dict": {}, "str": ""},
    "nested": {"a": [{"b": [{"c": [1, [2, [3, {"d": None}]]]}]}]},
    "🔑 key with spaces": "value",
    "": "empty key",
}

AWKWARD_HISTORY = [
    HistoryEntry(at=T0 + 0.125, kind="started"),
    HistoryEntry(at=T0 + 0.5, kind="step_started", step="reserve", attempt=1),
    HistoryEntry(
        at=T0 + 1.0000001,
        kind="step_failed",
        step="réserve 🦄",
        attempt=0,
        data={"error": "Zeitüberschreitung\nline 2", "n": 2**64, "deep": {"x": [1.5, None]}},
    ),
    HistoryEntry(at=T0 + 2.75, kind="finished", data={"status": "COMPLETED"}),
]


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 from True and -0.0 from 0.0 (``==`` does not)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def state_doc(step_status: str = "RUNNING", attempts: int = 1) -> dict[str, Any]:
    """A decider-shaped state document."""
    return {
        "status": "RUNNING",
        "stage": 0,
        "steps": {"reserve": {"status": step_status, "attempts": attempts}},
    }


def new_run(
    run_id: str | None = None,
    *,
    saga: str = SAGA,
    version: int = 1,
    status: SagaStatus = SagaStatus.RUNNING,
    input: Any = DEFAULT_INPUT,
    state: dict[str, Any] | None = None,
    key: str | None = None,
    wake_at: float | None = None,
    now: float = T0,
    history: Sequence[HistoryEntry] = (),
) -> NewRun:
    """A NewRun as the engine builds it (input encoded the way ``engine.payload`` does)."""
    text = json.dumps(
        input,
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=True,
    )
    return NewRun(
        id=run_id or f"run-{uuid.uuid4().hex}",
        saga=saga,
        version=version,
        status=status,
        input_json=text,
        input_hash=hashlib.sha256(text.encode()).hexdigest(),
        state=state_doc() if state is None else state,
        idempotency_key=key,
        wake_at=wake_at,
        now=now,
        history=history,
    )


def update(
    run_id: str,
    expected_version: int,
    *,
    status: SagaStatus = SagaStatus.RUNNING,
    state: dict[str, Any] | None = None,
    error: str | None = None,
    wake_at: float | None = None,
    now: float = T0 + 1,
    history: Sequence[HistoryEntry] = (),
    release: bool = False,
) -> RunUpdate:
    """A fenced transition of ``run_id`` from ``expected_version``."""
    return RunUpdate(
        run_id=run_id,
        expected_version=expected_version,
        status=status,
        state=state_doc("SUCCEEDED") if state is None else state,
        error=error,
        wake_at=wake_at,
        now=now,
        history=history,
        release=release,
    )


async def create(store: Store, *runs: NewRun, owner: str = OWNER) -> list[RunRecord]:
    """Commit ``runs`` (all new) and return their records."""
    result = await store.commit(runs, [], owner=owner, lease_seconds=LEASE)
    assert [c.created for c in result.created] == [True] * len(runs)
    assert result.updated == []
    return [c.record for c in result.created]


async def apply(store: Store, *updates: RunUpdate, owner: str = OWNER) -> list[bool]:
    """Commit ``updates`` and return which were applied."""
    result = await store.commit([], updates, owner=owner, lease_seconds=LEASE)
    assert result.created == []
    return result.updated


async def fetch(store: Store, run_id: str, *, history: bool = True) -> RunRecord:
    """``get_run`` for a run that must exist."""
    record = await store.get_run(run_id, history=history)
    assert record is not None, f"run {run_id} is missing"
    return record


async def release_all(store: Store, owner: str = OWNER) -> None:
    await store.release_leases(owner=owner)


class StoreConformance:
    """The contract of the store port, as tests. Subclass it to test a backend.

    Fixtures:
        clock: a :class:`~sagaway.testing.FakeClock` starting at ``T0``, provided here.
            Lease expiry is tested by advancing it, never by sleeping.
        store: **provided by the subclass**: an opened, empty store whose clock is the
            ``clock`` fixture (``MyStore(..., clock=clock)``), closed after the test. Each
            test gets its own store: with a shared database server, give each one a fresh
            schema or database. A backend whose leases are stamped by the database server's
            clock must accept an injected clock to run this suite.

    Every test uses one store; the workers it plays (``worker-a``, ``worker-b``, …) are owner
    names. A test that a backend is known to fail is overridden in that backend's module,
    marked ``xfail(strict=True)``, and calls ``super()``, so it fails loudly once fixed.
    """

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(T0)

    @pytest.fixture
    async def store(self, clock: FakeClock) -> AsyncIterator[Store]:
        raise NotImplementedError(
            f"{type(self).__name__} must override the `store` fixture: yield an opened, empty "
            f"store built with clock=clock"
        )
        yield  # pragma: no cover - makes this an async generator, like the overrides

    # -- clock and lifecycle ----------------------------------------------------------------

    async def test_now_is_the_injected_clock(self, store: Store, clock: FakeClock) -> None:
        assert await store.now() == T0
        clock.advance(12.5)
        assert await store.now() == T0 + 12.5

    async def test_open_and_close_are_idempotent(self, store: Store) -> None:
        await store.open()
        [run] = await create(store, new_run())
        assert (await fetch(store, run.id)).row_version == 1
        await store.aclose()
        await store.aclose()  # and the fixture closes it once more

    # -- commit: creations ------------------------------------------------------------------

    async def test_create_leases_the_run_to_its_owner(self, store: Store, clock: FakeClock) -> None:
        clock.advance(5)
        # The engine's clock (NewRun.now) need not agree with the store's: created_at and
        # updated_at come from the former, the lease from the latter.
        new = new_run(
            "run-1",
            status=SagaStatus.RUNNING,
            input={"order": 7, "lines": ["a", "b"]},
            key="order-7",
            wake_at=T0 + 60,
            now=T0 + 1.25,
            history=AWKWARD_HISTORY[:2],
        )
        result = await store.commit([new], [], owner=OWNER, lease_seconds=LEASE)

        expected = RunRecord(
            id="run-1",
            saga=SAGA,
            version=1,
            status=SagaStatus.RUNNING,
            input={"order": 7, "lines": ["a", "b"]},
            state=state_doc(),
            error=None,
            idempotency_key="order-7",
            input_hash=new.input_hash,
            owner=OWNER,
            lease_expires=T0 + 5 + LEASE,
            wake_at=T0 + 60,
            row_version=1,
            created_at=T0 + 1.25,
            updated_at=T0 + 1.25,
        )
        assert result.updated == []
        [created] = result.created
        assert created.created is True
        assert _without_history(created.record) == expected
        assert await store.get_run("run-1") == _with_history(expected, AWKWARD_HISTORY[:2])
        assert await store.get_run("run-1", history=False) == expected

    async def test_create_several_in_one_batch(self, store: Store) -> None:
        runs = [new_run(f"run-{i}", input={"i": i}, key=f"k-{i}") for i in range(5)]
        records = await create(store, *runs)
        assert [r.id for r in records] == [f"run-{i}" for i in range(5)]
        for i in range(5):
            got = await fetch(store, f"run-{i}")
            assert (got.input, got.idempotency_key, got.owner, got.row_version) == (
                {"i": i},
                f"k-{i}",
                OWNER,
                1,
            )

    async def test_runs_without_a_key_are_never_deduplicated(self, store: Store) -> None:
        a, b = await create(store, new_run(), new_run())
        assert a.id != b.id
        assert a.idempotency_key is None and b.idempotency_key is None
        [c] = await create(store, new_run())
        assert len({a.id, b.id, c.id}) == 3

    async def test_create_with_a_used_key_returns_the_existing_run(
        self, store: Store, clock: FakeClock
    ) -> None:
        [first] = await create(store, new_run("run-1", key="k", history=AWKWARD_HISTORY[:1]))
        assert await apply(store, update("run-1", 1, history=AWKWARD_HISTORY[1:2])) == [True]
        current = await fetch(store, "run-1", history=False)
        clock.advance(1)

        again = new_run("run-2", key="k", input={"other": True}, history=AWKWARD_HISTORY[2:])
        result = await store.commit([again], [], owner=OTHER, lease_seconds=LEASE * 2)

        [dup] = result.created
        assert dup.created is False
        # The run as it is now, untouched: same owner, same lease, no history appended.
        assert _without_history(dup.record) == current
        assert current.row_version == 2 and current.owner == OWNER
        assert current.lease_expires == first.lease_expires
        assert await store.get_run("run-2") is None
        assert (await fetch(store, "run-1")).history == AWKWARD_HISTORY[:2]

    async def test_same_key_twice_in_one_batch_creates_one_run(self, store: Store) -> None:
        result = await store.commit(
            [new_run("run-1", key="k"), new_run("run-2", key="k", input={"x": 2})],
            [],
            owner=OWNER,
            lease_seconds=LEASE,
        )
        assert [c.created for c in result.created] == [True, False]
        assert [c.record.id for c in result.created] == ["run-1", "run-1"]
        assert result.created[1].record.input == DEFAULT_INPUT
        assert await store.get_run("run-2") is None
        assert [r.id for r in await store.list_runs()] == ["run-1"]

    async def test_same_key_under_another_saga_is_another_run(self, store: Store) -> None:
        result = await store.commit(
            [new_run("run-1", saga="order", key="k"), new_run("run-2", saga="refund", key="k")],
            [],
            owner=OWNER,
            lease_seconds=LEASE,
        )
        assert [(c.created, c.record.id, c.record.saga) for c in result.created] == [
            (True, "run-1", "order"),
            (True, "run-2", "refund"),
        ]

    async def test_find_run_by_saga_and_key(self, store: Store) -> None:
        await store.commit(
            [new_run("run-1", saga="order", key="k"), new_run("run-2", saga="refund", key="k"),
             new_run("run-3", saga="order")],
            [], owner=OWNER, lease_seconds=LEASE,
        )
        found = await store.find_run("order", "k")
        assert found is not None and found.id == "run-1" and found.input == DEFAULT_INPUT
        assert found.idempotency_key == "k" and found.history is None
        refund = await store.find_run("refund", "k")
        assert refund is not None and refund.id == "run-2"
        assert await store.find_run("order", "other") is None
        assert await store.find_run("shipping", "k") is None
        # Keys are data, never SQL.
        assert await store.find_run("order", "k' OR '1'='1") is None

    async def test_create_with_an_existing_id_fails_and_applies_nothing(self, store: Store) -> None:
        """An id collision (no key to deduplicate on) must never overwrite a run."""
        await create(store, new_run("run-1", history=AWKWARD_HISTORY[:1]))
        before = await fetch(store, "run-1")

        with pytest.raises(StoreError):
            await store.commit(
                [new_run("run-2"), new_run("run-1", input={"clobbered": True})],
                [update("run-1", 1)],
                owner=OTHER,
                lease_seconds=LEASE,
            )

        assert await fetch(store, "run-1") == before
        assert await store.get_run("run-2") is None

    # -- commit: fenced updates -------------------------------------------------------------

    async def test_update_applies_and_bumps_the_row_version(
        self, store: Store, clock: FakeClock
    ) -> None:
        [run] = await create(store, new_run("run-1", history=AWKWARD_HISTORY[:1]))
        clock.advance(3)
        new_state = state_doc("WAITING", attempts=2)
        applied = await apply(
            store,
            update(
                "run-1",
                1,
                status=SagaStatus.COMPENSATING,
                state=new_state,
                error="card declined",
                wake_at=T0 + 99,
                now=T0 + 7.5,
                history=AWKWARD_HISTORY[1:3],
            ),
        )
        assert applied == [True]
        got = await fetch(store, "run-1")
        assert got == _with_history(
            RunRecord(
                id="run-1",
                saga=SAGA,
                version=1,
                status=SagaStatus.COMPENSATING,
                input=run.input,
                state=new_state,
                error="card declined",
                idempotency_key=None,
                input_hash=run.input_hash,
                owner=OWNER,
                lease_expires=run.lease_expires,
                wake_at=T0 + 99,
                row_version=2,
                created_at=run.created_at,
                updated_at=T0 + 7.5,
            ),
            AWKWARD_HISTORY[:3],
        )

    async def test_successive_updates_append_history_in_order(self, store: Store) -> None:
        await create(store, new_run("run-1", history=AWKWARD_HISTORY[:1]))
        for version, entry in enumerate(AWKWARD_HISTORY[1:], start=1):
            assert await apply(store, update("run-1", version, history=[entry])) == [True]
        got = await fetch(store, "run-1")
        assert got.row_version == len(AWKWARD_HISTORY)
        assert got.history == AWKWARD_HISTORY

    async def test_update_with_a_stale_version_is_fenced(self, store: Store) -> None:
        await create(store, new_run("run-1", history=AWKWARD_HISTORY[:1]))
        assert await apply(store, update("run-1", 1)) == [True]
        before = await fetch(store, "run-1")
        stale = [
            update("run-1", v, status=SagaStatus.FAILED, error="stale", history=AWKWARD_HISTORY)
            for v in (0, 1, 3)
        ]
        assert await apply(store, *stale) == [False, False, False]
        assert await fetch(store, "run-1") == before

    async def test_update_by_another_owner_is_fenced(self, store: Store) -> None:
        await create(store, new_run("run-1"))
        before = await fetch(store, "run-1")
        bad = update("run-1", 1, status=SagaStatus.FAILED, history=AWKWARD_HISTORY)
        assert await apply(store, bad, owner=OTHER) == [False]
        assert await fetch(store, "run-1") == before

    async def test_update_of_an_unknown_run_is_fenced(self, store: Store) -> None:
        assert await apply(store, update("no-such-run", 1)) == [False]
        assert await store.get_run("no-such-run") is None

    async def test_update_with_release_drops_the_lease(self, store: Store) -> None:
        await create(store, new_run("run-1"))
        done = update(
            "run-1", 1, status=SagaStatus.COMPLETED, release=True, history=AWKWARD_HISTORY[3:]
        )
        assert await apply(store, done) == [True]
        got = await fetch(store, "run-1")
        assert (got.status, got.owner, got.lease_expires, got.row_version) == (
            SagaStatus.COMPLETED,
            None,
            None,
            2,
        )
        assert got.history == AWKWARD_HISTORY[3:]
        # Released means no longer owned: the former owner's next write is fenced.
        assert await apply(store, update("run-1", 2)) == [False]

    async def test_a_fenced_update_does_not_fail_the_rest_of_the_batch(self, store: Store) -> None:
        await create(store, new_run("run-a"), new_run("run-b"), new_run("run-c"))
        b_before = await fetch(store, "run-b")
        result = await store.commit(
            [new_run("run-d")],
            [
                update("run-a", 1, status=SagaStatus.COMPLETED, history=AWKWARD_HISTORY[:1]),
                update("run-b", 7, status=SagaStatus.FAILED, history=AWKWARD_HISTORY[1:2]),
                update("run-gone", 1),
                update("run-c", 1, error="slow", history=AWKWARD_HISTORY[2:3]),
            ],
            owner=OWNER,
            lease_seconds=LEASE,
        )
        assert [c.created for c in result.created] == [True]
        assert result.updated == [True, False, False, True]
        a, c = await fetch(store, "run-a"), await fetch(store, "run-c")
        assert (a.status, a.row_version, a.history) == (
            SagaStatus.COMPLETED,
            2,
            AWKWARD_HISTORY[:1],
        )
        assert (c.error, c.row_version, c.history) == ("slow", 2, AWKWARD_HISTORY[2:3])
        assert await fetch(store, "run-b") == b_before
        assert (await fetch(store, "run-d")).row_version == 1

    async def test_a_failed_commit_applies_nothing(self, store: Store) -> None:
        """All or nothing: a batch that raises leaves no trace, and the store stays usable.

        The un-encodable state stands in for any failure in the middle of a batch.
        """
        await create(store, new_run("run-a"), new_run("run-b"))
        a_before, b_before = await fetch(store, "run-a"), await fetch(store, "run-b")

        with pytest.raises((TypeError, ValueError, SagawayError)):
            await store.commit(
                [new_run("run-new")],
                [
                    update("run-a", 1, status=SagaStatus.COMPLETED, history=AWKWARD_HISTORY),
                    update("run-b", 1, state={"not json": object()}),
                ],
                owner=OWNER,
                lease_seconds=LEASE,
            )

        assert await store.get_run("run-new") is None
        assert await fetch(store, "run-a") == a_before
        assert await fetch(store, "run-b") == b_before
        assert await apply(store, update("run-a", 1), update("run-b", 1)) == [True, True]

    # -- claim_due --------------------------------------------------------------------------

    async def test_claim_due_takes_unowned_active_runs_only(
        self, store: Store, clock: FakeClock
    ) -> None:
        statuses = ACTIVE + FINISHED
        await create(store, *(new_run(f"run-{s.value}", status=s) for s in statuses))
        await release_all(store)
        released = {s: await fetch(store, f"run-{s.value}", history=False) for s in statuses}
        clock.advance(1)

        claimed = await store.claim_due(owner=OTHER, lease_seconds=45, limit=100, definitions=DEFS)

        assert sorted(r.id for r in claimed) == sorted(f"run-{s.value}" for s in ACTIVE)
        for record in claimed:
            was = released[record.status]
            expected = dataclasses.replace(
                was, owner=OTHER, lease_expires=T0 + 1 + 45, row_version=was.row_version + 1
            )
            assert record == expected
            assert await store.get_run(record.id, history=False) == expected
        for s in FINISHED:
            assert await store.get_run(f"run-{s.value}", history=False) == released[s]

    async def test_claim_due_leaves_live_leases_alone(self, store: Store, clock: FakeClock) -> None:
        await create(store, new_run("run-1"))
        before = await fetch(store, "run-1")
        assert (
            await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS)
            == []
        )
        clock.advance(LEASE - 0.001)
        assert (
            await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS)
            == []
        )
        # The owner itself does not re-claim a run it holds either.
        assert (
            await store.claim_due(owner=OWNER, lease_seconds=LEASE, limit=10, definitions=DEFS)
            == []
        )
        assert await fetch(store, "run-1") == before

    async def test_claim_due_takes_expired_leases_and_fences_the_old_owner(
        self, store: Store, clock: FakeClock
    ) -> None:
        await create(store, new_run("run-1"))
        clock.advance(LEASE + 1)

        [claimed] = await store.claim_due(
            owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS
        )

        assert (claimed.id, claimed.owner, claimed.row_version, claimed.lease_expires) == (
            "run-1",
            OTHER,
            2,
            T0 + LEASE + 1 + LEASE,
        )
        # The old owner wakes up and writes with the version it knew: fenced.
        assert await apply(store, update("run-1", 1, status=SagaStatus.FAILED)) == [False]
        assert await apply(store, update("run-1", 2, status=SagaStatus.FAILED)) == [False]
        # The new owner's write goes through.
        assert await apply(store, update("run-1", 2), owner=OTHER) == [True]
        # And a third worker finds the renewed claim live.
        assert (
            await store.claim_due(owner=THIRD, lease_seconds=LEASE, limit=10, definitions=DEFS)
            == []
        )

    async def test_a_lease_is_expired_at_its_expiry_time(
        self, store: Store, clock: FakeClock
    ) -> None:
        """``lease_expires`` is the first instant the lease no longer holds (like JWT exp)."""
        [run] = await create(store, new_run("run-1"))
        assert run.lease_expires is not None
        clock.time = run.lease_expires
        claimed = await store.claim_due(
            owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS
        )
        assert [r.id for r in claimed] == ["run-1"]

    async def test_claim_due_takes_only_the_given_definitions(
        self, store: Store, clock: FakeClock
    ) -> None:
        await create(
            store,
            new_run("order-v1", saga="order", version=1),
            new_run("order-v2", saga="order", version=2),
            new_run("refund-v1", saga="refund", version=1),
        )
        await release_all(store)

        async def claim(definitions: list[tuple[str, int]]) -> list[str]:
            got = await store.claim_due(
                owner=OTHER, lease_seconds=LEASE, limit=10, definitions=definitions
            )
            return sorted(r.id for r in got)

        assert await claim([]) == []
        assert await claim([("order", 3), ("payment", 1), ("refund", 2)]) == []
        assert await claim([("order", 1), ("refund", 1)]) == ["order-v1", "refund-v1"]
        assert (await fetch(store, "order-v2")).owner is None
        assert await claim([("order", 2)]) == ["order-v2"]

    async def test_claim_due_respects_the_limit(self, store: Store) -> None:
        await create(store, *(new_run(f"run-{i}") for i in range(5)))
        await release_all(store)

        assert (
            await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=0, definitions=DEFS) == []
        )
        first = await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=2, definitions=DEFS)
        rest = await store.claim_due(owner=THIRD, lease_seconds=LEASE, limit=10, definitions=DEFS)
        assert len(first) == 2 and len(rest) == 3
        assert {r.id for r in first} | {r.id for r in rest} == {f"run-{i}" for i in range(5)}
        assert {r.owner for r in first} == {OTHER} and {r.owner for r in rest} == {THIRD}

    async def test_claim_due_takes_the_most_due_runs_first(
        self, store: Store, clock: FakeClock
    ) -> None:
        """Runs parked on a timer wait for it; under a limit, the most overdue come first."""
        await create(
            store,
            new_run("late", wake_at=T0 + 300),
            new_run("soon", wake_at=T0 + 10),
            new_run("now", wake_at=None),
            new_run("later", wake_at=T0 + 200),
        )
        await release_all(store)
        first = await store.claim_due(owner=OTHER, lease_seconds=10_000, limit=5,
                                      definitions=DEFS)
        assert [r.id for r in first] == ["now"]
        clock.advance(250)
        second = await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=1,
                                       definitions=DEFS)
        assert [r.id for r in second] == ["soon"]
        rest = await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=5, definitions=DEFS)
        assert [r.id for r in rest] == ["later"]

    async def test_claim_run_wakes_one_parked_run(self, store: Store, clock: FakeClock) -> None:
        await create(store, new_run("parked", wake_at=T0 + 300), new_run("held"))
        await release_all(store)
        await store.claim_due(owner=OWNER, lease_seconds=LEASE, limit=5, definitions=DEFS)
        got = await store.claim_run("parked", owner=OTHER, lease_seconds=LEASE)
        assert got is not None and (got.owner, got.row_version) == (OTHER, 2)
        # Not while someone holds it, and never a finished or unknown run.
        assert await store.claim_run("parked", owner=OWNER, lease_seconds=LEASE) is None
        assert await store.claim_run("held", owner=OTHER, lease_seconds=LEASE) is None
        assert await store.claim_run("nope", owner=OTHER, lease_seconds=LEASE) is None
        clock.advance(LEASE)
        again = await store.claim_run("parked", owner=OWNER, lease_seconds=LEASE)
        assert again is not None and again.owner == OWNER

    # -- renew_leases / release_leases ------------------------------------------------------

    async def test_renew_leases_extends_the_owners_active_leases(
        self, store: Store, clock: FakeClock
    ) -> None:
        await create(store, new_run("a"), new_run("b"), new_run("done"))
        [other] = await create(store, new_run("theirs"), owner=OTHER)
        assert await apply(store, update("done", 1, status=SagaStatus.COMPLETED)) == [True]
        clock.advance(10)

        held = await store.renew_leases(owner=OWNER, lease_seconds=60)

        assert held == {"a", "b"}
        for run_id in ("a", "b"):
            got = await fetch(store, run_id)
            assert (got.owner, got.lease_expires, got.row_version) == (OWNER, T0 + 70, 1)
        assert await fetch(store, "theirs", history=False) == other
        # Past the first lease, inside the renewed one: only the unrenewed run can be taken.
        clock.advance(LEASE)
        claimed = await store.claim_due(
            owner=THIRD, lease_seconds=LEASE, limit=10, definitions=DEFS
        )
        assert [r.id for r in claimed] == ["theirs"]
        assert await store.renew_leases(owner="nobody", lease_seconds=60) == set()

    async def test_renew_leases_omits_runs_taken_by_another_worker(
        self, store: Store, clock: FakeClock
    ) -> None:
        await create(store, new_run("lost"))
        clock.advance(LEASE + 1)
        await create(store, new_run("kept"))
        await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS)

        assert await store.renew_leases(owner=OWNER, lease_seconds=LEASE) == {"kept"}
        assert (await fetch(store, "lost")).owner == OTHER
        assert await store.renew_leases(owner=OTHER, lease_seconds=LEASE) == {"lost"}

    async def test_release_all_leases_lets_others_claim_at_once(self, store: Store) -> None:
        await create(store, new_run("a"), new_run("b"))
        [theirs] = await create(store, new_run("theirs"), owner=OTHER)

        await store.release_leases(owner=OWNER)

        for run_id in ("a", "b"):
            got = await fetch(store, run_id)
            assert (got.owner, got.lease_expires) == (None, None)
        assert await fetch(store, "theirs", history=False) == theirs
        assert await store.renew_leases(owner=OWNER, lease_seconds=LEASE) == set()
        claimed = await store.claim_due(
            owner=THIRD, lease_seconds=LEASE, limit=10, definitions=DEFS
        )
        assert sorted(r.id for r in claimed) == ["a", "b"]

    async def test_release_some_leases(self, store: Store) -> None:
        await create(store, new_run("a"), new_run("b"), new_run("c"))

        await store.release_leases(owner=OWNER, run_ids=[])
        assert await store.renew_leases(owner=OWNER, lease_seconds=LEASE) == {"a", "b", "c"}
        await store.release_leases(owner=OTHER, run_ids=["a", "b"])  # not OTHER's to give
        assert await store.renew_leases(owner=OWNER, lease_seconds=LEASE) == {"a", "b", "c"}

        await store.release_leases(owner=OWNER, run_ids={"a", "c", "no-such-run"})

        assert await store.renew_leases(owner=OWNER, lease_seconds=LEASE) == {"b"}
        claimed = await store.claim_due(
            owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS
        )
        assert sorted(r.id for r in claimed) == ["a", "c"]

    # -- get_run ----------------------------------------------------------------------------

    async def test_get_run_of_an_unknown_id_is_none(self, store: Store) -> None:
        assert await store.get_run("no-such-run") is None
        assert await store.get_run("no-such-run", history=False) is None

    async def test_get_run_with_and_without_history(self, store: Store) -> None:
        await create(store, new_run("bare"), new_run("full", history=AWKWARD_HISTORY))
        assert (await fetch(store, "bare")).history == []
        assert (await fetch(store, "full")).history == AWKWARD_HISTORY
        assert (await fetch(store, "full", history=False)).history is None
        assert (await fetch(store, "full", history=True)).history == AWKWARD_HISTORY

    # -- list_runs --------------------------------------------------------------------------

    async def test_list_runs_newest_first(self, store: Store) -> None:
        # created_at ties are broken by id, descending.
        await create(
            store,
            new_run("r-b", now=T0 + 1),
            new_run("r-z", now=T0),
            new_run("r-a", now=T0 + 1),
            new_run("r-c", now=T0 + 2),
            new_run("r-c2", now=T0 + 1),
        )
        listed = await store.list_runs()
        assert [r.id for r in listed] == ["r-c", "r-c2", "r-b", "r-a", "r-z"]
        # Full records, without history.
        assert listed == [await fetch(store, r.id, history=False) for r in listed]

    async def test_list_runs_filters(self, store: Store) -> None:
        await create(
            store,
            new_run("o-run", saga="order", status=SagaStatus.RUNNING, now=T0 + 1),
            new_run("o-done", saga="order", status=SagaStatus.COMPLETED, now=T0 + 2),
            new_run("o-fail", saga="order", status=SagaStatus.FAILED, now=T0 + 3),
            new_run("r-run", saga="refund", status=SagaStatus.RUNNING, now=T0 + 4),
            new_run("r-fail", saga="refund", status=SagaStatus.FAILED, now=T0 + 5),
        )

        async def ids(**filters: Any) -> list[str]:
            return [r.id for r in await store.list_runs(**filters)]

        assert await ids(saga="order") == ["o-fail", "o-done", "o-run"]
        assert await ids(saga="nothing") == []
        assert await ids(status={SagaStatus.RUNNING}) == ["r-run", "o-run"]
        assert await ids(status=[SagaStatus.FAILED, SagaStatus.COMPLETED]) == [
            "r-fail",
            "o-fail",
            "o-done",
        ]
        assert await ids(status=set()) == []
        assert await ids(status={SagaStatus.FAILED}, saga="refund") == ["r-fail"]
        assert await ids(status={SagaStatus.COMPENSATED}) == []

    async def test_list_runs_limit(self, store: Store) -> None:
        await create(store, *(new_run(f"r-{i:03}", now=T0 + i) for i in range(101)))
        assert len(await store.list_runs()) == 100  # the default limit
        assert [r.id for r in await store.list_runs(limit=3)] == ["r-100", "r-099", "r-098"]
        assert [r.id for r in await store.list_runs(limit=1)] == ["r-100"]
        assert len(await store.list_runs(limit=500)) == 101

    async def test_list_runs_limit_zero_is_empty(self, store: Store) -> None:
        await create(store, new_run("r-1"))
        assert await store.list_runs(limit=0) == []

    async def test_list_runs_pages_without_gaps_or_duplicates(self, store: Store) -> None:
        times = [0, 1, 1, 1, 2, 3, 3, 3, 3, 4]
        runs = [new_run(f"r-{i}", now=T0 + t, status=ACTIVE[i % 3]) for i, t in enumerate(times)]
        await create(store, *runs)
        everything = [r.id for r in await store.list_runs()]
        assert len(everything) == 10

        for page_size in (1, 2, 3, 4, 10):
            assert await _paginate(store, page_size) == everything

        running = [r.id for r in await store.list_runs(status={SagaStatus.RUNNING})]
        assert await _paginate(store, 2, status={SagaStatus.RUNNING}) == running
        # A cursor is exclusive and works from any (created_at, id), not only a listed one.
        assert [r.id for r in await store.list_runs(before=(T0 + 3, "r-7"))] == everything[
            everything.index("r-7") + 1 :
        ]
        assert [r.id for r in await store.list_runs(before=(T0 + 1, "r-25"))] == [
            "r-2",
            "r-1",
            "r-0",
        ]
        assert await store.list_runs(before=(T0, "")) == []

    async def test_list_runs_by_start_time_and_staleness(self, store: Store) -> None:
        await create(store, *(new_run(f"r-{i}", now=T0 + i) for i in range(5)))
        # r-1 and r-3 move on at T0 + 10; the others have not changed since they started.
        assert await apply(store, update("r-1", 1, now=T0 + 10), update("r-3", 1, now=T0 + 10))

        async def ids(**filters: Any) -> list[str]:
            return [r.id for r in await store.list_runs(**filters)]

        assert await ids(created_from=T0 + 1, created_to=T0 + 3) == ["r-2", "r-1"]
        assert await ids(created_from=T0 + 4) == ["r-4"]
        assert await ids(created_to=T0) == []
        assert await ids(updated_before=T0 + 10) == ["r-4", "r-2", "r-0"]
        assert await ids(updated_before=T0 + 10, created_from=T0 + 1, limit=1) == ["r-4"]

    async def test_count_runs_by_status(self, store: Store) -> None:
        assert await store.count_runs() == {}
        await create(
            store,
            new_run("a", status=SagaStatus.RUNNING),
            new_run("b", status=SagaStatus.RUNNING, saga="refund"),
            new_run("c", status=SagaStatus.FAILED),
            new_run("d", status=SagaStatus.COMPLETED),
        )
        assert await store.count_runs() == {
            SagaStatus.RUNNING: 2, SagaStatus.FAILED: 1, SagaStatus.COMPLETED: 1,
        }
        assert await store.count_runs(saga="refund") == {SagaStatus.RUNNING: 1}

    async def test_open_counts_by_saga_and_status_with_the_stuck_ones(
        self, store: Store
    ) -> None:
        assert await store.open_counts(updated_before=T0 + 100) == {}
        await create(
            store,
            new_run("a", status=SagaStatus.RUNNING, now=T0),
            new_run("b", status=SagaStatus.RUNNING, now=T0 + 50),
            new_run("c", status=SagaStatus.RUNNING, saga="refund", now=T0 + 50),
            new_run("d", status=SagaStatus.COMPENSATING, now=T0),
            new_run("e", status=SagaStatus.FAILED, now=T0),
            new_run("f", status=SagaStatus.COMPLETED, now=T0),
            new_run("g", status=SagaStatus.PENDING, now=T0 + 60),
        )
        assert await store.open_counts(updated_before=T0 + 10) == {
            (SAGA, SagaStatus.RUNNING): (2, 1),
            ("refund", SagaStatus.RUNNING): (1, 0),
            (SAGA, SagaStatus.COMPENSATING): (1, 1),
            (SAGA, SagaStatus.FAILED): (1, 1),
            (SAGA, SagaStatus.PENDING): (1, 0),
        }

    # -- operator requests ------------------------------------------------------------------

    async def test_request_operation_fences_the_owner_and_is_claimable(
        self, store: Store
    ) -> None:
        await create(store, new_run("r-1", status=SagaStatus.FAILED))
        note = HistoryEntry(at=T0 + 5, kind="operator.requested", data={"action": "retry"})
        request = {"action": "retry", "actor": "ana", "reason": "fixed"}
        got = await store.request_operation(
            "r-1", allowed=[SagaStatus.FAILED], request=request, new_status=None,
            history=[note], now=T0 + 5,
        )
        assert got is not None
        assert (got.request, got.owner, got.row_version, got.status) == (
            request, None, 2, SagaStatus.FAILED)
        assert (await fetch(store, "r-1")).history == [note]
        # The old owner is fenced; a second request waits for the first to be carried out.
        assert await apply(store, update("r-1", 1)) == [False]
        assert await store.request_operation(
            "r-1", allowed=[SagaStatus.FAILED], request=request, new_status=None,
            history=[], now=T0 + 6) is None
        # A FAILED run carrying a request is claimable; the claimer's write clears it.
        [claimed] = await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10,
                                          definitions=DEFS)
        assert (claimed.id, claimed.request) == ("r-1", request)
        cleared = RunUpdate(run_id="r-1", expected_version=claimed.row_version,
                            status=SagaStatus.COMPENSATING, state={}, error=None,
                            wake_at=None, now=T0 + 7, clear_request=True)
        assert await apply(store, cleared, owner=OTHER) == [True]
        assert (await fetch(store, "r-1")).request is None

    async def test_request_operation_respects_the_allowed_statuses(self, store: Store) -> None:
        await create(store, new_run("r-1", status=SagaStatus.COMPLETED))
        assert await store.request_operation(
            "r-1", allowed=[SagaStatus.FAILED], request={"action": "retry"},
            new_status=None, history=[], now=T0 + 1) is None
        assert await store.request_operation(
            "nope", allowed=[SagaStatus.FAILED], request={"action": "retry"},
            new_status=None, history=[], now=T0 + 1) is None
        untouched = await fetch(store, "r-1")
        assert (untouched.row_version, untouched.request, untouched.history) == (1, None, [])
        # A finished run without a request is never claimed.
        assert await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10,
                                     definitions=DEFS) == []

    async def test_request_operation_can_set_the_status_at_once(self, store: Store) -> None:
        await create(store, new_run("r-1", status=SagaStatus.FAILED))
        got = await store.request_operation(
            "r-1", allowed=[SagaStatus.FAILED], request=None,
            new_status=SagaStatus.RESOLVED, history=[], now=T0 + 1)
        assert got is not None and (got.status, got.request) == (SagaStatus.RESOLVED, None)

    # -- the transactional outbox -----------------------------------------------------------

    async def test_outbox_messages_are_written_with_their_transition(
        self, store: Store, clock: FakeClock
    ) -> None:
        cmd = OutboxMessage(id="m-1", destination="inventory", body='{"type":"reserve"}')
        await create(store, replace(new_run("r-1"), outbox=[cmd]))
        assert await store.outbox_backlog() == (1, clock())
        [claimed] = await store.claim_outbox(owner=OWNER, lease_seconds=LEASE, limit=10)
        assert (claimed.id, claimed.destination, claimed.body, claimed.run_id,
                claimed.attempts) == ("m-1", "inventory", '{"type":"reserve"}', "r-1", 0)
        # Leased to one relay: nobody else gets it until the lease runs out.
        assert await store.claim_outbox(owner=OTHER, lease_seconds=LEASE, limit=10) == []
        clock.advance(LEASE)
        [again] = await store.claim_outbox(owner=OTHER, lease_seconds=LEASE, limit=10)
        assert (again.id, again.attempts) == ("m-1", 1)
        await store.mark_sent(["m-1"], now=clock())
        clock.advance(LEASE * 2)
        assert await store.claim_outbox(owner=OTHER, lease_seconds=LEASE, limit=10) == []
        assert await store.outbox_backlog() == (0, None)

    async def test_a_fenced_transition_emits_nothing(self, store: Store) -> None:
        await create(store, new_run("r-1"))
        stale = replace(update("r-1", 7), outbox=[
            OutboxMessage(id="m-stale", destination="payments", body="{}")])
        good = replace(update("r-1", 1), outbox=[
            OutboxMessage(id="m-good", destination="payments", body="{}")])
        assert await apply(store, stale) == [False]
        assert await apply(store, good) == [True]
        claimed = await store.claim_outbox(owner=OWNER, lease_seconds=LEASE, limit=10)
        assert [m.id for m in claimed] == ["m-good"]

    async def test_outbox_claims_oldest_first_within_the_limit(
        self, store: Store, clock: FakeClock
    ) -> None:
        for i in range(5):
            await create(store, replace(new_run(f"r-{i}"), outbox=[
                OutboxMessage(id=f"m-{i}", destination="d", body=str(i))]))
            clock.advance(1)
        first = await store.claim_outbox(owner=OWNER, lease_seconds=LEASE, limit=2)
        rest = await store.claim_outbox(owner=OTHER, lease_seconds=LEASE, limit=10)
        assert [m.id for m in first] == ["m-0", "m-1"]
        assert [m.id for m in rest] == ["m-2", "m-3", "m-4"]
        count, oldest = await store.outbox_backlog()
        assert count == 5 and oldest is not None and oldest < clock() - 4

    async def test_a_duplicate_message_id_fails_the_whole_batch(self, store: Store) -> None:
        await create(store, replace(new_run("r-1"), outbox=[
            OutboxMessage(id="m-1", destination="d", body="{}")]))
        dup = replace(new_run("r-2"), outbox=[OutboxMessage(id="m-1", destination="d",
                                                             body="{}")])
        with pytest.raises(StoreError):
            await store.commit([dup], [], owner=OWNER, lease_seconds=LEASE)
        assert await store.get_run("r-2") is None
        assert await store.outbox_backlog() == (1, T0)

    # -- documents round-trip ---------------------------------------------------------------

    async def test_state_and_input_round_trip_exactly(self, store: Store) -> None:
        await create(store, new_run("run-1", input=AWKWARD_JSON, state=AWKWARD_JSON))
        got = await fetch(store, "run-1")
        assert got.input == AWKWARD_JSON and canonical(got.input) == canonical(AWKWARD_JSON)
        assert got.state == AWKWARD_JSON and canonical(got.state) == canonical(AWKWARD_JSON)

        updated = {"wrapped": AWKWARD_JSON, "list": [AWKWARD_JSON, 1.0, 1, True]}
        assert await apply(store, update("run-1", 1, state=updated)) == [True]
        got = await fetch(store, "run-1")
        assert canonical(got.state) == canonical(updated)
        await release_all(store)
        [claimed] = await store.claim_due(
            owner=OTHER, lease_seconds=LEASE, limit=1, definitions=DEFS
        )
        [listed] = await store.list_runs()
        for record in (claimed, listed):
            assert canonical(record.input) == canonical(AWKWARD_JSON)
            assert canonical(record.state) == canonical(updated)

    async def test_any_json_value_is_an_input(self, store: Store) -> None:
        values: list[Any] = [None, 0, 1.5, "text", [], [1, "two", None], {"a": {}}, True, 2**70]
        await create(store, *(new_run(f"run-{i}", input=v) for i, v in enumerate(values)))
        for i, v in enumerate(values):
            assert canonical((await fetch(store, f"run-{i}")).input) == canonical(v)

    async def test_history_round_trips_exactly(self, store: Store) -> None:
        await create(store, new_run("run-1", history=AWKWARD_HISTORY[:2]))
        assert await apply(store, update("run-1", 1, history=AWKWARD_HISTORY[2:])) == [True]
        history = (await fetch(store, "run-1")).history
        assert history == AWKWARD_HISTORY
        assert history is not None
        for got, sent in zip(history, AWKWARD_HISTORY, strict=True):
            assert canonical(got.to_json()) == canonical(sent.to_json())
            assert type(got.at) is float

    async def test_records_do_not_alias_the_stored_documents(self, store: Store) -> None:
        state = state_doc()
        new = new_run("run-1", state=state, input={"items": [1, 2]})
        [record] = await create(store, new)
        state["steps"]["reserve"]["status"] = "MUTATED"
        record.state["stage"] = 99
        record.input["items"].append(3)
        fetched = await fetch(store, "run-1")
        fetched.state["steps"].clear()

        got = await fetch(store, "run-1")
        assert got.state == state_doc()
        assert got.input == {"items": [1, 2]}

    # -- erasure, retention and key rotation: rewriting a run's payloads --------------------

    async def _payload_run(self, store: Store) -> StoredPayloads:
        first = [HistoryEntry(T0, "run.started"),
                 HistoryEntry(T0, "step.started", "reserve", 1)]
        second = [HistoryEntry(T0 + 1, "step.failed", "reserve", 1,
                               {"error": "card 4111 declined", "retryable": False}),
                  HistoryEntry(T0 + 1, "run.finished", data={"status": "COMPENSATED"})]
        await create(store, replace(new_run("r-1", input={"card": "4111"}, history=first),
                                    outbox=[OutboxMessage("m-1", "inventory",
                                                          '{"id":"m-1","payload":{"a":1}}')]))
        assert await apply(store, replace(
            update("r-1", 1, status=SagaStatus.COMPENSATED, error="card 4111 declined",
                   history=second, release=True),
            outbox=[OutboxMessage("m-2", "events", '{"id":"m-2","payload":null}')])) == [True]
        stored = await store.load_payloads("r-1")
        assert stored is not None
        return stored

    async def test_load_payloads_returns_every_payload_bearing_field(
            self, store: Store) -> None:
        assert await store.load_payloads("nope") is None
        stored = await self._payload_run(store)
        assert (stored.run_id, stored.status, stored.row_version, stored.erased_at,
                stored.has_request) == ("r-1", SagaStatus.COMPENSATED, 2, None, False)
        assert json.loads(stored.input_json) == {"card": "4111"}
        assert json.loads(stored.state_json) == state_doc("SUCCEEDED")
        assert stored.error == "card 4111 declined"
        entries = [e for k in sorted(stored.history) for e in json.loads(stored.history[k])]
        assert [HistoryEntry.from_json(e) for e in entries] == (await fetch(store, "r-1")
                                                                ).history
        assert stored.outbox == {"m-1": '{"id":"m-1","payload":{"a":1}}',
                                 "m-2": '{"id":"m-2","payload":null}'}

    async def test_rewrite_payloads_replaces_them_and_keeps_the_row_version(
            self, store: Store) -> None:
        stored = await self._payload_run(store)
        history = {}
        for key, text in stored.history.items():
            entries = json.loads(text)
            for e in entries:
                if "error" in e.get("data", {}):
                    e["data"]["error"] = "[gone]"
                    history[key] = json.dumps(entries)
        assert len(history) == 1
        # The input's fingerprint is the engine's (SHA-256 of its canonical text), which a
        # store that keys it differently still gives back.
        h2 = hashlib.sha256(b'"sealed-input"').hexdigest()
        ok = await store.rewrite_payloads(PayloadRewrite(
            "r-1", 2, input_json='"sealed-input"', input_hash=h2,
            state_json=json.dumps({"status": "COMPENSATED", "steps": {}}), error="[gone]",
            history=history, outbox={"m-1": '{"id":"m-1","payload":"sealed"}'}, now=T0 + 5))
        assert ok
        got = await fetch(store, "r-1")
        assert (got.input, got.input_hash, got.error, got.row_version, got.updated_at) == (
            "sealed-input", h2, "[gone]", 2, T0 + 1)
        assert got.state == {"status": "COMPENSATED", "steps": {}}
        assert got.history is not None and len(got.history) == 4
        assert got.history[2].data == {"error": "[gone]", "retryable": False}
        again = await store.load_payloads("r-1")
        assert again is not None and again.erased_at is None
        assert again.outbox["m-1"] == '{"id":"m-1","payload":"sealed"}'
        claimed = await store.claim_outbox(owner=OWNER, lease_seconds=LEASE, limit=10)
        assert sorted(m.id for m in claimed) == ["m-1", "m-2"]

    async def test_rewrite_payloads_with_an_entry_is_a_transition_and_can_mark_erased(
            self, store: Store) -> None:
        stored = await self._payload_run(store)
        erased = HistoryEntry(T0 + 9, "run.erased", data={"actor": "ops", "reason": "gdpr"})
        assert await store.rewrite_payloads(PayloadRewrite(
            "r-1", 2, input_json="null", input_hash="erased", state_json=stored.state_json,
            error=None, append=[erased], erased=True, now=T0 + 9))
        got = await fetch(store, "r-1")
        assert (got.input, got.error, got.row_version, got.updated_at, got.status) == (
            None, None, 3, T0 + 9, SagaStatus.COMPENSATED)
        assert got.history is not None and got.history[-1] == erased and len(got.history) == 5
        after = await store.load_payloads("r-1")
        assert after is not None and after.erased_at == T0 + 9

    async def test_rewrite_payloads_is_fenced_on_the_row_version(self, store: Store) -> None:
        stored = await self._payload_run(store)
        stale = PayloadRewrite("r-1", 1, input_json='"x"', input_hash="x",
                               state_json="{}", error=None, now=T0 + 3)
        assert not await store.rewrite_payloads(stale)
        assert not await store.rewrite_payloads(replace(stale, run_id="nope"))
        got = await fetch(store, "r-1")
        assert got.input == {"card": "4111"} and got.row_version == stored.row_version

    async def test_a_rewrite_without_entries_does_not_fence_the_owner(
            self, store: Store) -> None:
        await create(store, new_run("r-1"))
        assert await store.rewrite_payloads(PayloadRewrite(
            "r-1", 1, input_json='"sealed"', input_hash="h", state_json=json.dumps(
                state_doc()), error=None, now=T0 + 1))
        assert await apply(store, update("r-1", 1)) == [True]
        assert (await fetch(store, "r-1")).input == "sealed"

    async def test_payload_run_ids_pages_in_id_order_and_finds_what_retention_purges(
            self, store: Store) -> None:
        statuses = [SagaStatus.COMPLETED, SagaStatus.RUNNING, SagaStatus.COMPENSATED,
                    SagaStatus.FAILED, SagaStatus.RESOLVED, SagaStatus.COMPLETED]
        for i, status in enumerate(statuses):
            await create(store, new_run(f"r-{i}", now=T0 + i))
            assert await apply(store, update(f"r-{i}", 1, status=status, now=T0 + i,
                                             release=status.finished)) == [True]
        everything = [f"r-{i}" for i in range(6)]
        assert await store.payload_run_ids(after=None, limit=100) == everything
        assert await store.payload_run_ids(after=None, limit=2) == everything[:2]
        assert await store.payload_run_ids(after="r-1", limit=3) == everything[2:5]
        # Erasable (COMPLETED, COMPENSATED, RESOLVED), last changed before the cutoff.
        assert await store.payload_run_ids(after=None, limit=100,
                                           finished_before=T0 + 5) == ["r-0", "r-2", "r-4"]
        assert await store.payload_run_ids(after="r-0", limit=1,
                                           finished_before=T0 + 5) == ["r-2"]
        await store.request_operation("r-4", allowed=[SagaStatus.RESOLVED],
                                      request={"action": "x"}, new_status=None, history=[],
                                      now=T0)
        stored = await store.load_payloads("r-0")
        assert stored is not None
        assert await store.rewrite_payloads(PayloadRewrite(
            "r-0", stored.row_version, "null", "erased", stored.state_json, None,
            erased=True, now=T0 + 1))
        assert await store.payload_run_ids(after=None, limit=100,
                                           finished_before=T0 + 99) == ["r-2", "r-5"]


# -- helpers --------------------------------------------------------------------------------


def _without_history(record: RunRecord) -> RunRecord:
    return dataclasses.replace(record, history=None)


def _with_history(record: RunRecord, history: Sequence[HistoryEntry]) -> RunRecord:
    return dataclasses.replace(record, history=list(history))


async def _paginate(store: Store, page_size: int, **filters: Any) -> list[str]:
    out: list[str] = []
    before: tuple[float, str] | None = None
    for _ in range(100):
        page = await store.list_runs(limit=page_size, before=before, **filters)
        assert len(page) <= page_size
        if not page:
            return out
        out.extend(r.id for r in page)
        before = (page[-1].created_at, page[-1].id)
    raise AssertionError("pagination did not end")
