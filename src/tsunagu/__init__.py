"""tsunagu: self-hosted WebRTC connectivity (STUN/TURN, signaling, video rooms)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
