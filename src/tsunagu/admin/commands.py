"""``tsunagu status``, ``sessions``, ``kill``, ``drain`` and ``reload``: a running server,
through its admin socket.

The socket is ``--admin-socket PATH``, else the ``admin_socket`` of the configuration given
with ``-c FILE``, else admin.sock in the state directory ($XDG_STATE_HOME/tsunagu) — where
``tsunagu serve`` run by the same user listens by default. Each command prints aligned
plain text, or with ``--json`` the server's answer as it came.

Exit status: 0 done; 1 the server could not be reached, refused the request, a worker did
not answer (the others' figures are still printed), or there was nothing to kill with a
session id; 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, admin_socket_path, load_config
from ..config_reload import RESTART_NEEDED
from .client import AdminUnavailable, request

__all__ = [
    "drain_command",
    "kill_command",
    "reload_command",
    "sessions_command",
    "status_command",
]

_SESSION = re.compile(r"\d{1,5}-\d{1,19}")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument(
        "--admin-socket", metavar="PATH", help="the server's admin socket (default: the config's)"
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="tsunagu serve's config file (for admin_socket)"
    )
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    return parser


def _socket(args: argparse.Namespace) -> str:
    if args.admin_socket:
        return str(args.admin_socket)
    return str(admin_socket_path(load_config(["-c", args.config] if args.config else [])))


def _call(prog: str, args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | None:
    try:
        answer = request(_socket(args), payload)
    except (AdminUnavailable, ConfigError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return None
    if answer.get("ok") is not True:
        sys.stderr.write(f"{prog}: the server refused: {answer.get('error', 'no reason given')}\n")
        return None
    return answer


def _finish(prog: str, args: argparse.Namespace, answer: dict[str, Any], text: str) -> int:
    """Print the answer; 1 if a worker did not answer."""
    if args.json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    else:
        sys.stdout.write(text)
    missing = answer.get("not_answering") or []
    for entry in missing:
        sys.stderr.write(
            f"{prog}: worker {entry.get('worker')} did not answer: {entry.get('error')}\n"
        )
    return 1 if missing else 0


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with two spaces between them; numbers on the right."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and rows for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _is_number(text: str) -> bool:
    return text == "-" or text.replace(".", "", 1).isdigit()


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _flow(figures: dict[str, Any]) -> str:
    return f"{figures['packets']} packets, {_size(int(figures['bytes']))}"


# --- status ---------------------------------------------------------------------------------


def status_command(argv: list[str], prog: str) -> int:
    """``tsunagu status``: the running server's figures."""
    parser = _parser(
        prog,
        "Show a running server's figures: workers, allocations, relayed"
        " traffic, draining, the user database.",
    )
    args = parser.parse_args(argv)
    answer = _call(prog, args, {"command": "status"})
    if answer is None:
        return 1
    return _finish(prog, args, answer, status_text(answer))


def status_text(answer: dict[str, Any]) -> str:
    allocations = answer["allocations"]
    relayed = answer["relayed"]
    lines = [
        f"tsunagu {answer['version']}, up {_duration(answer['uptime'])}, pid {answer['pid']},"
        f" {answer['workers']} worker{'s' if answer['workers'] != 1 else ''}",
        "draining: " + ("yes, new allocations are refused" if answer["draining"] else "no"),
        f"allocations: {allocations['total']} (udp {allocations['udp']}, tcp"
        f" {allocations['tcp']}, tls {allocations['tls']})",
        f"relayed to peers: {_flow(relayed['to_peers'])}; to clients:"
        f" {_flow(relayed['to_client'])}; dropped {relayed['dropped']}",
    ]
    native = answer.get("native")
    if native:
        lines.append(
            f"native path: {native['relayed']} datagrams relayed from clients in C,"
            f" {native['bindings']} Binding requests answered in C"
        )
    database = answer.get("user_database")
    if database:
        state = "reachable" if database["reachable"] else f"unreachable ({database['last_error']})"
        lines.append(
            f"user database: {database['description']}, {state},"
            f" {database['cached_users']} cached users, {database['lookups_failed']} of"
            f" {database['lookups']} lookups failed"
        )
    rows = []
    for part in answer.get("per_worker", []):
        part_allocations = part["allocations"]
        part_relayed = part["relayed"]
        rows.append(
            [
                part["worker"],
                part["pid"],
                part_allocations["total"],
                part_allocations["udp"],
                part_allocations["tcp"],
                part_allocations["tls"],
                part_relayed["to_peers"]["bytes"],
                part_relayed["to_client"]["bytes"],
                "yes" if part["draining"] else "no",
            ]
        )
    for entry in answer.get("not_answering", []):
        rows.append([entry["worker"], "-", "-", "-", "-", "-", "-", "-", "not answering"])
    rows.sort(key=lambda row: int(row[0]))
    header = [
        "worker",
        "pid",
        "allocations",
        "udp",
        "tcp",
        "tls",
        "to peers B",
        "to clients B",
        "draining",
    ]
    return "\n".join(lines) + "\n\n" + table(header, rows)


# --- sessions -------------------------------------------------------------------------------


def sessions_command(argv: list[str], prog: str) -> int:
    """``tsunagu sessions``: one line per allocation."""
    parser = _parser(prog, "List a running server's allocations, one a line.")
    parser.add_argument(
        "--user", metavar="U", help="only this user's: a user id (after 'expiry:') or a username"
    )
    args = parser.parse_args(argv)
    payload: dict[str, Any] = {"command": "sessions"}
    if args.user is not None:
        payload["user"] = args.user
    answer = _call(prog, args, payload)
    if answer is None:
        return 1
    return _finish(prog, args, answer, sessions_text(answer))


