"""``tsunagu user``, ``tsunagu secret`` and ``tsunagu revoke``: the user database from the
shell, as coturn's ``turnadmin`` does it, on the same database ``tsunagu serve`` reads.

The database is the one the server's configuration names (``-c FILE``, or directly ``-b
FILE``, ``-e`` PostgreSQL or ``-N`` Redis as turnadmin takes them; by default users.db in the
state directory). Users are stored as keys, never
passwords; a password is read from a prompt, a file or standard input, so that it need not
appear in the process list (``--password`` exists for scripts that accept that). A running
server sees a new user at once, and a changed or deleted one once its cached key expires
(60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..auth.backends import open_user_database
from ..auth.database import DatabaseError, UserDatabase, keys_of_password
from ..config import Config, ConfigError, load_config
from ..turn.quotas import rest_expiry
from ..turn.revocations import Revocation

__all__ = ["revocation_for", "revoke_command", "secret_command", "user_command"]

T = TypeVar("T")


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="tsunagu serve's config file")
    parser.add_argument(
        "-b", "--userdb", metavar="FILE", help="the SQLite user database (default: the config's)"
    )
    parser.add_argument(
        "-e",
        "--psql-userdb",
        metavar="CONNECTION",
        help="a PostgreSQL user database instead, as coturn's turnadmin -e takes it",
    )
    parser.add_argument(
        "-N",
        "--redis-userdb",
        metavar="CONNECTION",
        help="a Redis user database instead, as coturn's turnadmin -N takes it",
    )
    parser.add_argument("-r", "--realm", help="the realm (default: the config's, else tsunagu)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _config(args: argparse.Namespace) -> Config:
    argv = []
    if args.config:
        argv += ["-c", args.config]
    if args.userdb:
        argv += ["-b", args.userdb]
    if args.psql_userdb:
        argv += ["-e", args.psql_userdb]
    if args.redis_userdb:
        argv += ["-N", args.redis_userdb]
    if args.realm:
        argv += ["-r", args.realm]
    return load_config(argv)


def _open(config: Config) -> UserDatabase:
    return open_user_database(config)


def _run(config: Config, work: Callable[[UserDatabase], Awaitable[T]]) -> T:
    async def run() -> T:
        database = _open(config)
        try:
            return await work(database)
        finally:
            await database.close()

    return asyncio.run(run())


def _print_rows(rows: list[tuple[str, str]], field: str, *, as_json: bool) -> None:
    """(realm, value) rows: a JSON list of objects, or ``value[realm]`` lines as turnadmin."""
    if as_json:
        sys.stdout.write(json.dumps([{"realm": r, field: v} for r, v in rows]) + "\n")
    else:
        sys.stdout.writelines(f"{value}[{realm}]\n" for realm, value in rows)


def _password(args: argparse.Namespace, prog: str) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_file is not None:
        if args.password_file == "-":
            line = sys.stdin.readline()
        else:
            with open(args.password_file, encoding="utf-8") as fh:
                line = fh.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def user_command(argv: list[str], prog: str) -> int:
    """``tsunagu user add|passwd|delete|list``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Long-term TURN users in the user database, as coturn's turnadmin -a/-d/-l: "
            "add (or give a new password), passwd (an existing user only), delete, list. "
            "The password comes from --password-file (- = standard input), else standard "
            "input when it is not a terminal, else a prompt."
        ),
    )
    parser.add_argument("action", choices=("add", "passwd", "delete", "list"))
    parser.add_argument("name", nargs="?", help="the user name (not for list)")
    parser.add_argument("--password-file", metavar="FILE", help="first line: the password")
    parser.add_argument("--password", help="the password itself (visible in the process list)")
    _database_options(parser)
    args = parser.parse_args(argv)
    if args.action != "list" and not args.name:
        parser.error(f"{args.action} needs a user name")
    if args.action == "list" and args.name:
        parser.error("list takes no user name")
    try:
        config = _config(args)
        realm = config.realm
        if args.action in ("add", "passwd"):
            password = _password(args, prog)
            if not password:
                parser.error("the password is empty")
            return _run(config, lambda db: _set(db, realm, args.name, password, args.action, prog))
        if args.action == "delete":
            gone = _run(config, lambda db: db.delete_user(realm, args.name))
            if not gone:
                sys.stderr.write(f"{prog}: no user {args.name!r} in realm {realm!r}\n")
                return 1
            return 0
        users = _run(config, lambda db: db.users(None if args.realm is None else realm))
    except (ConfigError, ValueError, OSError, DatabaseError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    _print_rows(users, "name", as_json=args.json)
    return 0


async def _set(
    database: UserDatabase, realm: str, name: str, password: str, action: str, prog: str
) -> int:
    if action == "passwd" and (realm, name) not in await database.users(realm):
        sys.stderr.write(f"{prog}: no user {name!r} in realm {realm!r}\n")
        return 1
    await database.add_user(realm, name, keys_of_password(name, realm, password))
    return 0


def secret_command(argv: list[str], prog: str) -> int:
    """``tsunagu secret add|delete|list``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "TURN REST API secrets in the user database, as coturn's turnadmin -s/-X/-S: "
            "a running server reads them every few seconds. 'add' without a value makes a "
            "random one and prints it."
        ),
    )
    parser.add_argument("action", choices=("add", "delete", "list"))
    parser.add_argument("value", nargs="?", help="the secret (add: default a new random one)")
    _database_options(parser)
    args = parser.parse_args(argv)
    if args.action == "delete" and not args.value:
        parser.error("delete needs the secret")
    if args.action == "list" and args.value:
        parser.error("list takes no value")
    try:
        config = _config(args)
        realm = config.realm
        if args.action == "add":
            value = args.value or secrets.token_urlsafe(32)
            _run(config, lambda db: db.add_secret(realm, value))
            if not args.value:
                sys.stdout.write(value + "\n")
            return 0
        if args.action == "delete":
            if not _run(config, lambda db: db.delete_secret(realm, args.value)):
                sys.stderr.write(f"{prog}: no such secret in realm {realm!r}\n")
                return 1
            return 0
        found = _run(config, lambda db: db.all_secrets(None if args.realm is None else realm))
    except (ConfigError, ValueError, OSError, DatabaseError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    _print_rows(found, "secret", as_json=args.json)
    return 0


def _when(text: str) -> float:
    if text == "now":
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a time is unix seconds, 'now' or ISO 8601 (2026-01-31T12:00:00Z), got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def revocation_for(
    *, user: str | None, credential: str | None, before: float | None, ttl: float, now: float
) -> Revocation:
    """What ``tsunagu revoke`` stores: kept as long as what it covers could be valid."""
    if credential is not None:
        expiry = rest_expiry(credential)
        until = float(expiry) if expiry is not None else now + ttl
        return Revocation(0, now, until, credential=credential)
    if user is not None:
        return Revocation(0, now, now + ttl, user=user)
    assert before is not None
    return Revocation(0, before, before + ttl)


def revoke_command(argv: list[str], prog: str) -> int:
    """``tsunagu revoke --user U | --credential USERNAME | --before TIME``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Take TURN credentials back. The revocation is stored in the user database: every "
            "tsunagu process that shares it ends the allocations made with them within a "
            "second, refuses them from then on (401), and closes a revoked user's signaling "
            "sessions. --user takes back every REST credential of that user id issued until "
            "now (and shuts the long-term user of that name out for a credential lifetime: "
            "change the password or delete the user for good); --credential one username; "
            "--before every REST credential issued before TIME. A revocation is kept only as "
            "long as what it covers could still be valid."
        ),
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--user", metavar="ID", help="a user id (the part after 'expiry:')")
    what.add_argument("--credential", metavar="USERNAME", help="one TURN username")
    what.add_argument("--before", type=_when, metavar="TIME", help="unix seconds, ISO 8601, now")
    parser.add_argument(
        "--ttl",
        type=float,
        metavar="SECONDS",
        help="the longest lifetime of the REST credentials issued (default: credential_ttl)",
    )
    _database_options(parser)
    args = parser.parse_args(argv)
    now = time.time()
    if args.before is not None and args.before > now:
        parser.error("--before: a time in the future would take back credentials not issued yet")
    try:
        config = _config(args)
        ttl = float(args.ttl if args.ttl is not None else config.credential_ttl)
        revocation = revocation_for(
            user=args.user, credential=args.credential, before=args.before, ttl=ttl, now=now
        )
        number = _run(config, lambda db: db.add_revocation(config.realm, revocation))
    except (ConfigError, ValueError, OSError, DatabaseError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    until = datetime.datetime.fromtimestamp(revocation.until, datetime.UTC)
    record = {
        "revocation": number,
        "realm": config.realm,
        "user": revocation.user,
        "credential": revocation.credential,
        "issued_before": revocation.issued_before,
        "until": revocation.until,
    }
    if args.json:
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(
            f"revocation {number} stored; in force until {until:%Y-%m-%d %H:%M:%S} UTC\n"
        )
    return 0
