"""The admin endpoint of a running server, which ``tsunagu status``, ``sessions``, ``kill``,
``drain`` and ``reload`` talk to.

Protocol: a client connects to a Unix socket, sends one JSON object on one line (at most
:data:`MAX_REQUEST` bytes, within :data:`READ_TIMEOUT` seconds) and reads one JSON object
back on one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; then the server
closes the connection. Whoever can connect is the operator: the socket is made mode 0600,
owned by the server's user.

Worker 0 listens on the operator's socket (:class:`AdminEndpoint`). It answers for itself
and asks every other worker over that worker's private socket (in a 0700 directory worker 0
made), each within :data:`WORKER_TIMEOUT` seconds, and merges the answers; a worker that does
not answer in time is named in ``not_answering`` while the others' figures still come back.
A worker's private socket speaks the same protocol and answers for that worker alone
(:class:`WorkerControl`).

Bounded throughout: :data:`MAX_CONNECTIONS` connections at once (beyond that the oldest one
still waiting for its request is closed, so that an operator's command gets through however
many idle connections are open), the request's size and read time, and the size of a
worker's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import __version__
from ..config import Config, ConfigError, config_from_json, config_to_json
from ..config_reload import LIVE, RESTART_NEEDED, ReloadPlan
from ..transport.driver import TurnDriver
from ..turn.allocation import Allocation
from ..turn.server import Session
from .metrics import worker_figures

__all__ = [
    "COMMANDS",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "READ_TIMEOUT",
    "WORKER_TIMEOUT",
    "AdminEndpoint",
    "AdminServer",
    "Handler",
    "RequestError",
    "UserDatabaseControl",
    "WorkerControl",
    "bind_unix_socket",
    "parse_request",
]

log = logging.getLogger("tsunagu")

COMMANDS = ("status", "sessions", "kill", "drain", "reload", "metrics")
MAX_REQUEST = 64 * 1024
"""Bytes of one request line; a longer one gets an error."""
READ_TIMEOUT = 5.0
"""Seconds a client has to send its request once connected."""
MAX_CONNECTIONS = 32
"""Connections handled at once on one socket."""
WORKER_TIMEOUT = 2.0
"""Seconds worker 0 waits for another worker's answer."""
RELOAD_TIMEOUT = 10.0
"""Seconds worker 0 waits for another worker to reload (it reads its user database)."""
MAX_ANSWER = 64 * 1024 * 1024
"""Bytes of one worker's answer (a long list of sessions) worker 0 reads at most."""
_MAX_USER = 513  # coturn's longest username
_SESSION = re.compile(r"(\d{1,5})-(\d{1,19})")
_FIELDS = {
    "status": frozenset(),
    "sessions": frozenset({"user"}),
    "kill": frozenset({"session", "user"}),
    "drain": frozenset(),
    "reload": frozenset(),
    "metrics": frozenset({"per_user"}),
    # Internal: worker 0 asks the others to load a renewed certificate (ACME).
    "certificate": frozenset(),
}
MAX_INTERNAL_REQUEST = 16 * 1024 * 1024
"""Bytes of one request worker 0 sends another worker (a whole configuration, every static
user in it)."""


class RequestError(ValueError):
    """A request the endpoint cannot take; the message goes back to the client."""


def parse_request(line: bytes, *, internal: bool = False) -> dict[str, Any]:
    """The request in ``line``, checked: a JSON object naming a known command with only the
    fields that command takes, each of the right type and size. ``internal``: on a worker's
    private socket, where reload carries worker 0's new configuration."""
    try:
        document = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"not a JSON object: {exc}") from None
    if not isinstance(document, dict):
        raise RequestError("not a JSON object")
    command = document.get("command")
    if not isinstance(command, str) or command not in (_FIELDS if internal else COMMANDS):
        raise RequestError(f"'command' must be one of {', '.join(COMMANDS)}")
    fields = _FIELDS[command] | ({"config"} if internal and command == "reload" else set())
    extra = set(document) - {"command"} - fields
    if extra:
        raise RequestError(f"{command} takes no {', '.join(sorted(map(str, extra)))}")
    request: dict[str, Any] = {"command": command}
    user = document.get("user")
    if user is not None:
        if not isinstance(user, str) or not 0 < len(user) <= _MAX_USER:
            raise RequestError(f"'user' must be a string of 1 to {_MAX_USER} characters")
        request["user"] = user
    session = document.get("session")
    if session is not None:
        if not isinstance(session, str) or not _SESSION.fullmatch(session):
            raise RequestError("'session' must be a session id such as 1-42 (tsunagu sessions)")
        request["session"] = session
    per_user = document.get("per_user")
    if per_user is not None:
        if not isinstance(per_user, bool):
            raise RequestError("'per_user' must be true or false")
        request["per_user"] = per_user
    config = document.get("config")
    if config is not None:
        if not isinstance(config, dict):
            raise RequestError("'config' must be an object")
        request["config"] = config
    if command == "kill" and ("user" in request) == ("session" in request):
        raise RequestError("kill takes either 'session' or 'user'")
    return request


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


