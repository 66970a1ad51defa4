"""The admin app's front door: authentication, roles and security headers, as ASGI middleware.

It runs before routing and before a request body is read, so every ``/api/`` path, known or
not, answers 401 without a valid token and 403 when the token's role is too weak: a read
(GET/HEAD/OPTIONS) needs a viewer, anything else an operator. Routes cannot forget it.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sagaway.admin.auth import Principal, Role, TokenAuth, is_loopback

__all__ = ["LOCAL", "PRINCIPAL", "AuthMiddleware"]

PRINCIPAL = "sagaway.principal"
"""The scope key under which the authenticated Principal travels to the routes."""

LOCAL = Principal("local", Role.OPERATOR)
"""Everyone, when auth is off (and only loopback clients are served)."""

_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class AuthMiddleware:
    """Resolves the caller's Principal (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, auth: TokenAuth, protected: tuple[str, ...] = ()
                 ) -> None:
        self.app = app
        self.auth = auth
        self.protected = protected
        """Paths outside /api that need a token too (``/metrics`` with metrics_auth)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        api = path == "/api" or path.startswith("/api/") or path in self.protected

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += _HEADERS
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        if not self.auth.enabled:
            client = scope.get("client")
            # A unix socket has no client address; its file permissions guard it.
            if client is not None and not is_loopback(client[0]):
                await _deny(send_with_headers, 403,
                            "this admin server runs without tokens, so it only serves this "
                            "machine; start it with --token NAME:ROLE:SECRET to allow others")
                return
            scope[PRINCIPAL] = LOCAL
        elif api:
            principal = self.auth.authenticate(_bearer(scope)) if _bearer(scope) else None
            if principal is None:
                detail = ("invalid token" if _bearer(scope) else
                          "missing token: send Authorization: Bearer <token>")
                await _deny(send_with_headers, 401, detail,
                            [(b"www-authenticate", b'Bearer realm="sagaway"')])
                return
            needed = Role.VIEWER if scope.get("method", "GET") in _READS else Role.OPERATOR
            if not principal.role.allows(needed):
                await _deny(send_with_headers, 403,
                            f"token {principal.name!r} has the {principal.role} role; this "
                            f"needs an {needed} token")
                return
            scope[PRINCIPAL] = principal
        await self.app(scope, receive, send_with_headers)


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").partition(" ")
            return secret.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _deny(send: Send, status: int, detail: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})
