"""Fixtures of the choreography tests: real brokers found as the transport tests find them.

``SAGAWAY_TEST_AMQP_URL`` and ``SAGAWAY_TEST_NATS_URL`` (tests/messaging/conftest.py, reused
here): without one, that broker's tests skip; under ``CI=true`` they fail. Each test gets a
fresh queue prefix (``Shop.prefix``), and its queues/streams are deleted afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.ecommerce.choreography
_MESSAGING = ROOT / "tests" / "messaging"


def _load_messaging_conftest() -> object:
    spec = importlib.util.spec_from_file_location("sagaway_tests_choreo_brokers",
                                                  _MESSAGING / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_brokers = _load_messaging_conftest()
amqp_url = _brokers.amqp_url  # type: ignore[attr-defined]
nats_url = _brokers.nats_url  # type: ignore[attr-defined]

_FIXTURE = {"rabbitmq": "amqp_url", "nats": "nats_url"}


@pytest.fixture(params=["rabbitmq", "nats"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """RabbitMQ and NATS JetStream."""
    url: str = request.getfixturevalue(_FIXTURE[request.param])
    return url