def sessions_text(answer: dict[str, Any]) -> str:
    sessions = answer["sessions"]
    if not sessions:
        return "no allocations\n"
    rows = [
        [
            s["id"],
            s["user"],
            f"{s['protocol']}:{s['client']}",
            " ".join(s["relayed"]),
            " ".join(s["peers"]) or "-",
            s["to_peers"]["packets"],
            s["to_peers"]["bytes"],
            s["to_client"]["packets"],
            s["to_client"]["bytes"],
            _duration(s["age"]),
        ]
        for s in sessions
    ]
    header = [
        "session",
        "user",
        "client",
        "relayed",
        "peers",
        "to peers pkt",
        "B",
        "to client pkt",
        "B",
        "age",
    ]
    return table(header, rows)


# --- kill -----------------------------------------------------------------------------------


def kill_command(argv: list[str], prog: str) -> int:
    """``tsunagu kill SESSION | --user U``: end allocations now."""
    parser = _parser(
        prog,
        "End an allocation (SESSION, as tsunagu sessions shows it) or all of a user's on"
        " every worker, now; the audit line gives the reason killed. The client may"
        " allocate again: tsunagu revoke takes credentials back.",
    )
    parser.add_argument("session", nargs="?", metavar="SESSION", help="a session id: 1-42")
    parser.add_argument("--user", metavar="U", help="a user id (after 'expiry:') or a username")
    args = parser.parse_args(argv)
    if (args.session is None) == (args.user is None):
        parser.error("give either SESSION or --user U")
    payload: dict[str, Any] = {"command": "kill"}
    if args.session is not None:
        if not _SESSION.fullmatch(args.session):
            parser.error(f"SESSION: a session id such as 1-42, got {args.session!r}")
        payload["session"] = args.session
    else:
        payload["user"] = args.user
    answer = _call(prog, args, payload)
    if answer is None:
        return 1
    ended = int(answer["ended"])
    if args.session is not None:
        text = f"ended session {args.session}\n" if ended else f"no session {args.session}\n"
    else:
        counts = ", ".join(f"worker {p['worker']}: {p['ended']}" for p in answer["per_worker"])
        text = f"ended {ended} allocation{'s' if ended != 1 else ''} of {args.user} ({counts})\n"
    status = _finish(prog, args, answer, text)
    return 1 if args.session is not None and not ended else status


# --- drain ----------------------------------------------------------------------------------


def drain_command(argv: list[str], prog: str) -> int:
    """``tsunagu drain``: refuse new allocations, keep the others."""
    parser = _parser(
        prog,
        "Make every worker refuse new allocations (300 to an alternate server, else 508) while"
        " the others keep relaying until they end, as the first SIGTERM does; the server keeps"
        " running until it is stopped (tsunagu status shows when none is left). Undone by a"
        " restart.",
    )
    args = parser.parse_args(argv)
    answer = _call(prog, args, {"command": "drain"})
    if answer is None:
        return 1
    count = int(answer["allocations"])
    text = (
        f"draining: new allocations are refused; {count} allocation{'s' if count != 1 else ''}"
        " keep relaying until they end\n"
    )
    return _finish(prog, args, answer, text)


# --- reload ---------------------------------------------------------------------------------


def reload_command(argv: list[str], prog: str) -> int:
    """``tsunagu reload``: read the configuration and the user database again."""
    parser = _parser(
        prog,
        "Read the configuration again, as SIGHUP does: the file given with -c, the same"
        " flags, the user and secret files. Applied at once in every worker, without"
        " ending a call: static users, REST secrets, peer ranges, quotas, bandwidth limits,"
        " log level, alternate servers, drain timeout and the TLS certificate (new"
        " handshakes get the new one). The user database is read again too: its secrets,"
        " revocations, and every user (cached keys are dropped). A configuration that is"
        " not valid is refused whole, and the running one is kept. Only a restart changes: "
        + "; ".join(RESTART_NEEDED)
        + ".",
    )
    args = parser.parse_args(argv)
    answer = _call(prog, args, {"command": "reload"})
    if answer is None:
        return 1
    lines = []
    failed = False
    configuration = answer["configuration"]
    where = f"configuration file {configuration['file']}" if configuration.get("file") else None
    if not configuration.get("reloaded"):
        lines.append(configuration.get("note", "the configuration was not read again"))
    else:
        lines.append(f"{where or 'the configuration'}: read again")
        applied = configuration.get("applied") or []
        if applied:
            lines.append("applied:")
            lines.extend(f"  {item['option']}: {item['what']}" for item in applied)
        else:
            lines.append("no option a reload applies has changed")
        if configuration.get("restart_needed"):
            lines.append(
                "changed, but only a restart applies: " + ", ".join(configuration["restart_needed"])
            )
        certificates = {
            part["configuration"]["certificate"]
            for part in answer["per_worker"]
            if part.get("configuration", {}).get("certificate")
        }
        for fingerprint in sorted(certificates):
            lines.append(f"TLS certificate read again, now serving SHA-256 {fingerprint}")
        for error in configuration.get("errors") or []:
            failed = True
            lines.append(f"not applied: {error}")
    for part in answer["per_worker"]:
        database = part.get("user_database")
        if database is None:
            lines.append(f"worker {part['worker']}: no user database")
            continue
        if database["error"]:
            failed = True
            lines.append(f"worker {part['worker']}: {database['description']}: {database['error']}")
            continue
        lines.append(
            f"worker {part['worker']}: {database['secrets']} REST secrets in the database,"
            f" revocations read, {database['cached_users_dropped']} cached users dropped"
        )
    status = _finish(prog, args, answer, "\n".join(lines) + "\n")
    return 1 if failed else status
