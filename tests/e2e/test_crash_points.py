"""Kill -9 the orchestrator at every durable transition and inside every step; restart; check.

For each backend of the saga log (SQLite, PostgreSQL) and each scenario (the forward path,
and a run that fails at step3 and compensates) a clean
run of ``crash_app.py`` first tells how many durable transitions a run takes and which
actions and compensations it invokes. Those are the crash points: "after transition K" (the
listener kills the process right after the K-th transition of the target run is durable,
before the step it starts is invoked) and "in STEP:KIND" (the step kills the process after
its effect is committed in the ledger, before it returns, so the success is not durable).
For each point, in a fresh directory and a fresh saga log (a SQLite file there, or a
PostgreSQL schema of its own, dropped afterwards): ``start`` (3 runs; must die by SIGKILL),
``resume`` (must finish every run), then the saga log (via the public API) and the ledger (a
SQLite file per point: the participants' own database, whatever the log's backend) are
checked:

* lost: a run the client was told about (or whose steps ran) missing from the log, or a
  key that does not map to exactly one run;
* double-applied: a step's action or compensation with more than one effect row;
* stuck: a run not finished after ``resume``;
* inconsistent: wrong final status, a missing effect, a compensation without its action or
  out of reverse order, an idempotency key other than ``{run_id}:{step}:{kind}``, or an
  invocation whose ``started`` transition is not in the log (write-ahead broken).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sagaway import Orchestrator, SagaRun, SagaStatus

pytestmark = pytest.mark.e2e

APP = Path(__file__).with_name("crash_app.py")
RUNS = 3
TARGET = 1  # the middle run: one run is started before it, one after
STEPS = ("step1", "step2", "step3")
SCENARIOS = {"forward": None, "compensation": "step3"}
BACKENDS = ("sqlite", "postgres")
PARALLEL = 4  # crash points run concurrently; most of their time is the 1 s lease expiry
START_TIMEOUT = 30.0
RESUME_TIMEOUT = 45.0  # the app gives up waiting after 20 s, so this only catches a hang


@dataclass
class Outcome:
    """The verdict on one crash point (or the clean run)."""

    label: str
    runs: int = 0
    lost: int = 0
    double_applied: int = 0
    stuck: int = 0
    inconsistent: int = 0
    reinvocations: int = 0
    noop_compensations: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.label}: {text}")


@dataclass
class Figure:
    crash_points: int = 0
    runs: int = 0
    lost: int = 0
    double_applied: int = 0
    stuck: int = 0
    inconsistent: int = 0
    reinvocations: int = 0
    noop_compensations: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, o: Outcome, *, crash_point: bool = True) -> None:
        self.crash_points += crash_point
        self.runs += o.runs if crash_point else 0
        self.lost += o.lost
        self.double_applied += o.double_applied
        self.stuck += o.stuck
        self.inconsistent += o.inconsistent
        self.reinvocations += o.reinvocations if crash_point else 0
        self.noop_compensations += o.noop_compensations if crash_point else 0
        self.problems.extend(o.problems)

    def merge(self, other: Figure) -> None:
        for name in ("crash_points", "runs", "lost", "double_applied", "stuck",
                     "inconsistent", "reinvocations", "noop_compensations", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems)

    def render(self, title: str) -> str:
        per_point = self.runs // self.crash_points if self.crash_points else 0
        return (
            f"{title}: {self.crash_points} crash points x {per_point} runs = {self.runs} runs | "
            f"lost {self.lost} | double-applied {self.double_applied} | stuck {self.stuck} | "
            f"inconsistent {self.inconsistent} | (re-invocations {self.reinvocations}, "
            f"no-op compensations {self.noop_compensations}; {self.seconds:.1f}s)"
        )

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double_applied or self.stuck or self.inconsistent
                    or self.problems)


# -- saga logs ------------------------------------------------------------------------------


class Logs:
    """Hands out a fresh saga log per crash point; the PostgreSQL schemas are dropped after."""

    def __init__(self, backend: str, base_url: str | None = None) -> None:
        self.backend = backend
        self.base_url = base_url
        self.schemas: list[str] = []

    def new(self, directory: Path) -> str:
        if self.base_url is None:
            return f"sqlite:///{directory / 'sagas.db'}"
        schema = f"crash_{uuid.uuid4().hex}"
        self.schemas.append(schema)
        sep = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{sep}schema={schema}"

    async def drop(self) -> None:
        if self.base_url is None or not self.schemas:
            return
        import asyncpg

        conn = await asyncpg.connect(self.base_url, timeout=10)
        try:
            for schema in self.schemas:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


@pytest.fixture(params=BACKENDS)
def logs(request: pytest.FixtureRequest) -> Iterator[Logs]:
    if request.param == "postgres":
        # Skips (or fails under CI=true) exactly like the other PostgreSQL tests.
        log = Logs("postgres", request.getfixturevalue("postgres_base_url"))
    else:
        log = Logs("sqlite")
    yield log
    asyncio.run(log.drop())


# -- running the app ------------------------------------------------------------------------


def _app(mode: str, directory: Path, store: str, fail_at: str | None, *extra: str,
         timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run crash_app.py; None if it hung (it is killed then)."""
    args = [sys.executable, str(APP), mode, "--dir", str(directory), "--store", store,
            "--runs", str(RUNS)]
    if fail_at:
        args += ["--fail-at", fail_at]
    try:
        return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return None


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stdout + proc.stderr).strip()
    return text[-1500:]


