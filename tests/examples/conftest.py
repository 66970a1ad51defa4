"""The example systems (``examples/`` at the repository root) under test.

``examples`` is not part of the installed package: the repository root goes on
``sys.path`` here, and the services the tests start get it on their PYTHONPATH
(``examples.launch``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


AMQP_ENV = "SAGAWAY_TEST_AMQP_URL"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ for the bank example: skips without ``SAGAWAY_TEST_AMQP_URL``, fails under
    ``CI=true`` (as tests/participant/conftest.py)."""
    from examples.bank_transfer.system import amqp_problem

    url = os.environ.get(AMQP_ENV)
    problem = asyncio.run(amqp_problem(url)) if url else f"{AMQP_ENV} is not set"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{AMQP_ENV} must name a reachable broker under CI=true: {problem}",
                        pytrace=False)  # fmt: skip
        pytest.skip(f"{problem}; set {AMQP_ENV}=amqp://guest:guest@127.0.0.1:5672/")
    assert url is not None
    return url
