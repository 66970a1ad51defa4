"""AesGcmCodec: sealed values round-trip, are bound to their place, rotate by key id, and a
missing key is a clear typed error; keys and fingerprints from the environment."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest
from protection_helpers import KEY1, KEY2

from sagaway import PayloadCodecError, UnknownKey
from sagaway.protection import AesGcmCodec, Sealed, codec_from_env, generate_key, parse_keys

VALUES = [None, 0, 1.5, "text", "Zürich 🦄 \n", [1, {"a": None}], {"card": "4111", "n": 2**70}]


@pytest.mark.parametrize("value", VALUES)
def test_values_round_trip_and_never_show_in_the_token(value: object) -> None:
    codec = AesGcmCodec({"k1": KEY1})
    token = codec.seal(value, aad="run:r1:input")
    assert token.startswith("sgw1:k1:") and codec.is_sealed(token)
    assert json.dumps(value, ensure_ascii=False) not in token[8:] or value in (None, 0)
    assert codec.open(token, aad="run:r1:input") == value


def test_every_seal_uses_a_fresh_nonce() -> None:
    codec = AesGcmCodec({"k1": KEY1})
    tokens = {codec.seal({"card": "4111"}, aad="x") for _ in range(50)}
    assert len(tokens) == 50


def test_a_value_moved_to_another_place_or_tampered_with_does_not_open() -> None:
    codec = AesGcmCodec({"k1": KEY1})
    token = codec.seal({"card": "4111"}, aad="run:r1:input")
    with pytest.raises(PayloadCodecError, match="copied from another run or field"):
        codec.open(token, aad="run:r2:input")
    raw = bytearray(base64.urlsafe_b64decode(token[8:]))
    raw[-1] ^= 1
    tampered = "sgw1:k1:" + base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(PayloadCodecError, match="tampered"):
        codec.open(tampered, aad="run:r1:input")
    # A token relabelled with another configured key id does not open either.
    both = AesGcmCodec({"k1": KEY1, "k2": KEY2}, active="k1")
    with pytest.raises(PayloadCodecError):
        both.open(token.replace("sgw1:k1:", "sgw1:k2:"), aad="run:r1:input")


def test_a_missing_key_is_a_typed_error_naming_it() -> None:
    token = AesGcmCodec({"k1": KEY1}).seal("x", aad="a")
    only_k2 = AesGcmCodec({"k2": KEY2})
    with pytest.raises(UnknownKey, match="payload encrypted with key 'k1' which is not "
                                         "configured") as info:
        only_k2.open(token, aad="a")
    assert info.value.kid == "k1"
    soft = only_k2.open(token, aad="a", strict=False)
    assert isinstance(soft, Sealed) and soft == token
    # Sealing an unreadable value again keeps it byte for byte.
    assert only_k2.seal(soft, aad="a") == token


def test_rotation_new_key_seals_old_keys_still_open() -> None:
    old = AesGcmCodec({"k1": KEY1})
    new = AesGcmCodec({"k1": KEY1, "k2": KEY2}, active="k2")
    token = old.seal({"a": 1}, aad="a")
    assert new.open(token, aad="a") == {"a": 1}
    assert new.seal({"a": 1}, aad="a").startswith("sgw1:k2:")
    assert AesGcmCodec({"k1": KEY1, "k2": KEY2}).active == "k2"  # default: the last one


def test_plaintext_values_pass_through_open() -> None:
    codec = AesGcmCodec({"k1": KEY1})
    assert codec.open({"written": "before the codec"}, aad="a") == {"written": "before the codec"}


def test_fingerprints_are_keyed() -> None:
    a, b = AesGcmCodec({"k1": KEY1}), AesGcmCodec({"k1": KEY2})
    text = '{"card":"4111"}'
    assert a.fingerprint(text) == a.fingerprint(text)
    assert a.fingerprint(text) != b.fingerprint(text)
    assert hashlib.sha256(text.encode()).hexdigest() not in a.fingerprint(text)
    assert a.fingerprint_matches(text, a.fingerprint(text))
    assert not a.fingerprint_matches('{"card":"4112"}', a.fingerprint(text))
    both = AesGcmCodec({"k1": KEY1, "k2": KEY2})
    assert both.fingerprint_matches(text, a.fingerprint(text))  # an old key's fingerprint


@pytest.mark.parametrize(("keys", "problem"), [
    ({}, "at least one key"),
    ({"k1": os.urandom(20)}, "20 bytes"),
    ({"bad:id": KEY1}, "bad key id"),
    ({"k1": "not base64!"}, "not base64"),
])
def test_bad_keys_are_refused(keys: dict[str, bytes | str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        AesGcmCodec(keys)
    with pytest.raises(ValueError, match="active key 'k9'"):
        AesGcmCodec({"k1": KEY1}, active="k9")


def test_keys_from_the_environment() -> None:
    k1, k2 = generate_key(), generate_key()
    assert len(base64.b64decode(k1)) == 32
    assert codec_from_env({}) is None
    codec = codec_from_env({"SAGAWAY_KEYS": f"k1:{k1}, k2:{k2}"})
    assert codec is not None and codec.active == "k2" and codec.key_ids == ["k1", "k2"]
    codec = codec_from_env({"SAGAWAY_KEYS": f"k1:{k1},k2:{k2}", "SAGAWAY_ACTIVE_KEY": "k1"})
    assert codec is not None and codec.active == "k1"
    with pytest.raises(ValueError, match="given twice"):
        parse_keys(f"k1:{k1},k1:{k2}")
    with pytest.raises(ValueError, match="not 'key-id:base64-key'"):
        parse_keys("justakey")
    with pytest.raises(ValueError) as info:
        parse_keys("k1:c2hvcnQ=")
    assert "c2hvcnQ" not in str(info.value)  # a key is never echoed


def test_the_codec_never_shows_its_keys() -> None:
    codec = AesGcmCodec({"k1": KEY1})
    assert base64.b64encode(KEY1).decode() not in repr(codec)
    assert repr(codec) == "<AesGcmCodec keys=['k1'] active='k1'>"
