"""Payload encryption: AES-GCM with key ids, so keys rotate without downtime.

A sealed value is one ASCII string, ``sgw1:<kid>:<base64url(nonce ‖ ciphertext ‖ tag)>``:
a fresh random 96-bit nonce per value, the key id in clear so any process holding that key
can open it, and *associated data* that binds the ciphertext to its place (the run id and
the field, or the message id), so a value copied into another run or field does not open.

Several keys may be configured; ``active`` encrypts, all decrypt. A value sealed with a key
that is not configured raises :class:`~sagaway.errors.UnknownKey` naming the key id.

Configure in code (``AesGcmCodec(keys={"k1": key_bytes}, active="k1")``) or from the
environment: ``SAGAWAY_KEYS="k1:<base64 key>,k2:<base64 key>"`` and optionally
``SAGAWAY_ACTIVE_KEY=k2`` (default: the last key listed). ``sagaway keygen`` prints a key.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from sagaway.errors import PayloadCodecError, UnknownKey

__all__ = [
    "ACTIVE_KEY_ENV",
    "KEYS_ENV",
    "AesGcmCodec",
    "PayloadCodec",
    "Sealed",
    "codec_from_env",
    "generate_key",
    "open_message",
    "parse_keys",
]

KEYS_ENV = "SAGAWAY_KEYS"
ACTIVE_KEY_ENV = "SAGAWAY_ACTIVE_KEY"
PREFIX = "sgw1:"
_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NONCE = 12


class Sealed(str):
    """A sealed value this process could not open (its key is not configured).

    It is a ``str`` holding the token, so it displays and serialises as the ciphertext, and
    sealing it again passes it through unchanged: a run failed for a lost key keeps its data
    intact for when the key comes back.
    """

    __slots__ = ()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class PayloadCodec(abc.ABC):
    """Encrypts payload values (JSON data) into strings and back. Subclass to plug in a KMS."""

    active: str
    """The key id new values are sealed with."""

    @abc.abstractmethod
    def seal_text(self, text: str, *, aad: str) -> str:
        """Encrypt ``text`` with the active key; bind it to ``aad``."""

    @abc.abstractmethod
    def open_text(self, token: str, *, aad: str) -> str:
        """Decrypt a token.

        Raises:
            UnknownKey: its key id is not configured.
            PayloadCodecError: not a token, tampered with, or sealed for another ``aad``.
        """

    @abc.abstractmethod
    def fingerprint(self, text: str) -> str:
        """A keyed hash of ``text`` (idempotency fingerprints): equal texts give equal
        fingerprints under one key, and it reveals nothing without the key."""

    def fingerprint_matches(self, text: str, stored: str) -> bool:
        """Whether ``stored`` (written under any configured key) is the fingerprint of
        ``text``."""
        return hmac.compare_digest(self.fingerprint(text), stored)

    @staticmethod
    def is_sealed(value: Any) -> bool:
        """Whether ``value`` looks like a sealed token (of any key)."""
        return isinstance(value, str) and value.startswith(PREFIX)

    @staticmethod
    def key_id(token: str) -> str:
        """The key id a token was sealed with."""
        return token[len(PREFIX):].split(":", 1)[0]

    def seal(self, value: Any, *, aad: str) -> Any:
        """Seal JSON data; a :class:`Sealed` value (unreadable here) passes through."""
        if isinstance(value, Sealed):
            return str(value)
        return self.seal_text(_dumps(value), aad=aad)

    def open(self, value: Any, *, aad: str, strict: bool = True) -> Any:
        """Open a sealed value back into JSON data; a value that is not sealed is returned
        as it is (written before the codec was turned on).

        With ``strict=False`` a value whose key is not configured comes back as
        :class:`Sealed` instead of raising :class:`UnknownKey`.
        """
        if not self.is_sealed(value):
            return value
        try:
            return json.loads(self.open_text(value, aad=aad))
        except UnknownKey:
            if strict:
                raise
            return Sealed(value)


def open_message(codec: PayloadCodec, envelope: Any) -> Any:
    """A received :class:`~sagaway.messaging.Envelope` with its payload opened: for
    consumers of the domain events a saga emits (participants do this by themselves).

    Raises UnknownKey / PayloadCodecError like :meth:`PayloadCodec.open`.
    """
    import dataclasses

    return dataclasses.replace(envelope,
                               payload=codec.open(envelope.payload, aad=f"msg:{envelope.id}"))


def generate_key() -> str:
    """A new random 256-bit key, base64-encoded (for ``SAGAWAY_KEYS``)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def _key_bytes(kid: str, key: bytes | str) -> bytes:
    if isinstance(key, str):
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {kid!r} is not base64 (make one with `sagaway keygen`)"
                             ) from None
    else:
        raw = bytes(key)
    if len(raw) not in (16, 24, 32):
        raise ValueError(f"key {kid!r} is {len(raw)} bytes; AES-GCM keys are 16, 24 or 32 "
                         f"bytes (32 recommended)")
    return raw


