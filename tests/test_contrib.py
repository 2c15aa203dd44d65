"""contrib/: the systemd unit checked by systemd-analyze and run as written, the example
configuration, the sysusers entry and what the Dockerfile relies on (the image is not built
here: no Docker)."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from support.certs import make_certificate
from support.interop import free_ports, relay_range
from tsunagu.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "tsunagu.service"
EXAMPLE = CONTRIB / "tsunagu.toml"
VENV_TSUNAGU = Path(sys.executable).parent / "tsunagu"
JOIN_SECRET = "j" * 40


def unit_settings() -> dict[str, list[str]]:
    """Each key of the unit with its values, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd-analyze needs no running systemd for this; it wants an executable ExecStart,
    so a copy names this venv's tsunagu. Unknown keys are only warned about: any output at
    all fails the test."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd package"
    text = UNIT.read_text()
    assert "ExecStart=/opt/tsunagu/bin/tsunagu " in text
    copy = tmp_path / "tsunagu.service"
    copy.write_text(text.replace("/opt/tsunagu/bin/tsunagu", str(VENV_TSUNAGU)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout + done.stderr, done


def test_systemd_analyze_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing program show."""
    analyze = shutil.which("systemd-analyze")
    assert analyze
    bad = UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
    copy = tmp_path / "tsunagu.service"
    copy.write_text(bad)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "NoNewPrivilege" in done.stderr and "/opt/tsunagu/bin/tsunagu" in done.stderr, done
    assert done.returncode != 0


def test_the_unit_fits_the_server() -> None:
    unit = unit_settings()
    config = tomllib.loads(EXAMPLE.read_text())
    assert unit["User"] == ["tsunagu"] and unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"] and unit["Restart"] == ["on-failure"]
    # The drain, then up to 5 s for the worker processes, before systemd's SIGKILL.
    assert int(unit["TimeoutStopSec"][0]) > config["drain_timeout"] + 5
    # A whole relay range twice over in both families, twice.
    ports = config["max_port"] - config["min_port"] + 1
    assert int(unit["LimitNOFILE"][0]) >= 2 * 2 * 2 * ports
    # The state directory is where tsunagu keeps its state: $XDG_STATE_HOME/tsunagu.
    environment = dict(e.split("=", 1) for e in unit["Environment"])
    state = Path(environment["XDG_STATE_HOME"]) / unit["StateDirectory"][0]
    assert state == Path("/var/lib/tsunagu") == Path(config["userdb"]).parent
    assert Path(config["admin_socket"]).parent == Path("/run") / unit["RuntimeDirectory"][0]
    assert "log_file" not in config and unit["StandardError"] == ["journal"]
    sysusers = (CONTRIB / "tsunagu.sysusers").read_text().split("\n", 1)[1].split()
    assert sysusers[:2] == ["u", "tsunagu"]


def test_the_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_JOIN_SECRET", JOIN_SECRET)
    config = load_config(["-c", str(EXAMPLE)])
    assert config.web_port == 443 and config.effective_room_access == "token"
    assert config.cert == "/etc/tsunagu/fullchain.pem"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def test_the_units_command_line_runs_with_the_example_configuration(tmp_path: Path) -> None:
    """ExecStart as written, the program being this venv's and the configuration the
    example's with loopback, free ports and files of this test's; the unit's environment
    file's variable; ready, reloaded by SIGHUP (ExecReload), stopped by SIGTERM in time."""
    unit = unit_settings()
    command = shlex.split(unit["ExecStart"][0])
    assert command[0] == "/opt/tsunagu/bin/tsunagu"
    assert command[-2:] == ["-c", "/etc/tsunagu/tsunagu.toml"]
    web_port, turn_port, tls_port, metrics_port = free_ports(4)
    low, high = relay_range()
    cert, key = make_certificate(
        tmp_path, "turn.example.org", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    config = tomllib.loads(EXAMPLE.read_text())
    config.update(
        listening_ips=["127.0.0.1"],
        allowed_peer_ips=["127.0.0.1"],
        listening_port=turn_port,
        tls_listening_port=tls_port,
        min_port=low,
        max_port=high,
        cert=str(cert),
        pkey=str(key),
        web_ip="127.0.0.1",
        web_port=web_port,
        admin_socket=str(tmp_path / "run" / "admin.sock"),
        userdb=str(tmp_path / "state" / "users.db"),
        prometheus_port=metrics_port,
        workers=1,
    )
    path = tmp_path / "tsunagu.toml"
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in config.items()))
    command = [str(VENV_TSUNAGU), *command[1:-1], str(path)]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    env["TSUNAGU_JOIN_SECRET"] = JOIN_SECRET
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while "tsunagu: ready" not in out.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, out.read_text()
            time.sleep(0.05)
        printed = out.read_text()
        assert "tsunagu: ready" in printed, printed
        assert re.search(
            rf"web app on https://127\.0\.0\.1:{web_port}/; certificate sha256", printed
        )
        assert "room access token" in printed
        # What the container image's health check asks.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as r:
            assert r.status == 200
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: reload done" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SIGHUP: reload done: 1 workers answered" in out.read_text(), out.read_text()
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=int(unit["TimeoutStopSec"][0]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
    assert code == 0, out.read_text()


def test_the_dockerfile_agrees_with_the_example_configuration() -> None:
    text = (CONTRIB / "Dockerfile").read_text()
    config = tomllib.loads(EXAMPLE.read_text())
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages and all(s == "debian:bookworm-slim" for s in stages), stages
    assert re.search(r"^USER tsunagu$", text, re.M)
    assert "ENV XDG_STATE_HOME=/var/lib " in text and "VOLUME /var/lib/tsunagu" in text
    assert f"127.0.0.1:{config['prometheus_port']}/healthz" in text
    (exposed,) = re.findall(r"^EXPOSE (.*)$", text, re.M)
    for port in (
        f"{config['listening_port']}/udp",
        f"{config['listening_port']}/tcp",
        f"{config['tls_listening_port']}/tcp",
        f"{config['web_port']}/tcp",
        f"{config['min_port']}-{config['max_port']}/udp",
    ):
        assert port in exposed.split(), port
    assert 'CMD ["serve", "-c", "/etc/tsunagu/tsunagu.toml"]' in text
