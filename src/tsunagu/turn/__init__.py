"""The TURN server core (RFC 8656, RFC 6156): pure state machine, no I/O."""

from ..stun.indication import data_indication
from .allocation import Allocation, FiveTuple, ForwardingState, RelaySocket
from .authentication import CredentialStore, KeyLookup, KeysNotAtHand, long_term_key
from .discovery import NatDiscovery, Reply
from .events import AllocationCreated, AllocationEnded, Event
from .forwarding import Forward, channel_data_forward
from .policy import PeerPolicy
from .ports import RandomSource, RelayBinder
from .server import Session, TurnServer
from .settings import TurnSettings

__all__ = [
    "Allocation",
    "AllocationCreated",
    "AllocationEnded",
    "CredentialStore",
    "Event",
    "FiveTuple",
    "Forward",
    "ForwardingState",
    "KeyLookup",
    "KeysNotAtHand",
    "NatDiscovery",
    "PeerPolicy",
    "RandomSource",
    "RelayBinder",
    "RelaySocket",
    "Reply",
    "Session",
    "TurnServer",
    "TurnSettings",
    "channel_data_forward",
    "data_indication",
    "long_term_key",
]
