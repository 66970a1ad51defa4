"""The message envelope: what every transport carries. JSON only, never pickle.

On the wire an envelope is one UTF-8 JSON object::

    {"id": "…", "type": "order.reserve", "run_id": "…", "step": "reserve",
     "idempotency_key": "…", "reply_to": "orders.replies", "correlation_id": "…",
     "headers": {"traceparent": "00-…"}, "created_at": 1700000000.25, "payload": {…}}

Fields this version does not know are kept in :attr:`Envelope.extra` and written back
unchanged, so a message passing through an older service loses nothing. Bytes that are not
such an object are refused with :class:`~sagaway.errors.MalformedEnvelope`, whose ``reason``
the transports put on the dead letter.

A dead letter is itself an envelope (type :data:`DEAD_LETTER_TYPE`) whose payload records the
source, the reason, the attempts and the original bytes; :class:`DeadLetter` reads and writes
that payload.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagaway.errors import InvalidPayload, MalformedEnvelope, PayloadTooLarge

__all__ = [
    "DEAD_LETTER_TYPE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DeadLetter",
    "Envelope",
]

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest encoded envelope :meth:`Envelope.to_bytes` accepts unless told otherwise."""

DEAD_LETTER_TYPE = "sagaway.dead-letter"
"""The ``type`` of the envelopes transports put on a dead-letter destination."""

_OPTIONAL_TEXT = ("run_id", "step", "idempotency_key", "reply_to", "correlation_id")
_KNOWN = frozenset(("id", "type", "headers", "created_at", "payload", *_OPTIONAL_TEXT))


def _new_id() -> str:
    return uuid.uuid4().hex


