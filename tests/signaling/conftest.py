"""Fixtures of the signaling tests."""

from support.web_app import make_client

__all__ = ["make_client"]
