"""``tsunagu policy chrome``: the Chrome/Chromium enterprise policy for a narrow UDP range.

Pure: the command reads a configuration and prints. tests/e2e/test_browser_policy_lab.py proves
the policy in Chromium behind a firewall that opens only the range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsunagu.browser_policy import (
    DEFAULT_UDP_PORTS,
    MIN_UDP_PORTS,
    PortRange,
    chrome_policy,
    explanation,
    ip_handling,
)
from tsunagu.cli import main
from tsunagu.config import Config, parse_config

Captured = pytest.CaptureFixture[str]


def run(argv: list[str], capsys: Captured) -> tuple[int, str, str]:
    status = main(["policy", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_defaults_print_the_policy_json_alone(capsys: Captured) -> None:
    status, out, err = run(["chrome"], capsys)
    assert status == 0
    # Standard output is the file and nothing else: `> tsunagu.json` works.
    assert json.loads(out) == {
        "WebRtcIPHandling": "default_public_and_private_interfaces",
        "WebRtcUdpPortRange": "20000-20199",
    }
    assert out.endswith("}\n")
    # Where it goes, on standard error.
    for where in (
        "/etc/chromium/policies/managed/tsunagu.json",
        "/etc/opt/chrome/policies/managed/",
        "HKLM\\SOFTWARE\\Policies\\Google\\Chrome",
        "configuration profile",
        "chrome://policy",
    ):
        assert where in err, where
    assert "Firewall" not in err


def test_relay_policy_exposes_no_local_address(capsys: Captured) -> None:
    status, out, _ = run(["chrome", "--ice-transport-policy", "relay"], capsys)
    assert status == 0
    assert json.loads(out)["WebRtcIPHandling"] == "default_public_interface_only"


def test_the_servers_config_file_is_read_and_flags_win(capsys: Captured, tmp_path: Path) -> None:
    config = tmp_path / "tsunagu.toml"
    config.write_text('ice-transport-policy = "relay"\nmin-port = 40000\nuser-quota = 5\n')
    status, out, _ = run(["chrome", "-c", str(config)], capsys)
    assert status == 0 and json.loads(out)["WebRtcIPHandling"] == "default_public_interface_only"
    status, out, _ = run(["chrome", "-c", str(config), "--ice-transport-policy", "all"], capsys)
    assert json.loads(out)["WebRtcIPHandling"] == "default_public_and_private_interfaces"
    # Every serve option is accepted, those the policy does not read too.
    status, out, _ = run(
        ["chrome", "--user-quota", "3", "--browser-udp-ports", "1024-1055"], capsys
    )
    assert status == 0 and json.loads(out)["WebRtcUdpPortRange"] == "1024-1055"


def test_a_bad_server_config_is_one_line_and_status_2(capsys: Captured) -> None:
    status, out, err = run(["chrome", "--min-port", "9", "--max-port", "5"], capsys)
    assert status == 2 and out == ""
    assert err.strip().startswith("config: max_port:") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("ports", "complaint"),
    [
        ("20000", "LOW-HIGH"),
        ("a-b", "LOW-HIGH"),
        ("-20000", "LOW-HIGH"),
        ("20199-20000", "LOW must not be above HIGH"),
        ("80-200", "1024-65535"),
        ("65500-70000", "1024-65535"),
        ("20000-20010", f"at least {MIN_UDP_PORTS}"),
    ],
)
def test_bad_browser_ports_are_usage_errors(ports: str, complaint: str, capsys: Captured) -> None:
    status, out, err = run(["chrome", "--browser-udp-ports", ports], capsys)
    assert status == 2 and out == ""
    assert "--browser-udp-ports" in err and complaint in err, err


def test_port_range_bounds() -> None:
    assert PortRange.parse(" 65504-65535 ") == PortRange(65504, 65535)
    assert PortRange.parse("1024-1055").size == MIN_UDP_PORTS
    with pytest.raises(ValueError):
        PortRange.parse("1024-1054")
    # The default stays out of every common ephemeral range (Linux from 32768, Windows and
    # macOS from 49152) and is comfortably above the minimum.
    assert DEFAULT_UDP_PORTS.high < 32768 and DEFAULT_UDP_PORTS.size >= 4 * MIN_UDP_PORTS


def test_ip_handling_follows_the_ice_transport_policy() -> None:
    assert ip_handling(Config()) == "default_public_and_private_interfaces"
    relay = parse_config({"ice_transport_policy": "relay"})
    assert ip_handling(relay) == "default_public_interface_only"
    assert chrome_policy(relay, PortRange(30000, 30099)) == {
        "WebRtcIPHandling": "default_public_interface_only",
        "WebRtcUdpPortRange": "30000-30099",
    }
    # Never the values that would spend ports on every interface or turn UDP off.
    for config in (Config(), relay):
        assert ip_handling(config) not in ("default", "disable_non_proxied_udp")


def test_explain_gives_the_matching_firewall_opening(capsys: Captured) -> None:
    status, out, err = run(
        [
            "chrome",
            "--explain",
            "--ice-transport-policy",
            "relay",
            "--public-host",
            "turn.example.org",
            "--aux-server",
            "203.0.113.10:443",
            "--browser-udp-ports",
            "41000-41063",
        ],
        capsys,
    )
    assert status == 0 and json.loads(out)["WebRtcUdpPortRange"] == "41000-41063"
    assert "UDP from source ports 41000-41063 to turn.example.org port 3478" in err
    assert "TCP to turn.example.org ports 443, 3478, 5349" in err
    # Relayed only: no opening towards peers' relayed addresses or anywhere else.
    assert "49152-65535" not in err and "any address" not in err
    assert "/etc/chromium/policies/managed/tsunagu.json" in err


def test_explain_without_relay_opens_peers_too() -> None:
    config = parse_config({"listening_ips": ["203.0.113.10"], "min_port": 50000})
    text = explanation(config, PortRange(20000, 20063))
    assert "to 203.0.113.10 port 3478" in text
    assert "to 203.0.113.10 ports 50000-65535" in text and "any address" in text
    no_udp = explanation(parse_config({"no_udp": True, "public_host": "h.example"}))
    assert "no TURN over UDP" in no_udp and "TCP to h.example ports 3478, 5349" in no_udp


def test_help_explains_and_lists_only_what_it_reads(capsys: Captured) -> None:
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    for text in (
        "WebRtcUdpPortRange",
        "WebRtcIPHandling",
        "default_public_interface_only",
        "default_public_and_private_interfaces",
        "WebRtcLocalIpsAllowedUrls",
        "/etc/opt/chrome/policies/managed",
        "chrome://policy",
        "--browser-udp-ports",
        "--ice-transport-policy",
        "--explain",
    ):
        assert text in out, text
    assert "--user-quota" not in out


@pytest.mark.parametrize("argv", [[], ["firefox"], ["chrome", "--browser-udp-ports"]])
def test_usage_errors(argv: list[str], capsys: Captured) -> None:
    status, out, err = run(argv, capsys)
    assert status == 2 and out == "" and "usage: tsunagu policy" in err


def test_the_readme_shows_what_the_command_prints(repo_root: Path, capsys: Captured) -> None:
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## A narrow UDP range for browsers") :]
    shown = json.loads(section[section.index("```json\n") + 8 : section.index("\n```\n\n`Web")])
    status, out, _ = run(["chrome", "--ice-transport-policy", "relay"], capsys)
    assert status == 0 and json.loads(out) == shown
