"""Bearer tokens with roles for the admin API.

A token is ``NAME:ROLE:SECRET``: the name is who acts (it is recorded as the actor of every
operator action done with the token), the role is ``viewer`` (read) or ``operator`` (read
and act), the secret is what a client sends as ``Authorization: Bearer SECRET``. Tokens come
from ``--token`` options, the ``SAGAWAY_ADMIN_TOKENS`` environment variable (specs separated
by whitespace or commas) or a file (one spec per line, ``#`` comments) named by
``--tokens-file`` or ``SAGAWAY_ADMIN_TOKENS_FILE``.

With no tokens at all, auth is off: every caller is an operator named ``local``, so the
server must only be reachable from this machine. The CLI refuses to bind a non-loopback
address without tokens, and the app itself answers 403 to any non-loopback client then.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

__all__ = [
    "TOKENS_ENV",
    "TOKENS_FILE_ENV",
    "Principal",
    "Role",
    "Token",
    "TokenAuth",
    "is_loopback",
    "load_tokens",
]

TOKENS_ENV = "SAGAWAY_ADMIN_TOKENS"
TOKENS_FILE_ENV = "SAGAWAY_ADMIN_TOKENS_FILE"
MIN_SECRET_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_SECRET = re.compile(r"[^\s,]+")


class Role(StrEnum):
    """What a token may do: ``viewer`` reads, ``operator`` reads and acts."""

    VIEWER = "viewer"
    OPERATOR = "operator"

    def allows(self, needed: Role) -> bool:
        return self is Role.OPERATOR or needed is Role.VIEWER


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: a token's name and role."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class Token:
    """One configured bearer token."""

    name: str
    role: Role
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"token name {self.name!r} must be 1-64 letters, digits or _.@-")
        if len(self.secret) < MIN_SECRET_LENGTH or not _SECRET.fullmatch(self.secret):
            raise ValueError(
                f"token {self.name!r}: the secret must be at least {MIN_SECRET_LENGTH} "
                f"characters with no spaces or commas (e.g. from `openssl rand -hex 24`)"
            )

    @classmethod
    def parse(cls, spec: str) -> Token:
        """``NAME:ROLE:SECRET`` (the secret may itself contain ``:``)."""
        name, _, rest = spec.strip().partition(":")
        role, _, secret = rest.partition(":")
        if not name or not secret:
            raise ValueError("a token looks like NAME:ROLE:SECRET, e.g. ana:operator:<secret>")
        try:
            parsed = Role(role.lower())
        except ValueError:
            raise ValueError(
                f"token {name!r}: unknown role {role!r}; use viewer or operator"
            ) from None
        return cls(name, parsed, secret)


def load_tokens(specs: Iterable[str] = (), *, file: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> list[Token]:
    """Tokens from ``specs``, a file, and the environment (see the module docstring).

    Raises:
        ValueError: a malformed spec, an unreadable file, or two tokens with the same name
            or secret.
    """
    env = os.environ if environ is None else environ
    lines = [s for s in specs if s.strip()]
    lines += re.split(r"[\s,]+", env.get(TOKENS_ENV, "").strip())
    file = file or env.get(TOKENS_FILE_ENV) or None
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the tokens file {str(file)!r}: {exc}") from exc
        lines += [line.split("#", 1)[0] for line in text.splitlines()]
    tokens = [Token.parse(line) for line in lines if line.strip()]
    _check_unique(tokens)
    return tokens


def _check_unique(tokens: Sequence[Token]) -> None:
    names = [t.name for t in tokens]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"token name(s) {', '.join(dupes)} given more than once")
    if len({t.secret for t in tokens}) != len(tokens):
        raise ValueError("two tokens share a secret; give each its own")


class TokenAuth:
    """Checks bearer secrets against the configured tokens.

    Args:
        tokens: ``Token`` objects, or a mapping ``{secret: Role}`` (each such token is
            named ``<role>-<first 8 hex of sha256(secret)>``, which never reveals it).
            None or empty turns auth off.
    """

    def __init__(self, tokens: Iterable[Token] | Mapping[str, Role] | None) -> None:
        if isinstance(tokens, Mapping):
            tokens = [
                Token(f"{Role(role)}-{hashlib.sha256(secret.encode()).hexdigest()[:8]}",
                      Role(role), secret)
                for secret, role in tokens.items()
            ]
        self.tokens: tuple[Token, ...] = tuple(tokens or ())
        _check_unique(self.tokens)
        self._digests = [(hashlib.sha256(t.secret.encode()).digest(), t) for t in self.tokens]

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def authenticate(self, secret: str) -> Principal | None:
        """The token's principal, or None. Constant-time in the secret compared."""
        # Comparing fixed-size digests, and every token, keeps the time independent of both
        # the secret's length and which token (if any) matched.
        offered = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        found: Token | None = None
        for digest, token in self._digests:
            if hmac.compare_digest(digest, offered):
                found = token
        return None if found is None else Principal(found.name, found.role)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a bind address or a client address) is this machine only."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
