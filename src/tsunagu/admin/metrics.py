"""Prometheus metrics and health answers of a running server: ``/metrics``, ``/healthz``,
``/readyz``.

Nothing here counts. Every figure is read at scrape time from what the server already
keeps: the core's counters (``TurnServer.responses``, ``drops``, ``bindings``, the refusal
tallies' ``total``), the driver's totals of ended allocations, the live allocations' own
counters plus what the native engine holds for them (``pending_counters``: a few attribute
reads of the C relay objects), the native listeners' ``relayed`` and ``bindings``, the
user database's lookups and the signaling hub's plain counts. The relay path does no work
for metrics.

One scrape covers every worker process. Worker 0 serves ``/metrics``; it takes its own
figures (:func:`worker_figures`) and asks each other worker for theirs over the admin API's
private sockets (the ``metrics`` request, each within the admin API's 2 s), then renders
them in Prometheus's classic text format (:func:`render`). Process figures (CPU, memory,
open files) carry a ``worker`` label; everything else is summed over the workers, since a
client's allocation lives in whichever worker the kernel picked and only the server's total
means something. A worker that does not answer in time is ``tsunagu_worker_up{worker=...}
0`` and its figures are missing from that one scrape.

User names appear only with ``metrics_per_user``: then each worker sends its
:data:`PER_USER_LIMIT` users with the most relayed bytes (their live allocations) and the
rest summed as ``other``; worker 0 keeps the same number after merging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..signaling.access import TokenBucket
from ..transport.driver import TurnDriver, family_label
from ..turn.quotas import user_id

__all__ = [
    "CONTENT_TYPE",
    "PER_USER_LIMIT",
    "Exporter",
    "MetricsHttp",
    "process_figures",
    "render",
    "worker_figures",
]

log = logging.getLogger("tsunagu")

CONTENT_TYPE = CONTENT_TYPE_LATEST
PER_USER_LIMIT = 20
"""Users named in the per-user metrics; the rest are summed under ``other``."""
TRANSPORTS = ("udp", "tcp", "tls")
_PROCESS = ProcessCollector(registry=None)


class UserDatabaseFigures(Protocol):
    def figures(self) -> dict[str, Any]: ...


def process_figures() -> dict[str, float]:
    """This process's figures as prometheus-client's process collector reads them
    (``/proc/self``): CPU seconds, resident and virtual memory, open and allowed files,
    start time."""
    found: dict[str, float] = {}
    for family in _PROCESS.collect():
        for sample in family.samples:
            found[sample.name] = float(sample.value)
    return found


def worker_figures(
    driver: TurnDriver,
    users: UserDatabaseFigures | None,
    native: dict[str, int] | None,
    *,
    per_user: bool = False,
) -> dict[str, Any]:
    """One worker's part of a scrape: plain data (JSON) from the counters it keeps.

    O(live allocations): each allocation's counters, and the native engine's for it.
    """
    server = driver.server
    active: dict[str, int] = {}
    relayed = {name: list(values) for name, values in driver.ended_by_transport.items()}
    pending = driver.engine.pending_counters
    by_user: dict[str, list[int]] = {}
    separator = server.settings.rest_api_separator
    for allocation in server.allocations.values():
        protocol = allocation.five_tuple.protocol
        key = f"{protocol} {family_label(allocation)}"
        active[key] = active.get(key, 0) + 1
        extra = pending(allocation)
        figures = (
            allocation.packets_to_peers + extra[0],
            allocation.bytes_to_peers + extra[1],
            allocation.packets_to_client + extra[2],
            allocation.bytes_to_client + extra[3],
            allocation.dropped + extra[4],
        )
        totals = relayed.get(protocol)
        if totals is None:
            totals = relayed[protocol] = [0, 0, 0, 0, 0]
        for index, value in enumerate(figures):
            totals[index] += value
        if per_user:
            name = user_id(allocation.username, separator)
            mine = by_user.get(name)
            if mine is None:
                mine = by_user[name] = [0, 0, 0]
            mine[0] += 1
            mine[1] += figures[1]
            mine[2] += figures[3]
    drops = dict(server.drops)
    listener_drops = sum(listener.dropped for listener in driver.udp_listeners.values())
    if listener_drops:
        drops["udp send failed"] = drops.get("udp send failed", 0) + listener_drops
    database = None
    if users is not None:
        found = users.figures()
        database = {
            "kind": str(found.get("kind", "")),
            "reachable": bool(found.get("reachable", True)),
            "lookups": int(found.get("lookups", 0)),
            "lookups_failed": int(found.get("lookups_failed", 0)),
            "cached_users": int(found.get("cached_users", 0)),
        }
    return {
        "worker": driver.worker,
        "process": process_figures(),
        "draining": server.draining,
        "allocations": active,
        "created": {f"{t} {f}": n for (t, f), n in driver.created.items()},
        "ended": driver.ended_count,
        "relayed": relayed,
        "responses": {str(code): n for code, n in server.responses.items()},
        "refusals": dict(server.refusals.total),
        "drops": drops,
        "failures": dict(driver.failures.total),
        "bindings": server.bindings,
        "native": native,
        "user_database": database,
        "users": _top_users(by_user) if per_user else None,
    }


def _top_users(by_user: dict[str, list[int]]) -> dict[str, list[int]]:
    """The :data:`PER_USER_LIMIT` users with the most relayed bytes, the rest as other."""
    ranked = sorted(by_user.items(), key=lambda item: -(item[1][1] + item[1][2]))
    kept = dict(ranked[:PER_USER_LIMIT])
    rest = ranked[PER_USER_LIMIT:]
    if rest:
        other = kept.setdefault("other", [0, 0, 0])
        for _, values in rest:
            for index, value in enumerate(values):
                other[index] += value
    return kept


# ----------------------------------------------------------------------------- rendering


def _sum(parts: Iterable[dict[str, Any]], field: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, value in (part.get(field) or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def render(
    parts: Sequence[dict[str, Any]],
    workers: Sequence[int],
    hub: dict[str, Any] | None,
    restarts: Mapping[int, int] | None = None,
) -> bytes:
    """The scrape in Prometheus's classic text format: the answering workers' ``parts``
    (:func:`worker_figures`) summed, process figures per worker, ``workers`` the indexes of
    every worker that should have answered, ``hub`` the signaling figures (worker 0's web
    app) or None, ``restarts`` how often worker 0 started each worker again."""
    metrics: list[Metric] = []
    answered = {int(part["worker"]) for part in parts}
    up = GaugeMetricFamily(
        "tsunagu_worker_up", "1 when the worker's figures are in this scrape", labels=["worker"]
    )
    started_again = CounterMetricFamily(
        "tsunagu_worker_restarts",
        "Times worker 0 started the worker again after it exited (a crash, the OOM killer)",
        labels=["worker"],
    )
    for index in workers:
        up.add_metric([str(index)], 1.0 if index in answered else 0.0)
        started_again.add_metric([str(index)], float((restarts or {}).get(index, 0)))
    metrics += [up, started_again]
    metrics.append(
        GaugeMetricFamily(
            "tsunagu_draining",
            "1 while the server drains (tsunagu drain, SIGTERM): new allocations refused",
            value=1.0 if any(part.get("draining") for part in parts) else 0.0,
        )
    )
    if workers:
        metrics += _turn_metrics(parts)
    metrics += _process_metrics(parts)
    if hub is not None:
        metrics += _hub_metrics(hub)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)


def _turn_metrics(parts: Sequence[dict[str, Any]]) -> list[Metric]:
    metrics: list[Metric] = []
    active = GaugeMetricFamily(
        "tsunagu_allocations",
        "Allocations alive now, by client transport and relayed address family",
        labels=["transport", "family"],
    )
    for key, value in sorted(_sum(parts, "allocations").items()):
        active.add_metric(key.split(" ", 1), value)
    created = CounterMetricFamily(
        "tsunagu_allocations_created",
        "Allocations created, by client transport and relayed address family",
        labels=["transport", "family"],
    )
    for key, value in sorted(_sum(parts, "created").items()):
        created.add_metric(key.split(" ", 1), value)
    ended = CounterMetricFamily("tsunagu_allocations_ended", "Allocations that ended")
    ended.add_metric([], sum(int(part.get("ended", 0)) for part in parts))
    metrics += [active, created, ended]

    packets = CounterMetricFamily(
        "tsunagu_relayed_packets",
        "Packets relayed, by client transport and direction (to_peer, to_client)",
        labels=["transport", "direction"],
    )
    octets = CounterMetricFamily(
        "tsunagu_relayed_bytes",
        "Payload bytes relayed, by client transport and direction (to_peer, to_client)",
        labels=["transport", "direction"],
    )
    dropped = CounterMetricFamily(
        "tsunagu_relay_dropped_packets",
        "Packets of allocations dropped on the way (a paused client, a full socket buffer)",
        labels=["transport"],
    )
    relayed: dict[str, list[int]] = {name: [0, 0, 0, 0, 0] for name in TRANSPORTS}
    for part in parts:
        for name, values in (part.get("relayed") or {}).items():
            totals = relayed.setdefault(name, [0, 0, 0, 0, 0])
            for index, value in enumerate(values):
                totals[index] += int(value)
    for name, totals in relayed.items():
        packets.add_metric([name, "to_peer"], totals[0])
        packets.add_metric([name, "to_client"], totals[2])
        octets.add_metric([name, "to_peer"], totals[1])
        octets.add_metric([name, "to_client"], totals[3])
        dropped.add_metric([name], totals[4])
    metrics += [packets, octets, dropped]

    for name, field, text, label in (
        (
            "tsunagu_responses",
            "responses",
            "STUN/TURN responses sent, by code (200: success)",
            "code",
        ),
        (
            "tsunagu_refusals",
            "refusals",
            "Requests refused, by cause (wrong password, unknown user, expired credential,"
            " revoked credential, user database unavailable, stale nonce, peer denied, quotas...)",
            "cause",
        ),
        ("tsunagu_drops", "drops", "Messages dropped without an answer, by cause", "cause"),
        (
            "tsunagu_transport_failures",
            "failures",
            "Failures only the transport sees (TLS handshakes, bytes that are not STUN), by cause",
            "cause",
        ),
    ):
        family = CounterMetricFamily(name, text, labels=[label])
        for key, value in sorted(_sum(parts, field).items()):
            family.add_metric([key], value)
        metrics.append(family)

    bindings = CounterMetricFamily(
        "tsunagu_stun_binding_requests",
        "STUN Binding requests, by the path that answered (native: in C, python: the core)",
        labels=["path"],
    )
    bindings.add_metric(["python"], sum(int(part.get("bindings", 0)) for part in parts))
    natives = [part["native"] for part in parts if part.get("native")]
    bindings.add_metric(["native"], sum(int(n.get("bindings", 0)) for n in natives))
    native_relayed = CounterMetricFamily(
        "tsunagu_native_relayed_datagrams",
        "Datagrams from clients the native path relayed without reaching Python (included in"
        " tsunagu_relayed_packets_total)",
    )
    native_relayed.add_metric([], sum(int(n.get("relayed", 0)) for n in natives))
    metrics += [bindings, native_relayed]

    databases = [part["user_database"] for part in parts if part.get("user_database")]
    if databases:
        kind = str(databases[0]["kind"])
        reachable = GaugeMetricFamily(
            "tsunagu_userdb_up",
            "1 when every worker reaches the user database",
            labels=["kind"],
        )
        reachable.add_metric([kind], 1.0 if all(d["reachable"] for d in databases) else 0.0)
        lookups = CounterMetricFamily(
            "tsunagu_userdb_lookups", "Key lookups in the user database", labels=["kind"]
        )
        lookups.add_metric([kind], sum(int(d["lookups"]) for d in databases))
        failed = CounterMetricFamily(
            "tsunagu_userdb_lookup_failures",
            "Key lookups that failed (the database unreachable or too slow)",
            labels=["kind"],
        )
        failed.add_metric([kind], sum(int(d["lookups_failed"]) for d in databases))
        cached = GaugeMetricFamily(
            "tsunagu_userdb_cached_users", "Users whose keys are cached now", labels=["kind"]
        )
        cached.add_metric([kind], sum(int(d["cached_users"]) for d in databases))
        metrics += [reachable, lookups, failed, cached]

    user_parts = [part["users"] for part in parts if part.get("users") is not None]
    if user_parts:
        merged: dict[str, list[int]] = {}
        for users in user_parts:
            for name, values in users.items():
                mine = merged.setdefault(name, [0, 0, 0])
                for index, value in enumerate(values):
                    mine[index] += int(value)
        top = _top_users(merged)
        allocations = GaugeMetricFamily(
            "tsunagu_user_allocations",
            f"Allocations alive now by user id (the {PER_USER_LIMIT} busiest, the rest as other)",
            labels=["user"],
        )
        traffic = GaugeMetricFamily(
            "tsunagu_user_relayed_bytes",
            "Bytes relayed by the live allocations of a user id, by direction",
            labels=["user", "direction"],
        )
        for name, values in sorted(top.items()):
            allocations.add_metric([name], values[0])
            traffic.add_metric([name, "to_peer"], values[1])
            traffic.add_metric([name, "to_client"], values[2])
        metrics += [allocations, traffic]
    return metrics


_PROCESS_HELP = {
    "process_cpu_seconds_total": ("counter", "User and system CPU time, seconds"),
    "process_resident_memory_bytes": ("gauge", "Resident memory, bytes"),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory, bytes"),
    "process_open_fds": ("gauge", "Open file descriptors"),
    "process_max_fds": ("gauge", "Limit of open file descriptors"),
    "process_start_time_seconds": ("gauge", "Start time since the Unix epoch, seconds"),
}


def _process_metrics(parts: Sequence[dict[str, Any]]) -> list[Metric]:
    metrics: list[Metric] = []
    for name, (kind, text) in _PROCESS_HELP.items():
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(name.removesuffix("_total"), text, labels=["worker"])
        else:
            family = GaugeMetricFamily(name, text, labels=["worker"])
        for part in parts:
            value = (part.get("process") or {}).get(name)
            if value is not None:
                family.add_metric([str(part["worker"])], float(value))
        metrics.append(family)
    return metrics


def _hub_metrics(hub: dict[str, Any]) -> list[Metric]:
    metrics: list[Metric] = []
    for name, key, text in (
        ("tsunagu_signaling_rooms", "rooms", "Rooms with someone in them"),
        ("tsunagu_signaling_people", "people", "People holding a seat in a room"),
        ("tsunagu_signaling_connections", "connections", "Signaling WebSockets open"),
        (
            "tsunagu_signaling_held_bytes",
            "held",
            "Bytes the signaling hub keeps for resumes: replays and away peers' messages",
        ),
    ):
        metrics.append(GaugeMetricFamily(name, text, value=float(hub.get(key, 0))))
    for name, key, text in (
        ("tsunagu_signaling_messages", "messages", "Signaling messages received"),
        ("tsunagu_signaling_joins", "joins", "Joins admitted (resumed seats included)"),
    ):
        family = CounterMetricFamily(name, text)
        family.add_metric([], float(hub.get(key, 0)))
        metrics.append(family)
    refused = CounterMetricFamily(
        "tsunagu_signaling_refusals",
        "Signaling error answers and refused joins, by code or cause",
        labels=["code"],
    )
    for key, value in sorted((hub.get("refused") or {}).items()):
        refused.add_metric([str(key)], float(value))
    metrics.append(refused)
    return metrics


# ----------------------------------------------------------------------------- the exporter


class Exporter:
    """Worker 0's scrapes and health answers.

    ``gather`` returns (parts, workers) for a scrape: the answering workers' figures and
    the index of every worker that should answer (see ``AdminEndpoint.metrics``); None when
    this server runs no TURN. ``hub`` gives the signaling figures, once the web app runs.
    ``ready`` says why the server should get no new clients now (empty: ready).
    """

    def __init__(
        self,
        gather: Callable[[], Any] | None,
        ready: Callable[[], list[str]],
    ) -> None:
        self.gather = gather
        self.ready = ready
        self.hub: Callable[[], dict[str, Any]] | None = None
        self.restarts: Mapping[int, int] = {}
        """How often worker 0 started each worker again (``workers.keep_workers``)."""
        self.stopping = False
        """Set once the server got its stop signal: not ready from then on."""
        self._running: asyncio.Future[bytes] | None = None

    async def scrape(self) -> bytes:
        """The text of one scrape. Requests that come while one is being gathered share
        its answer: however many arrive at once, the workers are asked once."""
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(self._scrape())
            running.add_done_callback(self._done)
        return await asyncio.shield(running)

    def _done(self, done: asyncio.Future[bytes]) -> None:
        if self._running is done:
            self._running = None

    async def _scrape(self) -> bytes:
        parts: list[dict[str, Any]] = []
        workers: list[int] = []
        if self.gather is not None:
            parts, workers = await self.gather()
        hub = None
        if self.hub is not None:
            try:
                hub = self.hub()
            except Exception:  # the web app is stopping; the TURN figures still count
                log.debug("signaling figures unavailable", exc_info=True)
        if not parts:
            # Without TURN, this process's own figures still come with the signaling ones.
            parts = [{"worker": 0, "process": process_figures()}]
        return render(parts, workers, hub, self.restarts)

    def health(self) -> tuple[int, bytes]:
        return 200, b'{"ok":true}\n'

    def readiness(self) -> tuple[int, bytes]:
        reasons = (["stopping"] if self.stopping else []) + self.ready()
        body = json.dumps({"ready": not reasons, "reasons": reasons}).encode() + b"\n"
        return (503 if reasons else 200), body


class MetricsHttp:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a port of their own (``prometheus_port``)."""

    def __init__(self, exporter: Exporter, ip: str, port: int) -> None:
        self.exporter = exporter
        self.ip = ip
        self.port = port
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=1024)
        for path, handler in routes(self.exporter).items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=10)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.ip, self.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


