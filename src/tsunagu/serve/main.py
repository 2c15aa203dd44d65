"""``tsunagu serve``: the configuration turned into running parts.

:func:`serve` turns the configuration into :class:`~tsunagu.turn.TurnSettings`, binds the
listeners on concrete addresses (a wildcard is expanded into the machine's addresses, so
every listener knows the IP a client reached and relays from that same IP), starts the
other worker processes and the web app, prints what a user needs to connect, and waits for
a signal.

The first SIGTERM or SIGINT drains: no new TCP/TLS clients, new Allocates are refused
(300 to the alternate servers in turn, else 508), existing allocations keep relaying until they
end or ``drain_timeout`` passes. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import faulthandler
import io
import logging
import os
import random
import shutil
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..logs import setup_logging
from ..workers import (
    DRAINED_LINE,
    READING_LINE,
    READY_LINE,
    Sockets,
    Worker,
    WorkerShare,
    keep_workers,
    release_workers,
    start_workers,
    wait_drained,
    wait_exited,
    wait_reading,
)
from .banner import internal_network_line, room_access_line, say, say_turn, web_app_line
from .control import admin_token, private_directory, start_admin, start_metrics
from .running import Running, acme_at_start, keep_acme_current, prepare_reload, reload_on_signal
from .settings import (
    listening_addresses,
    local_addresses,
    rest_secrets,
    web_serves_https,
    with_worker_count,
)
from .turn_side import (
    TurnSide,
    WorkerSockets,
    bind_every_worker,
    drain,
    start_turn_side,
    worker_endpoints,
)

if TYPE_CHECKING:
    from ..config_reload import ReloadPlan

log = logging.getLogger("tsunagu")


def _raise_open_files_limit() -> None:
    """Every allocation holds a socket: lift the soft limit on open files to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit above %d: %s", soft, exc)


def _setup_logging(config: Config) -> None:
    # Worker processes run this with the same configuration: same destination, same format.
    setup_logging(config.effective_log_level, config.log_format, config.log_file, config.audit_file)


def _log_tasks() -> None:
    for task in asyncio.all_tasks():
        where = io.StringIO()
        task.print_stack(limit=8, file=where)
        log.warning("task %s waits:\n%s", task.get_name(), where.getvalue().rstrip())


_START_MARGIN = 10.0
"""Seconds worker 0 waits for the other workers to read their UDP sockets once told to."""


_DRAIN_MARGIN = 10.0
"""Seconds beyond the drain timeout a worker waits for the others to finish draining."""


async def _start_udp_and_say(turn: TurnSide, loop: asyncio.AbstractEventLoop) -> None:
    await turn.start_udp(loop)
    with contextlib.suppress(OSError):  # worker 0 may be gone
        say(READING_LINE)


def _close_held(held: list[WorkerSockets]) -> None:
    """Close worker 0's copies of the workers' sockets (its own are its listeners')."""
    for each in held[1:]:
        each.close()


async def _bounded(waiting: Awaitable[Any], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waiting, timeout)


