"""The TURN server core (RFC 8656, RFC 6156): pure state machine, no I/O."""

from ..stun.indication import data_indication
from .allocation import Allocation, FiveTuple, RelaySocket
from .authentication import CredentialStore, long_term_key
from .events import AllocationCreated, AllocationEnded, Event
from .policy import PeerPolicy
from .ports import RandomSource, RelayBinder, RelayPortPool
from .server import Forward, TurnServer
from .settings import TurnSettings

__all__ = [
    "Allocation",
    "AllocationCreated",
    "AllocationEnded",
    "CredentialStore",
    "Event",
    "FiveTuple",
    "Forward",
    "PeerPolicy",
    "RandomSource",
    "RelayBinder",
    "RelayPortPool",
    "RelaySocket",
    "TurnServer",
    "TurnSettings",
    "data_indication",
    "long_term_key",
]
