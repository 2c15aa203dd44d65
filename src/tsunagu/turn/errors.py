"""TURN and STUN error responses as exceptions, one class per wire code.

Handlers raise them; the server turns each into an error response in one place
(``TurnServer._error``). Codes and reason phrases follow RFC 8489 §14.8 and
RFC 8656 §19.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..stun.attributes import Attribute
from .refusals import Refusal

__all__ = [
    "AddressFamilyNotSupported",
    "AllocationMismatch",
    "AllocationQuotaReached",
    "BadRequest",
    "Forbidden",
    "InsufficientCapacity",
    "PeerAddressFamilyMismatch",
    "StaleNonce",
    "TryAlternate",
    "TurnError",
    "Unauthorized",
    "UnknownAttribute",
    "UnsupportedTransportProtocol",
    "WrongCredentials",
]


class TurnError(Exception):
    """A request that gets an error response. ``attributes`` go into that response.

    ``detail`` is the cause an authenticated client reads in the reason phrase; ``note``,
    when given, is a more precise one kept for the operator's diagnostics only (it may name
    what the phrase does not). ``refusal``, when given, is the cause the operator's log
    names (:mod:`.refusals`); errors without one (a first 401, a malformed request) are
    answered without a log line.
    """

    code = 500
    reason = "Server Error"

    def __init__(
        self,
        detail: str | None = None,
        attributes: Sequence[Attribute] = (),
        *,
        note: str | None = None,
        refusal: Refusal | None = None,
    ) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail
        self.attributes = tuple(attributes)
        self.note = note
        self.refusal = refusal


class TryAlternate(TurnError):
    code, reason = 300, "Try Alternate"


class BadRequest(TurnError):
    code, reason = 400, "Bad Request"


class Unauthorized(TurnError):
    code, reason = 401, "Unauthorized"


class Forbidden(TurnError):
    code, reason = 403, "Forbidden"


class UnknownAttribute(TurnError):
    code, reason = 420, "Unknown Attribute"


class AllocationMismatch(TurnError):
    code, reason = 437, "Allocation Mismatch"


class StaleNonce(TurnError):
    code, reason = 438, "Stale Nonce"


class AddressFamilyNotSupported(TurnError):
    code, reason = 440, "Address Family not Supported"


class WrongCredentials(TurnError):
    code, reason = 441, "Wrong Credentials"


class UnsupportedTransportProtocol(TurnError):
    code, reason = 442, "Unsupported Transport Protocol"


class PeerAddressFamilyMismatch(TurnError):
    code, reason = 443, "Peer Address Family Mismatch"


class AllocationQuotaReached(TurnError):
    code, reason = 486, "Allocation Quota Reached"


class InsufficientCapacity(TurnError):
    code, reason = 508, "Insufficient Capacity"
