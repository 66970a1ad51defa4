"""Run an example's services as real processes (uvicorn) on free 127.0.0.1 ports.

Used by ``sagaway demo <example>`` and by the example tests; by hand you run the same
``uvicorn --factory`` command each :class:`Service` prints with :meth:`Service.command`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import httpx

__all__ = [
    "FINISHED",
    "ROOT",
    "SagaFront",
    "Service",
    "ServiceFailed",
    "free_port",
    "start_all",
    "stop_all",
]

ROOT = Path(__file__).resolve().parent.parent
"""The checkout the examples live in (put on the services' PYTHONPATH)."""


class ServiceFailed(RuntimeError):
    """A service process exited or did not answer ``/healthz`` in time."""


def free_port() -> int:
    """A port nothing listens on right now (the service binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """One service process: ``uvicorn --factory <factory>`` with its environment.

    Args:
        name: a short name (logs go to ``<log_dir>/<name>.log``).
        factory: ``module:function`` returning the ASGI app (it reads its settings from
            ``env``).
        env: extra environment variables (the database URL, other services' URLs).
        log_dir: where the process's output goes.
        port: fixed port (default: a free one, kept across restarts).
    """

    def __init__(
        self,
        name: str,
        factory: str,
        *,
        env: Mapping[str, str],
        log_dir: Path,
        port: int | None = None,
    ) -> None:
        self.name = name
        self.factory = factory
        self.env = dict(env)
        self.log_dir = Path(log_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            self.factory,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def start(self) -> None:
        """Start the process (do not wait for it to listen: :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ServiceFailed(f"{self.name} is already running (pid {self.proc.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **self.env, "PYTHONPATH": path}
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.starts += 1

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``GET /healthz`` answers 200.

        Raises:
            ServiceFailed: the process exited, or did not answer within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise ServiceFailed(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServiceFailed(
                    f"{self.name} did not answer {self.url}/healthz within {timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; the database keeps what was committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def start_all(services: Iterable[Service], timeout: float = 30.0) -> None:
    """Start the services together and wait until each answers (stops them all on failure)."""
    services = list(services)
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(timeout)
    except BaseException:
        stop_all(services)
        raise


def stop_all(services: Iterable[Service]) -> None:
    for service in services:
        service.stop()


FINISHED = ("COMPLETED", "COMPENSATED", "FAILED", "RESOLVED")


class System:
    """Services started together and stopped in reverse, with one HTTP client; a subclass
    sets ``services``, ``client`` (and its ``front``) in ``__init__``."""

    services: list[Service]
    client: httpx.Client

    def start(self) -> None:
        start_all(self.services)

    def stop(self) -> None:
        stop_all(reversed(self.services))
        self.client.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SagaFront:
    """A client of a :mod:`examples.sagaapi` service: start runs, read them, wait for them."""

    def __init__(self, service: Service, resource: str, client: httpx.Client) -> None:
        self.service = service
        self.resource = resource
        self.client = client
        self.placed: list[str] = []
        """Every run started through this client, oldest first."""

    @property
    def url(self) -> str:
        return f"{self.service.url}/{self.resource}"

    def place(self, body: dict[str, Any], *, key: str | None = None) -> str:
        """``POST /<resource>``; the new run's id."""
        headers = {"Idempotency-Key": key} if key else {}
        r = self.client.post(self.url, json=body, headers=headers)
        r.raise_for_status()
        run_id: str = r.json()["id"]
        if run_id not in self.placed:
            self.placed.append(run_id)
        return run_id

    def get(self, run_id: str) -> dict[str, Any]:
        r = self.client.get(f"{self.url}/{run_id}")
        r.raise_for_status()
        found: dict[str, Any] = r.json()
        return found

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = self.client.get(self.url).json()
        return found

    def wait(self, ids: Iterable[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until every run has finished; each as ``GET /<resource>/{id}`` shows it.

        Raises:
            TimeoutError: some had not finished after ``timeout`` seconds.
        """
        pending = list(ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending:
            still = []
            for run_id in pending:
                found = self.get(run_id)
                if found["status"] in FINISHED:
                    done[run_id] = found
                else:
                    still.append(run_id)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(pending)} {self.resource} unfinished after {timeout} s: "
                        f"{pending[:5]}"
                    )
                time.sleep(0.1)
        return done
