"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """The checkout's top directory (holds pyproject.toml, README.md, src/, scripts/)."""
    assert (REPO_ROOT / "pyproject.toml").is_file()
    return REPO_ROOT
