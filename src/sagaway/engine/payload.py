"""JSON encoding of inputs and results. JSON only: never pickle.

pydantic models, dataclasses, datetimes, UUIDs and Decimals are dumped through
``pydantic_core.to_jsonable_python`` (the same rules FastAPI uses); anything else that JSON
cannot express is refused with :class:`InvalidPayload` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic_core import PydanticSerializationError, to_jsonable_python

from sagaway.errors import InvalidPayload, PayloadTooLarge

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "decode", "encode", "fingerprint", "to_json_value"]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def _reject_sets(value: Any, what: str) -> None:
    # JSON has no sets, and a set dumped as a list comes out in hash order, which differs
    # between processes: the same input would fingerprint differently on two workers.
    if isinstance(value, set | frozenset):
        raise InvalidPayload(f"{what} holds a set; JSON has no sets, pass a sorted list")
    if isinstance(value, dict):
        for item in value.values():
            _reject_sets(item, what)
    elif isinstance(value, list | tuple):
        for item in value:
            _reject_sets(item, what)


def to_json_value(value: Any, *, what: str) -> Any:
    """Turn ``value`` into plain JSON data (dict/list/str/int/float/bool/None)."""
    _reject_sets(value, what)
    try:
        plain = to_jsonable_python(value)
    except (PydanticSerializationError, TypeError, ValueError) as exc:
        raise InvalidPayload(
            f"{what} is not JSON-serialisable ({type(value).__name__}): {exc}. Pass dicts, "
            f"lists, str, numbers, bools, None or pydantic models"
        ) from None
    return plain


def encode(value: Any, *, what: str, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[Any, str]:
    """Return (plain JSON value, its canonical text); check it is JSON and within ``limit``.

    The plain value is what a reload of the text gives (pydantic's JSON mode already turns
    keys into strings and tuples into lists), so no second parse is needed.
    """
    plain = to_json_value(value, what=what)
    try:
        text = json.dumps(plain, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"{what} is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidPayload(f"{what} holds text that is not valid Unicode: {exc}") from None
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes encoded, over the limit of {limit} bytes; store large data "
            f"elsewhere and pass a reference, or raise max_payload_bytes",
            size=size,
            limit=limit,
        )
    return plain, text


def decode(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def fingerprint(text: str) -> str:
    """A stable hash of a canonical JSON text, to compare inputs under one idempotency key."""
    return hashlib.sha256(text.encode()).hexdigest()
