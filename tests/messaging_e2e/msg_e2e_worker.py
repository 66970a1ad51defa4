"""A worker process for the orchestrator-kill test (test_orchestrator_kill.py).

    python msg_e2e_worker.py start  --dir D --transport URL --tag T --runs N [--participants]
    python msg_e2e_worker.py resume --dir D --transport URL --tag T --runs N [--participants]

``start`` opens the orchestrator (saga log: ``D/sagas.db``) and starts N orders with client
keys ``order-0..N-1``, recording each run id the client is told in ``D/acks.jsonl``, then
waits for them. With ``SAGAWAY_E2E_KILL=before:K`` (or ``after:K``) in the environment the
orchestrator's transport SIGKILLs this process right before the K-th ``publish_raw`` of the
outbox relay (the command is committed in the outbox, never published) or right after the
broker confirmed it (published, not yet marked sent); the message is described in
``D/killed.json`` first.

``resume`` plays the restarted worker: it starts the same N keys again (a client retrying;
the keys make it idempotent), waits until every run in the log has finished and the outbox
has drained, and prints ``{"unfinished": [...], "backlog": [n, oldest]}``. Exit codes: 0
done, 3 something unfinished, -9 killed.

``--participants`` hosts the three participants in this process too (needed for
``memory://``, whose broker lives in the process); otherwise the test hosts them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from msg_e2e_shop import (
    KillSwitch,
    Names,
    build_participants,
    drain_outbox,
    order_input,
    order_saga,
    running,
    start_orders,
    transport_factory,
    wait_all,
)

from sagaway import Orchestrator, RetryPolicy
from sagaway.messaging.base import Transport

KILL_ENV = "SAGAWAY_E2E_KILL"
LEASE_SECONDS = 1.0
POLL_INTERVAL = 0.1
STEP_TIMEOUT = 3.0


class RecordingKillSwitch(KillSwitch):
    """Writes down the message it dies on, so the test can follow it."""

    def __init__(self, inner: Transport, *, when: str, nth: int, directory: Path) -> None:
        super().__init__(inner, when=when, nth=nth)
        self.directory = directory

    async def publish_raw(self, destination: str, body: bytes, *,
                          message_id: str | None = None) -> None:
        if self.calls + 1 == self.nth:
            doc = json.loads(body)
            (self.directory / "killed.json").write_text(json.dumps({
                "when": self.when, "nth": self.nth, "destination": destination,
                "message_id": message_id, "idempotency_key": doc.get("idempotency_key"),
                "type": doc.get("type"),
            }))
        await super().publish_raw(destination, body, message_id=message_id)


def inputs(runs: int) -> dict[str, dict[str, Any]]:
    return {f"order-{i}": order_input(i, decline_every=3) for i in range(runs)}


def saga(names: Names) -> Any:
    return order_saga(names, timeout=STEP_TIMEOUT,
                      retry=RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=0.5))


def record_acks(directory: Path, ids: dict[str, str]) -> None:
    fd = os.open(directory / "acks.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for key, run_id in ids.items():
            os.write(fd, (json.dumps({"key": key, "run_id": run_id}) + "\n").encode())
    finally:
        os.close(fd)


async def main_async(args: argparse.Namespace) -> int:
    names = Names(args.tag)
    make = transport_factory(args.transport)
    participants = (build_participants(names, args.dir, make) if args.participants else [])
    transport = make()
    kill = os.environ.get(KILL_ENV) if args.mode == "start" else None
    if kill:
        when, _, nth = kill.partition(":")
        transport = RecordingKillSwitch(transport, when=when, nth=int(nth), directory=args.dir)
    store = f"sqlite:///{args.dir / 'sagas.db'}"
    orders = inputs(args.runs)
    async with running(participants), Orchestrator(
        store, sagas=[saga(names)], transport=transport, reply_to=names.replies,
        lease_seconds=LEASE_SECONDS, poll_interval=POLL_INTERVAL,
    ) as orch:
        ids: dict[str, str] = {}
        for key, data in orders.items():
            ids.update(await start_orders(orch, {key: data}))
            record_acks(args.dir, {key: ids[key]})
        if args.mode == "resume":
            ids.update({r.idempotency_key or r.id: r.id for r in await orch.list(limit=10_000)})
        unfinished = await wait_all(orch, ids.values(), args.timeout)
        backlog = await drain_outbox(orch, 10.0) if args.mode == "resume" else None
    print(json.dumps({"unfinished": unfinished, "backlog": backlog}))
    return 3 if unfinished or (backlog is not None and backlog != (0, None)) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("start", "resume"))
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--participants", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
