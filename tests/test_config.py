"""Configuration: defaults, file and flag sources, precedence, and validation errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tsunagu.config import (
    AlternateServer,
    AuxServer,
    Config,
    ConfigError,
    ExternalIp,
    PeerRange,
    StaticUser,
    build_parser,
    config_from_json,
    config_to_json,
    load_config,
    parse_alternate_server,
    parse_aux_server,
    parse_config,
    parse_external_ip,
    parse_ip_range,
    parse_user,
)

CONTRACT_FIELDS = [
    "listening_ips",
    "listening_port",
    "tls_listening_port",
    "aux_servers",
    "relay_ips",
    "external_ips",
    "min_port",
    "max_port",
    "realm",
    "users",
    "user_file",
    "userdb",
    "psql_userdb",
    "redis_userdb",
    "use_auth_secret",
    "static_auth_secrets",
    "static_auth_secret_file",
    "rest_check_on_refresh",
    "allowed_peer_ips",
    "denied_peer_ips",
    "internal_networks",
    "cert",
    "pkey",
    "acme_domains",
    "acme_email",
    "acme_directory",
    "acme_ca_file",
    "acme_http_port",
    "stun_only",
    "no_stun",
    "no_udp",
    "no_tcp",
    "no_tls",
    "user_quota",
    "address_quota",
    "total_quota",
    "max_bps",
    "user_max_bps",
    "bps_capacity",
    "max_allocate_lifetime",
    "channel_lifetime",
    "permission_lifetime",
    "stale_nonce",
    "software_attribute",
    "stun_backward_compatibility",
    "rfc5780",
    "alt_listening_port",
    "strict_channel_numbers",
    "alternate_servers",
    "unauth_rate",
    "max_tcp_connections_per_ip",
    "max_tcp_connections",
    "tcp_allocate_timeout",
    "drain_timeout",
    "log_file",
    "log_level",
    "log_format",
    "audit_file",
    "verbose",
    "no_turn",
    "no_web",
    "web_ip",
    "web_port",
    "web_plain_http",
    "public_host",
    "ice_transport_policy",
    "room_capacity",
    "room_access",
    "room_password",
    "join_secrets",
    "api_key",
    "allowed_origins",
    "credential_ttl",
    "workers",
    "relay_engine",
    "admin_socket",
    "no_admin",
    "admin_port",
    "admin_token_file",
    "prometheus_port",
    "prometheus_ip",
    "metrics_per_user",
]


ip = ipaddress.ip_address
A1, A2 = "192.0.2.1", "192.0.2.2"


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tsunagu.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(call: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config: "), message
    return message


# --- shape and defaults ---------------------------------------------------------------------


def test_fields_match_the_contract() -> None:
    assert [f.name for f in dataclasses.fields(Config)] == CONTRACT_FIELDS


def test_config_is_frozen_and_slotted() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listening_port = 1  # type: ignore[misc]
    assert not hasattr(config, "__dict__")
    assert "listening_port" in Config.__slots__


def test_defaults() -> None:
    config = load_config([])
    assert config == Config() == parse_config({})
    assert config.listening_ips == ()
    assert (config.listening_port, config.tls_listening_port) == (3478, 5349)
    assert (config.min_port, config.max_port) == (49152, 65535)
    assert config.realm == "tsunagu"
    assert config.rest_check_on_refresh is False
    assert config.software_attribute is False
    assert config.unauth_rate == 200.0 and config.drain_timeout == 30.0
    assert (config.web_ip, config.web_port) == ("127.0.0.1", 8080)
    assert config.ice_transport_policy == "all"
    assert (config.room_capacity, config.credential_ttl, config.workers) == (8, 600, 0)
    assert config.relay_engine == "auto"


# --- every field from both sources ----------------------------------------------------------

# (field, TOML literal, flag arguments, expected value)
EVERY_FIELD: list[tuple[str, str, list[str], Any]] = [
    (
        "listening_ips",
        '["127.0.0.1", "::1"]',
        ["-L", "127.0.0.1", "-L", "::1"],
        (ip("127.0.0.1"), ip("::1")),
    ),
    ("listening_port", "3479", ["-p", "3479"], 3479),
    ("tls_listening_port", "5350", ["--tls-listening-port", "5350"], 5350),
    ("relay_ips", '["192.0.2.7"]', ["-E", "192.0.2.7"], (ip("192.0.2.7"),)),
    (
        "external_ips",
        '["203.0.113.5/10.0.0.5"]',
        ["-X", "203.0.113.5/10.0.0.5"],
        (ExternalIp(ip("203.0.113.5"), ip("10.0.0.5")),),
    ),
    ("min_port", "50000", ["--min-port", "50000"], 50000),
    ("max_port", "60000", ["--max-port", "60000"], 60000),
    ("realm", '"example.org"', ["-r", "example.org"], "example.org"),
    ("userdb", '"/var/lib/turn/turndb"', ["-b", "/var/lib/turn/turndb"], "/var/lib/turn/turndb"),
    (
        "psql_userdb",
        '"host=127.0.0.1 dbname=coturn user=turn password=pw connect_timeout=30"',
        ["-e", "host=127.0.0.1 dbname=coturn user=turn password=pw connect_timeout=30"],
        "host=127.0.0.1 dbname=coturn user=turn password=pw connect_timeout=30",
    ),
    (
        "redis_userdb",
        '"redis://:pw@127.0.0.1:6379/0"',
        ["-N", "redis://:pw@127.0.0.1:6379/0"],
        "redis://:pw@127.0.0.1:6379/0",
    ),
    (
        "users",
        '["alice:pw1", "bob:p:w"]',
        ["-u", "alice:pw1", "--user", "bob:p:w"],
        (StaticUser("alice", "pw1"), StaticUser("bob", "p:w")),
    ),
    (
        "static_auth_secrets",
        '["s1", "s2"]',
        ["--static-auth-secret", "s1", "--static-auth-secret", "s2"],
        ("s1", "s2"),
    ),
    ("rest_check_on_refresh", "true", ["--rest-check-on-refresh"], True),
    (
        "allowed_peer_ips",
        '["10.1.2.3"]',
        ["--allowed-peer-ip", "10.1.2.3"],
        (PeerRange(ip("10.1.2.3"), ip("10.1.2.3")),),
    ),
    (
        "denied_peer_ips",
        '["198.51.100.0/24", "192.0.2.1-192.0.2.9"]',
        ["--denied-peer-ip", "198.51.100.0/24", "--denied-peer-ip", "192.0.2.1-192.0.2.9"],
        (
            PeerRange(ip("198.51.100.0"), ip("198.51.100.255")),
            PeerRange(ip("192.0.2.1"), ip("192.0.2.9")),
        ),
    ),
    (
        "cert",
        '"/etc/tsunagu/cert.pem"',
        ["--cert", "/etc/tsunagu/cert.pem"],
        "/etc/tsunagu/cert.pem",
    ),
    (
        "acme_domains",
        '["turn.example.org", "web.example.org"]',
        ["--acme-domain", "turn.example.org,web.example.org"],
        ("turn.example.org", "web.example.org"),
    ),
    ("acme_email", '"ops@example.org"', ["--acme-email", "ops@example.org"], "ops@example.org"),
    (
        "acme_directory",
        '"https://ca.internal:9000/acme/acme/directory"',
        ["--acme-directory", "https://ca.internal:9000/acme/acme/directory"],
        "https://ca.internal:9000/acme/acme/directory",
    ),
    (
        "acme_ca_file",
        '"/etc/step/root.pem"',
        ["--acme-ca-file", "/etc/step/root.pem"],
        "/etc/step/root.pem",
    ),
    ("acme_http_port", "8081", ["--acme-http-port", "8081"], 8081),
    ("stun_only", "true", ["-S"], True),
    ("no_stun", "true", ["--no-stun"], True),
    ("no_udp", "true", ["--no-udp"], True),
    ("no_tcp", "true", ["--no-tcp"], True),
    ("no_tls", "true", ["--no-tls"], True),
    ("user_quota", "5", ["--user-quota", "5"], 5),
    ("total_quota", "100", ["--total-quota", "100"], 100),
    ("address_quota", "0", ["--address-quota", "0"], 0),
    ("max_bps", "125000", ["--max-bps", "125000"], 125000),
    ("user_max_bps", "250000", ["--user-max-bps", "250000"], 250000),
    ("bps_capacity", "12500000", ["--bps-capacity", "12500000"], 12500000),
    ("max_allocate_lifetime", "1800", ["--max-allocate-lifetime", "1800"], 1800),
    ("channel_lifetime", "700", ["--channel-lifetime", "700"], 700),
    ("permission_lifetime", "400", ["--permission-lifetime", "400"], 400),
    ("stale_nonce", "60", ["--stale-nonce", "60"], 60),
    ("software_attribute", "true", ["--software-attribute"], True),
    ("strict_channel_numbers", "true", ["--strict-channel-numbers"], True),
    ("stun_backward_compatibility", "true", ["--stun-backward-compatibility"], True),
    ("alt_listening_port", "4000", ["--alt-listening-port", "4000"], 4000),
    (
        "alternate_servers",
        '["192.0.2.1:3478", "[2001:db8::1]:3478"]',
        ["--alternate-server", "192.0.2.1:3478", "--alternate-server", "[2001:db8::1]:3478"],
        (AlternateServer(ip("192.0.2.1"), 3478), AlternateServer(ip("2001:db8::1"), 3478)),
    ),
    (
        "aux_servers",
        '["192.0.2.1:443", "[2001:db8::1]:443", "0.0.0.0:80"]',
        [
            "--aux-server",
            "192.0.2.1:443",
            "--aux-server",
            "[2001:db8::1]:443",
            "--aux-server",
            "0.0.0.0:80",
        ],
        (
            AuxServer(ip("192.0.2.1"), 443),
            AuxServer(ip("2001:db8::1"), 443),
            AuxServer(ip("0.0.0.0"), 80),
        ),
    ),
    ("unauth_rate", "2.5", ["--unauth-rate", "2.5"], 2.5),
    ("max_tcp_connections_per_ip", "16", ["--max-tcp-connections-per-ip", "16"], 16),
    ("max_tcp_connections", "1000", ["--max-tcp-connections", "1000"], 1000),
    ("tcp_allocate_timeout", "5", ["--tcp-allocate-timeout", "5"], 5.0),
    ("drain_timeout", "0", ["--drain-timeout", "0"], 0.0),
    ("log_file", '"/var/log/tsunagu.log"', ["-l", "/var/log/tsunagu.log"], "/var/log/tsunagu.log"),
    ("log_level", '"warning"', ["--log-level", "warning"], "warning"),
    ("log_format", '"json"', ["--log-format", "json"], "json"),
    (
        "audit_file",
        '"/var/log/tsunagu/audit.jsonl"',
        ["--audit-file", "/var/log/tsunagu/audit.jsonl"],
        "/var/log/tsunagu/audit.jsonl",
    ),
    ("verbose", "true", ["-v"], True),
    ("no_turn", "true", ["--no-turn"], True),
    ("no_web", "true", ["--no-web"], True),
    ("web_plain_http", "true", ["--web-plain-http"], True),
    ("web_ip", '"10.1.2.3"', ["--web-ip", "10.1.2.3"], "10.1.2.3"),
    ("web_port", "8443", ["--web-port", "8443"], 8443),
    (
        "public_host",
        '"turn.example.org"',
        ["--public-host", "turn.example.org"],
        "turn.example.org",
    ),
    ("ice_transport_policy", '"relay"', ["--ice-transport-policy", "relay"], "relay"),
    ("room_capacity", "4", ["--room-capacity", "4"], 4),
    ("room_access", '"open"', ["--room-access", "open"], "open"),
    ("room_password", '"s3cret pw"', ["--room-password", "s3cret pw"], "s3cret pw"),
    ("join_secrets", f'["{"j" * 32}"]', ["--join-secret", "j" * 32], ("j" * 32,)),
    ("api_key", f'"{"k" * 40}"', ["--api-key", "k" * 40], "k" * 40),
    (
        "allowed_origins",
        '["https://App.example.org/"]',
        ["--allowed-origin", "https://App.example.org/"],
        ("https://app.example.org",),
    ),
    ("credential_ttl", "3600", ["--credential-ttl", "3600"], 3600),
    ("workers", "2", ["--workers", "2"], 2),
    ("relay_engine", '"python"', ["--relay-engine", "python"], "python"),
    (
        "admin_socket",
        '"/run/tsunagu/admin.sock"',
        ["--admin-socket", "/run/tsunagu/admin.sock"],
        "/run/tsunagu/admin.sock",
    ),
    ("no_admin", "true", ["--no-admin"], True),
    (
        "admin_token_file",
        '"/etc/tsunagu/admin.token"',
        ["--admin-token-file", "/etc/tsunagu/admin.token"],
        "/etc/tsunagu/admin.token",
    ),
    ("prometheus_port", "9641", ["--prometheus-port", "9641"], 9641),
    ("prometheus_ip", '"::1"', ["--prometheus-ip", "::1"], "::1"),
    ("metrics_per_user", "true", ["--metrics-per-user"], True),
]


def test_every_field_is_exercised() -> None:
    # The credential files are read while loading: test_users_and_secrets_from_files.
    files = {"user_file", "static_auth_secret_file"}
    # rfc5780 needs two listening IPs: test_rfc5780_from_file_and_flags; internal_networks
    # an address of the web server inside them: test_internal_networks_from_file_and_flags.
    # admin_port needs admin_token_file: test_admin_port_needs_a_token_file.
    special = {"use_auth_secret", "pkey", "rfc5780", "internal_networks", "admin_port"}
    covered = {row[0] for row in EVERY_FIELD} | special | files
    assert covered == set(CONTRACT_FIELDS)


def test_admin_port_needs_a_token_file(tmp_path: Path) -> None:
    message = config_error(load_config, ["--admin-port", "8091"])
    assert message.startswith("config: admin_token_file: is needed with admin_port")
    path = write_toml(tmp_path, 'admin_port = 8091\nadmin_token_file = "t"\n')
    config = load_config(["-c", path])
    assert (config.admin_port, config.admin_token_file) == (8091, "t")
    flags = load_config(["--admin-port", "8091", "--admin-token-file", "t"])
    assert (flags.admin_port, flags.admin_token_file) == (8091, "t")
    assert Config().admin_port == 0


def test_acme_options_are_checked(tmp_path: Path) -> None:
    flags = [
        "--acme-domain",
        "Turn.Example.org.",
        "--acme-domain",
        "a.example.org, turn.example.org",
    ]
    assert load_config(flags).acme_domains == ("turn.example.org", "a.example.org")
    path = write_toml(tmp_path, 'acme-domains = "turn.example.org"\n')
    assert load_config(["-c", path]).acme_domains == ("turn.example.org",)
    # Another port for the challenge, forwarded from 80: the web app may take 80 itself.
    moved = parse_config({"acme_domains": "t.example.org", "web_port": 80, "acme_http_port": 8081})
    assert (moved.web_port, moved.acme_http_port) == (80, 8081)
    defaults = Config()
    assert defaults.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert (defaults.acme_domains, defaults.acme_http_port) == ((), 80)
    for mapping, expected in [
        ({"acme_domains": ["t.example.org"], "cert": "c.pem"}, "acme_domains: cannot be combined"),
        ({"acme_domains": ["t.example.org"], "pkey": "k.pem"}, "acme_domains: cannot be combined"),
        ({"acme_domains": ["*.example.org"]}, "acme_domains: cannot hold a wildcard"),
        ({"acme_domains": ["192.0.2.1"]}, "acme_domains: must be DNS names, not IP"),
        ({"acme_domains": ["localhost"]}, "acme_domains: each entry must be a fully qualified"),
        ({"acme_domains": ["bad_name.example.org"]}, "acme_domains: each entry must be"),
        ({"acme_domains": [3]}, "acme_domains: must be a list of DNS names"),
        ({"acme_email": "ops"}, "acme_email: must be an e-mail address"),
        ({"acme_email": "ops@localhost"}, "acme_email: must be an e-mail address"),
        ({"acme_directory": "http://ca.example.org/dir"}, "acme_directory: must be an https://"),
        ({"acme_http_port": 0}, "acme_http_port: must be an integer 1-65535"),
        (
            {"acme_domains": ["t.example.org"], "web_port": 80},
            "acme_http_port: is 80, which web_port uses too",
        ),
        (
            {"acme_domains": ["t.example.org"], "aux_servers": ["192.0.2.1:80"]},
            "acme_http_port: is 80, which aux_servers uses too",
        ),
        (
            {"acme_domains": ["t.example.org"], "acme_http_port": 3478},
            "acme_http_port: is 3478, which listening_port uses too",
        ),
    ]:
        message = config_error(parse_config, mapping)
        assert message.startswith(f"config: {expected}"), message


@pytest.mark.parametrize(("name", "toml_value", "flags", "expected"), EVERY_FIELD)
def test_every_field_from_file_and_from_flags(
    tmp_path: Path, name: str, toml_value: str, flags: list[str], expected: Any
) -> None:
    assert getattr(Config(), name) != expected, "pick a non-default value"
    from_file = load_config(["-c", write_toml(tmp_path, f"{name} = {toml_value}\n")])
    from_flags = load_config(flags)
    assert getattr(from_file, name) == expected
    assert getattr(from_flags, name) == expected
    assert from_file == from_flags
    assert type(getattr(from_flags, name)) is type(expected)


def test_auth_secret_and_key_pair_from_file_and_flags(tmp_path: Path) -> None:
    text = 'use-auth-secret = true\nstatic-auth-secrets = ["s"]\ncert = "c.pem"\npkey = "k.pem"\n'
    from_file = load_config(["-c", write_toml(tmp_path, text)])
    from_flags = load_config(
        ["--use-auth-secret", "--static-auth-secret", "s", "--cert", "c.pem", "--pkey", "k.pem"]
    )
    assert from_file == from_flags
    assert from_file.use_auth_secret is True and from_file.pkey == "k.pem"


# --- precedence -----------------------------------------------------------------------------


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'listening-port = 4000\nrealm = "file"\nverbose = true\n'
        'listening_ips = ["127.0.0.1", "::1"]\nworkers = 3\n',
    )
    config = load_config(["-c", path, "-p", "4001", "--no-verbose", "-L", "127.0.0.2"])
    assert config.listening_port == 4001
    assert config.verbose is False
    # A repeatable flag replaces the file's list instead of extending it.
    assert config.listening_ips == (ip("127.0.0.2"),)
    # Untouched keys keep the file's values.
    assert config.realm == "file" and config.workers == 3


def test_file_may_switch_a_default_on_and_a_flag_back_off(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "rest_check_on_refresh = true\n")
    assert load_config(["-c", path]).rest_check_on_refresh is True
    assert load_config(["-c", path, "--no-rest-check-on-refresh"]).rest_check_on_refresh is False


def test_flag_order_is_kept_and_duplicates_dropped() -> None:
    config = load_config(["-L", "::1", "-L", "127.0.0.1", "-L", "0:0::1"])
    assert config.listening_ips == (ip("::1"), ip("127.0.0.1"))


def test_single_string_is_a_one_item_list() -> None:
    assert parse_config({"relay_ips": "192.0.2.1"}).relay_ips == (ip("192.0.2.1"),)


# --- normalisation and helpers --------------------------------------------------------------


def test_addresses_are_normalised() -> None:
    config = parse_config(
        {
            "listening_ips": ["2001:DB8:0:0::1"],
            "denied_peer_ips": ["2001:db8:0::/32", " 10.0.0.1 - 10.0.0.5 ", "192.0.2.9"],
            "public_host": "[2001:db8::7]",
            "web_ip": "2001:DB8::A",
        }
    )
    assert config.listening_ips == (ip("2001:db8::1"),)
    texts = [entry.text for entry in config.denied_peer_ips]
    assert texts == ["2001:db8::/32", "10.0.0.1-10.0.0.5", "192.0.2.9"]
    assert config.public_host == "2001:db8::7"
    assert config.web_ip == "2001:db8::a"


def test_parse_ip_range_forms() -> None:
    a = ipaddress.ip_address
    assert parse_ip_range("10.0.0.0/8") == (a("10.0.0.0"), a("10.255.255.255"))
    assert parse_ip_range("fe80::/10")[1] == a("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    assert parse_ip_range("1.2.3.4") == (a("1.2.3.4"), a("1.2.3.4"))
    assert parse_ip_range("1.2.3.4-1.2.4.0") == (a("1.2.3.4"), a("1.2.4.0"))
    for bad in ["1.2.3.4-::1", "1.2.3.9-1.2.3.1", "10.0.0.1/8", "10.0.0.0/33", "nope", ""]:
        with pytest.raises(ValueError):
            parse_ip_range(bad)


def test_parse_external_ip_and_alternate_server() -> None:
    a = ipaddress.ip_address
    assert parse_external_ip("203.0.113.1") == (a("203.0.113.1"), None)
    assert parse_external_ip("203.0.113.1/10.0.0.1") == (a("203.0.113.1"), a("10.0.0.1"))
    assert parse_alternate_server("[::1]:3478") == (a("::1"), 3478)
    assert parse_alternate_server("192.0.2.1:1") == (a("192.0.2.1"), 1)
    assert parse_user("name:pass:word") == ("name", "pass:word")
    for bad in ["::1:3478", "[192.0.2.1]:3478", "192.0.2.1", "192.0.2.1:0", "[::1]3478"]:
        with pytest.raises(ValueError):
            parse_alternate_server(bad)
    # An aux server may listen on every address of a family; an alternate server must be
    # somewhere a client can go.
    assert parse_aux_server("0.0.0.0:443") == (a("0.0.0.0"), 443)
    assert parse_aux_server("[::]:443") == (a("::"), 443)
    assert AuxServer.parse("[2001:db8::5]:443").text == "[2001:db8::5]:443"
    with pytest.raises(ValueError):
        parse_alternate_server("0.0.0.0:3478")
    for bad in ["::1:443", "[192.0.2.1]:443", "192.0.2.1", "192.0.2.1:65536", "host:443"]:
        with pytest.raises(ValueError):
            parse_aux_server(bad)


# --- rejections -----------------------------------------------------------------------------

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"listening_port": 0}, "listening_port"),
    ({"listening_port": 65536}, "listening_port"),
    ({"listening_port": "3478"}, "listening_port"),
    ({"listening_port": True}, "listening_port"),
    ({"listening_port": 3478.0}, "listening_port"),
    ({"tls_listening_port": -1}, "tls_listening_port"),
    ({"web_port": 70000}, "web_port"),
    ({"min_port": 0}, "min_port"),
    ({"max_port": 70000}, "max_port"),
    ({"min_port": 60000, "max_port": 50000}, "max_port"),
    ({"listening_ips": ["localhost"]}, "listening_ips"),
    ({"listening_ips": ["1.2.3"]}, "listening_ips"),
    ({"listening_ips": [1]}, "listening_ips"),
    ({"listening_ips": {"a": 1}}, "listening_ips"),
    ({"listening_ips": ["0.0.0.0", "127.0.0.1"]}, "listening_ips"),
    ({"relay_ips": ["0.0.0.0"]}, "relay_ips"),
    ({"relay_ips": ["300.1.1.1"]}, "relay_ips"),
    ({"web_ip": "example.org"}, "web_ip"),
    ({"external_ips": ["203.0.113.1/fd00::1"]}, "external_ips"),
    ({"external_ips": ["203.0.113.1/"]}, "external_ips"),
    ({"external_ips": ["0.0.0.0"]}, "external_ips"),
    ({"external_ips": ["host.example"]}, "external_ips"),
    ({"allowed_peer_ips": ["10.0.0.1/8"]}, "allowed_peer_ips"),
    ({"denied_peer_ips": ["10.0.0.9-10.0.0.1"]}, "denied_peer_ips"),
    ({"denied_peer_ips": ["10.0.0.1-::1"]}, "denied_peer_ips"),
    ({"denied_peer_ips": ["10.0.0.0/40"]}, "denied_peer_ips"),
    ({"alternate_servers": ["192.0.2.1"]}, "alternate_servers"),
    ({"alternate_servers": ["2001:db8::1:3478"]}, "alternate_servers"),
    ({"aux_servers": ["192.0.2.1"]}, "aux_servers"),
    ({"aux_servers": ["192.0.2.1:0"]}, "aux_servers"),
    # On a main listening address already (every address listens by default).
    ({"aux_servers": ["192.0.2.1:3478"]}, "aux_servers"),
    ({"aux_servers": ["[::]:5349"], "listening_ips": ["::1"]}, "aux_servers"),
    ({"aux_servers": ["0.0.0.0:443", "192.0.2.1:443"]}, "aux_servers"),
    ({"ice_transport_policy": "public"}, "ice_transport_policy"),
    ({"ice_transport_policy": "RELAY"}, "ice_transport_policy"),
    ({"max_allocate_lifetime": 0}, "max_allocate_lifetime"),
    ({"max_bps": -1}, "max_bps"),
    ({"max_bps": 2**32}, "max_bps"),
    ({"user_max_bps": 1.5}, "user_max_bps"),
    ({"bps_capacity": "1M"}, "bps_capacity"),
    ({"channel_lifetime": -5}, "channel_lifetime"),
    ({"permission_lifetime": 0}, "permission_lifetime"),
    ({"stale_nonce": 0}, "stale_nonce"),
    ({"credential_ttl": 0}, "credential_ttl"),
    ({"workers": -1}, "workers"),
    ({"relay_engine": "rust"}, "relay_engine"),
    ({"room_capacity": 0}, "room_capacity"),
    ({"user_quota": -1}, "user_quota"),
    ({"total_quota": "lots"}, "total_quota"),
    ({"address_quota": -2}, "address_quota"),
    ({"unauth_rate": 0}, "unauth_rate"),
    ({"unauth_rate": float("inf")}, "unauth_rate"),
    ({"drain_timeout": -1.0}, "drain_timeout"),
    ({"drain_timeout": float("nan")}, "drain_timeout"),
    ({"verbose": "yes"}, "verbose"),
    ({"log_level": "trace"}, "log_level"),
    ({"log_level": "INFO"}, "log_level"),
    ({"log_format": "xml"}, "log_format"),
    ({"verbose": 1}, "verbose"),
    ({"realm": ""}, "realm"),
    ({"realm": "x" * 128}, "realm"),
    ({"realm": "a\nb"}, "realm"),
    ({"users": ["nopassword"]}, "users"),
    ({"users": [":pw"]}, "users"),
    ({"users": ["alice:a", "alice:b"]}, "users"),
    ({"static_auth_secrets": [""]}, "static_auth_secrets"),
    ({"use_auth_secret": True}, "static_auth_secrets"),
    ({"pkey": "key.pem"}, "pkey"),
    ({"cert": ""}, "cert"),
    ({"log_file": 3}, "log_file"),
    ({"public_host": "bad host"}, "public_host"),
    ({"public_host": "-x.example"}, "public_host"),
    ({"stun_only": True, "no_stun": True}, "no_stun"),
    ({"no_udp": True, "no_tcp": True, "no_tls": True}, "no_tls"),
    ({"no_turn": True, "no_web": True}, "no_web"),
    ({"alt_listening_port": -1}, "alt_listening_port"),
    ({"alt_listening_port": 65536}, "alt_listening_port"),
    ({"rfc5780": True}, "rfc5780"),
    ({"rfc5780": True, "listening_ips": ["127.0.0.1", "::1"]}, "rfc5780"),
    ({"rfc5780": True, "listening_ips": ["0.0.0.0"]}, "rfc5780"),
    ({"rfc5780": True, "listening_ips": [A1, A2], "no_udp": True}, "rfc5780"),
    ({"rfc5780": True, "listening_ips": [A1, A2], "no_stun": True}, "rfc5780"),
    ({"rfc5780": True, "listening_ips": [A1, A2], "no_turn": True}, "rfc5780"),
    (
        {"rfc5780": True, "listening_ips": [A1, A2], "alt_listening_port": 3478},
        "alt_listening_port",
    ),
    (
        {"rfc5780": True, "listening_ips": [A1, A2], "alt_listening_port": 5349},
        "alt_listening_port",
    ),
    ({"rfc5780": True, "listening_ips": [A1, A2], "listening_port": 65535}, "alt_listening_port"),
    ({"rfc5780": True, "listening_ips": [A1, A2], "external_ips": ["203.0.113.1"]}, "external_ips"),
    (
        {
            "rfc5780": True,
            "listening_ips": [A1, A2],
            "external_ips": ["203.0.113.1/192.0.2.1", "203.0.113.1/192.0.2.2"],
        },
        "external_ips",
    ),
]


@pytest.mark.parametrize(("mapping", "key"), BAD_VALUES)
def test_bad_values_name_the_key(mapping: dict[str, Any], key: str) -> None:
    message = config_error(parse_config, mapping)
    assert message.startswith(f"config: {key}: "), message


def test_message_says_what_is_allowed_and_what_was_given() -> None:
    message = config_error(parse_config, {"max_port": 70000})
    assert message == "config: max_port: must be an integer 1-65535, got 70000"
    message = config_error(parse_config, {"min_port": 60000, "max_port": 50000})
    assert (
        message == "config: max_port: must be an integer 1-65535 and >= min_port (60000), got 50000"
    )


def test_cidr_with_host_bits_suggests_the_network() -> None:
    message = config_error(parse_config, {"denied_peer_ips": ["10.0.0.1/8"]})
    assert "10.0.0.0/8" in message


def test_transport_switches_that_leave_something_running_are_fine() -> None:
    assert (
        parse_config({"no_udp": True, "no_tcp": True, "no_tls": True, "no_turn": True}).no_web
        is False
    )
    assert parse_config({"stun_only": True, "no_udp": True}).stun_only is True


def test_aux_servers_beside_the_main_listeners() -> None:
    # Another address on the main port, or the main port's address family-wise elsewhere.
    config = parse_config({"listening_ips": ["192.0.2.1"], "aux_servers": ["192.0.2.2:3478"]})
    assert config.aux_servers == (AuxServer(ip("192.0.2.2"), 3478),)
    config = parse_config({"listening_ips": ["::1"], "aux_servers": ["0.0.0.0:5349"]})
    assert config.aux_servers == (AuxServer(ip("0.0.0.0"), 5349),)
    # Without TLS the TLS port is free for an aux server; the same address on two ports too.
    config = parse_config({"no_tls": True, "aux_servers": ["192.0.2.1:5349", "192.0.2.1:443"]})
    assert [aux.port for aux in config.aux_servers] == [5349, 443]
    message = config_error(parse_config, {"aux_servers": ["127.0.0.1:3478"]})
    assert "127.0.0.1:3478 is already a main listening address" in message, message
    # A worker process reads the aux servers back from JSON.
    given = parse_config({"aux_servers": ["[2001:db8::1]:443", "0.0.0.0:443"]})
    assert config_from_json(config_to_json(given)) == given


def test_wildcards_of_both_families_together_are_fine() -> None:
    config = parse_config({"listening_ips": ["0.0.0.0", "::"]})
    assert config.listening_ips == (ip("0.0.0.0"), ip("::"))
    config = parse_config({"listening_ips": ["0.0.0.0", "::1"]})
    assert config.listening_ips == (ip("0.0.0.0"), ip("::1"))


@pytest.mark.parametrize(
    "mapping",
    [
        {"users": ["alice"]},
        {"users": ["alice:s3cr3t-pass", "alice:s3cr3t-pass2"]},
        {"static_auth_secrets": ["s3cr3t-pass", 7]},
        {"users": "s3cr3t-pass\n"},
    ],
)
def test_secrets_never_appear_in_errors(mapping: dict[str, Any]) -> None:
    message = config_error(parse_config, mapping)
    assert "s3cr3t" not in message


def test_secrets_never_appear_in_repr() -> None:
    config = parse_config(
        {"users": ["alice:s3cr3t-a"], "static_auth_secrets": ["s3cr3t-b"], "use_auth_secret": True}
    )
    text = repr(config)
    assert "s3cr3t" not in text
    assert "users=<1 redacted>" in text and "realm='tsunagu'" in text


def test_unknown_key_lists_close_matches() -> None:
    message = config_error(parse_config, {"max-prot": 5})
    assert message.startswith("config: max-prot: unknown key")
    assert "max_port" in message
    assert config_error(parse_config, {"zzzz": 1}) == "config: zzzz: unknown key"


def test_key_given_with_dashes_and_underscores_is_rejected() -> None:
    message = config_error(parse_config, {"min-port": 50000, "min_port": 50001})
    assert message.startswith("config: min_port:")


def test_unknown_key_in_file(tmp_path: Path) -> None:
    message = config_error(load_config, ["-c", write_toml(tmp_path, "listening-ip = ['::1']\n")])
    assert "listening-ip: unknown key" in message and "listening_ips" in message


def test_table_in_file_is_rejected(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nrealm = 'x'\n")
    assert config_error(load_config, ["-c", path]).startswith("config: server: unknown key")
    path = write_toml(tmp_path, "[realm]\nname = 'x'\n")
    assert config_error(load_config, ["-c", path]).startswith("config: realm: must be")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    message = config_error(load_config, ["-c", missing])
    assert missing in message and "cannot read" in message
    message = config_error(load_config, ["-c", write_toml(tmp_path, "realm = \n")])
    assert "invalid TOML" in message
    message = config_error(
        load_config, ["-c", write_toml(tmp_path, "min_port = 1\nmin_port = 2\n")]
    )
    assert "invalid TOML" in message


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-p"], "--listening-port"),
        (["--listening"], "unrecognized arguments"),  # no abbreviations
        (["--no-no-stun"], "unrecognized arguments"),
        (["--max-port", "many"], "config: max_port: must be an integer 1-65535, got 'many'"),
        (["--unauth-rate", "fast"], "config: unauth_rate: must be a number > 0, got 'fast'"),
        (["--unauth-rate", "nan"], "config: unauth_rate:"),
        (["-p", "0x10"], "config: listening_port:"),
    ],
)
def test_bad_flags_raise_config_error(argv: list[str], needle: str) -> None:
    assert needle in config_error(load_config, argv)


def test_help_lists_every_field_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flags = {
        "listening_ips": "--listening-ip",
        "relay_ips": "--relay-ip",
        "external_ips": "--external-ip",
        "users": "--user",
        "static_auth_secrets": "--static-auth-secret",
        "allowed_peer_ips": "--allowed-peer-ip",
        "denied_peer_ips": "--denied-peer-ip",
        "internal_networks": "--internal-network",
        "alternate_servers": "--alternate-server",
        "aux_servers": "--aux-server",
        "join_secrets": "--join-secret",
        "allowed_origins": "--allowed-origin",
        "acme_domains": "--acme-domain",
    }
    for name in CONTRACT_FIELDS:
        flag = flags.get(name, "--" + name.replace("_", "-"))
        assert re.search(rf"{re.escape(flag)}\b", out), flag


def test_parser_only_reports_given_options() -> None:
    args = build_parser().parse_args(["-p", "1"])
    assert vars(args) == {"config": None, "listening_port": "1"}


def test_readme_toml_example_is_valid(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md should show a TOML example"
    for block in blocks:
        parse_config(tomllib.loads(block))


# --- typed values and the worker hand-over ----------------------------------------------------


def test_list_entries_are_typed_once() -> None:
    config = parse_config(
        {
            "external_ips": ["203.0.113.1", "2001:db8::1/fd00::1"],
            "alternate_servers": ["[2001:db8::2]:3479"],
            "users": ["alice:pa:ss"],
        }
    )
    first, second = config.external_ips
    assert (first.public, first.private) == (ip("203.0.113.1"), None)
    assert (second.public, second.private) == (ip("2001:db8::1"), ip("fd00::1"))
    assert [entry.text for entry in config.external_ips] == ["203.0.113.1", "2001:db8::1/fd00::1"]
    [alternate] = config.alternate_servers
    assert (alternate.ip, alternate.port, alternate.text) == (
        ip("2001:db8::2"),
        3479,
        "[2001:db8::2]:3479",
    )
    [user] = config.users
    assert (user.name, user.password) == ("alice", "pa:ss")
    assert "pa:ss" not in repr(user)


def every_field_set() -> Config:
    mapping: dict[str, Any] = {}
    for name, toml_value, _, _ in EVERY_FIELD:
        mapping.update(tomllib.loads(f"{name} = {toml_value}\n"))
    # Every field off its default, but for the switches that would leave nothing to run.
    mapping.update(use_auth_secret=True, pkey="k.pem", stun_only=False, no_tls=False, no_web=False)
    # One user database at a time: the SQLite file stands for the three here.
    mapping.pop("psql_userdb")
    mapping.pop("redis_userdb")
    # The certificate comes from cert and pkey or from ACME, not both.
    mapping.pop("acme_domains")
    return parse_config(mapping)


def test_one_user_database_and_its_password_never_shown() -> None:
    psql = "host=db dbname=turn user=turn password=hunter2"
    for mapping in (
        {"userdb": "users.db", "psql_userdb": psql},
        {"psql_userdb": psql, "redis_userdb": "ip=db password=hunter2"},
        {"redis_userdb": "hunter2"},
        {"psql_userdb": "hunter2\x01"},
    ):
        message = config_error(parse_config, mapping)
        assert "hunter2" not in message and "userdb" in message, message
    assert "one user database" in config_error(parse_config, {"userdb": "u", "redis_userdb": "x=y"})
    assert "hunter2" not in repr(parse_config({"psql_userdb": psql}))


def test_room_access_defaults_to_tokens_where_the_internet_may_reach_the_page() -> None:
    assert Config().effective_room_access == "open"  # 127.0.0.1
    for private in ("10.0.0.7", "192.168.1.2", "::1", "fd00::5"):
        assert parse_config({"web_ip": private}).effective_room_access == "open", private
    for public in ("0.0.0.0", "::", "93.184.216.34", "2a00:1450:4001::5"):
        message = config_error(parse_config, {"web_ip": public})
        assert "room_access: must be chosen" in message and "tsunagu token" in message, message
        with_secret = parse_config({"web_ip": public, "join_secrets": ["s" * 32]})
        assert with_secret.effective_room_access == "token"
        assert parse_config({"web_ip": public, "room_access": "open"}).effective_room_access == (
            "open"
        )
    assert "room_password: is needed" in config_error(parse_config, {"room_access": "password"})
    assert "join_secrets: at least one" in config_error(parse_config, {"room_access": "token"})
    short = config_error(parse_config, {"api_key": "short"})
    assert "at least 32 characters" in short and "short" not in short.split(":", 2)[2][30:]
    assert "origin" in config_error(parse_config, {"allowed_origins": ["evil.example"]})


def test_a_config_survives_the_json_hand_over_to_workers() -> None:
    import json

    databases = [
        parse_config({"psql_userdb": "host=db dbname=turn user=turn password='a b'"}),
        parse_config({"redis_userdb": "ip=127.0.0.1 dbname=2 password=pw"}),
    ]
    for config in (Config(), every_field_set(), *databases):
        sent = json.dumps(config_to_json(config))
        assert config_from_json(json.loads(sent)) == config
    assert config_to_json(every_field_set())["users"] == ["alice:pw1", "bob:p:w"]


# --- quotas and credentials kept out of the process list -----------------------------------


def test_quotas_default_to_derived_values() -> None:
    config = Config()
    assert (config.user_quota, config.address_quota, config.total_quota) == (None, None, None)
    assert config_from_json(config_to_json(config)).user_quota is None
    assert load_config(["--user-quota", "0"]).user_quota == 0  # unlimited, explicitly


def test_users_and_secrets_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSUNAGU_USERS", raising=False)
    monkeypatch.delenv("TSUNAGU_STATIC_AUTH_SECRET", raising=False)
    users = tmp_path / "users"
    users.write_text("# operators\nalice:pw:with:colons\n\n  bob:b0b  \n", encoding="utf-8")
    secrets = tmp_path / "secrets"
    secrets.write_text("# current first\nnew-secret\nold-secret\n", encoding="utf-8")
    config = load_config(
        ["-u", "carol:c", "--user-file", str(users), "--static-auth-secret-file", str(secrets)]
    )
    assert [(u.name, u.password) for u in config.users] == [
        ("carol", "c"),
        ("alice", "pw:with:colons"),
        ("bob", "b0b"),
    ]
    assert config.static_auth_secrets == ("new-secret", "old-secret")
    # Worker processes get the merged lists and do not read the files again.
    users.unlink()
    again = config_from_json(config_to_json(config))
    assert again.users == config.users and again.static_auth_secrets == config.static_auth_secrets
    # From a TOML file too.
    users.write_text("dave:d\n", encoding="utf-8")
    toml = write_toml(tmp_path, f'user_file = "{users}"\n')
    assert [u.name for u in load_config(["-c", toml]).users] == ["dave"]


def test_users_and_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_USERS", "alice:a, bob:b\ncarol:c")
    monkeypatch.setenv("TSUNAGU_STATIC_AUTH_SECRET", "from-env")
    config = load_config([])
    assert [u.name for u in config.users] == ["alice", "bob", "carol"]
    assert config.static_auth_secrets == ("from-env",)
    # A secret given otherwise wins over the environment's.
    assert load_config(["--static-auth-secret", "flag"]).static_auth_secrets == ("flag",)
    assert "users=<3 redacted>" in repr(config)


def test_credential_file_errors_name_the_key_and_not_the_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TSUNAGU_USERS", raising=False)
    message = config_error(load_config, ["--user-file", str(tmp_path / "missing")])
    assert message.startswith("config: user_file: ") and "cannot read" in message
    bad = tmp_path / "users"
    bad.write_text("no-password-here\n", encoding="utf-8")
    message = config_error(load_config, ["--user-file", str(bad)])
    assert message.startswith("config: users: ") and "no-password-here" not in message


@pytest.mark.parametrize(
    ("args", "level"),
    [
        ([], "info"),
        (["-v"], "debug"),
        (["--log-level", "warning"], "warning"),
        (["--log-level", "error", "-v"], "debug"),  # -v is --log-level debug, and wins
        (["-v", "--no-verbose", "--log-level", "error"], "error"),
    ],
)
def test_the_effective_log_level(args: list[str], level: str) -> None:
    assert load_config(args).effective_log_level == level


# --- NAT behaviour discovery ------------------------------------------------------------------


def test_rfc5780_from_file_and_flags(tmp_path: Path) -> None:
    text = f'rfc5780 = true\nlistening_ips = ["{A1}", "::1", "{A2}", "::2", "192.0.2.3"]\n'
    from_file = load_config(["-c", write_toml(tmp_path, text)])
    flags = ["--rfc5780", "-L", A1, "-L", "::1", "-L", A2, "-L", "::2", "-L", "192.0.2.3"]
    assert load_config(flags) == from_file
    assert from_file.rfc5780 is True
    # The first two of each family, in the order given.
    assert from_file.rfc5780_pairs == ((A1, A2), ("::1", "::2"))
    assert from_file.alternate_port == 3479


def test_rfc5780_is_off_by_default_and_coturns_old_switch_is_understood() -> None:
    config = load_config(["-L", A1, "-L", A2])
    assert config.rfc5780 is False and config.rfc5780_pairs == ()
    assert load_config(["--no-rfc5780"]) == Config()


def test_alternate_port() -> None:
    assert parse_config({"listening_port": 4000}).alternate_port == 4001
    assert parse_config({"alt_listening_port": 4444}).alternate_port == 4444
    # Without rfc5780 nothing listens there: no check against the other ports.
    assert parse_config({"listening_port": 65535}).listening_port == 65535


def test_rfc5780_behind_a_nat_maps_both_addresses() -> None:
    config = parse_config(
        {
            "rfc5780": True,
            "listening_ips": [A1, A2],
            "external_ips": ["203.0.113.1/192.0.2.1", "203.0.113.2/192.0.2.2", "2001:db8::9"],
        }
    )
    assert config.rfc5780_pairs == ((A1, A2),)


# --- internal networks ------------------------------------------------------------------------

INTERNAL = {"internal_networks": ["10.80.0.0/24", "fd00:80::/64"], "web_ip": "10.80.0.4"}


def test_internal_networks_from_file_and_flags(tmp_path: Path) -> None:
    expected = (ipaddress.ip_network("10.80.0.0/24"), ipaddress.ip_network("fd00:80::/64"))
    assert Config().internal_networks == ()
    text = 'internal-networks = ["10.80.0.0/24", "fd00:80::/64"]\nweb-ip = "10.80.0.4"\n'
    from_file = load_config(["-c", write_toml(tmp_path, text)])
    assert from_file.internal_networks == expected
    flags = ["--internal-network", "10.80.0.0/24", "--internal-network", "fd00:80::/64"]
    from_flags = load_config([*flags, "--web-ip", "10.80.0.4"])
    assert from_flags == from_file
    # The command line's list replaces the file's.
    narrower = load_config(["-c", write_toml(tmp_path, text), "--internal-network", "10.80.0.0/16"])
    assert narrower.internal_networks == (ipaddress.ip_network("10.80.0.0/16"),)
    # A single address is a network of one; worker processes read back what they were given.
    one = parse_config({**INTERNAL, "internal_networks": ["10.80.0.4"]})
    assert one.internal_networks == (ipaddress.ip_network("10.80.0.4/32"),)
    assert config_from_json(config_to_json(from_file)) == from_file
    assert config_to_json(from_file)["internal_networks"] == ["10.80.0.0/24", "fd00:80::/64"]


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("10.80.0.1/24", "did you mean 10.80.0.0/24"),
        ("0.0.0.0/0", "every address"),
        ("::/0", "every address"),
        ("10.80.0.0-10.80.0.9", "CIDR network"),
        ("office", "CIDR network"),
        ("10.80.0.0/33", "CIDR network"),
    ],
)
def test_internal_networks_refuse_what_is_not_a_network(entry: str, words: str) -> None:
    message = config_error(parse_config, {**INTERNAL, "internal_networks": [entry]})
    assert message.startswith("config: internal_networks: "), message
    assert words in message, message


@pytest.mark.parametrize(
    ("extra", "key", "address"),
    [
        ({"listening_ips": ["10.80.0.4", "192.0.2.4"]}, "listening_ips", "192.0.2.4"),
        ({"relay_ips": ["10.81.0.4"]}, "relay_ips", "10.81.0.4"),
        ({"aux_servers": ["192.0.2.4:443"]}, "aux_servers", "192.0.2.4"),
        ({"external_ips": ["203.0.113.4/10.80.0.4"]}, "external_ips", "203.0.113.4"),
        ({"external_ips": ["10.80.0.9/10.79.0.4"]}, "external_ips", "10.79.0.4"),
        ({"web_ip": "127.0.0.1"}, "web_ip", "127.0.0.1"),
        ({"listening_ips": ["fd00:81::4"]}, "listening_ips", "fd00:81::4"),
    ],
)
def test_internal_networks_refuse_a_server_address_outside_them(
    extra: dict[str, Any], key: str, address: str
) -> None:
    message = config_error(parse_config, {**INTERNAL, **extra})
    assert message.startswith(f"config: {key}: {address} lies outside internal_networks"), message
    assert "(10.80.0.0/24, fd00:80::/64)" in message, message


def test_internal_networks_take_wildcards_and_addresses_inside_them() -> None:
    config = parse_config(
        {
            **INTERNAL,
            "listening_ips": ["0.0.0.0", "fd00:80::4"],
            "relay_ips": ["10.80.0.4"],
            "aux_servers": ["[::]:443"],
            "external_ips": ["10.80.0.9/10.80.0.4"],
        }
    )
    assert config.relay_ips == (ip("10.80.0.4"),)
    # The web server on every address: who connects from outside cannot join (signaling).
    wildcard = {**INTERNAL, "web_ip": "0.0.0.0", "room_access": "open"}
    assert parse_config(wildcard).web_ip == "0.0.0.0"
    # Without the web server its address does not matter.
    assert parse_config({**INTERNAL, "web_ip": "127.0.0.1", "no_web": True}).no_web


def test_the_web_ip_outside_explains_the_reverse_proxy() -> None:
    message = config_error(parse_config, {**INTERNAL, "web_ip": "127.0.0.1"})
    assert "reverse proxy" in message, message


@pytest.mark.parametrize(
    "entry",
    ["8.8.8.8", "10.80.1.0/24", "10.80.0.0/23", "10.79.255.255-10.80.0.5", "fd00:81::1"],
)
def test_allowed_peer_ips_outside_internal_networks_are_refused(entry: str) -> None:
    message = config_error(parse_config, {**INTERNAL, "allowed_peer_ips": [entry]})
    assert message.startswith("config: allowed_peer_ips: "), message
    assert "lies outside internal_networks (10.80.0.0/24, fd00:80::/64)" in message, message
    assert "could never apply" in message, message


def test_allowed_peer_ips_inside_internal_networks_are_taken() -> None:
    entries = ["10.80.0.4", "10.80.0.16/28", "fd00:80::1-fd00:80::9"]
    config = parse_config({**INTERNAL, "allowed_peer_ips": entries})
    assert [entry.text for entry in config.allowed_peer_ips] == entries
    # A range across two adjacent internal networks lies inside them.
    two = {"internal_networks": ["10.80.0.0/24", "10.80.1.0/24"], "web_ip": "10.80.0.4"}
    assert parse_config({**two, "allowed_peer_ips": ["10.80.0.200-10.80.1.20"]})
