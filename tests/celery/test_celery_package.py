"""The Celery integration is a package (steps, transport, worker); what users import from
``sagaway.integrations.celery`` is pinned here, with the install hint and the shutdown hook."""

from __future__ import annotations

import subprocess
import sys
import threading

import sagaway.integrations.celery as integration
from sagaway.integrations.celery import _wire, steps, transport, worker

EXPECTED_ALL = [
    "DEFAULT_QUEUE",
    "META_KWARG",
    "CeleryIntegrationError",
    "CeleryTransport",
    "ChainSaga",
    "SagaTask",
    "TaskContext",
    "celery_step",
    "celery_task_message",
    "close_inboxes",
    "saga_chain",
    "saga_context",
    "saga_task",
]


def test_all_is_pinned_and_every_name_is_the_modules_own_object() -> None:
    assert integration.__all__ == EXPECTED_ALL
    homes = {"DEFAULT_QUEUE": steps, "ChainSaga": steps, "celery_step": steps,
             "saga_chain": steps, "CeleryTransport": transport,
             "celery_task_message": transport, "META_KWARG": _wire}
    for name in EXPECTED_ALL:
        home = homes.get(name, worker)
        assert getattr(integration, name) is getattr(home, name), name


def test_the_internals_tests_reach_stay_importable_from_the_package() -> None:
    from sagaway.integrations.celery import _Inbox, _open_inbox, _PostgresInbox, _replies

    assert _open_inbox is worker._open_inbox and _Inbox is worker._Inbox
    assert _PostgresInbox is worker._PostgresInbox
    # One reply publisher per process: patching it through the package patches the worker's.
    assert _replies is worker._replies


def test_without_celery_every_import_says_how_to_install_it() -> None:
    for module in ("sagaway.integrations.celery", "sagaway.integrations.celery.worker",
                   "sagaway.integrations.celery.steps"):
        code = (
            "import sys\n"
            "sys.modules['celery'] = None  # as if the extra were not installed\n"
            "import sagaway\n"
            "assert 'sagaway.integrations.celery' not in sys.modules\n"
            "try:\n"
            f"    import {module}\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    print('imported')\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            "the Celery integration needs celery: pip install 'sagaway[celery]'"), module


def test_worker_process_shutdown_closes_the_postgres_inboxes(postgres_url: str) -> None:
    from celery import signals

    inbox = worker._open_inbox(postgres_url)
    assert isinstance(inbox, worker._PostgresInbox)
    inbox.transaction()  # opens the pool on the inbox's loop thread
    threads = [t for t in threading.enumerate() if t.name == "sagaway-celery-inbox"]
    assert threads and inbox.db is not None
    signals.worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    assert not any(t.is_alive() for t in threads)
    assert inbox.db is None
