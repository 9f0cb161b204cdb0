"""Authenticate webhook POSTs: `X-Hub-Signature-256` is an HMAC-SHA256 of the raw body keyed by the app secret.

Verify the bytes exactly as received, before any parsing: Meta signs a body whose non-ASCII text is `\\uXXXX`
escaped, so a re-serialized body has other bytes and another HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

PREFIX = "sha256="
_HEADER = re.compile(r"sha256=([0-9a-fA-F]{64})")


def _digest(raw_body: bytes, secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), raw_body, hashlib.sha256).hexdigest()


def sign(raw_body: bytes, secret: str) -> str:
    """The full `X-Hub-Signature-256` header value Meta would send for `raw_body`."""
    if not secret:
        raise ValueError("cannot sign with an empty app secret")
    return PREFIX + _digest(bytes(raw_body), secret)


def verify_signature(raw_body: bytes, header_value: str | None, secrets: Sequence[str]) -> bool:
    """True when `header_value` is `sha256=<64 hex>` and matches the HMAC under one of `secrets`.

    Several secrets are accepted while an app secret is rotated. Empty secrets never match. Only the
    SHA-256 header counts: pass the value of `X-Hub-Signature-256`, never the SHA-1 `X-Hub-Signature`.
    """
    if not isinstance(header_value, str):
        return False
    match = _HEADER.fullmatch(header_value)
    if match is None:
        return False
    received = match.group(1).lower()
    # A lone string is a Sequence[str] too: iterating it would turn each character into a (forgeable) key.
    candidates = (secrets,) if isinstance(secrets, str) else tuple(secrets)
    body = bytes(raw_body)
    matched = False
    for secret in candidates:
        if isinstance(secret, str) and secret:
            # No early exit: the time taken does not depend on which secret matched.
            matched |= hmac.compare_digest(_digest(body, secret), received)
    return matched
