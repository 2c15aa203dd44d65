"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """The checkout's top directory (holds pyproject.toml, README.md, src/, scripts/)."""
    assert (REPO_ROOT / "pyproject.toml").is_file()
    return REPO_ROOT


# In CI a skipped test counts as a failure: everything the suite covers must really run there
# (coturn, Chromium and the rest are installed by scripts/setup --test).
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import os

    if os.environ.get("CI") == "true" and _skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    import os

    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.write_line(
            f"CI: {len(_skipped)} skipped test(s) count as failures: {', '.join(_skipped)}",
            red=True,
        )


# One PostgreSQL and one Redis server for the whole run, started on first use: each test
# takes a database of its own (tests/support/databases.py).
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    from support.databases import postgres_available, postgres_server

    if not postgres_available():
        pytest.skip("PostgreSQL 15 is not installed (scripts/setup --test installs it)")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    from support.databases import redis_available, redis_server

    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/setup --test installs it)")
    with redis_server() as server:
        yield server
