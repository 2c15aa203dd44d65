"""What a reload takes from a new configuration, and a certificate replaced under running
TLS listeners."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from support.certs import make_certificate
from support.turn_harness import make_server
from tsunagu.config import Config, ConfigError, parse_config
from tsunagu.config_reload import LIVE, reload_plan
from tsunagu.serve.settings import settings_from_config
from tsunagu.tls import ServingCertificate, TlsError, ensure_certificate
from tsunagu.turn import TurnSettings
from tsunagu.turn.settings import RELOADABLE


def test_live_options_are_taken_and_the_rest_kept_and_named() -> None:
    running = parse_config({"user_quota": 5, "min_port": 40000, "max_port": 40100})
    new = parse_config(
        {
            "user_quota": 2,
            "min_port": 41000,
            "max_port": 40100 + 1000,
            "users": ["carol:pw"],
            "log_level": "debug",
            "alternate_servers": ["192.0.2.9:3478"],
            "drain_timeout": 3,
        }
    )
    plan = reload_plan(running, new)
    assert plan.applied == (
        "users",
        "user_quota",
        "alternate_servers",
        "drain_timeout",
        "log_level",
    )
    assert plan.restart_needed == ("min_port", "max_port")
    assert plan.config.user_quota == 2 and plan.config.drain_timeout == 3
    assert [user.name for user in plan.config.users] == ["carol"]
    assert (plan.config.min_port, plan.config.max_port) == (40000, 40100)
    # A second reload of the same file applies nothing and still names what is owed.
    again = reload_plan(plan.config, new)
    assert again.applied == () and again.restart_needed == ("min_port", "max_port")


def test_every_live_option_is_a_configuration_field() -> None:
    fields = {field.name for field in dataclasses.fields(Config)}
    assert set(LIVE) <= fields
    unchanged = reload_plan(Config(), Config())
    assert unchanged.applied == () == unchanged.restart_needed


def test_moving_between_acme_and_a_configured_certificate_is_a_restart() -> None:
    running = parse_config({"acme_domains": ["turn.example.org"], "acme_http_port": 8081})
    new = parse_config({"cert": "/etc/tsunagu/cert.pem", "pkey": "/etc/tsunagu/key.pem"})
    plan = reload_plan(running, new)
    assert set(plan.restart_needed) == {"acme_domains", "acme_http_port", "cert", "pkey"}
    assert plan.config.cert is None and plan.config.acme_domains == ("turn.example.org",)
    back = reload_plan(new, running)
    assert back.config.cert == "/etc/tsunagu/cert.pem" and back.config.acme_domains == ()


def test_room_access_capacity_api_key_and_origins_are_live() -> None:
    running = parse_config({"room_access": "password", "room_password": "old"})
    new = parse_config(
        {
            "room_access": "token",
            "join_secrets": ["n" * 32, "o" * 32],
            "room_capacity": 4,
            "api_key": "k" * 32,
            "allowed_origins": ["https://app.example.org"],
            "ice_transport_policy": "relay",
        }
    )
    plan = reload_plan(running, new)
    assert set(plan.applied) == {
        "room_access",
        "room_password",
        "join_secrets",
        "room_capacity",
        "api_key",
        "allowed_origins",
    }
    assert plan.restart_needed == ("ice_transport_policy",)
    assert plan.config.effective_room_access == "token" and plan.config.room_capacity == 4
    assert plan.config.ice_transport_policy == "all"


def test_a_plan_that_breaks_a_rule_with_the_running_options_is_refused() -> None:
    # Running on a public address, where rooms need join tokens unless told otherwise; the
    # new file moves the web app to loopback (a restart) and so no longer needs its secret.
    running = parse_config({"web_ip": "0.0.0.0", "join_secrets": ["s" * 32]})
    new = parse_config({"web_ip": "127.0.0.1"})
    with pytest.raises(ConfigError, match=r"room_access: must be chosen.*as they run: web_ip"):
        reload_plan(running, new)
    # Choosing the access in the file makes the same move a valid reload.
    plan = reload_plan(running, parse_config({"web_ip": "127.0.0.1", "room_access": "open"}))
    assert plan.config.effective_room_access == "open" and plan.restart_needed == ("web_ip",)


TURN_SAMPLES: dict[str, Any] = {
    "allowed_peer_ips": ["10.1.0.0/16"],
    "denied_peer_ips": ["192.0.2.0/24"],
    "user_quota": 7,
    "address_quota": 9,
    "total_quota": 11,
    "max_bps": 1000,
    "user_max_bps": 2000,
    "bps_capacity": 3000,
    "alternate_servers": ["192.0.2.9:3478"],
    "max_allocate_lifetime": 120,
    "permission_lifetime": 60,
    "channel_lifetime": 90,
    "unauth_rate": 5.0,
    "stale_nonce": 120,
}
"""A changed value of each live option the TURN core's settings follow."""
APPLIED_ELSEWHERE = {
    # The credential store, the log, the drain, the TLS listeners, the web app, the
    # TCP/TLS connection counter.
    *("users", "user_file", "static_auth_secrets", "static_auth_secret_file"),
    *("rest_check_on_refresh", "log_level", "verbose", "drain_timeout", "cert", "pkey"),
    *("room_access", "room_password", "join_secrets", "room_capacity", "api_key"),
    *("allowed_origins", "max_tcp_connections", "max_tcp_connections_per_ip"),
}


