"""Data protection: payload encryption, signed envelopes, erasure and retention, limits.

* :mod:`~sagaway.protection.codec` — ``AesGcmCodec``: AES-GCM with key ids and rotation
  (``Orchestrator(codec=…)``, ``Participant(codec=…)``, ``SAGAWAY_KEYS``).
* :mod:`~sagaway.protection.store` — ``EncryptedStore``: seals payloads on the store port.
* :mod:`~sagaway.protection.signing` — ``EnvelopeSigner``: HMAC-signed envelopes; consumers
  reject unsigned, forged, stale and replayed messages.
* :mod:`~sagaway.protection.erasure` — ``erase_run``, ``purge_finished``, ``rotate_keys``.
* :mod:`~sagaway.protection.limits` — ``StartLimiter``: starts per second per saga name.

The codec needs the ``[crypto]`` extra (``cryptography``), imported when a codec is built.
"""

from __future__ import annotations

from sagaway.protection.codec import (
    AesGcmCodec,
    PayloadCodec,
    Sealed,
    codec_from_env,
    generate_key,
    open_message,
    parse_keys,
)
from sagaway.protection.erasure import erase_run, purge_finished, rotate_keys
from sagaway.protection.limits import StartLimiter
from sagaway.protection.signing import EnvelopeSigner, signer_from_env
from sagaway.protection.store import EncryptedStore

__all__ = [
    "AesGcmCodec",
    "EncryptedStore",
    "EnvelopeSigner",
    "PayloadCodec",
    "Sealed",
    "StartLimiter",
    "codec_from_env",
    "erase_run",
    "generate_key",
    "open_message",
    "parse_keys",
    "purge_finished",
    "rotate_keys",
    "signer_from_env",
]