WEB_SCRAPES: Final = (5.0, 10.0)
"""Scrapes a second, and the burst, that the web port's ``/metrics`` answers in all."""


def routes(exporter: Exporter, *, scrapes: tuple[float, float] | None = None) -> dict[str, Any]:
    """aiohttp handlers of ``/metrics``, ``/healthz`` and ``/readyz`` (the web port mounts
    them too).

    ``scrapes`` (rate, burst) bounds the scrapes answered, whoever asks: the web port may
    face the internet, and a scrape costs every worker a pass over its allocations, so
    that anyone could otherwise turn requests into the relay's CPU. Beyond it the answer is
    429. Prometheus asks every few seconds; the ``prometheus_port`` listener has no bound.
    """
    from aiohttp import web

    bucket = None if scrapes is None else TokenBucket(*scrapes, time.monotonic())

    async def metrics(request: web.Request) -> web.StreamResponse:
        if bucket is not None and not bucket.take(time.monotonic()):
            return web.Response(
                status=429,
                text="too many scrapes of this port; scrape prometheus_port instead\n",
                headers={"Retry-After": "1"},
            )
        body = await exporter.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.StreamResponse:
        status, body = exporter.health()
        return web.Response(status=status, body=body, content_type="application/json")

    async def readyz(request: web.Request) -> web.StreamResponse:
        status, body = exporter.readiness()
        return web.Response(status=status, body=body, content_type="application/json")

    return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}
