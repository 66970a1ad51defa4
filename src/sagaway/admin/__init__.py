"""The admin REST API and dashboard (``pip install 'sagaway[admin]'``; ``sagaway admin``).

``create_app(store_url_or_orchestrator, tokens=…)`` builds the FastAPI app; FastAPI is
imported only when it is asked for, so the token and masking helpers work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagaway.admin.auth import Principal, Role, Token, TokenAuth, is_loopback, load_tokens
from sagaway.admin.masking import DEFAULT_SENSITIVE_FIELDS, MASK, Masker

if TYPE_CHECKING:
    from sagaway.admin.api import create_app

__all__ = [
    "DEFAULT_SENSITIVE_FIELDS",
    "MASK",
    "Masker",
    "Principal",
    "Role",
    "Token",
    "TokenAuth",
    "create_app",
    "is_loopback",
    "load_tokens",
]

_MISSING_HINT = "the admin API needs FastAPI: pip install 'sagaway[admin]'"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        try:
            from sagaway.admin.api import create_app
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in ("fastapi", "starlette", "pydantic"):
                raise ImportError(_MISSING_HINT) from exc
            raise
        return create_app
    raise AttributeError(f"module 'sagaway.admin' has no attribute {name!r}")
