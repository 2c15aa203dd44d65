"""The ``tsunagu`` command line, plus the setup/CI scripts and README quick start it serves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tsunagu
from tsunagu.cli import COMMANDS, main
from tsunagu.config import Config
from tsunagu.tls import TlsError

Captured = pytest.CaptureFixture[str]


def run(argv: list[str], capsys: Captured) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# --- top level ------------------------------------------------------------------------------


def test_no_command_prints_help_and_fails(capsys: Captured) -> None:
    status, out, err = run([], capsys)
    assert status == 2 and out == ""
    for command in COMMANDS:
        assert command.name in err


def test_help_lists_commands(capsys: Captured) -> None:
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    assert all(re.search(rf"^  {c.name}\s+{re.escape(c.summary)}$", out, re.M) for c in COMMANDS)


def test_unknown_command_is_a_usage_error(capsys: Captured) -> None:
    status, _, err = run(["frobnicate"], capsys)
    assert status == 2 and "frobnicate" in err


def test_every_command_target_resolves() -> None:
    assert {c.name for c in COMMANDS} >= {"serve", "credential", "version"}
    for command in COMMANDS:
        assert callable(command.load())


def test_version(capsys: Captured) -> None:
    assert run(["version"], capsys) == (0, f"tsunagu {tsunagu.__version__}\n", "")
    assert run(["--version"], capsys) == (0, f"tsunagu {tsunagu.__version__}\n", "")
    status, _, err = run(["version", "extra"], capsys)
    assert status == 2 and "unrecognized" in err


def test_python_dash_m_runs_main() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tsunagu", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"tsunagu {tsunagu.__version__}\n")


# --- serve ----------------------------------------------------------------------------------


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], list[Any]]:
    """Stand in for tsunagu.serve; the argument is what serve() returns or raises."""

    def install(outcome: Any) -> list[Any]:
        calls: list[Any] = []

        async def serve(
            config: Config,
            config_file: str | None = None,
            reread: Callable[[], Config] | None = None,
        ) -> int:
            calls.append((config, asyncio.get_running_loop()))
            # What a reload reads: the same command line again.
            assert reread is not None and reread() == config
            if isinstance(outcome, BaseException):
                raise outcome
            return int(outcome)

        module = types.ModuleType("tsunagu.serve")
        module.serve = serve  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "tsunagu.serve", module)
        return calls

    return install


def test_serve_bad_config_prints_one_line_and_exits_2(
    capsys: Captured, fake_serve: Callable[[Any], list[Any]]
) -> None:
    calls = fake_serve(0)
    status, out, err = run(["serve", "--max-port", "70000"], capsys)
    assert status == 2 and out == ""
    assert err == "config: max_port: must be an integer 1-65535, got 70000\n"
    assert calls == []


def test_serve_unknown_flag_prints_one_line_and_exits_2(capsys: Captured) -> None:
    status, _, err = run(["serve", "--listening-prot", "1"], capsys)
    assert status == 2 and err.count("\n") == 1 and "--listening-prot" in err


def test_serve_bad_file_prints_one_line_and_exits_2(capsys: Captured, tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("relm = 'x'\n")
    status, _, err = run(["serve", "-c", str(path)], capsys)
    assert status == 2 and err == "config: relm: unknown key (did you mean: realm?)\n"


def test_serve_help(capsys: Captured) -> None:
    status, out, _ = run(["serve", "--help"], capsys)
    assert status == 0 and out.startswith("usage: tsunagu serve")
    assert "--static-auth-secret" in out


def test_serve_runs_on_uvloop(capsys: Captured, fake_serve: Callable[[Any], list[Any]]) -> None:
    calls = fake_serve(7)
    status, _, _ = run(["serve", "-p", "3479", "--no-web", "--realm", "example.org"], capsys)
    assert status == 7
    [(config, loop)] = calls
    assert config == Config(listening_port=3479, no_web=True, realm="example.org")
    assert type(loop).__module__.startswith("uvloop")
    assert loop.is_closed()


def test_serve_falls_back_to_asyncio_without_uvloop(
    capsys: Captured, fake_serve: Callable[[Any], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes "import uvloop" fail
    calls = fake_serve(0)
    assert run(["serve"], capsys)[0] == 0
    [(_, loop)] = calls
    assert isinstance(loop, asyncio.BaseEventLoop)
    assert not type(loop).__module__.startswith("uvloop")


def test_serve_reports_startup_config_errors(
    capsys: Captured, fake_serve: Callable[[Any], list[Any]]
) -> None:
    fake_serve(TlsError("config: cert: cannot read /nope.pem: No such file or directory"))
    status, _, err = run(["serve"], capsys)
    assert status == 2
    assert err == "config: cert: cannot read /nope.pem: No such file or directory\n"


def test_serve_interrupted_exits_130(
    capsys: Captured, fake_serve: Callable[[Any], list[Any]]
) -> None:
    fake_serve(KeyboardInterrupt())
    assert run(["serve"], capsys)[0] == 130


def test_serve_lets_unexpected_errors_through(fake_serve: Callable[[Any], list[Any]]) -> None:
    fake_serve(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(["serve"])


# --- credential -----------------------------------------------------------------------------


def expected_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def test_credential_text_output(capsys: Captured) -> None:
    before = int(time.time())
    status, out, err = run(
        ["credential", "--secret", "north", "--user", "alice", "--ttl", "60"], capsys
    )
    after = int(time.time())
    assert (status, err) == (0, "")
    match = re.fullmatch(r"username: (\d+):alice\npassword: (\S+)\n", out)
    assert match is not None, out
    expiry = int(match.group(1))
    assert before + 60 <= expiry <= after + 60
    assert match.group(2) == expected_password("north", f"{expiry}:alice")


def test_credential_json_output_and_defaults(capsys: Captured) -> None:
    before = int(time.time())
    status, out, _ = run(["credential", "--secret", "north", "--json"], capsys)
    assert status == 0
    payload = json.loads(out)
    assert set(payload) == {"username", "password", "ttl"}
    assert payload["ttl"] == Config().credential_ttl == 600
    assert payload["username"].isdigit()  # no user id: the username is just the expiry
    assert int(payload["username"]) >= before + 600
    assert payload["password"] == expected_password("north", payload["username"])


def test_credential_secret_from_file(capsys: Captured, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("south\n")
    status, out, _ = run(
        ["credential", "--secret-file", str(path), "--json", "--user", "b"], capsys
    )
    assert status == 0
    payload = json.loads(out)
    assert payload["password"] == expected_password("south", payload["username"])


@pytest.mark.parametrize(
    "argv",
    [
        ["credential"],
        ["credential", "--secret", ""],
        ["credential", "--secret", "s", "--ttl", "0"],
        ["credential", "--secret", "s", "--ttl", "soon"],
        ["credential", "--secret", "s", "--secret-file", "f"],
        ["credential", "--secret-file", "/nonexistent/secret"],
    ],
)
def test_credential_usage_errors(argv: list[str], capsys: Captured) -> None:
    status, out, err = run(argv, capsys)
    assert status == 2 and out == "" and err


# --- scripts and README ---------------------------------------------------------------------


@pytest.mark.parametrize("script", ["scripts/setup", ".ci/run"])
def test_scripts_are_executable_bash(repo_root: Path, script: str) -> None:
    path = repo_root / script
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_setup_script_usage(repo_root: Path, tmp_path: Path) -> None:
    # From an unrelated directory: the script must find the repository by itself.
    script = str(repo_root / "scripts" / "setup")
    ok = subprocess.run(
        [script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert ok.returncode == 0 and "--test" in ok.stdout
    bad = subprocess.run(
        [script, "--bogus"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_readme_quick_start_is_exactly_two_one_line_commands(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", readme, flags=re.M)
    assert sections[1].startswith("Quick start on a fresh Debian machine\n")
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", sections[1], flags=re.S)
    assert blocks == [
        "./scripts/setup && .venv/bin/tsunagu serve\n",
        "./scripts/setup --test && .venv/bin/python -m pytest\n",
    ]
    ci = (repo_root / ".ci" / "run").read_text()
    assert "./scripts/setup --test" in ci and ".venv/bin/python -m pytest" in ci


# --- token ------------------------------------------------------------------------------------

JOIN_SECRET = "t" * 40


def test_token_mints_what_the_server_admits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tsunagu.signaling.tokens import JoinTokens

    secret_file = tmp_path / "join.secret"
    secret_file.write_text(JOIN_SECRET + "\n")
    argv = ["token", "--room", "Board", "--identity", "alice", "--name", "Alice", "--ttl", "60"]
    assert main([*argv, "--join-secret-file", str(secret_file), "--url", "https://m.example/"]) == 0
    link = capsys.readouterr().out.strip()
    prefix = "https://m.example/r/board?token="
    assert link.startswith(prefix), link
    grant = JoinTokens([JOIN_SECRET]).verify(link[len(prefix) :], time.time())
    assert (grant.room, grant.identity, grant.name, grant.turn) == ("board", "alice", "Alice", True)
    with pytest.raises(ValueError, match="expired"):
        JoinTokens([JOIN_SECRET]).verify(link[len(prefix) :], time.time() + 60 + 31)

    monkeypatch.setenv("TSUNAGU_JOIN_SECRET", JOIN_SECRET)
    assert main(["token", "--room", "b", "--identity", "bob", "--no-turn"]) == 0
    assert (
        JoinTokens([JOIN_SECRET]).verify(capsys.readouterr().out.strip(), time.time()).turn is False
    )

    monkeypatch.delenv("TSUNAGU_JOIN_SECRET")
    config = tmp_path / "tsunagu.toml"
    config.write_text(f'join_secrets = ["{JOIN_SECRET}"]\n')
    assert main(["token", "--room", "b", "--identity", "carol", "-c", str(config)]) == 0
    assert JoinTokens([JOIN_SECRET]).verify(capsys.readouterr().out.strip(), time.time())

    assert main(["token", "--room", "b", "--identity", "carol"]) == 2
    assert "no join secret" in capsys.readouterr().err
    assert main(["token", "--room", "b", "--identity", "x:y", "-c", str(config)]) == 2
    assert "--identity" in capsys.readouterr().err


def test_web_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tsunagu.config import load_config

    monkeypatch.setenv("TSUNAGU_JOIN_SECRET", JOIN_SECRET)
    monkeypatch.setenv("TSUNAGU_API_KEY", "a" * 32)
    monkeypatch.setenv("TSUNAGU_ROOM_PASSWORD", "open sesame")
    config = load_config(["--web-ip", "0.0.0.0"])
    assert config.join_secrets == (JOIN_SECRET,) and config.effective_room_access == "token"
    assert config.api_key == "a" * 32 and config.room_password == "open sesame"
    assert "open sesame" not in repr(config) and JOIN_SECRET not in repr(config)
    # A flag wins over the environment.
    assert load_config(["--join-secret", "u" * 32]).join_secrets == ("u" * 32,)
