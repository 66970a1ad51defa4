"""The envelope, dead letters, URL handling and the two transport errors: no broker needed."""

from __future__ import annotations

import json
import math

import pytest

import sagaway
from sagaway.errors import InvalidPayload, MalformedEnvelope, PayloadTooLarge, TransportError
from sagaway.messaging import DEAD_LETTER_TYPE, DeadLetter, Envelope, open_transport
from sagaway.messaging.base import check_destination, redact_url, scrub
from sagaway.testing.transport_conformance import MALFORMED, full_envelope


def test_the_errors_sit_where_the_tree_says() -> None:
    assert TransportError.__bases__ == (sagaway.SagawayError,)
    assert MalformedEnvelope.__bases__ == (sagaway.SagawayError,)
    assert sagaway.TransportError is TransportError
    assert sagaway.MalformedEnvelope is MalformedEnvelope
    err = MalformedEnvelope("not JSON")
    assert (str(err), err.reason) == ("malformed envelope: not JSON", "not JSON")
    doc = sagaway.errors.__doc__ or ""
    assert "TransportError" in doc and "MalformedEnvelope" in doc


def test_defaults_are_fresh() -> None:
    a, b = Envelope(type="t"), Envelope(type="t")
    assert a.id != b.id and len(a.id) == 32
    assert a.created_at > 1_700_000_000
    assert (a.payload, a.run_id, dict(a.headers), dict(a.extra)) == (None, None, {}, {})


def test_round_trip_is_exact() -> None:
    env = full_envelope()
    data = env.to_bytes()
    assert Envelope.from_bytes(data) == env
    assert Envelope.from_bytes(data).to_bytes() == data
    doc = json.loads(data)
    assert doc["schema_version"] == 3 and doc["x-future"] == {"nested": [1, "two", None]}
    assert b"\\u" not in data.replace(b"\\u0000", b"").replace(b"\\u2028", b"")  # UTF-8 text


def test_minimal_foreign_envelope() -> None:
    env = Envelope.from_bytes(b'{"id": "x", "type": "t"}')
    assert (env.id, env.type, env.payload, env.created_at, dict(env.extra)) == (
        "x", "t", None, 0.0, {}
    )
    assert Envelope.from_bytes(b'{"id":"x","type":"t","created_at":5}').created_at == 5.0


@pytest.mark.parametrize(("body", "fragment"), MALFORMED)
def test_malformed_bytes_are_refused_with_a_reason(body: bytes, fragment: str) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        Envelope.from_bytes(body)
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"id": "", "type": "t"}, "'id' must be a non-empty string"),
        ({"id": "x", "type": None}, "'type' must be a non-empty string"),
        ({"id": "x", "type": "t", "run_id": 5}, "'run_id' must be a string or null"),
        ({"id": "x", "type": "t", "reply_to": ["q"]}, "'reply_to' must be a string"),
        ({"id": "x", "type": "t", "headers": []}, "'headers' must be an object"),
        ({"id": "x", "type": "t", "created_at": "yesterday"}, "'created_at' must be a number"),
        ({"id": "x", "type": "t", "created_at": True}, "'created_at' must be a number"),
        ("just a string", "expected a JSON object, got a string"),
    ],
)
def test_wrong_field_types_are_malformed(doc: object, fragment: str) -> None:
    with pytest.raises(MalformedEnvelope, match=fragment):
        Envelope.from_bytes(json.dumps(doc).encode())


def test_deeply_nested_input_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedEnvelope):
        Envelope.from_bytes(b"[" * 100_000 + b"]" * 100_000)


def test_oversized_input_is_malformed() -> None:
    data = full_envelope(payload="x" * 100).to_bytes()
    with pytest.raises(MalformedEnvelope, match="over the 50-byte limit"):
        Envelope.from_bytes(data, max_bytes=50)


@pytest.mark.parametrize(
    "payload", [{1, 2}, object(), math.nan, math.inf, {"b": b"bytes"}, {"k": (1j)}]
)
def test_payload_that_is_not_json_is_invalid(payload: object) -> None:
    with pytest.raises(InvalidPayload):
        Envelope(type="t", payload=payload).to_bytes()


def test_invalid_envelope_fields_are_refused_on_encoding() -> None:
    with pytest.raises(InvalidPayload, match="'type'"):
        Envelope(type="").to_bytes()
    with pytest.raises(InvalidPayload, match="'headers'"):
        Envelope(type="t", headers={"n": 1}).to_bytes()  # type: ignore[dict-item]
    with pytest.raises(InvalidPayload, match="shadows"):
        Envelope(type="t", extra={"payload": 1}).to_bytes()


def test_size_limit() -> None:
    env = Envelope(type="t", payload="x" * 1000)
    with pytest.raises(PayloadTooLarge) as info:
        env.to_bytes(max_bytes=500)
    assert info.value.limit == 500 and info.value.size > 1000
    assert len(env.to_bytes(max_bytes=None)) > 1000


def test_dead_letter_round_trip_text_and_binary() -> None:
    original = full_envelope()
    for body in (original.to_bytes(), b"\xff\x00 binary"):
        dead = DeadLetter("orders", "RuntimeError: boom", 3, body)
        wrapper = dead.to_envelope()
        assert wrapper.type == DEAD_LETTER_TYPE
        back = DeadLetter.from_envelope(Envelope.from_bytes(wrapper.to_bytes()))
        assert (back.source, back.reason, back.attempts, back.body, back.size) == (
            "orders", "RuntimeError: boom", 3, body, len(body)
        )
    assert DeadLetter("o", "r", 1, original.to_bytes()).to_envelope().run_id == "run-7"


def test_a_dead_letter_too_big_for_the_broker_keeps_its_start() -> None:
    body = b"x" * 100_000
    wrapper = DeadLetter("orders", "too big", 1, body).to_envelope(max_bytes=20_000)
    assert len(wrapper.to_bytes(max_bytes=None)) <= 20_000
    back = DeadLetter.from_envelope(wrapper)
    assert back.truncated and back.size == 100_000
    assert 0 < len(back.body) < 20_000 and body.startswith(back.body)


def test_other_envelopes_are_not_dead_letters() -> None:
    with pytest.raises(MalformedEnvelope, match="not a dead letter"):
        DeadLetter.from_envelope(full_envelope())
    with pytest.raises(MalformedEnvelope, match="incomplete"):
        DeadLetter.from_envelope(Envelope(type=DEAD_LETTER_TYPE, payload={"source": "x"}))


@pytest.mark.parametrize("name", ["orders", "orders.reserve", "a-b_c.D9", "x" * 200])
def test_good_destination_names(name: str) -> None:
    assert check_destination(name) == name


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("nats://u:s3cret@[::1]:4222", "nats://u:***@[::1]:4222"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("u:s3cret@host", "…@host"),
    ],
)
def test_passwords_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in scrub(f"failed to reach {url}", url)
    if "://" in url and "s3cret" in url:
        assert scrub(f"{url}: password s3cret rejected", url) == (
            f"{shown}: password *** rejected"
        )


@pytest.mark.parametrize(
    "url",
    ["kafka://broker:9092", "sqs://u:s3cret@queue", "amqp", "", "postgresql://u:s3cret@h/db",
     "mqtt://u:s3cret@host:1883"],
)
def test_unknown_transport_url_says_what_to_use(url: str) -> None:
    with pytest.raises(TransportError) as info:
        open_transport(url)
    message = str(info.value)
    assert "s3cret" not in message
    for form in ("memory://", "amqp://", "nats://", "redis://"):
        assert form in message
