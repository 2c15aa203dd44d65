"""TURN REST API time-limited credentials (draft-uberti-behave-turn-rest-00).

A web backend that shares a secret with the TURN server mints, for each browser session,

- ``username = "<expiry unix time>:<user id>"``
- ``password = base64(HMAC-SHA1(secret, username))``

The TURN server recomputes the password from the username, so it stores nothing per user,
and refuses a username whose expiry has passed. Several secrets may be valid at once so that
an operator can rotate them without cutting calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from ..turn.quotas import rest_expiry

__all__ = ["mint_credentials", "rest_password", "rest_expiry"]


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def rest_password(secret: str | bytes, username: str) -> str:
    """Return the password that goes with ``username`` under ``secret``."""
    digest = hmac.new(_as_bytes(secret), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def mint_credentials(secret: str | bytes, user_id: str, ttl: int, now: float) -> tuple[str, str]:
    """Mint ``(username, password)`` valid for ``ttl`` seconds from ``now``."""
    username = f"{int(now) + ttl}:{user_id}" if user_id else str(int(now) + ttl)
    return username, rest_password(secret, username)
