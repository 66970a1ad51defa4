"""How fast the choreography tracker turns events into run records.

N sagas' events (the success path: 4 events each) are published to a flow's tracker queue
first, then a tracker is started and timed until every run is COMPLETED. Each event costs
the tracker a read, a claim and a fenced commit (one writer per run), so this is the
store's write rate for small transitions, not the broker's.

    .venv/bin/python bench/choreography_tracker.py --transport amqp://guest:guest@127.0.0.1:5672/ \\
        --store sqlite --sagas 500
    .venv/bin/python bench/choreography_tracker.py --store postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid

from sagaway import SagaStatus
from sagaway.choreography import Choreography, FlowStep, Tracker, emit_event
from sagaway.messaging import open_transport
from sagaway.store import open_store

EVENTS = ("Go", "A", "B", "C")


def flow(prefix: str) -> Choreography:
    return Choreography("bench-flow", start="Go", prefix=prefix, steps=[
        FlowStep("a", service="x", on="Go", success="A"),
        FlowStep("b", service="y", on="A", success="B"),
        FlowStep("c", service="z", on="B", success="C"),
    ])


async def main(args: argparse.Namespace) -> None:
    store_url = args.store
    if store_url == "sqlite":
        store_url = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    elif store_url.startswith("postgres"):
        sep = "&" if "?" in store_url else "?"
        store_url += f"{sep}schema=bench_{uuid.uuid4().hex[:8]}"
    f = flow(f"bench.{uuid.uuid4().hex[:8]}")
    async with open_transport(args.transport) as transport:
        for _ in range(args.sagas):
            run_id = None
            for event in EVENTS:
                run_id = await emit_event(transport, f, event, {"n": 1}, run_id=run_id)
        store = open_store(store_url)
        await store.open()
        started = time.perf_counter()
        async with Tracker(store, transport, [f], prefetch=args.prefetch):
            while True:
                done = (await store.count_runs(saga=f.name)).get(SagaStatus.COMPLETED, 0)
                if done >= args.sagas:
                    break
                await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        await store.aclose()
        if store_url.startswith("postgres"):
            import asyncpg

            conn = await asyncpg.connect(args.store)
            await conn.execute(f"DROP SCHEMA IF EXISTS {store_url.rsplit('=', 1)[1]} CASCADE")
            await conn.close()
    events = args.sagas * len(EVENTS)
    print(f"{args.store.split('@')[-1]} over {args.transport.split('@')[-1]}: {args.sagas} "
          f"sagas, {events} events in {seconds:.2f}s = {events / seconds:.0f} events/s, "
          f"{args.sagas / seconds:.0f} sagas/s (prefetch {args.prefetch})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transport", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--store", default="sqlite")
    parser.add_argument("--sagas", type=int, default=500)
    parser.add_argument("--prefetch", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
