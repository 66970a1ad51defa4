"""Every endpoint by {no token, bad token, viewer, operator}, and the token machinery."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from admin_helpers import AUTH, OPERATOR_SECRET, TOKENS, Env, Faults, make_run, sagas

from sagaway import Orchestrator, SagaStatus
from sagaway.admin import Role, Token, TokenAuth, create_app, is_loopback, load_tokens

# (method, path template, state of the run it needs, operator's status)
ENDPOINTS = [
    ("GET", "/api/whoami", None, 200),
    ("GET", "/api/runs", None, 200),
    ("GET", "/api/runs/counts", None, 200),
    ("GET", "/api/runs/{id}", "completed", 200),
    ("POST", "/api/runs/{id}/retry", "failed", 202),
    ("POST", "/api/runs/{id}/resolve", "failed", 202),
    ("POST", "/api/runs/{id}/compensate", "failed", 202),
    ("POST", "/api/runs/{id}/resume", "parked", 202),
]
EXPECTED = {"none": 401, "bad": 401, "viewer": None, "operator": None}


@pytest.mark.parametrize("who", list(AUTH))
@pytest.mark.parametrize(("method", "path", "needs", "ok"), ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
async def test_auth_matrix(env: Env, who: str, method: str, path: str, needs: str | None,
                           ok: int) -> None:
    run = await make_run(env.worker, needs or "completed")
    before = await env.worker.get(run.id)
    body = {"reason": "matrix"} if method == "POST" else None
    response = await env.http.request(method, path.format(id=run.id), headers=AUTH[who],
                                      json=body)

    if who in ("none", "bad"):
        expected = 401
    elif who == "viewer":
        expected = 403 if method == "POST" else 200
    else:
        expected = ok
    assert response.status_code == expected, response.text
    assert response.headers["content-type"] == "application/json"
    if expected == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["detail"] in (
            "invalid token", "missing token: send Authorization: Bearer <token>")
    if expected == 403:
        assert "needs an operator token" in response.json()["detail"]
    after = await env.worker.get(run.id)
    if method == "POST" and expected == 202:
        assert response.json()["id"] == run.id
        entry = next(h for h in after.history if h.kind == "operator.requested")
        assert entry.data == {"action": path.rsplit("/", 1)[1], "actor": "ana",
                              "reason": "matrix"}
    elif method == "POST":
        # Refused before anything was read or written.
        assert after.history == before.history and after.request is None


async def test_whoami_names_the_token(env: Env) -> None:
    for who, (name, role) in {"viewer": ("vic", "viewer"),
                              "operator": ("ana", "operator")}.items():
        response = await env.http.get("/api/whoami", headers=AUTH[who])
        assert response.json() == {"name": name, "role": role, "auth": True}


async def test_unknown_api_paths_and_schemes_are_401_without_a_valid_token(env: Env) -> None:
    assert (await env.http.get("/api/nope")).status_code == 401
    basic = {"Authorization": f"Basic {OPERATOR_SECRET}"}
    assert (await env.http.get("/api/runs", headers=basic)).status_code == 401
    prefix = {"Authorization": f"Bearer {OPERATOR_SECRET[:-1]}"}
    assert (await env.http.get("/api/runs", headers=prefix)).status_code == 401
    # Authenticated first, so a body is never parsed for a stranger.
    garbage = await env.http.post("/api/runs/x/retry", content=b"{not json")
    assert garbage.status_code == 401
    assert (await env.http.get("/api/nope", headers=AUTH["viewer"])).status_code == 404


async def test_public_paths_need_no_token(env: Env) -> None:
    assert (await env.http.get("/healthz")).json() == {"status": "ok"}
    assert (await env.http.get("/openapi.json")).status_code == 200
    assert (await env.http.get("/docs")).status_code == 200
    index = await env.http.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert index.headers["x-frame-options"] == "DENY"


async def test_without_tokens_only_loopback_clients_are_served(store_url: str) -> None:
    async with Orchestrator(store_url, sagas=sagas(Faults()), poll_interval=0.05) as worker:
        failed = await make_run(worker, "failed")
        app = create_app(worker, tokens=None)
        local = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=local, base_url="http://a") as http:
            assert (await http.get("/api/whoami")).json() == {
                "name": "local", "role": "operator", "auth": False}
            # With auth off the caller may name themselves (with tokens it is ignored).
            done = await http.post(f"/api/runs/{failed.id}/resolve",
                                   json={"reason": "by hand", "actor": "ops-lead"})
            assert done.status_code == 202
            assert done.json()["request"]["actor"] == "ops-lead"
        remote = httpx.ASGITransport(app=app, client=("10.1.2.3", 5000))
        async with httpx.AsyncClient(transport=remote, base_url="http://a") as http:
            for path in ("/api/runs", "/", "/healthz"):
                refused = await http.get(path)
                assert refused.status_code == 403
                assert "only serves this machine" in refused.json()["detail"]


async def test_the_actor_is_the_token_name_whatever_the_body_says(env: Env) -> None:
    failed = await make_run(env.worker, "failed")
    response = await env.http.post(f"/api/runs/{failed.id}/resolve", headers=AUTH["operator"],
                                   json={"reason": "settled", "actor": "somebody-else"})
    assert response.status_code == 202
    assert response.json()["request"]["actor"] == "ana"


def test_token_specs_parse_and_reject_mistakes(tmp_path: Path) -> None:
    token = Token.parse("ana:operator:abc:def-0123456789abcdef")
    assert (token.name, token.role, token.secret) == ("ana", Role.OPERATOR,
                                                      "abc:def-0123456789abcdef")
    assert "abc" not in repr(token)
    for bad, message in [("ana:admin:0123456789abcdef0", "unknown role"),
                         ("ana:viewer:short", "at least 16"),
                         ("ana:viewer", "NAME:ROLE:SECRET"),
                         ("bad name:viewer:0123456789abcdef0", "must be 1-64")]:
        with pytest.raises(ValueError, match=message):
            Token.parse(bad)

    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# ops team\nbob:viewer:bbbbbbbbbbbbbbbbbbbb  # read only\n\n")
    env = {"SAGAWAY_ADMIN_TOKENS": "cy:operator:cccccccccccccccccccc, "
                                   "di:viewer:dddddddddddddddddddd"}
    loaded = load_tokens(["ana:operator:aaaaaaaaaaaaaaaaaaaa"], file=tokens_file, environ=env)
    assert [(t.name, t.role.value) for t in loaded] == [
        ("ana", "operator"), ("cy", "operator"), ("di", "viewer"), ("bob", "viewer")]
    assert load_tokens([], environ={}) == []
    with pytest.raises(ValueError, match="more than once"):
        load_tokens(["a:viewer:aaaaaaaaaaaaaaaaaaaa", "a:operator:bbbbbbbbbbbbbbbbbbbb"],
                    environ={})
    with pytest.raises(ValueError, match="share a secret"):
        load_tokens(["a:viewer:aaaaaaaaaaaaaaaaaaaa", "b:operator:aaaaaaaaaaaaaaaaaaaa"],
                    environ={})
    with pytest.raises(ValueError, match="cannot read the tokens file"):
        load_tokens([], file=tmp_path / "missing", environ={})


def test_token_auth_checks_every_token_and_names_mapping_tokens() -> None:
    auth = TokenAuth(TOKENS)
    assert auth.enabled
    assert auth.authenticate(OPERATOR_SECRET) is not None
    assert auth.authenticate(OPERATOR_SECRET + "x") is None
    assert auth.authenticate("") is None
    mapped = TokenAuth({"s" * 20: Role.VIEWER})
    principal = mapped.authenticate("s" * 20)
    assert principal is not None and principal.role is Role.VIEWER
    assert principal.name.startswith("viewer-") and "s" * 8 not in principal.name
    assert not TokenAuth(None).enabled and not TokenAuth({}).enabled


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("example.com", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_statuses_in_the_hint_table_match_the_engine() -> None:
    from sagaway.admin.views import ALLOWED
    from sagaway.engine.decider import OPERATOR_ALLOWED

    assert {k: set(v) for k, v in ALLOWED.items()} == {
        k: set(v) for k, v in OPERATOR_ALLOWED.items()}
    assert SagaStatus.RESOLVED not in {s for v in ALLOWED.values() for s in v}
