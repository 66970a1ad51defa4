"""Fixtures shared by the whole suite: real servers, found from the environment.

PostgreSQL tests read ``SAGAWAY_TEST_POSTGRES_URL`` (``.ci/run`` sets it to the local
server). Without it they skip and say how to enable them; under ``CI=true`` a missing or
unreachable server fails the run instead of skipping silently.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

PG_ENV = "SAGAWAY_TEST_POSTGRES_URL"
PG_HINT = (
    f"set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to run the PostgreSQL tests "
    f"(start the server with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) "
    f"main start)"
)


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}", pytrace=False)
    pytest.skip(f"{reason}; {PG_HINT}")


async def _probe(url: str) -> str | None:
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install 'sagaway[postgres]')"
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"cannot connect to {url}: {exc}"
    await conn.close()
    return None


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    """The server's URL (no schema); skips or fails as the module docstring says."""
    url = os.environ.get(PG_ENV)
    if not url:
        _missing(f"{PG_ENV} is not set")
    assert url is not None
    problem = asyncio.run(_probe(url))
    if problem:
        _missing(problem)
    return url


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A store URL with a fresh schema of its own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in postgres_base_url else "?"
    yield f"{postgres_base_url}{sep}schema={schema}"
    asyncio.run(_drop_schema(postgres_base_url, schema))
