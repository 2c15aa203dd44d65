"""The driver writes the core's refusals as one summary line per reason and interval."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from support.turn_harness import Client, make_server, udp
from tsunagu.stun import Method, XorPeerAddress
from tsunagu.transport.driver import TurnDriver
from tsunagu.turn import TurnSettings


def driver_for(server: Any, interval: float = 10.0) -> TurnDriver:
    engine = SimpleNamespace(stream_framer=None, fold_counters=lambda allocation: None)
    loop = asyncio.get_running_loop()
    return TurnDriver(server, loop, cast(Any, engine), worker=2, report_interval=interval)


async def test_one_line_per_reason_with_the_top_offender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server(TurnSettings(user_quota=1, address_quota=0))
    driver = driver_for(server)
    Client(server, udp(("198.51.100.1", 1))).allocate()  # alice's one allocation
    for n in range(2, 50):
        Client(server, udp(("198.51.100.1", n))).allocate()
    client = Client(server, udp(("198.51.100.2", 1)), "bob", "bob-pw")
    client.allocate()
    for _ in range(3):
        client.request(Method.CREATE_PERMISSION, [XorPeerAddress("10.1.2.3", 1)])
    driver.report_refusals()
    lines = [r.getMessage() for r in caplog.records if r.name == "tsunagu"]
    assert len(lines) == 2, lines
    assert "user quota x48; most often 'alice' (48) of 1" in lines[0]
    assert "worker 2" in lines[0]
    assert "peer denied x3; most often 'bob -> 10.1.2.3' (3)" in lines[1]
    caplog.clear()
    driver.report_refusals()  # nothing new: nothing written
    assert [r for r in caplog.records if r.name == "tsunagu"] == []


async def test_reports_run_on_the_loop_until_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server(TurnSettings(user_quota=1, address_quota=0))
    driver = driver_for(server, interval=0.05)
    driver.start_reports()
    for n in range(1, 4):
        Client(server, udp(("198.51.100.1", n))).allocate()
    await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "tsunagu"]
    assert len(lines) == 1 and "user quota x2" in lines[0], lines
    while server.next_event() is not None:  # no listener here to attach them to
        pass
    driver.shutdown()
    assert driver._report is None
