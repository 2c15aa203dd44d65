"""The admin API and the metrics endpoints of a worker: worker 0 on the operator's socket
(and HTTP), asking the other workers over their private sockets."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..config import Config, ConfigError, admin_socket_path, state_dir
from ..workers import WorkerShare
from .banner import bracket, say
from .running import Running
from .turn_side import TurnSide

if TYPE_CHECKING:
    from ..config_reload import ReloadPlan

log = logging.getLogger("tsunagu")


def native_counters(turn: TurnSide) -> dict[str, int] | None:
    """What the native UDP listeners did without Python: relayed datagrams, Bindings."""
    listeners = [item for item in turn.udp_listeners if hasattr(item, "relayed")]
    if not listeners:
        return None
    return {
        "relayed": sum(int(getattr(item, "relayed", 0)) for item in listeners),
        "bindings": sum(int(getattr(item, "bindings", 0)) for item in listeners),
    }


def admin_token(config: Config) -> str:
    """The HTTP admin API's token; ConfigError (before anything starts) when it is unusable."""
    from ..admin.http import read_token

    assert config.admin_token_file is not None  # the configuration checked it
    try:
        return read_token(config.admin_token_file)
    except OSError as exc:
        raise ConfigError(
            f"config: admin_token_file: cannot read {config.admin_token_file}:"
            f" {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"config: admin_token_file: {exc}") from None


def private_directory() -> str:
    """Where the other workers answer worker 0's admin requests: only this user may enter
    (mkdtemp makes it 0700). In $TMPDIR (short paths: a socket's is at most 107 bytes), else
    in the state directory; empty (logged) when neither can be made."""
    for parent in (None, str(state_dir())):
        try:
            return tempfile.mkdtemp(prefix="tsunagu-admin-", dir=parent)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    log.error("admin API: cannot make a private directory for the workers: %s", problem)
    return ""


def _worker_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


async def start_admin(
    config: Config,
    share: WorkerShare,
    turn: TurnSide,
    started: float,
    config_file: str | None,
    token: str | None,
    running: Running,
    prepare: Callable[[], ReloadPlan] | None,
) -> tuple[list[Any], Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None]:
    """The admin API: worker 0 on the operator's socket (and with ``token`` over HTTP on
    loopback), asking the others on their private ones; each other worker on its private
    socket. What was started, each with ``close()``, what could not be is logged; and in
    worker 0 the handler of admin requests, which SIGHUP's reload goes through too (with
    ``no_admin`` as well, when no socket is opened)."""
    from ..admin.server import (
        MAX_INTERNAL_REQUEST,
        AdminEndpoint,
        AdminServer,
        Peer,
        WorkerControl,
        bind_unix_socket,
        worker_handler,
    )

    started_servers: list[Any] = []
    control = WorkerControl(
        turn.driver,
        turn.users,
        started=started,
        native=lambda: native_counters(turn),
        reconfigure=running.reconfigure,
        certificate=running.reload_certificate,
    )
    endpoint_handler = None
    if share.index > 0:
        if not share.admin_dir:
            return started_servers, None
        path = _worker_socket(share.admin_dir, share.index)
        handler = worker_handler(control)
    else:
        path = str(admin_socket_path(config))
        # Without the private directory the other workers are reported as not answering.
        peers = [
            Peer(index, _worker_socket(share.admin_dir or "/nonexistent", index))
            for index in range(1, config.workers)
        ]
        endpoint = AdminEndpoint(
            control, peers, workers=config.workers, config_file=config_file, prepare=prepare
        )
        handler = endpoint_handler = endpoint.handle
        running.endpoint = endpoint
        if config.no_admin:
            return started_servers, endpoint_handler
        if token is not None:
            from ..admin.http import AdminHttp

            web = AdminHttp(config.admin_port, token, handler)
            try:
                await web.start()
            except OSError as exc:
                log.error("admin API over HTTP: %s", exc.strerror or exc)
            else:
                started_servers.append(web)
                where = " and ".join(bracket(ip) for ip in web.addresses)
                say(f"tsunagu: admin API over HTTP on {where} port {config.admin_port}")
    try:
        if share.index == 0:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        sock = bind_unix_socket(path)
    except OSError as exc:
        log.error(
            "admin socket %s: %s; tsunagu status and the other admin commands cannot reach"
            " this server (--admin-socket PATH chooses another place)",
            path,
            exc.strerror or exc,
        )
        return started_servers, endpoint_handler
    if share.index > 0:
        server = AdminServer(sock, handler, internal=True, max_request=MAX_INTERNAL_REQUEST)
    else:
        server = AdminServer(sock, handler)
    await server.start()
    started_servers.append(server)
    if share.index == 0:
        say(f"tsunagu: admin socket {path} (tsunagu status, sessions, kill, drain, reload)")
    return started_servers, endpoint_handler


async def start_metrics(
    config: Config, share: WorkerShare, turn: TurnSide | None
) -> tuple[Any, list[Any]]:
    """Worker 0's ``/metrics``, ``/healthz`` and ``/readyz`` (admin/metrics.py): the
    exporter, which the web app serves too, and the ``prometheus_port`` listener if one is
    configured. A scrape asks every other worker over its private admin socket, as
    ``tsunagu status`` does. Other workers: (None, [])."""
    if share.index > 0:
        return None, []
    from ..admin.metrics import Exporter, MetricsHttp
    from ..admin.server import AdminEndpoint, Peer, WorkerControl

    gather = None
    if turn is not None:
        running = turn
        control = WorkerControl(
            running.driver,
            running.users,
            started=time.time(),
            native=lambda: native_counters(running),
        )
        # Without the private directory the others show as not answering.
        peers = [
            Peer(index, _worker_socket(share.admin_dir or "/nonexistent", index))
            for index in range(1, config.workers)
        ]
        endpoint = AdminEndpoint(control, peers, workers=config.workers)

        async def gather() -> tuple[list[dict[str, Any]], list[int]]:
            return await endpoint.metrics(per_user=config.metrics_per_user)

    def not_ready() -> list[str]:
        reasons = []
        if turn is not None:
            if turn.driver.server.draining:
                reasons.append("draining")
            users = turn.users
            if users is not None and users.kind != "sqlite" and not users.figures()["reachable"]:
                reasons.append(f"{users.kind} user database unreachable")
        return reasons

    exporter = Exporter(gather, not_ready)
    servers: list[Any] = []
    if config.prometheus_port:
        http = MetricsHttp(exporter, config.prometheus_ip, config.prometheus_port)
        try:
            await http.start()
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s port %d: %s",
                bracket(config.prometheus_ip),
                config.prometheus_port,
                exc.strerror or exc,
            )
        else:
            servers.append(http)
            say(
                f"tsunagu: metrics on http://{bracket(config.prometheus_ip)}:"
                f"{config.prometheus_port}/metrics (and /healthz, /readyz)"
            )
    return exporter, servers
