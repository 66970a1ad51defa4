"""Payload encoding: JSON only, canonical text, typed errors for what JSON cannot express."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import math
import uuid

import pytest
from pydantic import BaseModel

from sagaway import InvalidPayload, PayloadTooLarge
from sagaway.engine.payload import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    decode,
    encode,
    fingerprint,
    to_json_value,
)


class Address(BaseModel):
    city: str
    zip: str


class Order(BaseModel):
    id: int
    items: list[str]
    ship_to: Address
    placed_at: datetime.datetime


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_plain_json_round_trips() -> None:
    value = {"b": [1, 2.5, None, True], "a": {"nested": "x"}, "c": ""}
    plain, text = encode(value, what="the input")
    assert plain == value
    assert json.loads(text) == value


def test_text_is_canonical_compact_sorted_and_utf8() -> None:
    _, text = encode({"b": 1, "a": {"é": "ü", "z": [1, 2]}}, what="the input")
    assert text == '{"a":{"z":[1,2],"é":"ü"},"b":1}'


def test_key_order_does_not_change_the_text_or_fingerprint() -> None:
    _, one = encode({"a": 1, "b": 2}, what="x")
    _, two = encode({"b": 2, "a": 1}, what="x")
    assert one == two
    assert fingerprint(one) == fingerprint(two)


@pytest.mark.parametrize("value", [None, 0, -1.5, "text", True, [], {}])
def test_scalars_and_empty_containers(value: object) -> None:
    plain, text = encode(value, what="x")
    assert plain == value
    assert text == json.dumps(value, separators=(",", ":"))


def test_pydantic_models_dump_to_json() -> None:
    order = Order(
        id=7,
        items=["book"],
        ship_to=Address(city="Oslo", zip="0150"),
        placed_at=datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC),
    )
    plain, text = encode({"order": order}, what="the input")
    expected = {
        "order": {
            "id": 7,
            "items": ["book"],
            "ship_to": {"city": "Oslo", "zip": "0150"},
            "placed_at": "2024-05-01T12:30:00Z",
        }
    }
    assert plain == expected
    assert json.loads(text) == expected


def test_top_level_model_and_dataclass() -> None:
    assert encode(Address(city="Oslo", zip="0150"), what="x")[0] == {"city": "Oslo", "zip": "0150"}
    assert encode(Point(1, 2), what="x")[0] == {"x": 1, "y": 2}


def test_datetime_uuid_decimal_use_pydantic_rules() -> None:
    value = {
        "when": datetime.date(2024, 1, 2),
        "id": uuid.UUID(int=1),
        "amount": decimal.Decimal("12.50"),
        "tuple": (1, 2),
    }
    plain, _ = encode(value, what="x")
    assert plain == {
        "when": "2024-01-02",
        "id": "00000000-0000-0000-0000-000000000001",
        "amount": "12.50",
        "tuple": [1, 2],
    }


@pytest.mark.parametrize(
    "value",
    [{"ids": {3, 1, 2}}, {"frozen": frozenset({5})}, [[{"deep": {"a"}}]], {1, 2}],
)
def test_sets_are_refused_because_json_has_no_order_for_them(value: object) -> None:
    # A set dumped as a list comes out in hash order, which changes with PYTHONHASHSEED: the
    # same input would fingerprint differently on two workers (a false IdempotencyConflict).
    with pytest.raises(InvalidPayload, match="holds a set; JSON has no sets, pass a sorted list"):
        encode(value, what="x")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (lambda: None, "function"),
        ({"nested": [object()]}, "dict"),
        (b"\xff\xfe", "bytes"),
    ],
)
def test_non_json_values_raise_invalid_payload(value: object, type_name: str) -> None:
    with pytest.raises(
        InvalidPayload,
        match=rf"^the input of saga 'orders' is not JSON-serialisable "
        rf"\({type_name}\):.*Pass dicts, lists, str, numbers",
    ) as info:
        encode(value, what="the input of saga 'orders'")
    assert not isinstance(info.value, PayloadTooLarge)
    # The driver exception is not chained into the user's traceback.
    assert info.value.__cause__ is None


@pytest.mark.parametrize("value", ["\ud800", {"k": ["ok", "\udfff"]}, {"\ud800": 1}])
def test_lone_surrogates_are_refused(value: object) -> None:
    # Python str can hold them, UTF-8 (and so every store and wire format) cannot.
    with pytest.raises(InvalidPayload, match=r"^the input .*surrogates not allowed") as info:
        encode(value, what="the input")
    assert not isinstance(info.value, PayloadTooLarge)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("wrap", [lambda v: v, lambda v: {"a": [1, v]}])
def test_nan_and_infinity_are_refused(bad: float, wrap: object) -> None:
    value = wrap(bad)  # type: ignore[operator]
    with pytest.raises(
        InvalidPayload,
        match=r"^the result of step 'charge' is not JSON-serialisable: Out of "
        r"range float values are not JSON compliant",
    ):
        encode(value, what="the result of step 'charge'")


def test_to_json_value_refuses_the_same_values() -> None:
    with pytest.raises(InvalidPayload, match=r"^x is not JSON-serialisable \(object\)"):
        to_json_value(object(), what="x")
    assert to_json_value({"a": (1, 2)}, what="x") == {"a": [1, 2]}


# -- size limit ------------------------------------------------------------------------


def test_payload_at_the_limit_is_accepted() -> None:
    value = "x" * 8  # encodes as 10 bytes with the quotes
    _, text = encode(value, what="x", limit=10)
    assert len(text.encode()) == 10


def test_payload_over_the_limit_raises_with_size_and_limit() -> None:
    with pytest.raises(
        PayloadTooLarge,
        match=r"^the input is 11 bytes encoded, over the limit of 10 bytes; store "
        r"large data elsewhere",
    ) as info:
        encode("x" * 9, what="the input", limit=10)
    assert (info.value.size, info.value.limit) == (11, 10)
    assert isinstance(info.value, InvalidPayload)


def test_size_is_counted_in_utf8_bytes_not_characters() -> None:
    value = {"k": "é"}  # '{"k":"é"}' is 9 characters, 10 bytes
    encode(value, what="x", limit=10)
    with pytest.raises(PayloadTooLarge) as info:
        encode(value, what="x", limit=9)
    assert (info.value.size, info.value.limit) == (10, 9)


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_PAYLOAD_BYTES == 1024 * 1024
    encode("x" * (DEFAULT_MAX_PAYLOAD_BYTES - 2), what="x")
    with pytest.raises(PayloadTooLarge) as info:
        encode("x" * (DEFAULT_MAX_PAYLOAD_BYTES - 1), what="x")
    assert (info.value.size, info.value.limit) == (
        DEFAULT_MAX_PAYLOAD_BYTES + 1,
        DEFAULT_MAX_PAYLOAD_BYTES,
    )


def test_invalid_payload_is_reported_before_size() -> None:
    with pytest.raises(InvalidPayload) as info:
        encode({"a": math.nan}, what="x", limit=1)
    assert not isinstance(info.value, PayloadTooLarge)


# -- decode / fingerprint --------------------------------------------------------------


def test_decode() -> None:
    assert decode(None) is None
    assert decode("null") is None
    assert decode('{"a":[1,2]}') == {"a": [1, 2]}
    _, text = encode({"z": 1, "a": [True]}, what="x")
    assert decode(text) == {"z": 1, "a": [True]}


def test_fingerprint_is_sha256_hex_of_the_text() -> None:
    assert fingerprint("{}") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert fingerprint('{"a":1}') != fingerprint('{"a":2}')
