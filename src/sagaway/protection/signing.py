"""Signed envelopes: an HMAC-SHA256 signature and a timestamp on every message.

With a signer on a transport (``transport.signer = EnvelopeSigner(keys={"s1": secret})``,
or ``Orchestrator(signer=…)`` / ``Participant(signer=…)``, or ``SAGAWAY_SIGNING_KEYS``),
every envelope it publishes — commands, replies, events, dead letters — carries two
headers::

    sagaway-signed-at: 1700000000.25           (seconds since the epoch, the signer's clock)
    sagaway-signature: s1:<base64url HMAC-SHA256>

The HMAC covers a canonical form of the whole envelope: its JSON object with sorted keys,
compact separators and the signature header left out (id, type, run id, step, idempotency
key, reply destination, correlation id, created_at, the other headers, the payload and any
extra fields). Signing happens when the message is handed to the broker (the outbox relay
re-signs a row it publishes again), so the timestamp is the publish time.

Its consumers check each delivery before the handler sees it and dead-letter, at once and
with the reason, a message that is

* ``unsigned`` — no signature headers;
* ``forged`` — a signature that does not match, or made with a key id not configured;
* ``stale`` — signed more than ``window`` seconds before (or after) now: a message kept
  in a queue longer than the window is dead-lettered too, and an operator can replay it
  (a replay is signed afresh);
* ``replayed`` — the exact signed message was already handled by this consumer within the
  window. The seen-set is per consumer process and bounded (``replay_cache`` entries, each
  kept for ``window`` seconds); a broker redelivery (attempt > 1) of a message whose handler
  failed is not a replay, and a message the relay publishes again carries a fresh signature,
  so legitimate duplicates reach the handler (and the inbox drops them). Across processes,
  duplicates are the inbox's and the decider's to absorb, as always.

Each outcome is counted in :attr:`EnvelopeSigner.counts` (``accepted``, ``unsigned``,
``forged``, ``stale``, ``replayed``) for a metrics exporter.

Key rotation: configure several keys; ``active`` signs, all verify. Add the new key
everywhere, then make it active, then drop the old one after ``window`` seconds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from sagaway.errors import UntrustedMessage

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNED_AT_HEADER",
    "SIGNING_KEYS_ENV",
    "EnvelopeSigner",
    "ReplayGuard",
    "signer_from_env",
]

SIGNATURE_HEADER = "sagaway-signature"
SIGNED_AT_HEADER = "sagaway-signed-at"
SIGNING_KEYS_ENV = "SAGAWAY_SIGNING_KEYS"
DEFAULT_WINDOW = 600.0
OUTCOMES = ("accepted", "unsigned", "forged", "stale", "replayed")


def _canonical(doc: Mapping[str, Any]) -> bytes:
    headers = {k: v for k, v in (doc.get("headers") or {}).items() if k != SIGNATURE_HEADER}
    body = dict(doc)
    body["headers"] = headers
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


class ReplayGuard:
    """The signatures one consumer has handled, each remembered for ``window`` seconds;
    at most ``size`` (the oldest are forgotten first)."""

    def __init__(self, window: float, size: int) -> None:
        self.window = window
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, signature: str, now: float) -> bool:
        self._expire(now)
        return signature in self._seen

    def remember(self, signature: str, now: float) -> None:
        self._seen[signature] = now + self.window
        self._seen.move_to_end(signature)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._seen:
            first, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[first]

    def __len__(self) -> int:
        return len(self._seen)


class EnvelopeSigner:
    """Signs and verifies envelopes with shared secrets that have key ids.

    Args:
        keys: ``{key id: secret}``; a secret is at least 16 bytes (raw, or base64 text).
        active: the key id that signs (default: the last one given).
        window: seconds a signature stays valid (either side of now), and how long a
            consumer remembers what it handled.
        replay_cache: the most signatures one consumer remembers.
        clock: seconds since the epoch (tests pass their own).
    """

    def __init__(self, keys: Mapping[str, bytes | str], *, active: str | None = None,
                 window: float = DEFAULT_WINDOW, replay_cache: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("EnvelopeSigner needs at least one key")
        if not (isinstance(window, int | float) and math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a number of seconds > 0, got {window!r}")
        self._keys: dict[str, bytes] = {}
        for kid, key in keys.items():
            if not kid or ":" in kid or "," in kid:
                raise ValueError(f"bad signing key id {kid!r}")
            raw = key.encode() if isinstance(key, str) else bytes(key)
            if isinstance(key, str):
                try:
                    raw = base64.b64decode(key, validate=True)
                except (binascii.Error, ValueError):
                    raw = key.encode()
            if len(raw) < 16:
                raise ValueError(f"signing key {kid!r} is {len(raw)} bytes; use at least 16 "
                                 f"(32 random bytes recommended)")
            self._keys[kid] = raw
        self.active = active if active is not None else list(keys)[-1]
        if self.active not in self._keys:
            raise ValueError(f"the active signing key {self.active!r} is not among "
                             f"{sorted(self._keys)}")
        self.window = float(window)
        self.replay_cache = replay_cache
        self.clock = clock
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        """How many deliveries were accepted, and how many rejected for each reason."""

    def __repr__(self) -> str:
        return f"<EnvelopeSigner keys={list(self._keys)} active={self.active!r}>"

    def _mac(self, kid: str, doc: Mapping[str, Any]) -> str:
        digest = hmac.new(self._keys[kid], _canonical(doc), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def sign_json(self, doc: dict[str, Any]) -> dict[str, Any]:
        """An envelope's JSON object with fresh signature headers."""
        headers = {k: v for k, v in (doc.get("headers") or {}).items()
                   if k not in (SIGNATURE_HEADER, SIGNED_AT_HEADER)}
        headers[SIGNED_AT_HEADER] = repr(float(self.clock()))
        signed = dict(doc)
        signed["headers"] = headers
        headers[SIGNATURE_HEADER] = f"{self.active}:{self._mac(self.active, signed)}"
        return signed

    def sign(self, envelope: Any) -> Any:
        """The envelope with fresh signature headers."""
        signed = self.sign_json(envelope.to_json())
        return dataclasses.replace(envelope, headers=signed["headers"])

    def sign_body(self, body: bytes) -> bytes:
        """Encoded envelope bytes, signed (bytes that are not an envelope JSON object are
        returned as they are: the consumer will dead-letter them as malformed anyway)."""
        from sagaway.errors import MalformedEnvelope
        from sagaway.messaging.envelope import Envelope

        try:
            envelope = Envelope.from_bytes(body)
        except MalformedEnvelope:
            return body
        # Normalised through the envelope, so the consumer's view hashes the same.
        return json.dumps(self.sign_json(envelope.to_json()), separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False).encode("utf-8")

    def guard(self) -> ReplayGuard:
        """A fresh seen-set for one consumer."""
        return ReplayGuard(self.window, self.replay_cache)

    def verify(self, envelope: Any, *, attempt: int = 1, guard: ReplayGuard | None = None
               ) -> str:
        """Check a received envelope; return its signature (to remember once handled).

        Raises:
            UntrustedMessage: unsigned, forged, stale or replayed (``kind`` says which).
        """
        headers = envelope.headers or {}
        signature = str(headers.get(SIGNATURE_HEADER) or "")
        signed_at = str(headers.get(SIGNED_AT_HEADER) or "")
        if not signature or not signed_at:
            self.counts["unsigned"] += 1
            raise UntrustedMessage("unsigned", f"message {envelope.id} carries no signature")
        kid, _, mac = signature.partition(":")
        key = self._keys.get(kid)
        if key is None or not hmac.compare_digest(
                mac.encode(), self._mac(kid, envelope.to_json()).encode()):
            self.counts["forged"] += 1
            why = (f"signed with key id {kid!r}, which is not configured" if key is None
                   else "its signature does not match its content")
            raise UntrustedMessage("forged", f"message {envelope.id}: {why}")
        now = self.clock()
        try:
            at = float(signed_at)
        except ValueError:
            at = math.nan
        if not abs(now - at) <= self.window:
            self.counts["stale"] += 1
            raise UntrustedMessage(
                "stale", f"message {envelope.id} was signed at {signed_at}, outside the "
                         f"{self.window:g}s window around now ({now:.3f})")
        if guard is not None and attempt <= 1 and guard.seen(signature, now):
            self.counts["replayed"] += 1
            raise UntrustedMessage("replayed", f"message {envelope.id} was already handled "
                                               f"(the same signed copy)")
        self.counts["accepted"] += 1
        return signature


def parse_signing_keys(spec: str) -> dict[str, str]:
    """``"s1:<secret>,s2:<secret>"`` → ``{"s1": "<secret>", …}``."""
    keys: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kid, sep, secret = part.partition(":")
        if not sep or not kid or not secret:
            raise ValueError(f"{SIGNING_KEYS_ENV}: an entry is not 'key-id:secret'")
        keys[kid] = secret
    if not keys:
        raise ValueError(f"{SIGNING_KEYS_ENV} holds no keys")
    return keys


def signer_from_env(environ: Mapping[str, str] | None = None) -> EnvelopeSigner | None:
    """The signer ``SAGAWAY_SIGNING_KEYS`` (and ``SAGAWAY_SIGNING_ACTIVE``,
    ``SAGAWAY_SIGNING_WINDOW``) describe, or None when unset."""
    env = os.environ if environ is None else environ
    spec = env.get(SIGNING_KEYS_ENV, "").strip()
    if not spec:
        return None
    window = float(env.get("SAGAWAY_SIGNING_WINDOW") or DEFAULT_WINDOW)
    return EnvelopeSigner(parse_signing_keys(spec), active=env.get("SAGAWAY_SIGNING_ACTIVE")
                          or None, window=window)
