"""Stateless nonces for the long-term credential mechanism (RFC 8489 §9.2).

A nonce carries its own expiry and an HMAC over the expiry and the client's IP, so the
server keeps no table of nonces, a nonce taken from one client is useless from another,
and an old one is recognised as stale (438) rather than unknown.

When RFC 8489's security features are offered, the nonce starts with the nonce cookie
``obMatJos2`` and four base64 characters of feature bits (§9.2): bit 0 says the server
offers PASSWORD-ALGORITHMS.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from enum import Enum

__all__ = ["NONCE_COOKIE", "NonceManager", "NonceStatus"]

NONCE_COOKIE = "obMatJos2"
_FEATURE_PASSWORD_ALGORITHMS = bytes((0x80, 0, 0))


class NonceStatus(Enum):
    VALID = "valid"
    STALE = "stale"
    INVALID = "invalid"


class NonceManager:
    """Mints and checks nonces. ``secret`` is random bytes chosen at start-up."""

    __slots__ = ("_lifetime", "_prefix", "_secret")

    def __init__(self, secret: bytes, lifetime: float, *, security_features: bool) -> None:
        self._secret = secret
        self._lifetime = lifetime
        self._prefix = (
            NONCE_COOKIE + base64.b64encode(_FEATURE_PASSWORD_ALGORITHMS).decode()
            if security_features
            else ""
        )

    def set_lifetime(self, lifetime: float) -> None:
        """Nonces made from now on last ``lifetime`` seconds; those handed out carry their
        own expiry and keep it."""
        self._lifetime = lifetime

    def _mac(self, expiry: bytes, client_ip: str) -> bytes:
        return hmac.digest(self._secret, expiry + client_ip.encode(), "sha256")[:14]

    def make(self, client_ip: str, now: float) -> str:
        expiry = int(now + self._lifetime).to_bytes(4, "big")
        token = base64.urlsafe_b64encode(expiry + self._mac(expiry, client_ip)).decode()
        return self._prefix + token

    def check(self, nonce: str, client_ip: str, now: float) -> NonceStatus:
        if not nonce.startswith(self._prefix):
            return NonceStatus.INVALID
        try:
            raw = base64.urlsafe_b64decode(nonce[len(self._prefix) :].encode())
        except (binascii.Error, ValueError):
            return NonceStatus.INVALID
        if len(raw) != 18 or not hmac.compare_digest(raw[4:], self._mac(raw[:4], client_ip)):
            return NonceStatus.INVALID
        if int.from_bytes(raw[:4], "big") <= now:
            return NonceStatus.STALE
        return NonceStatus.VALID

    @property
    def security_features(self) -> bool:
        return bool(self._prefix)
