"""A scripted HTTP service for the HTTP step tests: a real FastAPI app served by uvicorn on
127.0.0.1 (a port the OS picked, or one the test names) in a background thread.

Every request is recorded (method, path, headers, body, when it started and ended). A test
scripts the answers per (method, path): ``script.plan("POST", "/payments", Reply(503),
Reply(201, {...}))`` answers the first call 503 and every later one 201 (the last reply
sticks). Unscripted requests get 200 (201 for POST) with a small JSON echo.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] | None = None
    text: str | None = None
    """A non-JSON body, sent as text/plain."""


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started: float
    finished: float | None = None

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class Script:
    calls: list[Call] = field(default_factory=list)
    plans: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, method: str, path: str, *replies: Reply) -> None:
        with self.lock:
            self.plans[(method.upper(), path)] = list(replies)

    def next(self, method: str, path: str) -> Reply:
        with self.lock:
            queue = self.plans.get((method, path))
            if queue:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        return Reply(201 if method == "POST" else 200, {"ok": True, "path": path})

    def to(self, method: str, path: str) -> list[Call]:
        """The calls received for (method, path), in arrival order."""
        return [c for c in self.calls if c.method == method and c.path == path]


def build_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(request: Request, path: str) -> Response:
        raw = await request.body()
        # The raw (still percent-encoded) path: what the client really sent.
        raw_path = request.scope["raw_path"].decode()
        call = Call(request.method, raw_path, dict(request.headers.items()),
                    json.loads(raw) if raw else None, time.monotonic())
        script.calls.append(call)
        reply = script.next(request.method, call.path)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        call.finished = time.monotonic()
        if reply.text is not None:
            return PlainTextResponse(reply.text, status_code=reply.status,
                                     headers=reply.headers)
        if reply.body is None and reply.status == 204:
            return Response(status_code=204, headers=reply.headers)
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

    return app


class ThreadServer:
    """uvicorn serving ``build_app(script)`` on 127.0.0.1 in a background thread."""

    def __init__(self, script: Script, *, port: int = 0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(script), ws="none", lifespan="off",
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn exited at startup"
            time.sleep(0.01)
        self._sock = sock

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