class AesGcmCodec(PayloadCodec):
    """AES-GCM payload encryption (the ``[crypto]`` extra: the ``cryptography`` package).

    Args:
        keys: ``{key id: key}``; a key is 16/24/32 raw bytes or their base64 text. Key ids
            are 1-64 characters of letters, digits, ``_``, ``.`` and ``-``.
        active: the key id that seals new values (default: the last key given).
    """

    def __init__(self, keys: Mapping[str, bytes | str], *, active: str | None = None) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "payload encryption needs the cryptography package: "
                "pip install 'sagaway[crypto]'"
            ) from exc
        if not keys:
            raise ValueError("AesGcmCodec needs at least one key")
        self._ciphers: dict[str, Any] = {}
        self._fp_keys: dict[str, bytes] = {}
        for kid, key in keys.items():
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise ValueError(f"bad key id {kid!r}: use 1-64 letters, digits, '_', '.', '-'")
            raw = _key_bytes(kid, key)
            self._ciphers[kid] = AESGCM(raw)
            # A separate key for fingerprints, so the hash never uses the encryption key.
            self._fp_keys[kid] = hmac.new(raw, b"sagaway fingerprint v1", hashlib.sha256
                                          ).digest()
        self.active = active if active is not None else list(keys)[-1]
        if self.active not in self._ciphers:
            raise ValueError(f"the active key {self.active!r} is not among the keys "
                             f"{sorted(self._ciphers)}")

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def __repr__(self) -> str:  # never the keys themselves
        return f"<AesGcmCodec keys={self.key_ids} active={self.active!r}>"

    def seal_text(self, text: str, *, aad: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._ciphers[self.active].encrypt(
            nonce, text.encode("utf-8"), f"{PREFIX}{self.active}|{aad}".encode())
        return f"{PREFIX}{self.active}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open_text(self, token: str, *, aad: str) -> str:
        from cryptography.exceptions import InvalidTag

        if not self.is_sealed(token):
            raise PayloadCodecError("not an encrypted payload (no 'sgw1:' header)")
        kid, _, body = token[len(PREFIX):].partition(":")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise UnknownKey(
                f"payload encrypted with key {kid!r} which is not configured (configured: "
                f"{', '.join(self._ciphers)}); add it to the keys (SAGAWAY_KEYS) to read it",
                kid=kid,
            )
        try:
            raw = base64.urlsafe_b64decode(body.encode("ascii"))
            if len(raw) < _NONCE + 16:
                raise ValueError("too short")
            text: bytes = cipher.decrypt(raw[:_NONCE], raw[_NONCE:],
                                         f"{PREFIX}{kid}|{aad}".encode())
        except (InvalidTag, ValueError, binascii.Error, UnicodeEncodeError):
            raise PayloadCodecError(
                f"an encrypted payload (key {kid!r}) does not decrypt for {aad!r}: it was "
                f"tampered with, or copied from another run or field"
            ) from None
        return text.decode("utf-8")

    def fingerprint(self, text: str) -> str:
        digest = hmac.new(self._fp_keys[self.active], text.encode("utf-8"), hashlib.sha256)
        return f"hmac:{self.active}:{digest.hexdigest()}"

    def fingerprint_matches(self, text: str, stored: str) -> bool:
        """Whether ``stored`` (a fingerprint of any configured key) is that of ``text``."""
        if not stored.startswith("hmac:"):
            return False
        kid, _, hexdigest = stored[5:].partition(":")
        key = self._fp_keys.get(kid)
        if key is None:
            return False
        mine = hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mine, hexdigest)


def parse_keys(spec: str) -> dict[str, bytes]:
    """``"k1:<base64>,k2:<base64>"`` → ``{"k1": b"…", "k2": b"…"}`` (order kept).

    Raises ValueError with what is wrong (never echoing a key).
    """
    keys: dict[str, bytes] = {}
    for n, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            continue
        kid, sep, value = part.partition(":")
        if not sep or not kid:
            raise ValueError(f"{KEYS_ENV}: entry {n + 1} is not 'key-id:base64-key'")
        if kid in keys:
            raise ValueError(f"{KEYS_ENV}: key id {kid!r} is given twice")
        keys[kid.strip()] = _key_bytes(kid, value)
    if not keys:
        raise ValueError(f"{KEYS_ENV} holds no keys; use 'k1:<base64 key>' "
                         f"(make one with `sagaway keygen`)")
    return keys


def codec_from_env(environ: Mapping[str, str] | None = None) -> AesGcmCodec | None:
    """The codec ``SAGAWAY_KEYS`` / ``SAGAWAY_ACTIVE_KEY`` describe, or None if unset."""
    env = os.environ if environ is None else environ
    spec = env.get(KEYS_ENV, "").strip()
    if not spec:
        return None
    return AesGcmCodec(parse_keys(spec), active=env.get(ACTIVE_KEY_ENV) or None)
