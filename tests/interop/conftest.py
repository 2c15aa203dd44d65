"""Fixtures of the interoperability tests: a real ``tsunagu serve`` and an echo peer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.interop import HOST, HOST6, EchoPeer, ServeProcess, run_serve, run_turnutils_peer


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One server for a whole test module (clients tell themselves apart by address)."""
    with run_serve(tmp_path_factory.mktemp("serve")) as server:
        yield server


@pytest.fixture(scope="module")
def serve6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """Listening on ::1 first (where clients go) and on 127.0.0.1."""
    with run_serve(tmp_path_factory.mktemp("serve6"), hosts=(HOST6, HOST)) as server:
        yield server


@pytest.fixture
def fresh_serve(tmp_path: Path) -> Iterator[ServeProcess]:
    """A server of the test's own, whose audit log holds only what the test did."""
    with run_serve(tmp_path / "serve") as server:
        yield server


@pytest.fixture(scope="module")
def echo_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoPeer]:
    """coturn's ``turnutils_peer`` echoing UDP on loopback."""
    with run_turnutils_peer(tmp_path_factory.mktemp("peer")) as peer:
        yield peer


@pytest.fixture(scope="module")
def echo_peer6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoPeer]:
    """The same on ::1."""
    with run_turnutils_peer(tmp_path_factory.mktemp("peer6"), HOST6) as peer:
        yield peer
