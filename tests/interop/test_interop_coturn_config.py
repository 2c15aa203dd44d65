"""``tsunagu serve -c turnserver.conf``: a coturn configuration file, as an operator moving
from coturn has it, starts tsunagu, and coturn's own ``turnutils_uclient`` relays through it.

The file holds coturn's options in coturn's form (``key=value``, bare switches, a quoted
value, comments) and some options only coturn has; the server names those in one warning
line, never their values, and honours the rest: its addresses, ports, realm, user,
relay range, allowed peers, log file and ``no-tls``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.interop import (
    HOST,
    PASSWORD,
    UCLIENT_SUMMARY,
    USER,
    EchoPeer,
    ServeProcess,
    free_ports,
    relay_range,
    run_uclient,
    uclient_command,
)

pytestmark = pytest.mark.interop

UCLIENT_TIMEOUT = 60.0
IGNORED = "no-cli, cli-password, no-dtls, syslog, pidfile, proc-user"


class CoturnFileServe(ServeProcess):
    """``tsunagu serve -c turnserver.conf`` with no other option than the file's."""

    @property
    def conf_path(self) -> Path:
        return self.tmp / "turnserver.conf"

    def launch(self) -> None:
        self.port, self.tls_port, self.alt_port = free_ports(3)
        self.conf_path.write_text(
            f"""# TURN server configuration, in coturn's format
listening-ip=127.0.0.1
listening-port={self.port}
tls-listening-port = {self.tls_port}
realm="example.org"
user={USER}:{PASSWORD}
lt-cred-mech
fingerprint
no-tls
min-port {self.min_port}
max-port={self.max_port}
allowed-peer-ip={HOST}
log-file={self.log_path}

# Only coturn has these.
no-cli
cli-password=qwerty-not-shown
no-dtls
syslog
pidfile="/var/run/turnserver.pid"
proc-user=turnserver
no-cli
""",
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "tsunagu", "serve", "-c", str(self.conf_path)]
        # The web app is tsunagu's own and not what this test is about.
        command += ["--no-web", "--drain-timeout", str(self.drain_timeout)]
        env = dict(os.environ, XDG_STATE_HOME=str(self.state_dir), PYTHONUNBUFFERED="1")
        self.log_path.write_bytes(b"")
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )


@pytest.fixture
def conf_serve(tmp_path: Path) -> Iterator[CoturnFileServe]:
    low, high = relay_range()
    server = CoturnFileServe(tmp_path, (), (HOST,), 0.5, low, high)
    server.launch()
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"tsunagu serve exited with {code}:\n{server.log_text()}"


def test_a_coturn_file_serves_coturn_clients(
    conf_serve: CoturnFileServe, echo_peer: EchoPeer
) -> None:
    command = uclient_command(
        conf_serve.port, (echo_peer.host, echo_peer.port), "-z", "5", messages=20, clients=2
    )
    _, output = run_uclient(command, UCLIENT_TIMEOUT)
    summary = UCLIENT_SUMMARY.search(output)
    assert summary is not None, output
    sent, received = int(summary.group(1)), int(summary.group(2))
    assert sent == 40 and received == sent, summary.group(0)

    output = conf_serve.stdout_path.read_text(errors="replace")
    warning = f"config: warning: {conf_serve.conf_path}: coturn options tsunagu ignores: {IGNORED}"
    assert output.splitlines().count(warning) == 1, output
    assert "qwerty" not in output
    assert "realm example.org" in output
    # Honoured: the log went to the file's log-file, and no-tls left the TLS port closed.
    assert "allocation-created" in conf_serve.log_text()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.settimeout(2)
        sock.connect((HOST, conf_serve.tls_port))
