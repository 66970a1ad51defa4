"""The orchestrator SIGKILLed around the publish of a command, then restarted.

A real worker process (msg_e2e_worker.py) starts orders; its transport SIGKILLs it

* ``before`` the K-th publish of the outbox relay: the command is committed in the outbox
  (with the transition that started the step) but never reached the broker;
* ``after`` the broker confirmed the K-th publish, before the relay marked it sent: the
  restarted relay publishes it again, so the participant gets it twice.

A second process resumes (the client re-sends its starts with the same keys). Every run must
end as its input says, the killed command must have been delivered and applied once, the
outbox must drain, and no effect may be applied twice. The participants run in the test
process (they live through the crash), except on ``memory://``, whose broker is in the
worker's process: there they die and restart with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from msg_e2e_shop import (
    Figure,
    Names,
    bounded,
    build_participants,
    count_known_bug,
    db_path,
    declines_may_fail,
    read_runs,
    running,
    transport_factory,
    transport_name,
    verify,
)
from msg_e2e_worker import KILL_ENV, inputs

pytestmark = pytest.mark.e2e

WORKER = Path(__file__).with_name("msg_e2e_worker.py")
RUNS = 6
PROCESS_TIMEOUT = 60.0
POINTS = [("before", 4), ("after", 9)]


async def run_worker(mode: str, directory: Path, url: str, names: Names, *,
                     participants: bool, kill: str | None = None) -> tuple[int | None, str]:
    """Run the worker; (exit code or None if it hung and was killed, its output)."""
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    args = [sys.executable, str(WORKER), mode, "--dir", str(directory), "--transport", url,
            "--tag", names.tag, "--runs", str(RUNS), "--timeout", "30"]
    if participants:
        args.append("--participants")
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return None, out.decode(errors="replace")[-3000:]
    return proc.returncode, out.decode(errors="replace")[-3000:]


def _acks(directory: Path) -> tuple[dict[str, str], list[str]]:
    acked: dict[str, str] = {}
    conflicts = []
    path = directory / "acks.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        doc = json.loads(line)
        if acked.setdefault(doc["key"], doc["run_id"]) != doc["run_id"]:
            conflicts.append(f"client key {doc['key']} was told two run ids")
    return acked, conflicts


def _one(path: Path, sql: str, params: tuple[Any, ...]) -> Any:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        return conn.execute(sql, params).fetchone()


@pytest.mark.parametrize(("when", "nth"), POINTS, ids=[f"{w}-publish-{n}" for w, n in POINTS])
@bounded(150)
async def test_orchestrator_killed_around_a_publish(broker_url: str, names: Names,
                                                    tmp_path: Path, when: str,
                                                    nth: int) -> None:
    began = time.monotonic()
    memory = broker_url.startswith("memory://")
    hosted = [] if memory else build_participants(names, tmp_path,
                                                  transport_factory(broker_url))
    async with running(hosted):
        code, out = await run_worker("start", tmp_path, broker_url, names,
                                     participants=memory, kill=f"{when}:{nth}")
        assert code == -signal.SIGKILL, f"start exited {code}, expected SIGKILL:\n{out}"
        code, out = await run_worker("resume", tmp_path, broker_url, names,
                                     participants=memory)
        assert code == 0, f"resume exited {code}:\n{out}"

    figure = Figure(f"orchestrator killed {when} publish #{nth} on "
                    f"{transport_name(broker_url)}")
    acked, conflicts = _acks(tmp_path)
    figure.problems += conflicts
    runs = await read_runs(f"sqlite:///{tmp_path / 'sagas.db'}")
    # The replies a killed worker had taken wait for another consumer (NATS ack_wait, Redis
    # claim_idle: 30 s), so deadlines pass; a declined order must still compensate.
    verify(figure, runs, inputs(RUNS), acked, tmp_path, expect=declines_may_fail)
    count_known_bug(figure, runs)

    # The very command the worker died on: sent (marked so by the restarted relay), and
    # applied (or refused) once by its participant.
    killed = json.loads((tmp_path / "killed.json").read_text())
    row = _one(tmp_path / "sagas.db",
               "SELECT sent_at, attempts FROM sagaway_outbox WHERE id = ?",
               (killed["message_id"],))
    service = killed["destination"].rsplit("-", 1)[0]
    answered = _one(db_path(tmp_path, service),
                    "SELECT count(*) FROM sagaway_inbox WHERE idempotency_key = ?",
                    (killed["idempotency_key"],))
    if row is None or row[0] is None:
        figure.lost += 1
        figure.problems.append(f"the killed command {killed} is not marked sent: {row}")
    elif when == "after" and row[1] < 2:
        figure.problems.append(f"the command confirmed before the kill was not published "
                               f"again (attempts {row[1]})")
    if answered is None or answered[0] != 1:
        figure.lost += 1
        figure.problems.append(f"the killed command {killed} is not in {service}'s inbox")
    figure.notes.append(f"killed on {killed['type']} to {service}, outbox attempts "
                        f"{row[1] if row else None}")
    figure.seconds = time.monotonic() - began
    assert figure.ok, figure.report()
    figure.report()
