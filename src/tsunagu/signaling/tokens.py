"""Join tokens: who may enter which room, signed by the product that embeds tsunagu.

With ``room-access token`` a browser joins a room only with a token that the embedding
product's backend minted for that person and that room. A token is a JWT signed with
HS256 under the join secret the backend shares with this server:

- ``room`` (required): the one room the token opens;
- ``sub`` (required): who the person is in the backend (1-64 of ``A-Z a-z 0-9 . _ @ -``);
  TURN credentials carry it, so quotas and audit lines name the person;
- ``exp`` (required): unix time after which the token no longer admits anyone;
- ``name`` (optional): the display name, which the person then cannot change;
- ``turn`` (optional, default true): false admits the person without a TURN relay;
- ``nbf`` (optional): unix time before which the token is not valid yet.

A token only opens the door: once in, the peer stays until it leaves, and its TURN
credentials are renewed over the WebSocket for as long as it stays.

Time is passed in (the hub's clock), so the expiry check is as testable as the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt

__all__ = ["Grant", "TokenError", "IDENTITY_RE", "MAX_TOKEN_BYTES", "mint_join_token", "JoinTokens"]

IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MAX_TOKEN_BYTES: Final = 2048
"""Longer than any token with the claims above; a bound on what is verified."""
_LEEWAY: Final = 30.0
"""Clock skew tolerated between the backend that mints and this server."""
_ALGORITHM: Final = "HS256"


class TokenError(ValueError):
    """The token does not admit anyone; the message says why, for the person's screen."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows."""

    room: str
    identity: str
    name: str | None
    turn: bool
    expires: float


def mint_join_token(
    secret: str,
    *,
    room: str,
    identity: str,
    now: float,
    ttl: int,
    name: str | None = None,
    turn: bool = True,
) -> str:
    """A token for ``identity`` to join ``room`` within ``ttl`` seconds of ``now``."""
    if IDENTITY_RE.fullmatch(identity) is None:
        raise ValueError("identity must be 1-64 letters, digits or . _ @ -")
    claims: dict[str, Any] = {"room": room, "sub": identity, "iat": int(now), "exp": int(now) + ttl}
    if name is not None:
        claims["name"] = name
    if not turn:
        claims["turn"] = False
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


class JoinTokens:
    """Verifies join tokens against the current secret and, while rotating, older ones."""

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one join secret is needed")
        self._secrets = tuple(secrets)

    def verify(self, token: str, now: float) -> Grant:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("the join token is too long")
        claims = None
        for secret in self._secrets:
            try:
                # Times are checked below against the hub's clock, not the library's.
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=[_ALGORITHM],
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "require": ["exp", "room", "sub"],
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise TokenError(f"the join token is not valid ({exc})") from None
        if claims is None:
            raise TokenError("the join token was not signed by this server's join secret")
        return _grant(claims, now)


def _grant(claims: dict[str, Any], now: float) -> Grant:
    room, identity, exp = claims["room"], claims["sub"], claims["exp"]
    name, turn, nbf = claims.get("name"), claims.get("turn", True), claims.get("nbf")
    if not isinstance(room, str) or not room:
        raise TokenError("the join token names no room")
    if not isinstance(identity, str) or IDENTITY_RE.fullmatch(identity) is None:
        raise TokenError("the join token's sub must be 1-64 letters, digits or . _ @ -")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise TokenError("the join token's exp is not a number")
    if exp + _LEEWAY <= now:
        raise TokenError("the join token has expired; ask for a new link")
    if nbf is not None:
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            raise TokenError("the join token's nbf is not a number")
        if nbf - _LEEWAY > now:
            raise TokenError("the join token is not valid yet")
    if name is not None and not isinstance(name, str):
        raise TokenError("the join token's name is not text")
    if not isinstance(turn, bool):
        raise TokenError("the join token's turn must be true or false")
    return Grant(room=room, identity=identity, name=name, turn=turn, expires=float(exp))