async def serve(
    config: Config,
    share: WorkerShare | None = None,
    *,
    config_file: str | None = None,
    reread: Callable[[], Config] | None = None,
) -> int:
    """Run everything ``config`` enables until a signal; return the exit status.

    With ``workers`` > 1 this process is worker 0 (and serves the web app); it starts the
    other workers, which run this function with the same configuration and ``share``.
    ``config_file`` is the file given with ``-c``, named by ``tsunagu reload``'s answer;
    ``reread`` reads the configuration again from the same command line, for reloads.
    """
    started = time.time()
    # A reload asked for while the server starts (systemctl reload, a SIGHUP to the process
    # group) must not end it: ignored until the handler below is in place. Worker processes
    # inherit this across exec, so their start is covered from their first instruction.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A process that will not stop can be asked why: SIGABRT writes every thread's stack.
    faulthandler.enable()
    http_token = None
    if config.admin_port and not config.no_admin and (share is None or share.index == 0):
        http_token = admin_token(config)
    config = with_worker_count(config)
    _setup_logging(config)
    _raise_open_files_limit()
    loop = asyncio.get_running_loop()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A bug in a callback must be seen in the server's own log, and must not stop it.
        log.error("unexpected error: %s", context.get("message"), exc_info=context.get("exception"))

    loop.set_exception_handler(on_loop_error)

    if share is None:
        share = WorkerShare("", random.SystemRandom().randbytes(32), 0)
        # The web page mints time-limited credentials; without an operator's secret one
        # derived from the share's random secret keeps that working with no configuration.
        share = dataclasses.replace(share, turn_secret=rest_secrets(config, share)[0])
    turn_secret = share.turn_secret
    listening = listening_addresses(config)
    if config.internal_networks and not config.no_turn and not listening:
        log.error(
            "internal_networks: none of this machine's addresses (%s) lies inside %s: nothing"
            " to listen on; give listening_ips inside them",
            ", ".join(local_addresses()),
            ", ".join(str(net) for net in config.internal_networks),
        )
        return 1

    running = Running(config, share, listening)
    ssl_context: ssl.SSLContext | None = None
    material: Any = None
    web_tls = web_serves_https(config)
    need_tls = (not config.no_turn and not config.no_tls and not config.stun_only) or web_tls
    acme = None
    if need_tls and config.acme_domains and share.index == 0:
        acme = await acme_at_start(config)
    if need_tls:
        from ..tls import ServingCertificate

        material = running.material(config)
        running.certificate = ServingCertificate(material)
        ssl_context = running.certificate.context

    turn: TurnSide | None = None
    children: list[Worker] = []
    admin: list[Any] = []
    admin_handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    admin_dir = ""
    # With several workers, worker 0 binds every worker's listening sockets and keeps them
    # (see bind_every_worker); [k] is worker k's.
    held: list[WorkerSockets] = []
    held_fds: list[Sockets] = []
    if not config.no_turn:
        own: WorkerSockets | None = None
        if share.index == 0 and config.workers > 1:
            every = bind_every_worker(
                worker_endpoints(config, listening, ssl_context), config.workers
            )
            if every is None:
                return 1
            held = every
            held_fds = [each.fds() for each in held]
            own = held[0]
        elif share.index > 0:
            own = WorkerSockets.from_fds(share.udp_fds, share.tcp_fds)
        turn = await start_turn_side(
            config, share, listening, rest_secrets(config, share), ssl_context, own
        )
        if turn is None:
            if own is not None:
                own.close()
            _close_held(held)
            return 1
        running.turn = turn
        if share.index == 0 and config.workers > 1:
            # The workers' private sockets are how a reload, a renewed certificate and a
            # scrape reach them, with or without the operator's socket (no_admin).
            admin_dir = private_directory()
            share = dataclasses.replace(share, admin_dir=admin_dir)
            children = await start_workers(config, share, held_fds)
            if len(children) != config.workers - 1:
                if admin_dir:
                    shutil.rmtree(admin_dir, ignore_errors=True)
                turn.close_listeners()
                _close_held(held)
                log.error("worker processes did not start")
                return 1
            release_workers(children)
        if share.index == 0:
            # The other workers start on worker 0's word, on their stdin (below); ready
            # means every worker reads.
            await turn.start_udp(loop)
            reading = await wait_reading(children, _START_MARGIN)
            if reading < len(children):
                log.warning("%d worker processes did not start reading", len(children) - reading)
        say_turn(
            config, listening, turn.endpoints, turn.engine.name, ssl_context, material, turn_secret
        )
        prepare = None
        if reread is not None:
            source = reread

            def prepare() -> ReloadPlan:
                return prepare_reload(running, source)

        admin, admin_handler = await start_admin(
            config, share, turn, started, config_file, http_token, running, prepare
        )

    renewals = None if acme is None else loop.create_task(keep_acme_current(acme, running))
    exporter, metrics_servers = await start_metrics(config, share, turn)
    runner: Any = None
    if not config.no_web:
        from ..signaling.server import revoke_user, run_web

        web_ssl = ssl_context if web_tls else None
        from ..admin.metrics import WEB_SCRAPES, routes
        from ..signaling.server import hub_figures

        runner = await run_web(
            config,
            None if config.no_turn else turn_secret,
            web_ssl,
            extra_routes=None if exporter is None else routes(exporter, scrapes=WEB_SCRAPES),
        )
        running.web = runner
        if exporter is not None:
            signaling = runner
            exporter.hub = lambda: hub_figures(signaling)
        if turn is not None and turn.users is not None:
            web = runner
            turn.users.on_user_revoked = lambda user: revoke_user(web, user)
        say(web_app_line(config, material if web_tls else None))
        say(room_access_line(config))
    internal = internal_network_line(config)
    if internal is not None and share.index == 0:
        say(internal)

    stop = asyncio.Event()
    signals_seen = 0
    # A worker that exits while the server runs is started again, with the configuration
    # in force (reloads included).
    keeper = None
    if children:
        restarts: collections.Counter[int] = collections.Counter()
        if exporter is not None:
            exporter.restarts = restarts

        def given_up(index: int) -> None:
            # Its clients go to the other workers rather than to sockets nobody reads.
            held[index].close()

        keeper = loop.create_task(
            keep_workers(
                children,
                lambda: running.config,
                share,
                held_fds,
                given_up=given_up,
                restarts=restarts,
            )
        )

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "draining: no new allocations; waiting up to %ss", running.config.drain_timeout
            )
            stop.set()
            if keeper is not None:
                keeper.cancel()  # from now on a worker that exits has stopped
            for child in children:
                child.signal(signal.SIGTERM)
        else:
            log.info("second signal: exiting now")
            for child in children:
                child.kill()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    # SIGUSR1: where every task of this worker waits, in the log (a stop that hangs).
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    # Tasks started by signals and by worker 0's word, held until done.
    background: set[asyncio.Task[None]] = set()
    if share.index == 0:
        reload_handler = admin_handler

        def on_hangup() -> None:
            if reload_handler is None:
                log.info("SIGHUP: nothing to reload without TURN")
                return
            task = loop.create_task(reload_on_signal(reload_handler))
            background.add(task)
            task.add_done_callback(background.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    else:
        # Worker 0 asks this worker over its admin socket; a SIGHUP sent to the whole
        # process group must not end it.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    parent_gone = asyncio.Event()
    if share.index > 0:
        # A worker drains when its parent goes away: the parent holds our stdin open. The
        # parent's first line on it says every worker has bound the ports.
        def on_stdin() -> None:
            data = os.read(0, 4096)
            if not data:
                loop.remove_reader(0)
                parent_gone.set()
                stop.set()
            elif turn is not None and turn.waiting_udp:
                task = loop.create_task(_start_udp_and_say(turn, loop))
                background.add(task)
                task.add_done_callback(background.discard)

        loop.add_reader(0, on_stdin)
    say(READY_LINE)
    await stop.wait()
    if keeper is not None:
        # Cancelled by the signal handler: wait for its end (a worker it was starting
        # again is killed).
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    if renewals is not None:
        renewals.cancel()
        await asyncio.gather(renewals, return_exceptions=True)
    if exporter is not None:
        exporter.stopping = True  # /readyz: 503 from now on, while the drain runs

    if turn is not None:
        for item in turn.servers:
            item.close()
        for each in held[1:]:
            # No worker is started again from now on: new TCP connections must not wait
            # on listeners nobody will accept from.
            each.close_tcp()
    if runner is not None:
        await runner.cleanup()
    if turn is not None:
        await drain(turn, running.config.drain_timeout)
        # Every worker's UDP sockets stay bound until all workers have drained: one that
        # leaves the port's group makes the kernel hash other workers' clients anew.
        if share.index > 0:
            with contextlib.suppress(OSError):  # worker 0 may be gone (then stdin is closed)
                say(DRAINED_LINE)
            await _bounded(parent_gone.wait(), running.config.drain_timeout + _DRAIN_MARGIN)
        elif children:
            drained = await wait_drained(children, running.config.drain_timeout + _DRAIN_MARGIN)
            if drained < len(children):
                log.warning("%d worker processes did not finish draining", len(children) - drained)
            release_workers(children, stop=True)
        for listener in turn.udp_listeners:
            listener.close()
        if turn.counter is not None:
            turn.counter.close()  # what is left of the interval's counts reaches the log
        if turn.users is not None:
            await turn.users.close()
    for item in admin:
        await item.close()
    await wait_exited(children, 5.0)
    _close_held(held)
    # Open until the other workers are gone too: /readyz keeps saying 503 while any of
    # them still drains its allocations.
    for item in metrics_servers:
        await item.close()
    if admin_dir:
        shutil.rmtree(admin_dir, ignore_errors=True)
    await asyncio.sleep(0)
    log.info("stopped")
    return 0
