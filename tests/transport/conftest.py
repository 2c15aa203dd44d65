"""Fixtures of the transport tests: the relay engine under test, both where both are built."""

from __future__ import annotations

import logging

import pytest

from support.engines import make_engine
from tsunagu.transport.engine import RelayEngine


@pytest.fixture(params=["python", "native"])
def engine(request: pytest.FixtureRequest) -> RelayEngine:
    return make_engine(request.param)


@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # serve() stops "tsunagu" propagating to the root logger; nothing here calls it, but a
    # test run in the same process earlier might have.
    monkeypatch.setattr(logging.getLogger("tsunagu"), "propagate", True)