def _dumps(value: Any) -> bytes:
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One message. Build it with keywords; ``id`` and ``created_at`` default to fresh values.

    Example::

        Envelope(type="payment.charge", payload={"amount": 42}, run_id=run.id,
                 step="charge", idempotency_key=f"{run.id}:charge:action",
                 reply_to="orders.replies")
    """

    type: str
    """What the message means (``"payment.charge"``); consumers dispatch on it."""
    payload: Any = None
    """The message body: JSON data (dict, list, str, number, bool, None)."""
    id: str = field(default_factory=_new_id)
    """Unique per message; brokers that deduplicate (NATS ``Nats-Msg-Id``) use it."""
    run_id: str | None = None
    """The saga run this message belongs to."""
    step: str | None = None
    idempotency_key: str | None = None
    """The same on every retry of one step invocation: ``{run_id}:{step}:{action|compensation}``."""
    reply_to: str | None = None
    """Where the receiver sends its reply (a destination name)."""
    correlation_id: str | None = None
    """Set on a reply to the ``id`` of the request it answers."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Trace context (W3C ``traceparent``, ``tracestate``, ``baggage``) and similar strings."""
    created_at: float = field(default_factory=time.time)
    """Seconds since the epoch, stamped by the sender."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Top-level fields this version does not know, kept so a round trip loses nothing."""

    def to_json(self) -> dict[str, Any]:
        """The envelope as the JSON object it is on the wire (``extra`` merged in first)."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            id=self.id,
            type=self.type,
            run_id=self.run_id,
            step=self.step,
            idempotency_key=self.idempotency_key,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            headers=dict(self.headers),
            created_at=self.created_at,
            payload=self.payload,
        )
        return doc

    def to_bytes(self, *, max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
        """Encode as UTF-8 JSON.

        Raises:
            InvalidPayload: a field is not JSON data (NaN and infinities included).
            PayloadTooLarge: the encoding is over ``max_bytes`` (``None``: no limit).
        """
        _check_fields(self.id, self.type, self.headers, self.created_at, error=InvalidPayload)
        for key in self.extra:
            if key in _KNOWN:
                raise InvalidPayload(f"extra field {key!r} shadows an envelope field")
        try:
            data = _dumps(self.to_json())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(
                f"envelope {self.type!r} is not JSON-serialisable: {exc}. Pass dicts, lists, "
                f"str, numbers, bools or None"
            ) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise PayloadTooLarge(
                f"envelope {self.type!r} is {len(data)} bytes, over the {max_bytes}-byte limit",
                size=len(data),
                limit=max_bytes,
            )
        return data

    @classmethod
    def from_json(cls, doc: Any) -> Envelope:
        """Validate a decoded JSON object and build the envelope.

        Raises:
            MalformedEnvelope: not an object, a required field missing, a field of the wrong type.
        """
        if not isinstance(doc, dict):
            raise MalformedEnvelope(f"expected a JSON object, got {_json_kind(doc)}")
        for name in ("id", "type"):
            if name not in doc:
                raise MalformedEnvelope(f"the required field {name!r} is missing")
        for name in _OPTIONAL_TEXT:
            value = doc.get(name)
            if value is not None and not isinstance(value, str):
                raise MalformedEnvelope(f"{name!r} must be a string or null, got "
                                        f"{_json_kind(value)}")
        headers = doc.get("headers")
        headers = {} if headers is None else headers
        created_at = doc.get("created_at", 0.0)
        _check_fields(doc["id"], doc["type"], headers, created_at, error=MalformedEnvelope)
        return cls(
            id=doc["id"],
            type=doc["type"],
            run_id=doc.get("run_id"),
            step=doc.get("step"),
            idempotency_key=doc.get("idempotency_key"),
            reply_to=doc.get("reply_to"),
            correlation_id=doc.get("correlation_id"),
            headers=headers,
            created_at=float(created_at),
            payload=doc.get("payload"),
            extra={k: v for k, v in doc.items() if k not in _KNOWN},
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int | None = None) -> Envelope:
        """Decode an envelope received from a broker.

        Raises:
            MalformedEnvelope: not UTF-8, not JSON (NaN, infinities and duplicate keys
                included), not an envelope, or over ``max_bytes``. ``reason`` says which.
        """
        if max_bytes is not None and len(data) > max_bytes:
            raise MalformedEnvelope(f"{len(data)} bytes, over the {max_bytes}-byte limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEnvelope(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            doc = json.loads(text, parse_constant=_reject_constant,
                             object_pairs_hook=_unique_keys)
        except _Refused as exc:
            raise MalformedEnvelope(str(exc)) from None
        except (ValueError, RecursionError) as exc:
            raise MalformedEnvelope(f"not JSON ({exc})") from None
        return cls.from_json(doc)


class _Refused(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _Refused(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_fields(
    id: Any, type: Any, headers: Any, created_at: Any, *, error: type[Exception]
) -> None:
    if not isinstance(id, str) or not id:
        raise error(f"'id' must be a non-empty string, got {_json_kind(id)}")
    if not isinstance(type, str) or not type:
        raise error(f"'type' must be a non-empty string, got {_json_kind(type)}")
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise error("'headers' must be an object of strings")
    if (
        isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not math.isfinite(created_at)
    ):
        raise error(f"'created_at' must be a number of seconds, got {_json_kind(created_at)}")


# -- dead letters -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a consumer gave up on, as found on a dead-letter destination.

    Attributes:
        source: the destination it was consumed from.
        reason: why: the handler's last exception, ``malformed envelope: …``, or the broker's
            own delivery-limit reason.
        attempts: how many times it was delivered.
        body: the original message, byte for byte (unless ``truncated``).
        truncated: the original was too large to keep whole; ``body`` is its start and
            ``size`` its full length.
    """

    source: str
    reason: str
    attempts: int
    body: bytes
    size: int = -1
    """The original's length in bytes (``-1`` when built: ``len(body)``)."""
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.body))

    def envelope(self) -> Envelope:
        """The original envelope (raises MalformedEnvelope when that is why it died)."""
        return Envelope.from_bytes(self.body)

    def to_envelope(self, *, max_bytes: int | None = None) -> Envelope:
        """Wrap as a :data:`DEAD_LETTER_TYPE` envelope, carrying the original's saga fields.

        Over ``max_bytes`` the body is cut so the wrapper fits, and marked ``truncated``.
        """
        try:
            original: Envelope | None = self.envelope()
        except MalformedEnvelope:
            original = None
        body = self.body
        payload: dict[str, Any] = {
            "source": self.source,
            "reason": self.reason,
            "attempts": self.attempts,
            "size": self.size,
        }
        try:
            payload["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            payload["body_base64"] = base64.b64encode(body).decode("ascii")
        wrapper = Envelope(
            type=DEAD_LETTER_TYPE,
            payload=payload,
            run_id=original.run_id if original else None,
            step=original.step if original else None,
            idempotency_key=original.idempotency_key if original else None,
            correlation_id=original.id if original else None,
        )
        if max_bytes is None or len(wrapper.to_bytes(max_bytes=None)) <= max_bytes:
            return wrapper
        # Keep the start that surely fits (base64 grows it by a third) and say it was cut.
        keep = max(0, (max_bytes - 4096) * 3 // 4)
        cut = {k: v for k, v in payload.items() if k not in ("body", "body_base64")}
        cut.update(truncated=True, body_base64=base64.b64encode(body[:keep]).decode("ascii"))
        return dataclasses.replace(wrapper, payload=cut)

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> DeadLetter:
        """Read a dead letter back (raises MalformedEnvelope for any other envelope)."""
        if envelope.type != DEAD_LETTER_TYPE or not isinstance(envelope.payload, dict):
            raise MalformedEnvelope(f"not a dead letter (type {envelope.type!r})")
        p = envelope.payload
        try:
            if "body" in p:
                body = str(p["body"]).encode("utf-8")
            else:
                body = base64.b64decode(str(p["body_base64"]), validate=True)
            return cls(
                source=str(p["source"]),
                reason=str(p["reason"]),
                attempts=int(p["attempts"]),
                body=body,
                size=int(p.get("size", len(body))),
                truncated=bool(p.get("truncated", False)),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise MalformedEnvelope(f"dead letter payload is incomplete: {exc!r}") from None
