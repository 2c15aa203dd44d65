"""``tsunagu user`` and ``tsunagu secret`` on the SQLite user database, checked with coturn's
``turnadmin`` reading the same file."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tsunagu.cli import main


def turnadmin(*argv: str) -> str:
    done = subprocess.run(["turnadmin", *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_users_added_changed_listed_and_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "users.db")
    common = ["-b", db, "-r", "example.org"]
    assert run(capsys, monkeypatch, "user", "add", "dana", *common, stdin="pw-1\n")[0] == 0
    # turnadmin sees the user, with the MD5 key of the password read from standard input.
    assert "dana" in turnadmin("-l", "-b", db, "-r", "example.org")
    row = sqlite3.connect(db).execute("SELECT hmackey FROM turnusers_lt").fetchone()
    assert row[0] == hashlib.md5(b"dana:example.org:pw-1").hexdigest()
    password_file = tmp_path / "pw"
    password_file.write_text("pw-2\n")
    status, _, _ = run(
        capsys,
        monkeypatch,
        "user",
        "passwd",
        "dana",
        *common,
        "--password-file",
        str(password_file),
    )
    assert status == 0
    row = sqlite3.connect(db).execute("SELECT hmackey FROM turnusers_lt").fetchone()
    assert row[0] == hashlib.md5(b"dana:example.org:pw-2").hexdigest()
    status, _, err = run(capsys, monkeypatch, "user", "passwd", "ghost", *common, stdin="x\n")
    assert status == 1 and "no user 'ghost'" in err
    status, out, _ = run(capsys, monkeypatch, "user", "list", *common, "--json")
    assert status == 0 and json.loads(out) == [{"realm": "example.org", "name": "dana"}]
    assert run(capsys, monkeypatch, "user", "delete", "dana", *common)[0] == 0
    assert run(capsys, monkeypatch, "user", "delete", "dana", *common)[0] == 1
    assert "dana" not in turnadmin("-l", "-b", db, "-r", "example.org")


def test_secrets_added_generated_listed_and_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "users.db")
    common = ["-b", db, "-r", "example.org"]
    assert run(capsys, monkeypatch, "secret", "add", "given", *common) == (0, "", "")
    status, out, _ = run(capsys, monkeypatch, "secret", "add", *common)
    generated = out.strip()
    assert status == 0 and len(generated) >= 40
    listed = turnadmin("-S", "-b", db, "-r", "example.org")
    assert "given" in listed and generated in listed
    status, out, _ = run(capsys, monkeypatch, "secret", "list", *common, "--json")
    assert {entry["secret"] for entry in json.loads(out)} == {"given", generated}
    assert run(capsys, monkeypatch, "secret", "delete", "given", *common)[0] == 0
    assert run(capsys, monkeypatch, "secret", "delete", "given", *common)[0] == 1


def test_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "users.db")
    assert run(capsys, monkeypatch, "user", "add", "-b", db)[0] == 2  # no name
    assert run(capsys, monkeypatch, "user", "add", "x", "-b", db, stdin="\n")[0] == 2  # empty
    assert run(capsys, monkeypatch, "secret", "delete", "-b", db)[0] == 2
    status, _, err = run(capsys, monkeypatch, "user", "list", "-b", str(tmp_path))
    assert status == 2 and str(tmp_path) in err  # a directory is no database


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_user_secret_and_revoke_on_postgres_and_redis_as_turnadmin_names_them(
    kind: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = request.getfixturevalue(f"{kind}_server")
    flag = "-e" if kind == "postgres" else "-N"
    connection = server.connection(server.new_database())
    common = [flag, connection, "-r", "example.org"]
    assert run(capsys, monkeypatch, "user", "add", "dana", *common, stdin="pw-1\n")[0] == 0
    assert run(capsys, monkeypatch, "secret", "add", "s3cret", *common)[0] == 0
    assert "dana[example.org]" in turnadmin("-l", flag, connection)
    assert "s3cret" in turnadmin("-S", flag, connection, "-r", "example.org")
    status, out, _ = run(capsys, monkeypatch, "user", "list", *common, "--json")
    assert status == 0 and json.loads(out) == [{"realm": "example.org", "name": "dana"}]
    assert run(capsys, monkeypatch, "revoke", "--user", "dana", *common)[0] == 0
    # One database at a time; and the connection string's password is never shown.
    status, _, err = run(capsys, monkeypatch, "user", "list", *common, "-b", "users.db")
    assert status == 2 and "one user database" in err and server.password not in err
    wrong = connection.replace(server.password, "not-the-password")
    status, _, err = run(capsys, monkeypatch, "user", "list", flag, wrong)
    assert status == 2 and "not-the-password" not in err, err
