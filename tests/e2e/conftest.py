"""Fixtures of the browser tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.browser import Server, run_server


@pytest.fixture
def relay_server(tmp_path: Path) -> Iterator[Server]:
    """``tsunagu serve`` forcing every browser to relay through it."""
    with run_server(tmp_path, "--ice-transport-policy", "relay") as server:
        yield server


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[Server]:
    """``tsunagu serve`` with the default policy: any path, relay only on request."""
    with run_server(tmp_path) as server:
        yield server
