"""The ``tsunagu`` command: ``tsunagu <command> [options]``.

Each command is a function ``(argv, prog) -> exit status`` named by a ``"module:function"``
string in :data:`COMMANDS`, imported only when that command runs. A new command, in its own
module, needs one line here and keeps the start-up of the others cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from tsunagu import __version__
from tsunagu.config import Config, ConfigError, load_config

__all__ = ["COMMANDS", "Command", "main"]

CommandFunction = Callable[[list[str], str], int]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    summary: str
    target: str  # "package.module:function"

    def load(self) -> CommandFunction:
        module_name, _, function_name = self.target.partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return cast(CommandFunction, function)


COMMANDS: tuple[Command, ...] = (
    Command("serve", "run the STUN/TURN server and the web app", "tsunagu.cli:serve_command"),
    Command(
        "credential",
        "mint TURN REST API credentials, as a web backend would",
        "tsunagu.cli:credential_command",
    ),
    Command(
        "token",
        "mint a join token (an invitation link) for one person and one room",
        "tsunagu.cli:token_command",
    ),
    Command(
        "probe",
        "check a STUN/TURN server (stun, turn: what is wrong and what to do) or load it (load)",
        "tsunagu.probe.cli:probe_command",
    ),
    Command(
        "policy",
        "print the browser policy (chrome) matching the server: a narrow UDP port range",
        "tsunagu.browser_policy:policy_command",
    ),
    Command(
        "user",
        "add, change, delete or list TURN users in the user database",
        "tsunagu.admin.users:user_command",
    ),
    Command(
        "secret",
        "add, delete or list TURN REST secrets in the user database",
        "tsunagu.admin.users:secret_command",
    ),
    Command(
        "revoke",
        "take TURN credentials back: live allocations end, the credentials are refused",
        "tsunagu.admin.users:revoke_command",
    ),
    Command(
        "status",
        "a running server's figures: workers, allocations, relayed bytes, user database",
        "tsunagu.admin.commands:status_command",
    ),
    Command(
        "sessions",
        "a running server's allocations, one a line (--user U: one user's)",
        "tsunagu.admin.commands:sessions_command",
    ),
    Command(
        "kill",
        "end an allocation (SESSION) or all of a user's (--user U) on a running server",
        "tsunagu.admin.commands:kill_command",
    ),
    Command(
        "drain",
        "a running server refuses new allocations and lets the others end",
        "tsunagu.admin.commands:drain_command",
    ),
    Command(
        "reload",
        "a running server reads its user database's secrets, users and revocations again",
        "tsunagu.admin.commands:reload_command",
    ),
    Command("version", "print the version", "tsunagu.cli:version_command"),
)


def _error(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    _error(str(exc.code))
    return 1


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(c.name) for c in COMMANDS)
    listing = "\n".join(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS)
    parser = argparse.ArgumentParser(
        prog="tsunagu",
        description="Self-hosted WebRTC connectivity: STUN/TURN, signaling and video rooms.",
        epilog=f"commands:\n{listing}\n\nRun 'tsunagu COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tsunagu {__version__}")
    parser.add_argument(
        "command",
        metavar="COMMAND",
        choices=[c.name for c in COMMANDS],
        help="one of the commands below, followed by its options",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tsunagu`` command line; return the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not args:
        parser.print_help(sys.stderr)
        return 2
    try:
        parsed = parser.parse_args(args)
        command = next(c for c in COMMANDS if c.name == parsed.command)
        return command.load()(list(parsed.args), f"tsunagu {command.name}")
    except SystemExit as exc:
        # argparse exits for --help and usage errors; callers of main() get a status instead.
        return _exit_status(exc)


# --- serve ----------------------------------------------------------------------------------

ServeFunction = Callable[..., Coroutine[Any, Any, int]]


def _serve_function() -> ServeFunction:
    # Imported here so that the other commands never load the network stack.
    module = importlib.import_module("tsunagu.serve")
    return cast(ServeFunction, module.serve)


def serve_command(argv: list[str], prog: str) -> int:
    """``tsunagu serve``: load the configuration and run everything until stopped."""
    # A reload asked for while the server starts must not end it (serve installs the
    # handler once it can reload); the worker processes inherit this across exec.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = load_config(argv, prog=prog)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    serve = _serve_function()
    from tsunagu.config import build_parser
    from tsunagu.workers import loop_factory

    # A reload reads the same command line again: the file, the flags, the credential files.
    config_file = getattr(build_parser(prog).parse_known_args(argv)[0], "config", None)

    def reread() -> Config:
        return load_config(argv, prog=prog)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return int(runner.run(serve(config, config_file=config_file, reread=reread)))
    except ConfigError as exc:
        # Problems only found while starting up (an unusable certificate, say).
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


# --- credential -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _read_secret(path: str) -> str:
    if path == "-":
        text = sys.stdin.readline()
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.readline()
    return text.rstrip("\r\n")


def credential_command(argv: list[str], prog: str) -> int:
    """``tsunagu credential``: print a TURN REST API username and password."""
    from tsunagu.auth.rest import mint_credentials

    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Mint a time-limited TURN credential from a secret shared with the server "
            "(--use-auth-secret --static-auth-secret): username = '<expiry>:<user>', "
            "password = base64(HMAC-SHA1(secret, username))."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--secret", help="the shared secret (visible to other local users)")
    source.add_argument(
        "--secret-file",
        metavar="FILE",
        help="read the secret from the first line of FILE (- = stdin)",
    )
    parser.add_argument("--user", default="", metavar="ID", help="user id after the expiry")
    parser.add_argument(
        "--ttl",
        type=_positive_int,
        default=Config().credential_ttl,
        metavar="SECONDS",
        help="validity in seconds (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    args = parser.parse_args(argv)

    if args.secret_file is not None:
        try:
            secret = _read_secret(args.secret_file)
        except OSError as exc:
            _error(f"{prog}: cannot read {args.secret_file}: {exc.strerror or exc}")
            return 2
    else:
        secret = args.secret
    if not secret:
        _error(f"{prog}: the secret is empty")
        return 2
    username, password = mint_credentials(secret, args.user, args.ttl, time.time())
    if args.json:
        payload = {"username": username, "password": password, "ttl": args.ttl}
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(f"username: {username}\npassword: {password}\n")
    return 0


# --- token ----------------------------------------------------------------------------------


def token_command(argv: list[str], prog: str) -> int:
    """``tsunagu token``: print a join token, or an invitation link that carries one."""
    import os

    from tsunagu.config import WEB_SECRET_ENV
    from tsunagu.signaling.messages import is_valid_room, normalize_room
    from tsunagu.signaling.tokens import mint_join_token

    variable = WEB_SECRET_ENV["join_secrets"]
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Mint a join token for --room-access token, as the embedding product's backend "
            "would: a JWT (HS256) with room, sub (the identity), exp and optionally name, "
            "signed with the server's join secret. The secret comes from --join-secret-file, "
            f"else {variable}, else the join_secrets of the config file given with -c."
        ),
    )
    parser.add_argument("--room", required=True, help="the room the token opens")
    parser.add_argument(
        "--identity", required=True, metavar="ID", help="who the person is (TURN usernames name it)"
    )
    parser.add_argument("--name", help="display name the person cannot change")
    parser.add_argument(
        "--ttl",
        type=_positive_int,
        default=3600,
        metavar="SECONDS",
        help="how long the token admits its holder (default: %(default)s)",
    )
    parser.add_argument("--no-turn", action="store_true", help="admit without a TURN relay")
    parser.add_argument(
        "--join-secret-file", metavar="FILE", help="first line: the secret (- = stdin)"
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="tsunagu serve's config file")
    parser.add_argument(
        "--url", metavar="BASE", help="print the invitation link under BASE (https://host:port)"
    )
    args = parser.parse_args(argv)

    room = normalize_room(args.room)
    if not is_valid_room(room):
        _error(f"{prog}: --room: 1-48 letters, digits, '-' or '_', got {args.room!r}")
        return 2
    secret = ""
    try:
        if args.join_secret_file is not None:
            secret = _read_secret(args.join_secret_file)
        elif os.environ.get(variable, "").strip():
            secret = os.environ[variable].split()[0]
        elif args.config is not None:
            secrets = load_config(["-c", args.config]).join_secrets
            secret = secrets[0] if secrets else ""
    except OSError as exc:
        _error(f"{prog}: cannot read {args.join_secret_file}: {exc.strerror or exc}")
        return 2
    except ConfigError as exc:
        _error(str(exc))
        return 2
    if not secret:
        _error(
            f"{prog}: no join secret: give --join-secret-file, {variable} or -c with join_secrets"
        )
        return 2
    try:
        token = mint_join_token(
            secret,
            room=room,
            identity=args.identity,
            name=args.name,
            ttl=args.ttl,
            now=time.time(),
            turn=not args.no_turn,
        )
    except ValueError as exc:
        _error(f"{prog}: --identity: {exc}")
        return 2
    if args.url:
        sys.stdout.write(f"{args.url.rstrip('/')}/r/{room}?token={token}\n")
    else:
        sys.stdout.write(token + "\n")
    return 0


# --- version --------------------------------------------------------------------------------


def version_command(argv: list[str], prog: str) -> int:
    """``tsunagu version``."""
    argparse.ArgumentParser(prog=prog, description="Print the version.").parse_args(argv)
    sys.stdout.write(f"tsunagu {__version__}\n")
    return 0
