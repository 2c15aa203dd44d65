"""coturn's client against ``tsunagu serve --workers 2``: SO_REUSEPORT listeners.

uclient's default traffic asks for EVEN-PORT with a reservation on about half of its
allocations and redeems the RESERVATION-TOKEN from another socket, which the kernel may
hand to the other worker: this is what proves reservations work across workers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_interop_coturn import LOST, SUMMARY

from support.interop import HOST, EchoPeer, run_serve, run_uclient, uclient_command

pytestmark = pytest.mark.interop


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.mark.parametrize("flags", [[], ["-t"]], ids=["udp", "tcp"])
def test_uclient_through_two_workers(tmp_path: Path, echo_peer: EchoPeer, flags: list[str]) -> None:
    with run_serve(tmp_path / "serve", "--workers", "2") as server:
        assert len(_children(server.pid)) == 1  # worker 0 is the server process itself
        for _ in range(2):
            code, out = run_uclient(
                uclient_command(
                    server.port,
                    (echo_peer.host, echo_peer.port),
                    *flags,
                    "-z",
                    "5",
                    messages=50,
                    clients=8,
                    length=100,
                ),
                60.0,
            )
            assert code == 0, out
            assert "508" not in out, out
            sent, received = (int(n) for n in SUMMARY.findall(out)[-1])
            assert sent == 400 and received == sent, out
            assert int(LOST.findall(out)[-1]) == 0, out


def test_second_server_on_a_workers_port_is_refused(tmp_path: Path) -> None:
    """SO_REUSEPORT must not let a server started by mistake share the first one's port."""
    with run_serve(tmp_path / "first", "--workers", "2") as first:
        command = [
            sys.executable,
            "-m",
            "tsunagu",
            "serve",
            "-L",
            HOST,
            "-p",
            str(first.port),
            "--tls-listening-port",
            str(first.tls_port),
            "--no-web",
            "--workers",
            "2",
        ]
        started = time.monotonic()
        process = subprocess.run(
            command,
            capture_output=True,
            timeout=30,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        )
        assert process.returncode != 0
        assert re.search(rb"cannot listen on 127\.0\.0\.1", process.stderr), process.stderr
        assert time.monotonic() - started < 30


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The parent PID is the second field after the parenthesised command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_default_is_one_worker_per_usable_core(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    with run_serve(tmp_path / "serve", "--workers", "0") as server:
        startup = "\n".join(server.startup)
        if cores > 1:
            assert f"{cores} worker processes" in startup, startup
        else:
            assert "worker processes" not in startup, startup
        assert len(_children(server.pid)) == cores - 1
