"""The load generator against real servers on loopback: tsunagu serve, and coturn."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.interop import run_coturn
from tsunagu.cli import main
from tsunagu.probe import procstat
from tsunagu.probe.load import LoadSpec, run

HOST = "127.0.0.1"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    tls_port: int

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)


def _free_port_pair() -> tuple[int, int]:
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp, socket.socket() as tls:
                try:
                    tcp.bind((HOST, port))
                    tls.bind((HOST, 0))
                except OSError:
                    continue
                return port, tls.getsockname()[1]
    raise RuntimeError("no free ports")


def _binding_answered(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        try:
            sock.sendto(request, (HOST, port))
            return sock.recv(2048)[8:20] == request[8:20]
        except OSError:
            return False


def _start(
    command: list[str], port: int, tls_port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[Server]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, tls_port)
    try:
        deadline = time.monotonic() + 20
        while not _binding_answered(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not answer"
            time.sleep(0.05)
        yield server
    finally:
        for signum in (signal.SIGTERM, signal.SIGTERM):
            if process.poll() is None:
                process.send_signal(signum)
                try:
                    process.wait(2)
                except subprocess.TimeoutExpired:
                    pass
        if process.poll() is None:
            process.kill()
            process.wait(5)


def _relay_range() -> tuple[int, int]:
    # Below the ephemeral range where client sockets live; random so that parallel runs of
    # the suite rarely meet (both servers step over ports already taken).
    low = random.Random().randrange(16384, 31000, 100)
    return low, low + 399


@pytest.fixture(scope="module")
def tsunagu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("tsunagu")
    port, tls_port = _free_port_pair()
    low, high = _relay_range()
    command = [
        sys.executable,
        "-m",
        "tsunagu",
        "serve",
        "--workers",
        "1",
        "-L",
        HOST,
        "-p",
        str(port),
        "--tls-listening-port",
        str(tls_port),
        "--no-web",
        "--allowed-peer-ip",
        HOST,
        "-u",
        "alice:secret",
        # A REST secret beside the static user (with --use-auth-secret, as in coturn, the
        # static user would not be accepted).
        "--static-auth-secret",
        "s3cret",
        "--min-port",
        str(low),
        "--max-port",
        str(high),
        "--unauth-rate",
        "100000",
    ]
    # Its self-signed TLS certificate goes to a directory of this test's own.
    env = dict(os.environ, XDG_STATE_HOME=str(directory / "state"))
    yield from _start(command, port, tls_port, directory / "serve.log", env)


def spec(server: Server, **kw: Any) -> LoadSpec:
    base: dict[str, Any] = {
        "server": server.address,
        "username": "alice",
        "password": "secret",
        "server_pid": server.process.pid,
        "duration": 0.3,
        "warmup": 0.1,
        "release": True,
    }
    base.update(kw)
    return LoadSpec(**base)


def _step(result: dict[str, Any]) -> dict[str, Any]:
    assert result["setup"]["failed"] == 0, result["setup"]["errors"]
    (step,) = result["steps"]
    return step


def _check_relayed(step: dict[str, Any], rate: float) -> None:
    assert step["sent"] == pytest.approx(rate * step["seconds"], rel=0.05)
    # A quiet loopback relays everything; a little slack for a machine busy with other tests.
    assert step["received"] >= 0.9 * step["sent"]
    assert step["loss"] <= 0.1
    assert step["relayed_packets"] == 2 * step["received"]
    assert step["rtt_ms"]["p50"] <= step["rtt_ms"]["p99"] <= step["rtt_ms"]["max"]
    assert step["strays"] == 0
    assert "server_cpu_s" in step and step["server_rss_after"] > 0


@pytest.mark.parametrize(
    ("transport", "mode", "size"),
    [
        ("udp", "channel", 100),
        ("udp", "channel", 1000),
        ("udp", "indication", 101),
        ("tcp", "channel", 102),
        ("tls", "channel", 100),
    ],
)
def test_relays_through_tsunagu(tsunagu: Server, transport: str, mode: str, size: int) -> None:
    server = tsunagu
    if transport == "tls":
        server = Server(tsunagu.process, tsunagu.tls_port, tsunagu.tls_port)
    result = run(
        spec(server, transport=transport, mode=mode, size=size, allocations=3, rates=[600])
    )
    assert result["setup"]["ready"] == 3
    assert result["setup"]["latency_ms"]["p50"] > 0
    _check_relayed(_step(result), 600)
    assert result["release"]["released"] == 3


def test_rate_ladder_and_interval(tsunagu: Server) -> None:
    result = run(spec(tsunagu, allocations=2, rates=[300, 900], stop_loss=1.0))
    steps = result["steps"]
    assert [s["offered_msgs_per_s"] for s in steps] == [300, 900]
    assert steps[1]["sent"] > 2 * steps[0]["sent"]
    paced = run(spec(tsunagu, allocations=5, interval=0.02, size=160))
    step = _step(paced)
    assert step["offered_msgs_per_s"] == pytest.approx(250)
    _check_relayed(step, 250)


def test_allocate_hold_verify_release(tsunagu: Server) -> None:
    before = procstat.sample(tsunagu.process.pid)
    result = run(spec(tsunagu, mode="allocate", allocations=60, hold=0.2, verify=True))
    setup = result["setup"]
    assert (setup["ready"], setup["failed"]) == (60, 0)
    assert setup["per_second"] > 0
    assert result["hold"]["server_rss_bytes"] >= before.rss_bytes / 2
    assert result["verify"] == {"allocations": 60, "relaying": 60, "rounds": 1}
    assert result["release"]["released"] == 60


def test_rest_credentials(tsunagu: Server) -> None:
    result = run(spec(tsunagu, mode="allocate", allocations=5, rest_secret="s3cret"))
    assert result["setup"]["ready"] == 5
    wrong = run(spec(tsunagu, mode="allocate", allocations=2, rest_secret="other"))
    assert wrong["setup"]["ready"] == 0
    assert any("401" in error for error in wrong["setup"]["errors"])


def test_binding(tsunagu: Server) -> None:
    result = run(spec(tsunagu, mode="binding", binding_sockets=2, binding_window=4))
    binding = result["binding"]
    assert binding["responses"] > 0 and binding["errors"] == 0
    assert binding["per_second"] == pytest.approx(
        binding["responses"] / binding["seconds"], rel=0.01
    )
    assert binding["server_cpu_us_per_request"] >= 0


def test_unreachable_server_fails_setup() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        silent = sock.getsockname()[1]
        result = run(
            LoadSpec(
                server=(HOST, silent),
                username="alice",
                password="secret",
                allocations=2,
                rates=[100],
                setup_timeout=1.0,
            )
        )
    assert result["setup"]["ready"] == 0
    assert "steps" not in result


def test_command_line(tsunagu: Server, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "probe",
            f"{HOST}:{tsunagu.port}",
            "-u",
            "alice:secret",
            "-n",
            "2",
            "--rate",
            "400",
            "-d",
            "0.2",
            "--warmup",
            "0",
            "--release",
            "--server-pid",
            str(tsunagu.process.pid),
        ]
    )
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["spec"]["allocations"] == 2
    assert "password" not in result["spec"]
    assert result["steps"][0]["sent"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["127.0.0.1:1", "-u", "a:b", "--rate", "10", "-l", "8"],  # too small for the header
        ["127.0.0.1:1", "--rate", "10"],  # no credentials
        ["127.0.0.1:1", "-u", "a:b"],  # no rate
        ["127.0.0.1:1", "-u", "a:b", "--rate", "10,-1"],
        ["127.0.0.1:1", "--mode", "binding", "-t", "tcp"],
        ["nowhere", "-u", "a:b", "--rate", "10"],
    ],
)
def test_command_line_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", *argv]) == 2
    assert capsys.readouterr().err


@pytest.mark.interop
def test_relays_through_coturn(tmp_path: Path) -> None:
    assert shutil.which("turnserver"), "coturn is part of the test setup (scripts/setup --test)"
    with run_coturn(tmp_path, "-m", "1", relay_ports=400) as coturn:
        server = Server(coturn.process, coturn.port, coturn.tls_port)
        for mode in ("channel", "indication"):
            result = run(spec(server, mode=mode, allocations=3, rates=[600]))
            _check_relayed(_step(result), 600)
            assert result["release"]["released"] == 3
