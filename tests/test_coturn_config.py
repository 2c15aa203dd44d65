"""coturn's configuration format: the reader (pure) and ``tsunagu serve -c turnserver.conf``.

The files read are the example the Debian coturn package ships (as it is: all but a few
lines commented out; and with its typical lines uncommented) and the machine's own
/etc/turnserver.conf, when they exist.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from tsunagu.cli import main
from tsunagu.config import ConfigError, ExternalIp, PeerRange, StaticUser, load_config
from tsunagu.coturn_config import (
    CoturnConfigError,
    Option,
    has_toml_constructs,
    read_coturn_config,
    reads_as_coturn,
)

Captured = pytest.CaptureFixture[str]

DEBIAN_EXAMPLE = Path("/usr/share/doc/coturn/examples/etc/turnserver.conf")
ETC = Path("/etc/turnserver.conf")

OPTIONS = {
    "listening-ip": Option("listening_ips", "list"),
    "listening-port": Option("listening_port", "value"),
    "realm": Option("realm", "value"),
    "user": Option("users", "list"),
    "verbose": Option("verbose", "flag"),
    "rfc5780": Option("rfc5780", "flag"),
    "no-tls": Option("no_tls", "flag"),
    "stun-only": Option("stun_only", "flag"),
    "stale-nonce": Option("stale_nonce", "value"),
    "use-auth-secret": Option("use_auth_secret", "flag"),
    "static-auth-secret": Option("static_auth_secrets", "list"),
    "strict-channel-numbers": Option("strict_channel_numbers", "flag"),
    "stun-backward-compatibility": Option("stun_backward_compatibility", "flag"),
}


def read(text: str, options: dict[str, Option] | None = None) -> dict[str, str | bool | list[str]]:
    return read_coturn_config(text, OPTIONS if options is None else options).values


def ignored(text: str) -> tuple[str, ...]:
    return read_coturn_config(text, OPTIONS).ignored


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("config: warning:")]


def write(tmp_path: Path, text: str, name: str = "turnserver.conf") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- the line format ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "realm=example.org",
        "realm = example.org",
        "realm example.org",
        "realm\texample.org",
        "  realm=example.org   ",
        'realm="example.org"',
        'realm = "example.org"  ',
        "realm==example.org",
    ],
)
def test_name_and_value_as_coturn_splits_them(line: str) -> None:
    assert read(line + "\n") == {"realm": "example.org"}


def test_comments_and_blank_lines_are_skipped_but_a_later_hash_is_part_of_the_value() -> None:
    text = "# a comment\n\n   # indented comment\nrealm=a#b\n"
    assert read(text) == {"realm": "a#b"}


def test_a_bare_switch_is_on_and_coturn_values_turn_it_on_or_off() -> None:
    assert read("verbose\n") == {"verbose": True}
    for on in ("1", "yes", "true", "on", "On", "t", "Y"):
        assert read(f"verbose={on}\n") == {"verbose": True}, on
    for off in ("0", "no", "false", "off", "OFF", "f", "N"):
        assert read(f"verbose={off}\n") == {"verbose": False}, off


def test_a_bad_switch_value_is_an_error_with_its_line_and_without_the_value() -> None:
    with pytest.raises(CoturnConfigError) as caught:
        read("realm=x\nuse-auth-secret=hunter2-as-secret\n")
    assert caught.value.line == 2 and caught.value.name == "use-auth-secret"
    assert "hunter2" not in str(caught.value)


def test_list_options_accumulate_and_others_keep_the_last_value() -> None:
    text = "listening-ip=127.0.0.1\nrealm=a\nlistening-ip=::1\nrealm=b\n"
    assert read(text) == {"listening_ips": ["127.0.0.1", "::1"], "realm": "b"}


def test_dashes_and_underscores_are_the_same_but_case_matters() -> None:
    assert read("listening_port=1\n") == {"listening_port": "1"}
    assert ignored("Realm=x\n") == ("Realm",)


def test_renamed_and_inverted_options() -> None:
    assert read("Verbose\n") == {"verbose": True}
    assert read("no-rfc5780\n") == {"rfc5780": False}
    assert read("no-rfc5780=0\n") == {"rfc5780": True}
    assert read("rfc5766-channel-numbers\n") == {"strict_channel_numbers": False}
    assert read("rfc5766-channel-numbers=off\n") == {"strict_channel_numbers": True}
    assert read("rfc3489-compatibility\n") == {"stun_backward_compatibility": True}
    assert read("no-stun-backward-compatibility\n") == {"stun_backward_compatibility": False}
    # A "no-" switch of tsunagu's own is not inverted into nothing.
    assert ignored("no-no-tls\n") == ("no-no-tls",)


def test_what_tsunagu_always_does_is_accepted_silently_and_its_opposite_is_ignored() -> None:
    text = "lt-cred-mech\nfingerprint\nno-multicast-peers\nresponse-origin-only-with-rfc5780\n"
    assert read(text) == {} and ignored(text) == ()
    assert ignored("fingerprint=0\nlt-cred-mech=no\n") == ("fingerprint", "lt-cred-mech")


def test_every_ignored_name_is_listed_once_in_file_order() -> None:
    text = "no-cli\ncli-password=qwerty\nno-dtls\nno-cli\ncli-password=other\nsyslog\n"
    assert ignored(text) == ("no-cli", "cli-password", "no-dtls", "syslog")


def test_a_value_option_needs_its_value_unless_coturn_defaults_it() -> None:
    with pytest.raises(CoturnConfigError, match="realm: needs a value") as caught:
        read("\nrealm\n")
    assert caught.value.line == 2
    assert read("stale-nonce\n") == {}
    assert read("stale-nonce=300\n") == {"stale_nonce": "300"}


def test_no_auth_is_refused_unless_stun_only() -> None:
    with pytest.raises(CoturnConfigError, match="no-auth: tsunagu always authenticates") as err:
        read("realm=x\nno-auth\n")
    assert err.value.line == 2
    assert read("no-auth\nstun-only\n") == {"stun_only": True}
    assert read("no-auth=false\n") == {}


def test_a_static_auth_secret_means_rest_credentials_only_as_in_coturn() -> None:
    assert read("static-auth-secret=s3cret\n") == {
        "static_auth_secrets": ["s3cret"],
        "use_auth_secret": True,
    }


def test_a_user_given_as_a_key_is_left_out_with_a_note_naming_only_the_user() -> None:
    key = "0xbc807ee29df3c9ffa736523fb2c4e8ee"
    result = read_coturn_config(f"user=ninefingers:{key}\nuser=bob:pw\n", OPTIONS)
    assert result.values == {"users": ["bob:pw"]}
    assert len(result.notes) == 1 and "ninefingers" in result.notes[0]
    assert key not in result.notes[0]


def test_a_line_that_is_no_option_is_left_out_without_echoing_it() -> None:
    result = read_coturn_config("realm=x\n:my-password\n", OPTIONS)
    assert result.values == {"realm": "x"}
    assert result.notes == ("line 2 is not an option line and was left out",)


def test_options_tsunagu_gains_map_by_name_with_coturn_aliases() -> None:
    text = "userdb=/var/db/turndb\npsql-userdb=host=x\n"
    assert ignored(text) == ("userdb", "psql-userdb")
    options = {
        **OPTIONS,
        "userdb": Option("userdb", "value"),
        "psql-userdb": Option("psql_userdb", "value"),
    }
    assert read(text, options) == {"userdb": "/var/db/turndb", "psql_userdb": "host=x"}
    assert read("db=/var/db/turndb\nsql-userdb=host=y\n", options) == {
        "userdb": "/var/db/turndb",
        "psql_userdb": "host=y",
    }


def test_coturns_prometheus_switch_turns_the_exporter_on_at_its_port() -> None:
    options = {
        **OPTIONS,
        "prometheus-port": Option("prometheus_port", "value"),
        "prometheus-ip": Option("prometheus_ip", "value"),
    }
    config = read_coturn_config("prometheus\n", options)
    assert [(s.key, s.value) for s in config.settings] == [("prometheus_port", "9641")]
    assert "on loopback" in config.notes[0] and "prometheus-address" in config.notes[0]
    text = "prometheus\nprometheus-port=9100\nprometheus-address=0.0.0.0\n"
    assert read(text, options) == {"prometheus_port": "9100", "prometheus_ip": "0.0.0.0"}
    assert read_coturn_config(text, options).notes == ()
    assert read("prometheus=0\n", options) == {}


def test_log_file_stdout_keeps_standard_error_and_syslog_is_ignored() -> None:
    options = {**OPTIONS, "log-file": Option("log_file", "value")}
    assert read_coturn_config("log-file=stdout\nlog-file=-\n", options).values == {}
    result = read_coturn_config("log-file=syslog\n", options)
    assert result.values == {} and result.ignored == ("log-file (syslog)",)
    assert read("log-file=/var/log/turn.log\n", options) == {"log_file": "/var/log/turn.log"}


def test_what_reads_as_coturn_and_what_only_toml_writes() -> None:
    coturn = "# c\nlt-cred-mech\nrealm=example.org\naux-server=[::1]:3479\n"
    assert reads_as_coturn(coturn) and not has_toml_constructs(coturn)
    for toml in (
        "[web]\nport = 1\n",
        'listening-ips = ["127.0.0.1"]\n',
        'aux-servers = ["[::1]:3479"]\n',
        "listening-ips = [\n",
        "x = { a = 1 }\n",
    ):
        assert not reads_as_coturn(toml) and has_toml_constructs(toml), toml
    # Neither: coturn's reader leaves such a line out, and TOML has no bare names.
    odd = "realm=x\n--verbose\n"
    assert not reads_as_coturn(odd) and not has_toml_constructs(odd)
    assert not reads_as_coturn('"quoted key" = 1\n')


# --- tsunagu serve -c turnserver.conf -------------------------------------------------------


def test_values_are_checked_like_any_other_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "realm=x\n\nmax-port=70000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(["-c", path])
    assert str(caught.value) == (
        f"config: {path}:3: max-port: must be an integer 1-65535, got 70000"
    )
    path = write(tmp_path, "listening-ip=127.0.0.1\nlistening-ip=nowhere\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(path)}:2: listening-ip: "):
        load_config(["-c", path])


def test_a_rule_over_several_options_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "min-port=50000\nmax-port=40000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(["-c", path])
    assert str(caught.value).startswith(f"config: {path}:2: max-port: must be")


def test_secrets_are_never_printed(tmp_path: Path, capsys: Captured) -> None:
    path = write(tmp_path, "user=alice\ncli-password=qwerty-secret\n")
    with pytest.raises(ConfigError) as caught:
        load_config(["-c", path])
    assert str(caught.value).startswith(f"config: {path}:1: user: ")
    assert "alice" not in str(caught.value)
    path = write(tmp_path, "static-auth-secret=north-secret\ncli-password=qwerty-secret\nno-cli\n")
    config = load_config(["-c", path])
    assert config.static_auth_secrets == ("north-secret",) and config.use_auth_secret
    err = capsys.readouterr().err
    assert "cli-password" in err and "qwerty" not in err and "north" not in err


def test_flags_win_over_the_file(tmp_path: Path, capsys: Captured) -> None:
    path = write(tmp_path, "listening-port=4000\nrealm=file.example\nverbose\nlisting-ip=1\n")
    config = load_config(["-c", path, "-p", "4001", "--no-verbose"])
    assert (config.listening_port, config.realm, config.verbose) == (4001, "file.example", False)
    assert warnings(capsys.readouterr().err) == [
        f"config: warning: {path}: coturn options tsunagu ignores: listing-ip"
    ]


def test_tsunagu_options_may_be_written_in_the_same_form(tmp_path: Path) -> None:
    path = write(tmp_path, "web-port=8443\nno-web=false\njoin-secret=" + "k" * 32 + "\n")
    config = load_config(["-c", path])
    assert config.web_port == 8443 and config.join_secrets == ("k" * 32,)


def test_the_user_database_maps_by_name(tmp_path: Path) -> None:
    for line in ("userdb=/var/lib/turn/turndb", 'db="/var/lib/turn/turndb"'):
        config = load_config(["-c", write(tmp_path, f"lt-cred-mech\n{line}\n")])
        assert config.userdb == "/var/lib/turn/turndb", line
    connection = "host=localhost dbname=coturn user=turn password=pw-hidden connect_timeout=30"
    for line in (f'psql-userdb="{connection}"', f"sql-userdb={connection}"):
        config = load_config(["-c", write(tmp_path, f"{line}\n")])
        assert config.psql_userdb == connection, line
    path = write(tmp_path, "redis-userdb=pw-hidden\n")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(path)}:1: redis-userdb: ") as e:
        load_config(["-c", path])
    assert "pw-hidden" not in str(e.value)


def test_the_format_is_chosen_by_suffix_then_by_content(tmp_path: Path) -> None:
    coturn = "realm=example.org\nlt-cred-mech\n"
    assert load_config(["-c", write(tmp_path, coturn, "turn")]).realm == "example.org"
    assert load_config(["-c", write(tmp_path, coturn, "turn.conf")]).realm == "example.org"
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(["-c", write(tmp_path, coturn, "turn.toml")])
    # TOML that coturn would read the same way, and TOML coturn could not read.
    toml = 'realm = "example.org"\nmin-port = 50000\n'
    for name in ("t.toml", "t.conf", "t"):
        config = load_config(["-c", write(tmp_path, toml, name)])
        assert (config.realm, config.min_port) == ("example.org", 50000), name
    toml = 'listening-ips = ["127.0.0.1"]\n'
    for name in ("t.toml", "t.conf", "t"):
        config = load_config(["-c", write(tmp_path, toml, name)])
        assert config.listening_ips == (ipaddress.ip_address("127.0.0.1"),), name
    # A .conf file with a line coturn leaves out is still read as coturn's.
    odd = write(tmp_path, "realm=example.org\n--verbose\n", "odd.conf")
    assert load_config(["-c", odd]).realm == "example.org"
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(["-c", write(tmp_path, "realm=example.org\n--verbose\n", "odd")])


def test_serve_with_a_bad_line_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: Captured
) -> None:
    path = write(tmp_path, "lt-cred-mech\nlistening-port=http\n")
    assert main(["serve", "-c", path]) == 2
    err = capsys.readouterr().err
    assert err == f"config: {path}:2: listening-port: must be an integer 1-65535, got 'http'\n"


# --- real files -----------------------------------------------------------------------------

# The lines an installation typically turns on, as they stand (commented out) in the
# Debian package's example.
TYPICAL = [
    "listening-port=3478",
    "tls-listening-port=5349",
    "listening-ip=172.17.19.101",
    "listening-ip=2607:f0d0:1002:51::4",
    "external-ip=60.70.80.91/172.17.19.101",
    "min-port=49152",
    "max-port=65535",
    "verbose",
    "fingerprint",
    "lt-cred-mech",
    "user=username1:password1",
    "user=ninefingers:0xbc807ee29df3c9ffa736523fb2c4e8ee",
    "realm=mycompany.org",
    "user-quota=0",
    "total-quota=0",
    "stale-nonce=600",
    "server-name=blackdow.carleon.gov",
    "log-file=/var/tmp/turn.log",
    "no-stdout-log",
    "cert=/usr/local/etc/turn_server_cert.pem",
    "pkey=/usr/local/etc/turn_server_pkey.pem",
    "no-dtls",
    "no-tlsv1",
    "no-tlsv1_1",
    "no-cli",
    "cli-password=qwerty",
    "no-multicast-peers",
    "denied-peer-ip=83.166.64.0-83.166.95.255",
    "allowed-peer-ip=83.166.68.45",
    'pidfile="/var/run/turnserver.pid"',
    "proc-user=<user-name>",
]


def uncommented(text: str, wanted: list[str]) -> str:
    lines = text.splitlines()
    found = set()
    for number, line in enumerate(lines):
        option = line.removeprefix("#").removeprefix(" ")
        if line.startswith("#") and option in wanted and option not in found:
            lines[number] = option
            found.add(option)
    assert found == set(wanted), set(wanted) - found
    return "\n".join(lines) + "\n"


needs_example = pytest.mark.skipif(
    not DEBIAN_EXAMPLE.exists(), reason="the coturn package's example is not installed"
)


@needs_example
def test_the_debian_example_as_shipped(capsys: Captured) -> None:
    config = load_config(["-c", str(DEBIAN_EXAMPLE)])
    # Its few lines that are not comments: no-rfc5780, no-stun-backward-compatibility,
    # response-origin-only-with-rfc5780 (what tsunagu does anyway) and syslog.
    assert not config.rfc5780 and not config.stun_backward_compatibility
    assert warnings(capsys.readouterr().err) == [
        f"config: warning: {DEBIAN_EXAMPLE}: coturn options tsunagu ignores: syslog"
    ]


@needs_example
def test_the_debian_example_with_its_typical_lines_on(tmp_path: Path, capsys: Captured) -> None:
    text = uncommented(DEBIAN_EXAMPLE.read_text(), TYPICAL)
    path = write(tmp_path, text)
    config = load_config(["-c", path])
    assert config.listening_port == 3478 and config.tls_listening_port == 5349
    assert config.listening_ips == (
        ipaddress.ip_address("172.17.19.101"),
        ipaddress.ip_address("2607:f0d0:1002:51::4"),
    )
    assert config.external_ips == (ExternalIp.parse("60.70.80.91/172.17.19.101"),)
    assert (config.min_port, config.max_port) == (49152, 65535)
    assert config.verbose and config.realm == "mycompany.org"
    assert config.users == (StaticUser("username1", "password1"),)
    assert (config.user_quota, config.total_quota) == (0, 0)
    assert config.stale_nonce == 600 and config.log_file == "/var/tmp/turn.log"
    assert config.cert == "/usr/local/etc/turn_server_cert.pem"
    assert config.pkey == "/usr/local/etc/turn_server_pkey.pem"
    assert config.denied_peer_ips == (PeerRange.parse("83.166.64.0-83.166.95.255"),)
    assert config.allowed_peer_ips == (PeerRange.parse("83.166.68.45"),)
    assert not config.rfc5780 and not config.stun_backward_compatibility
    err = capsys.readouterr().err
    assert warnings(err) == [
        f"config: warning: {path}: coturn options tsunagu ignores: server-name, no-dtls,"
        " no-stdout-log, syslog, pidfile, proc-user, no-cli, cli-password, no-tlsv1, no-tlsv1_1",
        f"config: warning: {path}: line {text.splitlines().index(TYPICAL[11]) + 1}: user"
        " 'ninefingers' is given as a 0x key, which tsunagu cannot use; the user is left out"
        " (give name:password)",
    ]
    assert "qwerty" not in err and "password1" not in err and "0xbc80" not in err


@pytest.mark.skipif(not ETC.exists(), reason="no /etc/turnserver.conf on this machine")
def test_this_machines_turnserver_conf(capsys: Captured) -> None:
    try:
        load_config(["-c", str(ETC)])
    except ConfigError as exc:
        # Only a value tsunagu checks may stop it, and then with the file and line.
        assert str(exc).startswith(f"config: {ETC}:"), exc
    lines = warnings(capsys.readouterr().err)
    listed = [line for line in lines if "coturn options tsunagu ignores" in line]
    assert len(listed) <= 1
    if listed:
        names = listed[0].partition("ignores: ")[2].split(", ")
        assert len(names) == len(set(names))
