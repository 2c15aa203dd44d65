"""``tsunagu probe``: subcommands, the old invocation, and the arguments of stun and turn."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from contextlib import redirect_stdout

import pytest

from tsunagu.cli import main
from tsunagu.probe import cli as probe_cli
from tsunagu.probe.net import Proxy, parse_pin
from tsunagu.probe.verdicts import Tried, Verdict, quota_reached, server_full, summary


def test_subcommand_table_lists_stun_turn_nat_and_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert [s.name for s in probe_cli.SUBCOMMANDS] == ["stun", "turn", "nat", "load"]
    assert main(["probe", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("stun", "turn", "nat", "load"):
        assert f"\n  {name} " in out
    assert "IP:PORT" in out  # the old form, still accepted
    assert main(["probe"]) == 2
    assert "subcommands:" in capsys.readouterr().err


def test_the_old_invocation_is_probe_load(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], str]] = []

    def fake(argv: list[str], prog: str) -> int:
        calls.append((argv, prog))
        return 0

    monkeypatch.setattr(probe_cli, "load_command", fake)
    monkeypatch.setattr(
        probe_cli,
        "SUBCOMMANDS",
        tuple(
            probe_cli.Subcommand(s.name, s.summary, fake if s.name == "load" else s.run)
            for s in probe_cli.SUBCOMMANDS
        ),
    )
    assert main(["probe", "127.0.0.1:3478", "--mode", "binding"]) == 0
    assert main(["probe", "load", "127.0.0.1:3478", "--mode", "binding"]) == 0
    assert calls == [
        (["127.0.0.1:3478", "--mode", "binding"], "tsunagu probe"),
        (["127.0.0.1:3478", "--mode", "binding"], "tsunagu probe load"),
    ]


def test_a_url_without_its_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "turn:127.0.0.1:3478", "-u", "a:b"]) == 2
    assert "tsunagu probe turn turn:127.0.0.1:3478" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["turn", "turn:127.0.0.1"],  # no credentials
        ["turn", "stun:127.0.0.1", "-u", "a:b"],  # a STUN URL
        ["turn", "turn:127.0.0.1", "-u", "nocolon"],
        ["turn", "turn:127.0.0.1", "-u", "a:b", "--secret", "s"],
        ["turn", "turn:127.0.0.1", "--secret", "s", "--password", "p"],
        ["turn", "turn:127.0.0.1", "-u", "a:b", "--size", "8"],
        ["turn", "turn:127.0.0.1", "-u", "a:b", "--seconds", "600"],
        ["turn", "turn:127.0.0.1", "-u", "a:b", "--proxy", "http://127.0.0.1:3128"],  # UDP only
        ["turn", "turn:127.0.0.1", "-u", "a:b", "--proxy", "socks5://127.0.0.1:1080"],
        ["turn", "turns:127.0.0.1", "-u", "a:b", "--ca", "/nonexistent/ca.pem"],
        ["turn", "turns:127.0.0.1", "-u", "a:b", "--pin", "not-a-pin"],
        ["turn", "turns:127.0.0.1", "-u", "a:b", "--insecure", "--ca", "x"],
        ["stun", "turn:127.0.0.1"],
        ["stun", "stun:127.0.0.1", "--count", "0"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", *argv]) == 2
    assert capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice:secret", ("alice", "secret")),
        ("alice:pass:word", ("alice", "pass:word")),
        ("1700000000:alice:c2VjcmV0", ("1700000000:alice", "c2VjcmV0")),
        ("1700000000:c2VjcmV0", ("1700000000", "c2VjcmV0")),
    ],
)
def test_credentials_keep_a_rest_names_colon(text: str, expected: tuple[str, str]) -> None:
    assert probe_cli._credentials(text) == expected


def test_pins_in_both_forms() -> None:
    digest = hashlib.sha256(b"key").digest()
    b64 = base64.b64encode(digest).decode()
    assert parse_pin(f"sha256/{b64}") == ("spki", b64)
    assert parse_pin(b64) == ("spki", b64)
    colon = ":".join(f"{b:02X}" for b in digest)
    assert parse_pin(digest.hex()) == ("sha256", colon)
    assert parse_pin(colon.lower()) == ("sha256", colon)
    with pytest.raises(ValueError, match="a pin is"):
        parse_pin("sha256/AAAA")


def test_proxy_urls() -> None:
    proxy = Proxy.parse("http://carol:p%40ss@proxy.example.org:3128")
    assert proxy == Proxy("proxy.example.org", 3128, "carol", "p@ss")
    assert str(proxy) == "http://carol@proxy.example.org:3128"  # no password in output
    assert Proxy.parse("http://[::1]:8080") == Proxy("::1", 8080)
    for bad in ("https://p:1", "http://p", "http://p:1/path", "http://p:99999"):
        with pytest.raises(ValueError):
            Proxy.parse(bad)


def test_summary_of_several_urls() -> None:
    ok = Verdict("ok", "fine")
    bad = Verdict("no-answer", "No answer.", "Unblock UDP.")
    refused = Verdict("connection-refused", "Refused.")
    assert summary([Tried("turn:a", "udp", ok)]) is ok
    assert summary([Tried("turn:a", "udp", ok), Tried("turn:b", "tcp", ok)]).code == "ok"
    both = summary([Tried("turn:a", "tcp", ok), Tried("turn:b", "udp", refused)])
    assert both.code == "connection-refused" and not both.ok
    assert both.sentence == "1 of 2 URLs work; turn:b: Refused."
    # Two UDP URLs, both silent: not a network pattern, only a count.
    udp_only = summary([Tried("turn:a", "udp", bad), Tried("turn:b", "udp", bad)])
    assert udp_only.code == "no-answer" and udp_only.advice == "Unblock UDP."


def test_summary_names_the_network() -> None:
    ok = Verdict("ok", "fine")
    silent = Verdict("no-answer", "No answer.")
    unreachable = Verdict("unreachable", "No route.")
    refused = Verdict("connection-refused", "Refused.")
    udp, tls = "turn:s:3478", "turns:s:443?transport=tcp"
    blocked_udp = summary([Tried(udp, "udp", silent), Tried(tls, "tls", ok)])
    assert blocked_udp.code == "udp-blocked" and not blocked_udp.ok
    assert blocked_udp.sentence == (
        f"UDP is blocked on this network: {udp} got no answer, but {tls} works."
    )
    nothing = summary([Tried(udp, "udp", silent), Tried(tls, "tls", unreachable)])
    assert nothing.code == "blocked" and "--proxy" in nothing.advice
    # A refusal is an answer: something is there, so the network is not named.
    mixed = summary([Tried(udp, "udp", silent), Tried(tls, "tls", refused)])
    assert mixed.code == "no-answer" and mixed.sentence.startswith("0 of 2 URLs work;")
    proxied = [Tried(udp, "udp", silent), Tried(tls, "tls", ok, proxied=True)]
    only = summary(proxied, direct=Verdict("no-answer", "The TCP connection got no answer."))
    assert only.code == "proxy-only" and not only.ok
    assert only.sentence == (
        f"This network lets traffic out only through the HTTP proxy: {tls} works through it, "
        "but nothing reaches the server directly (the TCP connection got no answer)."
    )
    # The proxy is configured, but the server can be reached without it too.
    assert summary(proxied, direct=ok).code == "no-answer"
    assert summary(proxied[1:], direct=ok).code == "ok"
    assert summary(proxied[1:], direct=silent).code == "proxy-only"


def test_the_servers_reason_is_not_repeated() -> None:
    assert server_full("Insufficient Capacity: total allocation quota reached").sentence == (
        "The server is full: 508 Insufficient Capacity (total allocation quota reached)."
    )
    assert server_full("Insufficient Capacity").sentence.endswith("508 Insufficient Capacity.")
    assert "(user quota)" in quota_reached("user quota").sentence


def test_json_names_every_step_field(monkeypatch: pytest.MonkeyPatch) -> None:
    # A UDP check of a port where the kernel answers "port unreachable": fast and offline.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = io.StringIO()
    with redirect_stdout(out):
        status = main(["probe", "stun", f"stun:127.0.0.1:{port}", "--json", "--timeout", "1"])
    assert status == 1
    report = json.loads(out.getvalue())
    assert report["probe"] == "stun"
    assert set(report["verdict"]) == {"code", "ok", "sentence", "advice"}
    (result,) = report["results"]
    assert result["verdict"]["code"] == "connection-refused"
    (step,) = result["steps"]
    assert step["name"] == "binding" and not step["ok"] and step["code"] == "connection-refused"
