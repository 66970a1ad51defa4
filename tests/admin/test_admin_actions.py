"""Operator actions through the API: carried out by a worker, recorded with who and why,
refused (409) when the run's state does not allow them, 422 without a reason, 404."""

from __future__ import annotations

from typing import Any

import pytest
from admin_helpers import AUTH, Env, make_run

from sagaway import SagaRun, SagaStatus

OP = AUTH["operator"]


async def act(env: Env, run_id: str, action: str, body: Any = None) -> Any:
    response = await env.http.post(f"/api/runs/{run_id}/{action}", headers=OP,
                                   json={"reason": f"ops: {action}"} if body is None else body)
    return response


async def finished(env: Env, run_id: str) -> SagaRun:
    return await env.worker.wait(run_id, timeout=10)


async def test_retry_a_failed_compensation_once_the_fault_is_fixed(env: Env) -> None:
    failed = await make_run(env.worker, "failed")
    assert failed.error and "inventory service down" in failed.error
    env.faults.release_broken = False

    response = await act(env, failed.id, "retry", {"reason": "inventory is back"})
    assert response.status_code == 202
    body = response.json()
    assert body["request"]["action"] == "retry" and body["request"]["actor"] == "ana"
    assert body["allowed_actions"] == []  # one request at a time

    done = await finished(env, failed.id)
    assert done.status is SagaStatus.COMPENSATED
    entry = next(h for h in done.history if h.kind == "operator.retry")
    assert entry.data == {"actor": "ana", "reason": "inventory is back"}
    detail = (await env.http.get(f"/api/runs/{failed.id}", headers=OP)).json()
    assert detail["status"] == "COMPENSATED" and detail["request"] is None
    reserve = next(s for s in detail["steps"] if s["name"] == "reserve")
    assert [a["outcome"] for a in reserve["timeline"] if a["phase"] == "compensation"] == [
        "failed", "failed", "succeeded"]


async def test_resolve_marks_a_failed_run_resolved(env: Env) -> None:
    failed = await make_run(env.worker, "failed")
    assert (await act(env, failed.id, "resolve", {"reason": "released in the WMS"})
            ).status_code == 202
    done = await finished(env, failed.id)
    assert done.status is SagaStatus.RESOLVED
    assert [h.kind for h in done.history][-3:] == ["operator.requested", "operator.resolve",
                                                   "run.finished"]
    listed = (await env.http.get("/api/runs?status=RESOLVED", headers=OP)).json()["runs"]
    assert [r["id"] for r in listed] == [failed.id]


async def test_force_compensate_a_parked_run(env: Env) -> None:
    parked = await make_run(env.worker, "parked")
    assert parked.status is SagaStatus.RUNNING
    assert (await act(env, parked.id, "compensate")).status_code == 202
    done = await finished(env, parked.id)
    assert done.status is SagaStatus.COMPENSATED
    assert "operator.compensate" in [h.kind for h in done.history]


async def test_resume_a_parked_run_fires_its_retry_now(env: Env) -> None:
    parked = await make_run(env.worker, "parked")
    detail = (await env.http.get(f"/api/runs/{parked.id}", headers=OP)).json()
    step = detail["steps"][0]
    assert parked.wake_at is not None and parked.wake_at > parked.updated_at + 3000
    assert step["next_attempt_at"] == pytest.approx(parked.wake_at, abs=0.01)
    assert detail["allowed_actions"] == ["resume", "compensate"]
    assert (await act(env, parked.id, "resume")).status_code == 202
    done = await finished(env, parked.id)
    assert done.status is SagaStatus.COMPLETED
    assert done.results == {"flaky": "done on attempt 2"}


# (state, action): every action a state does not allow.
REFUSED = [
    ("completed", "retry"), ("completed", "resume"), ("completed", "compensate"),
    ("completed", "resolve"),
    ("compensated", "retry"), ("compensated", "resume"), ("compensated", "compensate"),
    ("compensated", "resolve"),
    ("failed", "resume"),
    ("parked", "retry"), ("parked", "resolve"),
    ("resolved", "retry"), ("resolved", "resume"), ("resolved", "compensate"),
    ("resolved", "resolve"),
]


@pytest.mark.parametrize(("state", "action"), REFUSED, ids=[f"{a}-{s}" for s, a in REFUSED])
async def test_actions_the_state_does_not_allow_are_409(env: Env, state: str,
                                                        action: str) -> None:
    if state == "resolved":
        run = await make_run(env.worker, "failed")
        await env.worker.resolve(run.id, reason="setup", actor="setup")
        run = await finished(env, run.id)
    else:
        run = await make_run(env.worker, state)
    before = await env.worker.get(run.id)
    response = await act(env, run.id, action)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"cannot {action} run {run.id}: the run is {before.status.value}")
    after = await env.worker.get(run.id)
    assert after.history == before.history and after.request is None


@pytest.mark.parametrize("action", ["retry", "resume", "compensate", "resolve"])
async def test_a_second_request_while_one_is_pending_is_409(env: Env, action: str) -> None:
    orphan = await (await env.admin.orch()).start("orphan", {})  # PENDING: no worker runs it
    first = "compensate" if action == "resume" else "resume"
    assert (await act(env, orphan.id, first)).status_code == 202
    response = await act(env, orphan.id, action)
    assert response.status_code == 409
    assert "already pending" in response.json()["detail"]


@pytest.mark.parametrize("body", [None, {}, {"reason": ""}, {"reason": "   "},
                                  {"reason": None}, {"reason": "x" * 2001},
                                  {"reason": "ok", "unexpected": 1}, "just text"],
                         ids=["no body", "empty", "empty reason", "blank reason",
                              "null reason", "too long", "extra field", "not an object"])
async def test_an_action_without_a_reason_is_422(env: Env, body: Any) -> None:
    failed = await make_run(env.worker, "failed")
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = await env.http.post(f"/api/runs/{failed.id}/resolve", headers=OP, **kwargs)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert "reason" in detail or "unexpected" in detail or "body" in detail
    assert (await env.worker.get(failed.id)).request is None


async def test_unknown_runs_are_404_and_the_message_names_no_store(env: Env) -> None:
    for method, path in [("GET", "/api/runs/no-such-run"),
                         ("POST", "/api/runs/no-such-run/retry")]:
        response = await env.http.request(method, path, headers=OP, json={"reason": "x"})
        assert response.status_code == 404
        assert response.json() == {"detail": "no saga run with id 'no-such-run'"}
        assert "sqlite" not in response.text and env.url not in response.text
