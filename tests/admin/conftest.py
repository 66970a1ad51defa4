"""Fixtures for the admin API tests.

``env`` is the fast path: a worker orchestrator and the admin app (over a client
orchestrator on the same SQLite file) in the test's event loop, called through httpx's
ASGITransport. The live-server tests build real uvicorn servers and worker threads from
``admin_helpers``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from admin_helpers import TOKENS, Env, Faults, orphan_saga, sagas

from sagaway import Orchestrator
from sagaway.admin import create_app
from sagaway.admin.api import AdminState


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/admin.db"


@pytest.fixture
async def env(store_url: str) -> AsyncIterator[Env]:
    faults = Faults()
    async with Orchestrator(store_url, sagas=sagas(faults), poll_interval=0.05) as worker:
        app = create_app(store_url, tokens=TOKENS, sensitive_fields=["dob"],
                         sagas=[*sagas(Faults()), orphan_saga()])
        admin: AdminState = app.state.sagaway
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") \
                    as http:
                yield Env(store_url, worker, admin, app, http, faults)
        finally:
            await admin.aclose()
