"""A small sagaway application for the crash test (tests/e2e/test_crash_points.py).

A 3-step saga whose steps are idempotent participants writing to a ledger in a *separate*
SQLite file. The process can SIGKILL itself at a chosen durable transition of one run, or
inside a step right after the step's effect is committed but before the step returns.

    python crash_app.py start  --dir D [--store URL] --runs N --target-run I [--fail-at STEP]
                               [--crash-after K | --crash-in-step STEP:action|compensation]
    python crash_app.py resume --dir D [--store URL] --runs N [--fail-at STEP] [--timeout S]

``start`` opens the saga log given by ``--store URL`` (default: the SQLite file
``D/sagas.db``; a ``postgresql://host/db?schema=NAME`` URL keeps it in that schema) and
creates ``D/ledger.db`` (the participants' side), starts N runs with client keys
``crash-0..N-1`` and waits for them; without a crash option it prints, as JSON, how many
durable transitions each run took (a clean run, used to derive the crash points).
``resume`` plays a restarted service: it re-sends the same N starts (as a client retrying
would; the keys make that idempotent), then waits until every run in the log has finished.
Exit codes: 0 done, 3 some run did not finish in time, -9 killed.

Ledger tables (ledger.db):

* ``invocations`` — every call of an action or compensation (re-invocations are expected).
* ``ledger`` — one row per idempotency key the participant has processed (applied once).
* ``effects`` — the business effects; a participant inserts one only for a key it has not
  seen, in the same transaction as its ``ledger`` row. Two effect rows for one step of one
  run mean the effect was applied twice.
* ``client`` — the run ids ``start`` returned to the client (its acknowledgements).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from sagaway import (
    Listener,
    NonRetryableError,
    Orchestrator,
    RetryPolicy,
    Saga,
    StepContext,
    Transition,
    WaitTimeout,
)

SAGA = "crash-demo"
STEPS = ("step1", "step2", "step3")
LEASE_SECONDS = 1.0
POLL_INTERVAL = 0.1

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, idem_key TEXT NOT NULL, idx INTEGER NOT NULL,
    run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL, attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL, pid INTEGER NOT NULL, began REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    idem_key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL,
    applied_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS effects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, idem_key TEXT NOT NULL, idx INTEGER NOT NULL,
    run_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client (
    id INTEGER PRIMARY KEY AUTOINCREMENT, idx INTEGER NOT NULL, run_id TEXT NOT NULL,
    created INTEGER NOT NULL, phase TEXT NOT NULL);
"""


class Config:
    """What this process was asked to do (module-level so plain-def steps can read it)."""

    ledger: Path = Path("ledger.db")
    target: int = -1
    crash_in_step: tuple[str, str] | None = None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def store_url(directory: Path) -> str:
    """The default saga log: a SQLite file next to the ledger."""
    return f"sqlite:///{directory / 'sagas.db'}"


def init_ledger(path: Path) -> None:
    with closing(_connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_LEDGER_SCHEMA)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def participant(ctx: StepContext, data: dict[str, Any], step: str, kind: str) -> dict[str, Any]:
    """An idempotent service: check the key, apply the effect once, in one transaction.

    ``step`` and ``kind`` are what this function *is* (not read from ``ctx``), so the test
    can check the key sagaway sent against them.
    """
    began = time.time()
    key = ctx.idempotency_key
    idx = int(data["index"])
    refuse = kind == "action" and data.get("fail_at") == step
    with closing(_connect(Config.ledger)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        if refuse:
            outcome = "refused"
        elif conn.execute("SELECT 1 FROM ledger WHERE idem_key = ?", (key,)).fetchone():
            outcome = "duplicate"
        else:
            undoes = kind == "compensation"
            nothing_to_undo = undoes and conn.execute(
                "SELECT 1 FROM effects WHERE idx = ? AND step = ? AND kind = 'action'",
                (idx, step),
            ).fetchone() is None
            outcome = "noop" if nothing_to_undo else "applied"
            conn.execute(
                "INSERT INTO ledger (idem_key, run_id, step, kind, applied_count) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(idem_key) DO UPDATE SET applied_count = applied_count",
                (key, ctx.run_id, step, kind, 0 if nothing_to_undo else 1),
            )
            if not nothing_to_undo:
                conn.execute(
                    "INSERT INTO effects (idem_key, idx, run_id, step, kind) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, idx, ctx.run_id, step, kind),
                )
        conn.execute(
            "INSERT INTO invocations (idem_key, idx, run_id, step, kind, attempt, outcome, "
            "pid, began, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, idx, ctx.run_id, step, kind, ctx.attempt, outcome, os.getpid(), began,
             time.time()),
        )
        conn.execute("COMMIT")
    # The effect is durable in the ledger; the transition recording it is not yet.
    if idx == Config.target and Config.crash_in_step == (step, kind):
        _die()
    if refuse:
        raise NonRetryableError(f"{step} refuses run {idx} (fail_at={step})")
    return {"key": key}