def test_every_live_option_the_core_follows_is_one_its_reconfigure_takes() -> None:
    # A new live option must say where it is applied: in the core's settings (then its
    # fields must be among those reconfigure takes) or elsewhere.
    assert set(LIVE) == set(TURN_SAMPLES) | APPLIED_ELSEWHERE
    before = settings_from_config(Config())
    for option, value in TURN_SAMPLES.items():
        after = settings_from_config(parse_config({option: value}))
        changed = {
            f.name
            for f in dataclasses.fields(TurnSettings)
            if getattr(before, f.name) != getattr(after, f.name)
        }
        assert changed, option
        assert changed <= set(RELOADABLE), (option, changed - set(RELOADABLE))


def test_reconfigure_takes_every_reloadable_setting_and_no_other() -> None:
    server, _ = make_server(TurnSettings())
    new = settings_from_config(parse_config({**TURN_SAMPLES, "min_port": 50000}))
    server.reconfigure(new)
    for name in RELOADABLE:
        assert getattr(server.settings, name) == getattr(new, name), name
    assert server.settings.min_port == TurnSettings().min_port


# --- the certificate -----------------------------------------------------------------------


def pair(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir()
    return make_certificate(directory, name, x509.DNSName("localhost"))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert: Path) -> str:
    return fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServingCertificate, int, Path]]:
    """A TLS echo server on loopback serving through a ServingCertificate; each connection
    answers every line with itself until the client closes."""
    cert, key = pair(tmp_path / "a", "a")
    serving = ServingCertificate(ensure_certificate(str(cert), str(key), [], tmp_path))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def echo(connection: socket.socket) -> None:
        try:
            with serving.context.wrap_socket(connection, server_side=True) as wrapped:
                while data := wrapped.recv(100):
                    wrapped.sendall(data)
        except (OSError, ssl.SSLError):
            connection.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(5)
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield serving, listener.getsockname()[1], tmp_path
    stop.set()
    thread.join(5)
    listener.close()


def connect(port: int, server_name: str | None) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(sock, server_hostname=server_name)


@pytest.mark.parametrize("server_name", [None, "localhost"])
def test_new_handshakes_get_the_new_certificate_and_open_connections_keep_theirs(
    tls_server: tuple[ServingCertificate, int, Path], server_name: str | None
) -> None:
    serving, port, tmp = tls_server
    old = serving.material.cert_path
    before = connect(port, server_name)
    assert fingerprint(before.getpeercert(binary_form=True) or b"") == file_fingerprint(old)

    cert, key = pair(tmp / "b", "b")
    serving.replace(ensure_certificate(str(cert), str(key), [], tmp))
    with connect(port, server_name) as after:
        assert fingerprint(after.getpeercert(binary_form=True) or b"") == file_fingerprint(cert)
    with before:
        before.sendall(b"still here")
        assert before.recv(100) == b"still here"


def test_a_certificate_that_does_not_load_leaves_the_running_one(
    tls_server: tuple[ServingCertificate, int, Path],
) -> None:
    serving, port, tmp = tls_server
    old = serving.material
    cert, _ = pair(tmp / "b", "b")
    _, other_key = pair(tmp / "c", "c")
    with pytest.raises(ConfigError):
        serving.replace(dataclasses.replace(old, key_path=other_key, cert_path=cert))
    with pytest.raises(TlsError):
        ensure_certificate(str(cert), str(other_key), [], tmp)  # what a reload checks first
    assert serving.material is old
    with connect(port, None) as client:
        assert fingerprint(client.getpeercert(binary_form=True) or b"") == file_fingerprint(
            old.cert_path
        )


def test_an_expired_generated_certificate_is_made_anew_by_a_reload(tmp_path: Path) -> None:
    first = ensure_certificate(None, None, ["localhost"], tmp_path)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=40)
    second = ensure_certificate(None, None, ["localhost"], tmp_path, now=later)
    assert second.sha256_fingerprint != first.sha256_fingerprint
    ServingCertificate(first).replace(second)