# ----------------------------------------------------------------------------- one worker


class UserDatabaseControl(Protocol):
    """A worker's user database, as the admin endpoint sees it."""

    def figures(self) -> dict[str, Any]:
        """Kind, description, reachable, cached users, failed lookups."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Read the REST secrets and revocations now, forget the cached users; what it did."""
        ...


def _address(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def session_record(driver: TurnDriver, session: Session, now: float) -> dict[str, Any]:
    """One allocation as the admin API shows it."""
    five_tuple = session.five_tuple
    return {
        "id": driver.session_id(session.number),
        "worker": driver.worker,
        "user": session.user,
        "username": session.username,
        "protocol": five_tuple.protocol,
        "client": _address((str(five_tuple.client[0]), int(five_tuple.client[1]))),
        "server": _address((str(five_tuple.server[0]), int(five_tuple.server[1]))),
        "relayed": [_address(address) for address in session.relayed],
        "peers": list(session.peers),
        "channels": session.channels,
        "to_peers": {"packets": session.packets_to_peers, "bytes": session.bytes_to_peers},
        "to_client": {"packets": session.packets_to_client, "bytes": session.bytes_to_client},
        "dropped": session.dropped,
        "age": round(max(0.0, now - session.created), 1),
        "expires_in": round(max(0.0, session.expiry - now), 1),
    }


class WorkerControl:
    """Answers admin requests for one worker: its core, through its driver."""

    def __init__(
        self,
        driver: TurnDriver,
        users: UserDatabaseControl | None,
        *,
        started: float,
        native: Callable[[], dict[str, int] | None] = lambda: None,
        reconfigure: Callable[[Config], Awaitable[dict[str, Any]]] | None = None,
        certificate: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.driver = driver
        self.users = users
        self.started = started
        self.native = native
        """Counters of the native per-packet path (relayed, bindings) where it runs."""
        self.reconfigure = reconfigure
        """Applies a reloaded configuration in this worker; what it did."""
        self.certificate = certificate
        """Loads the configured certificate from its files again; what it did."""

    @property
    def worker(self) -> int:
        return self.driver.worker

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """This worker's part of the answer to a checked ``request``."""
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "sessions":
            return self.sessions(request.get("user"))
        if command == "kill":
            return self.kill(request.get("session"), request.get("user"))
        if command == "drain":
            return self.drain()
        if command == "metrics":
            return self.metrics(per_user=bool(request.get("per_user")))
        if command == "certificate":
            done = {} if self.certificate is None else self.certificate()
            return {"worker": self.worker, **done}
        return await self.reload(request.get("config"))

    def status(self) -> dict[str, Any]:
        driver = self.driver
        by_protocol = {"udp": 0, "tcp": 0, "tls": 0}
        for five_tuple in driver.server.allocations:
            by_protocol[five_tuple.protocol] = by_protocol.get(five_tuple.protocol, 0) + 1
        totals = list(driver.ended_counters)
        for session in driver.sessions():
            totals[0] += session.packets_to_peers
            totals[1] += session.bytes_to_peers
            totals[2] += session.packets_to_client
            totals[3] += session.bytes_to_client
            totals[4] += session.dropped
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "draining": driver.server.draining,
            "allocations": {"total": len(driver.server.allocations), **by_protocol},
            "ended": driver.ended_count,
            "relayed": _relayed(totals),
            "native": self.native(),
            "user_database": None if self.users is None else self.users.figures(),
        }

    def metrics(self, *, per_user: bool = False) -> dict[str, Any]:
        """This worker's figures for a Prometheus scrape (:mod:`.metrics`); with
        ``per_user``, its busiest users too."""
        return worker_figures(self.driver, self.users, self.native(), per_user=per_user)

    def sessions(self, user: str | None) -> dict[str, Any]:
        driver = self.driver
        match = None if user is None else driver.server.of_user(user)
        now = time.time()
        return {
            "worker": self.worker,
            "sessions": [session_record(driver, s, now) for s in driver.sessions(match)],
        }

    def kill(self, session: str | None, user: str | None) -> dict[str, Any]:
        match: Callable[[Allocation], bool]
        if session is not None:
            found = _SESSION.fullmatch(session)
            assert found is not None  # parse_request checked it
            worker, number = int(found.group(1)), int(found.group(2))
            if worker != self.worker:
                return {"worker": self.worker, "ended": 0}

            def match(allocation: Allocation) -> bool:
                return allocation.number == number

        else:
            assert user is not None
            match = self.driver.server.of_user(user)
        ended = self.driver.end_allocations(match, "killed")
        if ended:
            what = f"session {session}" if session is not None else f"user {user!r}"
            log.info("tsunagu kill %s: %d allocations ended (worker %d)", what, ended, self.worker)
        return {"worker": self.worker, "ended": ended}

    def drain(self) -> dict[str, Any]:
        server = self.driver.server
        if not server.draining:
            log.info(
                "draining (tsunagu drain): new allocations refused, %d keep relaying",
                len(server.allocations),
            )
        server.start_drain()
        return {"worker": self.worker, "draining": True, "allocations": len(server.allocations)}

    async def reload(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply ``config`` (worker 0's reloaded configuration, as JSON) when given, then
        read the user database again."""
        part: dict[str, Any] = {"worker": self.worker, "user_database": None}
        if config is not None and self.reconfigure is not None:
            try:
                parsed = config_from_json(config)
            except ConfigError as exc:
                part["configuration"] = {"error": str(exc)}
            else:
                part["configuration"] = await self.reconfigure(parsed)
        if self.users is None:
            return part
        done = await self.users.reload()
        log.info(
            "tsunagu reload: user database read again, %d cached users dropped%s (worker %d)",
            done.get("cached_users_dropped", 0),
            f"; {done['error']}" if done.get("error") else "",
            self.worker,
        )
        part["user_database"] = done
        return part


def _relayed(totals: Sequence[int]) -> dict[str, Any]:
    return {
        "to_peers": {"packets": totals[0], "bytes": totals[1]},
        "to_client": {"packets": totals[2], "bytes": totals[3]},
        "dropped": totals[4],
    }


# ----------------------------------------------------------------------------- every worker


@dataclass(frozen=True, slots=True)
class Peer:
    """Another worker: its index and private socket."""

    index: int
    path: str


async def ask_worker(peer: Peer, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``peer``'s part of the answer to ``request``; raises OSError, TimeoutError or
    ValueError when it does not come, whole and well-formed, within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(peer.path, limit=MAX_ANSWER)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    if not line:
        raise ValueError("it closed the connection without an answer")
    answer = json.loads(line)
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ValueError(str(error or "a malformed answer"))
    part = answer.get("part")
    if not isinstance(part, dict):
        raise ValueError("a malformed answer")
    return part


class AdminEndpoint:
    """Worker 0's answers: its own part and every other worker's, merged."""

    def __init__(
        self,
        local: WorkerControl,
        peers: Iterable[Peer],
        *,
        workers: int,
        config_file: str | None = None,
        timeout: float = WORKER_TIMEOUT,
        prepare: Callable[[], ReloadPlan] | None = None,
    ) -> None:
        self.local = local
        self.peers = tuple(peers)
        self.workers = workers
        self.config_file = config_file
        self.timeout = timeout
        self.prepare = prepare
        """Reads the configuration again and checks it (raising ConfigError); None where
        the server was not started from a command line."""

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        plan = None
        if request["command"] == "reload" and self.prepare is not None:
            try:
                plan = self.prepare()
            except ConfigError as exc:
                log.error("reload refused, the running configuration is kept: %s", exc)
                return {
                    "ok": False,
                    "command": "reload",
                    "error": f"configuration refused, the running one is kept: {exc}",
                }
            request = {**request, "config": config_to_json(plan.config)}
        parts, missing = await self._gather(request)
        command = request["command"]
        merged: dict[str, Any]
        if command == "status":
            merged = self._status(parts)
        elif command == "sessions":
            sessions = [s for part in parts for s in part["sessions"]]
            merged = {"sessions": sessions}
        elif command == "kill":
            merged = {
                "ended": sum(int(part["ended"]) for part in parts),
                "per_worker": [{"worker": p["worker"], "ended": p["ended"]} for p in parts],
            }
        elif command == "metrics":
            merged = {"per_worker": parts}
        elif command == "drain":
            merged = {
                "draining": True,
                "allocations": sum(int(part["allocations"]) for part in parts),
                "per_worker": parts,
            }
        else:
            merged = {"per_worker": parts, "configuration": self._reloaded(plan, parts)}
        return {"ok": True, "command": command, **merged, "not_answering": missing}

    async def certificate_renewed(self) -> None:
        """Every worker loads the certificate from its files again (ACME renewed it)."""
        parts, missing = await self._gather({"command": "certificate"})
        errors = [f"worker {p['worker']}: {p['error']}" for p in parts if p.get("error")]
        errors += [f"worker {m['worker']}: {m['error']}" for m in missing]
        serving = sorted({p["certificate"] for p in parts if p.get("certificate")})
        if errors:
            log.error("renewed certificate not in service everywhere: %s", "; ".join(errors))
        log.info(
            "renewed certificate in service in %d of %d workers (SHA-256 %s)",
            len(parts) - sum(1 for p in parts if p.get("error")),
            self.workers,
            ", ".join(serving),
        )

    def _reloaded(self, plan: ReloadPlan | None, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The configuration part of reload's answer, and the same in the log."""
        restart_only = list(RESTART_NEEDED)
        if plan is None:
            return {
                "file": self.config_file,
                "reloaded": False,
                "note": "only the user database was read again: this server was not started"
                " from a command line it can read again",
                "restart_only": restart_only,
            }
        errors = [
            f"worker {part['worker']}: {part['configuration']['error']}"
            for part in parts
            if part.get("configuration", {}).get("error")
        ]
        log.info(
            "reload: configuration%s read again; %s%s%s",
            f" file {self.config_file}" if self.config_file else "",
            f"applied {', '.join(plan.applied)}" if plan.applied else "no live option changed",
            f"; changed but only a restart applies them: {', '.join(plan.restart_needed)}"
            if plan.restart_needed
            else "",
            f"; {'; '.join(errors)}" if errors else "",
        )
        return {
            "file": self.config_file,
            "reloaded": True,
            "applied": [{"option": name, "what": LIVE[name]} for name in plan.applied],
            "restart_needed": list(plan.restart_needed),
            "errors": errors,
            "restart_only": restart_only,
        }

    async def metrics(self, *, per_user: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
        """Every answering worker's figures for a scrape, and the index of every worker."""
        parts, _ = await self._gather({"command": "metrics", "per_user": per_user})
        return parts, [self.local.worker, *(peer.index for peer in self.peers)]

    async def _gather(
        self, request: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        peers = self.peers
        if request["command"] == "kill" and "session" in request:
            # Only the worker the id names holds that allocation.
            index = int(request["session"].partition("-")[0])
            peers = tuple(peer for peer in peers if peer.index == index)
        timeout = self.timeout
        if request["command"] == "reload":
            timeout = max(timeout, RELOAD_TIMEOUT)
        results = await asyncio.gather(
            self.local.answer(request),
            *(ask_worker(peer, request, timeout) for peer in peers),
            return_exceptions=True,
        )
        parts: list[dict[str, Any]] = []
        missing: list[dict[str, Any]] = []
        for index, result in zip(
            (self.local.worker, *(p.index for p in peers)), results, strict=True
        ):
            if isinstance(result, BaseException):
                missing.append({"worker": index, "error": _why(result, timeout)})
                if index == self.local.worker:
                    log.error("admin request failed", exc_info=result)
            else:
                parts.append(result)
        parts.sort(key=lambda part: int(part["worker"]))
        return parts, missing

    def _status(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        totals = [0, 0, 0, 0, 0]
        allocations = {"total": 0, "udp": 0, "tcp": 0, "tls": 0}
        for part in parts:
            relayed = part["relayed"]
            totals[0] += relayed["to_peers"]["packets"]
            totals[1] += relayed["to_peers"]["bytes"]
            totals[2] += relayed["to_client"]["packets"]
            totals[3] += relayed["to_client"]["bytes"]
            totals[4] += relayed["dropped"]
            for key in allocations:
                allocations[key] += int(part["allocations"].get(key, 0))
        natives = [part["native"] for part in parts if part.get("native")]
        native = None
        if natives:
            native = {
                "relayed": sum(int(n["relayed"]) for n in natives),
                "bindings": sum(int(n["bindings"]) for n in natives),
            }
        databases = [part["user_database"] for part in parts if part["user_database"]]
        user_database: dict[str, Any] | None = None
        if databases:
            first = databases[0]
            user_database = {
                "kind": first["kind"],
                "description": first["description"],
                "reachable": all(d["reachable"] for d in databases),
                "last_error": next((d["last_error"] for d in databases if d["last_error"]), ""),
                "cached_users": sum(int(d["cached_users"]) for d in databases),
                "lookups": sum(int(d["lookups"]) for d in databases),
                "lookups_failed": sum(int(d["lookups_failed"]) for d in databases),
            }
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.local.started, 1),
            "workers": self.workers,
            "draining": any(part["draining"] for part in parts),
            "allocations": allocations,
            "relayed": _relayed(totals),
            "native": native,
            "user_database": user_database,
            "per_worker": parts,
        }


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {timeout:g} s"
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return "not running (its socket does not answer)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- the sockets


def bind_unix_socket(path: str) -> socket.socket:
    """A Unix stream socket listening at ``path``, mode 0600.

    A socket file left by a server that is gone is replaced; a live one (another server
    answers there) or a file that is not a socket is an error (OSError), never removed.
    """
    if len(os.fsencode(path)) >= 108:
        raise OSError(
            errno.ENAMETOOLONG, f"the socket path is too long (at most 107 bytes): {path}"
        )
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left by a server that is gone
            except OSError:
                pass
            else:
                raise OSError(errno.EADDRINUSE, f"another server answers on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Made 0600 from the start: no moment when another user could connect.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AdminServer:
    """Serves the admin protocol on a bound Unix socket with ``handler``'s answers."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
        internal: bool = False,
    ) -> None:
        self.sock = sock
        self.internal = internal
        """A worker's private socket: worker 0's reload carries its configuration."""
        self.path = str(sock.getsockname())
        self._inode = os.stat(self.path).st_ino
        self.handler = handler
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.max_request = max_request
        self._server: asyncio.AbstractServer | None = None
        # Connections by arrival, and whether each still waits for its request.
        self._connections: dict[asyncio.StreamWriter, bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.evicted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._connected, sock=self.sock, limit=self.max_request
        )

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if len(self._connections) >= self.max_connections and not self._evict():
                await _reply(writer, _error("busy: too many admin connections"))
                return
            self._connections[writer] = True
            request = await self._read(reader)
            if writer not in self._connections:
                return  # evicted while it waited
            # Read: from now on it is an operator's command, never evicted.
            self._connections[writer] = False
            answer = request if "ok" in request else await self._handle(request)
            await _reply(writer, answer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.pop(writer, None)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _evict(self) -> bool:
        """Close the oldest connection still waiting for its request; whether there was one."""
        for writer, waiting in self._connections.items():
            if waiting:
                self._connections.pop(writer)
                self.evicted += 1
                writer.close()
                return True
        return False

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """The checked request, or the error answer to send instead (it has "ok")."""
        try:
            line = await asyncio.wait_for(reader.readline(), self.read_timeout)
        except TimeoutError:
            return _error(f"no request within {self.read_timeout:g} s")
        except (ValueError, asyncio.LimitOverrunError):
            return _error(f"request over {self.max_request} bytes")
        if not line.strip():
            return _error("empty request: send one JSON object on one line")
        try:
            return parse_request(line, internal=self.internal)
        except RequestError as exc:
            return _error(str(exc))

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.handler(request)
        except Exception as exc:  # a bug must cost this request, not the server
            log.exception("admin request %s failed", request.get("command"))
            return _error(f"internal error: {type(exc).__name__}")

    async def close(self) -> None:
        """Stop listening, end the connections, remove the socket file if it is still ours."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


async def _reply(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
    await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


def worker_handler(control: WorkerControl) -> Handler:
    """A worker's private socket: its own part of each answer."""

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "part": await control.answer(request)}

    return handle