def build_saga() -> Saga:
    saga = Saga(SAGA)
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.2)
    for name in STEPS:

        def action(ctx: StepContext, data: dict[str, Any], _step: str = name) -> dict[str, Any]:
            return participant(ctx, data, _step, "action")

        def undo(ctx: StepContext, data: dict[str, Any], result: Any, _step: str = name) -> None:
            participant(ctx, data, _step, "compensation")

        step = saga.step(name=name, retry=retry)(action)
        step.compensation(retry=retry)(undo)
    return saga


class CrashAfter(Listener):
    """Counts each run's durable transitions; SIGKILLs the process after the K-th of one run.

    Runs are numbered in the order their first transition (the creation, committed inside
    ``start``) is seen; ``start`` is called one run after the other on a fresh log, so that
    is the start order.
    """

    def __init__(self, target: int, crash_after: int | None) -> None:
        self.target = target
        self.crash_after = crash_after
        self.index: dict[str, int] = {}
        self.counts: Counter[int] = Counter()
        self.kinds: dict[int, list[list[str]]] = {}

    def on_transition(self, transition: Transition) -> None:
        if transition.run_id not in self.index:
            self.index[transition.run_id] = len(self.index)
        idx = self.index[transition.run_id]
        self.counts[idx] += 1
        self.kinds.setdefault(idx, []).append([e.kind for e in transition.entries])
        if idx == self.target and self.counts[idx] == self.crash_after:
            _die()


def _input(idx: int, fail_at: str | None) -> dict[str, Any]:
    return {"index": idx, "fail_at": fail_at}


def _record_ack(idx: int, run_id: str, created: bool, phase: str) -> None:
    with closing(_connect(Config.ledger)) as conn:
        conn.execute(
            "INSERT INTO client (idx, run_id, created, phase) VALUES (?, ?, ?, ?)",
            (idx, run_id, int(created), phase),
        )


async def _start_all(orch: Orchestrator, runs: int, fail_at: str | None,
                     phase: str) -> list[str]:
    ids = []
    for idx in range(runs):
        handle = await orch.start(SAGA, _input(idx, fail_at), key=f"crash-{idx}")
        _record_ack(idx, handle.id, handle.created, phase)
        ids.append(handle.id)
    return ids


async def _wait_all(orch: Orchestrator, run_ids: list[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    unfinished = []
    for run_id in run_ids:
        try:
            await orch.wait(run_id, timeout=max(0.01, deadline - time.monotonic()))
        except WaitTimeout:
            unfinished.append(run_id)
    return unfinished


async def cmd_start(args: argparse.Namespace) -> int:
    listener = CrashAfter(args.target_run, args.crash_after)
    async with Orchestrator(
        args.store,
        sagas=[build_saga()],
        lease_seconds=LEASE_SECONDS,
        poll_interval=POLL_INTERVAL,
        listeners=[listener],
    ) as orch:
        ids = await _start_all(orch, args.runs, args.fail_at, "start")
        unfinished = await _wait_all(orch, ids, args.timeout)
    print(json.dumps({
        "transitions": [listener.counts[i] for i in range(args.runs)],
        "target_transitions": listener.kinds.get(args.target_run, []),
        "unfinished": unfinished,
    }))
    return 3 if unfinished else 0


async def cmd_resume(args: argparse.Namespace) -> int:
    async with Orchestrator(
        args.store,
        sagas=[build_saga()],
        lease_seconds=LEASE_SECONDS,
        poll_interval=POLL_INTERVAL,
    ) as orch:
        await _start_all(orch, args.runs, args.fail_at, "resume")
        ids = [r.id for r in await orch.list(limit=10_000)]
        unfinished = await _wait_all(orch, ids, args.timeout)
    print(json.dumps({"runs": len(ids), "unfinished": unfinished}))
    return 3 if unfinished else 0


def _crash_point(text: str) -> tuple[str, str]:
    step, _, kind = text.partition(":")
    if step not in STEPS or kind not in ("action", "compensation"):
        raise argparse.ArgumentTypeError(f"expected STEP:action|compensation, got {text!r}")
    return step, kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("start", "resume"):
        p = sub.add_parser(mode)
        p.add_argument("--dir", type=Path, required=True)
        p.add_argument("--store", default=None, metavar="URL",
                       help="the saga log's store URL (default: sqlite:///DIR/sagas.db)")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--fail-at", choices=STEPS, default=None)
        p.add_argument("--timeout", type=float, default=20.0)
        if mode == "start":
            p.add_argument("--target-run", type=int, default=0)
            crash = p.add_mutually_exclusive_group()
            crash.add_argument("--crash-after", type=int, default=None, metavar="K")
            crash.add_argument("--crash-in-step", type=_crash_point, default=None,
                               metavar="STEP:KIND")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.store is None:
        args.store = store_url(args.dir)
    Config.ledger = args.dir / "ledger.db"
    init_ledger(Config.ledger)
    if args.mode == "start":
        Config.target = args.target_run
        Config.crash_in_step = args.crash_in_step
        return asyncio.run(cmd_start(args))
    return asyncio.run(cmd_resume(args))


if __name__ == "__main__":
    sys.exit(main())
