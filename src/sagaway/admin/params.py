"""Parsing the admin API's query parameters: times, statuses and page cursors.

Values only ever reach the store as bound parameters; these functions turn hostile or
malformed input into a 4xx with a message before it gets that far.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime

from fastapi import HTTPException

from sagaway import SagaRun, SagaStatus

__all__ = ["PRINTABLE", "decode_cursor", "encode_cursor", "parse_statuses", "parse_time"]

PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
"""No control characters in names and ids: PostgreSQL rejects NUL in text, and no saga name
or run id has one, so they are a client error here rather than a store error later."""


def parse_time(value: str, name: str) -> float:
    """ISO 8601 (``2024-05-01T12:00:00Z``; no zone means UTC) or epoch seconds."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise HTTPException(422, f"{name}: {value!r} is not an ISO 8601 time (e.g. "
                                     f"2024-05-01T12:00:00Z) or epoch seconds") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(seconds):
        raise HTTPException(422, f"{name}: {value!r} is not a time")
    return seconds


def parse_statuses(values: Iterable[str]) -> list[SagaStatus]:
    """``?status=FAILED&status=running`` or ``?status=FAILED,RUNNING``; case-insensitive."""
    out: list[SagaStatus] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                out.append(SagaStatus(part.strip().upper()))
            except ValueError:
                known = ", ".join(s.value for s in SagaStatus)
                raise HTTPException(422, f"status: unknown status {part.strip()[:40]!r}; "
                                         f"use one of {known}") from None
    return list(dict.fromkeys(out))


def encode_cursor(run: SagaRun) -> str:
    raw = json.dumps([run.created_at, run.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        if not isinstance(run_id, str) or not re.fullmatch(PRINTABLE, run_id) \
                or isinstance(created_at, bool) \
                or not isinstance(created_at, int | float) or not math.isfinite(created_at):
            raise ValueError
    except (ValueError, TypeError, binascii.Error):
        raise HTTPException(400, "cursor: not a cursor this API returned; pass the "
                                 "next_cursor of the previous page unchanged") from None
    return float(created_at), run_id
