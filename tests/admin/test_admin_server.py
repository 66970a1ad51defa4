"""Real processes and sockets: a uvicorn server on 127.0.0.1, ``sagaway admin`` as a process
(and its refusal to bind elsewhere without tokens), and the CLI's operator commands against
a store URL and against a live admin API, with a worker in this process carrying out what
they ask."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from admin_helpers import (
    AUTH,
    LEAKY_INPUT,
    OPERATOR_SECRET,
    SECRET_VALUES,
    TOKENS,
    VIEWER_SECRET,
    Faults,
    ThreadServer,
    ThreadWorker,
    free_port,
    sagas,
    wait_http,
)

from sagaway import SagaStatus
from sagaway.admin import create_app

pytestmark = pytest.mark.e2e


@dataclass
class Live:
    url: str
    admin: str
    worker: ThreadWorker
    faults: Faults


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    url = f"sqlite:///{tmp_path}/admin.db"
    faults = Faults()
    worker = ThreadWorker(url, faults)
    server = ThreadServer(create_app(url, tokens=TOKENS, sagas=sagas(Faults()),
                                     sensitive_fields=["dob"]))
    try:
        yield Live(url, server.url, worker, faults)
    finally:
        server.close()
        worker.close()


def sagaway(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAWAY_")}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run([sys.executable, "-m", "sagaway.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_real_server_authenticates_and_carries_out_actions(live: Live) -> None:
    failed = live.worker.run("failed")
    with httpx.Client(base_url=live.admin, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/").headers["content-type"].startswith("text/html")
        assert http.get("/api/runs").status_code == 401
        assert http.get("/api/runs", headers=AUTH["bad"]).status_code == 401
        listed = http.get("/api/runs", headers=AUTH["viewer"])
        assert listed.status_code == 200 and listed.json()["runs"][0]["id"] == failed.id
        path = f"/api/runs/{failed.id}/retry"
        assert http.post(path, headers=AUTH["viewer"], json={"reason": "x"}).status_code == 403
        live.faults.release_broken = False
        accepted = http.post(path, headers=AUTH["operator"], json={"reason": "fixed"})
        assert accepted.status_code == 202
    done = live.worker.wait(failed.id)
    assert done.status is SagaStatus.COMPENSATED
    entry = next(h for h in done.history if h.kind == "operator.retry")
    assert entry.data == {"actor": "ana", "reason": "fixed"}


def test_cli_operator_commands_against_the_store(live: Live, tmp_path: Path) -> None:
    failed = live.worker.run("failed")
    parked = live.worker.run("parked")
    completed = live.worker.run("completed")
    store = ["--store", live.url]

    listed = sagaway("runs", "--status", "failed", "--status", "running", *store)
    assert listed.returncode == 0, listed.stderr
    assert failed.id in listed.stdout and parked.id in listed.stdout
    assert completed.id not in listed.stdout
    shown = sagaway("show", failed.id, *store)
    assert shown.returncode == 0 and "FAILED" in shown.stdout

    live.faults.release_broken = False
    retried = sagaway("retry", failed.id, "--reason", "inventory is back", "--actor", "bo",
                      *store)
    assert retried.returncode == 0, retried.stderr
    assert f"retry of run {failed.id} recorded (by bo)" in retried.stdout
    done = live.worker.wait(failed.id)
    assert done.status is SagaStatus.COMPENSATED
    assert next(h for h in done.history if h.kind == "operator.retry").data == {
        "actor": "bo", "reason": "inventory is back"}

    resumed = sagaway("resume", parked.id, "-r", "service is back", *store)
    assert resumed.returncode == 0, resumed.stderr
    assert live.worker.wait(parked.id).status is SagaStatus.COMPLETED

    refused = sagaway("compensate", completed.id, "--reason", "oops", *store)
    assert refused.returncode == 1
    assert f"cannot compensate run {completed.id}: the run is COMPLETED" in refused.stderr
    missing = sagaway("resolve", "no-such-run", "--reason", "x", *store)
    assert missing.returncode == 1 and "no saga run with id 'no-such-run'" in missing.stderr
    blank = sagaway("resolve", completed.id, "--reason", "  ", *store)
    assert blank.returncode == 2 and "a reason is required" in blank.stderr
    no_reason = sagaway("resolve", completed.id, *store)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    nothing = sagaway("retry", "x", "--reason", "y", "--store",
                      f"sqlite:///{tmp_path}/missing.db")
    assert nothing.returncode == 1 and "no saga store" in nothing.stderr


def test_cli_against_a_live_admin_api(live: Live) -> None:
    failed = live.worker.run("failed")
    completed = live.worker.run("completed")
    leaky = live.worker.call(live.worker.orch.start("leaky", LEAKY_INPUT))
    live.worker.wait(leaky.id)
    viewer = ["--admin", live.admin, "--token", VIEWER_SECRET]
    operator = ["--admin", live.admin, "--token", OPERATOR_SECRET]

    listed = sagaway("runs", "--status", "FAILED", *viewer)
    assert listed.returncode == 0, listed.stderr
    assert failed.id in listed.stdout and completed.id not in listed.stdout
    everything = sagaway("runs", "--saga", "shop", "-n", "1", *viewer)
    assert completed.id in everything.stdout and failed.id not in everything.stdout
    shown = sagaway("show", leaky.id, *viewer)
    assert shown.returncode == 0, shown.stderr
    assert "COMPENSATED" in shown.stdout and "***" in shown.stdout
    for secret in SECRET_VALUES:
        assert secret not in shown.stdout

    denied = sagaway("resolve", failed.id, "--reason", "by hand", *viewer)
    assert denied.returncode == 1 and "needs an operator token" in denied.stderr
    bad = sagaway("resolve", failed.id, "--reason", "by hand", "--admin", live.admin,
                  "--token", "wrong-token-0123456789")
    assert bad.returncode == 1 and "invalid token (HTTP 401" in bad.stderr

    resolved = sagaway("resolve", failed.id, "--reason", "released by hand", "--actor",
                       "mallory", *operator)
    assert resolved.returncode == 0, resolved.stderr
    assert "recorded (by ana)" in resolved.stdout  # the token's name, not --actor
    done = live.worker.wait(failed.id)
    assert done.status is SagaStatus.RESOLVED
    assert next(h for h in done.history if h.kind == "operator.resolve").data == {
        "actor": "ana", "reason": "released by hand"}

    refused = sagaway("compensate", completed.id, "--reason", "oops", *operator)
    assert refused.returncode == 1
    assert "the run is COMPLETED" in refused.stderr and "HTTP 409" in refused.stderr
    missing = sagaway("show", "no-such-run", *viewer)
    assert missing.returncode == 1 and "no saga run with id 'no-such-run'" in missing.stderr
    gone = sagaway("runs", "--admin", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert gone.returncode == 1 and "cannot reach the admin API" in gone.stderr


def test_sagaway_admin_serves_with_tokens_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAWAY_")}
    env["SAGAWAY_ADMIN_TOKENS"] = f"vic:viewer:{VIEWER_SECRET}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagaway.cli", "admin", "--store",
         f"sqlite:///{tmp_path}/admin.db", "--port", str(port), "--token",
         f"ana:operator:{OPERATOR_SECRET}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz").status_code == 200
        runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers=AUTH["viewer"])
        assert runs.status_code == 200 and runs.json() == {"runs": [], "next_cursor": None}
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert f"http://127.0.0.1:{port}/" in out
    assert "auth on: 2 token(s): ana (operator), vic (viewer)" in out
    assert OPERATOR_SECRET not in out + err and VIEWER_SECRET not in out + err


def test_sagaway_admin_without_tokens_is_loopback_only(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/admin.db"
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com"):
        refused = sagaway("admin", "--store", store, "--host", host, "--port", "1")
        assert refused.returncode == 2, host
        assert f"refusing to bind {host} without tokens" in refused.stderr
    bad = sagaway("admin", "--store", store, "--token", "ana:root:0123456789abcdef0")
    assert bad.returncode == 2 and "unknown role 'root'" in bad.stderr

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAWAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagaway.cli", "admin", "--store", store, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        who = wait_http(f"http://127.0.0.1:{port}/api/whoami")
        assert who.json() == {"name": "local", "role": "operator", "auth": False}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "auth OFF" in out and "serves this machine only" in out
