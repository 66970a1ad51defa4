"""Running an orchestrator as a long-lived worker process (``sagaway worker``).

The worker opens the orchestrator (which starts recovering runs at once), serves until
SIGTERM or SIGINT, then closes it: in-flight attempts are cut and every lease is released,
so another worker resumes those runs at once instead of after the lease expires.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys

from sagaway.engine.runtime import Orchestrator

__all__ = ["load_app", "serve"]

log = logging.getLogger("sagaway.worker")


def load_app(spec: str) -> Orchestrator:
    """Import ``module:attribute`` (or ``module:factory()``) and return the Orchestrator."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app must look like 'package.module:orchestrator', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    target = getattr(module, attr.removesuffix("()"), None)
    if target is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr.removesuffix('()')!r}")
    if call:
        target = target()
    if not isinstance(target, Orchestrator):
        raise ValueError(f"{spec!r} is a {type(target).__name__}, not a sagaway Orchestrator")
    return target


async def serve(orch: Orchestrator, *, stop: asyncio.Event | None = None) -> None:
    """Drive runs until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with orch:
            log.info("worker %s started on %s (%d saga definitions)", orch.worker_id,
                     orch.store.url.split("@")[-1], len(orch.sagas))
            await stop.wait()
            log.info("worker %s stopping: releasing leases", orch.worker_id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