def clean_run(directory: Path, store: str, fail_at: str | None
              ) -> tuple[dict[str, Any], Outcome]:
    """Run the scenario without a crash; return the app's report and the verdict."""
    outcome = Outcome("clean run")
    proc = _app("start", directory, store, fail_at, "--target-run", str(TARGET),
                timeout=START_TIMEOUT)
    if proc is None or proc.returncode != 0:
        pytest.fail(f"the clean run failed: {proc and _tail(proc)}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    verify(directory, store, fail_at, outcome)
    return report, outcome


def crash_point(directory: Path, store: str, fail_at: str | None, label: str,
                crash: list[str]) -> Outcome:
    outcome = Outcome(label)
    start = _app("start", directory, store, fail_at, "--target-run", str(TARGET), *crash,
                 timeout=START_TIMEOUT)
    if start is None:
        outcome.problem("start hung (killed)")
    elif start.returncode != -signal.SIGKILL:
        outcome.problem(f"start exited {start.returncode}, expected SIGKILL (the crash "
                        f"point was not reached): {_tail(start)}")
    resume = _app("resume", directory, store, fail_at, timeout=RESUME_TIMEOUT)
    if resume is None:
        outcome.problem("resume hung (killed)")
    elif resume.returncode != 0:
        outcome.problem(f"resume exited {resume.returncode}: {_tail(resume)}")
    verify(directory, store, fail_at, outcome)
    return outcome


# -- checking -----------------------------------------------------------------------------


async def _read_log(store: str) -> list[SagaRun]:
    # No saga registered: this orchestrator can read the log but never claims a run.
    async with Orchestrator(store, poll_interval=60.0) as orch:
        return [await orch.get(r.id) for r in await orch.list(limit=10_000)]


def _rows(conn: sqlite3.Connection, sql: str) -> list[sqlite3.Row]:
    return list(conn.execute(sql))


def verify(directory: Path, store: str, fail_at: str | None, o: Outcome) -> None:
    runs = asyncio.run(_read_log(store))
    with closing(sqlite3.connect(directory / "ledger.db")) as conn:
        conn.row_factory = sqlite3.Row
        invocations = _rows(conn, "SELECT * FROM invocations ORDER BY id")
        effects = _rows(conn, "SELECT * FROM effects ORDER BY id")
        ledger = _rows(conn, "SELECT * FROM ledger")
        acks = _rows(conn, "SELECT * FROM client ORDER BY id")

    o.runs = RUNS
    expected_status = SagaStatus.COMPENSATED if fail_at else SagaStatus.COMPLETED
    applied_steps = list(STEPS[: STEPS.index(fail_at)] if fail_at else STEPS)
    by_key: dict[str, list[SagaRun]] = {}
    for run in runs:
        by_key.setdefault(run.idempotency_key or "", []).append(run)
    if len(runs) != RUNS:
        o.problem(f"{len(runs)} runs in the log, expected {RUNS}")
        o.inconsistent += 1
    known_ids = {r.id for r in runs}
    for inv in invocations:
        if inv["run_id"] not in known_ids:
            o.problem(f"run {inv['idx']}: {inv['step']} {inv['kind']} ran for run id "
                      f"{inv['run_id']}, which is not in the log")
    noops = [row for row in ledger if row["applied_count"] == 0]
    o.noop_compensations = len(noops)

    for idx in range(RUNS):
        tag = f"run {idx}"
        found = by_key.get(f"crash-{idx}", [])
        if len(found) != 1:
            o.lost += 1
            o.problem(f"{tag}: key crash-{idx} maps to {len(found)} runs in the log")
            continue
        run = found[0]
        acked = {a["run_id"] for a in acks if a["idx"] == idx}
        ghost = {i["run_id"] for i in invocations if i["idx"] == idx} - {run.id}
        if acked - {run.id} or ghost:
            o.lost += 1
            o.problem(f"{tag}: the client was told {sorted(acked)} and steps ran for "
                      f"{sorted(ghost | {run.id})}, but the log holds {run.id}")
        if not run.finished:
            o.stuck += 1
            steps = {name: st.get("status") for name, st in (run.steps or {}).items()}
            o.problem(f"{tag}: still {run.status.value} after resume; steps {steps}")
            continue
        if run.status is not expected_status:
            o.inconsistent += 1
            o.problem(f"{tag}: ended {run.status.value}, expected {expected_status.value} "
                      f"({run.error})")

        invs = [i for i in invocations if i["idx"] == idx]
        effs = [e for e in effects if e["idx"] == idx]
        o.reinvocations += len(invs) - len({(i["step"], i["kind"]) for i in invs})
        bad = []

        # Exactly-once effects.
        counts = Counter((e["step"], e["kind"]) for e in effs)
        doubled = sorted(k for k, n in counts.items() if n > 1)
        o.double_applied += len(doubled)
        if doubled:
            o.problem(f"{tag}: effects applied more than once: {doubled}")
        actions = [e["step"] for e in effs if e["kind"] == "action"]
        undos = [e["step"] for e in effs if e["kind"] == "compensation"]
        if sorted(set(actions)) != applied_steps:
            bad.append(f"action effects {actions}, expected {applied_steps}")
        expected_undos = applied_steps if fail_at else []
        if sorted(set(undos)) != expected_undos:
            bad.append(f"compensation effects {undos}, expected {expected_undos}")
        # Each compensation undoes an action applied before it, in reverse order.
        first_effect = {(e["step"], e["kind"]): e["id"] for e in reversed(effs)}
        for e in effs:
            if e["kind"] == "compensation" and first_effect.get((e["step"], "action"),
                                                                e["id"]) >= e["id"]:
                bad.append(f"compensation of {e['step']} has no earlier action effect")
        if undos and undos != list(reversed(actions)):
            bad.append(f"compensation effects in order {undos}, actions were {actions}")
        comp_invs = [i for i in invs if i["kind"] == "compensation"]
        action_invs = [i for i in invs if i["kind"] == "action"]
        if comp_invs and action_invs and min(i["id"] for i in comp_invs) < max(
                i["id"] for i in action_invs):
            bad.append("an action was invoked after compensation began")
        comp_order = list(dict.fromkeys(i["step"] for i in comp_invs))
        if comp_order != sorted(comp_order, key=STEPS.index, reverse=True):
            bad.append(f"compensations invoked in order {comp_order}")
        # A no-op compensation is only allowed where no action effect exists.
        for row in noops:
            if row["run_id"] == run.id and row["step"] in actions:
                bad.append(f"compensation of {row['step']} found nothing to undo, but the "
                           f"action's effect is there")
        # Keys, and the write-ahead promise: every invocation's start is in the log.
        started: dict[tuple[str, str | None, int | None], float] = {}
        for h in run.history:
            started.setdefault((h.kind, h.step, h.attempt), h.at)
        for i in invs:
            key = f"{run.id}:{i['step']}:{i['kind']}"
            if i["idem_key"] != key:
                bad.append(f"{i['step']} {i['kind']} attempt {i['attempt']} carried key "
                           f"{i['idem_key']!r}, expected {key!r}")
            kind = "step.started" if i["kind"] == "action" else "compensation.started"
            logged_at = started.get((kind, i["step"], i["attempt"]))
            if logged_at is None or logged_at > i["began"]:
                bad.append(f"{i['step']} {i['kind']} attempt {i['attempt']} was invoked "
                           f"before its {kind} was in the log")
        # The snapshot agrees with the ledger.
        if run.status is SagaStatus.COMPLETED:
            for step in STEPS:
                result = run.results.get(step)
                if result != {"key": f"{run.id}:{step}:action"}:
                    bad.append(f"result of {step} is {result!r}")
        if bad:
            o.inconsistent += 1
            o.problem(f"{tag}: " + "; ".join(bad))


# -- the test -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def totals() -> Iterator[dict[str, Figure]]:
    figures = {backend: Figure() for backend in BACKENDS}
    yield figures
    for backend, figure in figures.items():
        if figure.crash_points:
            print("\n" + figure.render(f"sagaway crash test on {backend}, all scenarios"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_crash_points(scenario: str, logs: Logs, tmp_path: Path,
                      totals: dict[str, Figure]) -> None:
    fail_at = SCENARIOS[scenario]
    began = time.monotonic()
    report, clean = clean_run(tmp_path / "clean", logs.new(tmp_path / "clean"), fail_at)
    assert not clean.problems, "\n".join(clean.problems)
    transitions = report["transitions"][TARGET]
    steps_path = [" + ".join(kinds) for kinds in report["target_transitions"]]
    with closing(sqlite3.connect(tmp_path / "clean" / "ledger.db")) as conn:
        invoked = list(dict.fromkeys(conn.execute(
            "SELECT step, kind FROM invocations WHERE idx = ? ORDER BY id", (TARGET,))))
    assert transitions >= (6 if fail_at else 4), report
    assert len(invoked) == (5 if fail_at else 3), invoked

    points: list[tuple[str, list[str]]] = [
        (f"after transition {k}/{transitions} ({steps_path[k - 1]})",
         ["--crash-after", str(k)])
        for k in range(1, transitions + 1)
    ]
    points += [(f"inside {step}:{kind}", ["--crash-in-step", f"{step}:{kind}"])
               for step, kind in invoked]
    runs = [(tmp_path / f"p{i}", label, crash) for i, (label, crash) in enumerate(points)]
    stores = [logs.new(directory) for directory, _, _ in runs]
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(
            lambda run, store: crash_point(run[0], store, fail_at, run[1], run[2]),
            runs, stores,
        ))

    figure = Figure()
    figure.add(clean, crash_point=False)
    for o in outcomes:
        figure.add(o)
    figure.seconds = time.monotonic() - began
    totals[logs.backend].merge(figure)
    text = figure.render(f"sagaway crash test on {logs.backend}, {scenario} path")
    print("\n" + text)
    ok = figure.ok
    assert ok, text + "\n" + "\n".join(figure.problems)
