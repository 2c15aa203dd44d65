"""Worker processes' hand-over and entry point, in-process."""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

import pytest

from tsunagu import workers
from tsunagu.config import Config, parse_config
from tsunagu.workers import WorkerShare


def test_the_hand_over_line_carries_config_and_share() -> None:
    config = parse_config(
        {
            "listening_ips": ["127.0.0.1", "::1"],
            "external_ips": ["203.0.113.5/10.0.0.5"],
            "users": ["alice:p:w"],
            "alternate_servers": ["[2001:db8::1]:3478"],
            "workers": 3,
        }
    )
    share = WorkerShare("turn-secret", bytes(range(32)), 0, udp_fds=(7, 8), tcp_fds=(9,))
    line = workers._payload(config, share, 2)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got_config, got_share = workers._read_payload(line)
    assert got_config == config
    assert got_share == WorkerShare("turn-secret", bytes(range(32)), 2, "", (7, 8), (9,))


def test_worker_main_runs_serve_on_the_shared_loop_factory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = parse_config({"workers": 2, "no_web": True})
    share = WorkerShare("s", b"\x01" * 32, 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(workers._payload(config, share, 1).decode()))
    calls: list[Any] = []

    async def serve(got: Config, got_share: WorkerShare | None) -> int:
        calls.append((got, got_share, asyncio.get_running_loop()))
        return 5

    assert workers.worker_main(serve) == 5
    [(got, got_share, loop)] = calls
    assert got == config and got_share == WorkerShare("s", b"\x01" * 32, 1)
    assert type(loop).__module__.startswith("uvloop")


def test_the_child_command_names_importable_functions() -> None:
    namespace: dict[str, Any] = {}
    exec(workers._CHILD.partition("raise")[0], namespace)
    assert callable(namespace["serve"]) and namespace["worker_main"] is workers.worker_main
