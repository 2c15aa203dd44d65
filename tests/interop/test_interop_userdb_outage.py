"""A PostgreSQL or Redis user database that goes away loses no call.

``tsunagu serve --psql-userdb`` (``--redis-userdb``), with its default worker count, serves
50 aioice allocations of users from the database, each relaying a steady stream of packets
to an echo peer. The database is stopped for ``TSUNAGU_OUTAGE_SECONDS`` (8 s here, so that
CI stays quick; ``make -C bench outage`` runs the 30 s of the requirement), then started
again on the same port and data. Checked:

- no allocation is lost: every allocation's Refresh and ChannelBind, sent every 2 s during
  the outage, succeeds (the users' keys are cached for 60 s, and served again past that
  while the database does not answer: ``auth/cache.py``), and each still echoes afterwards;
- no packet is lost beyond what the same load loses with the database up (measured first,
  for as long as the outage);
- a user not yet cached cannot allocate during the outage: 401, and the log names "user
  database unavailable";
- that user allocates again within 5 s of the database's return (the figure is printed).

And a database that is down when the server starts does not stop it: static users serve at
once, the error is logged once per worker, and the database's users and secrets serve as soon
as it is up.

The figures go to the test's output (``-s`` shows them) and to ``record_property``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.stun
import aioice.turn
import pytest

from support.databases import (
    postgres_available,
    postgres_server,
    redis_available,
    redis_server,
)
from support.interop import (
    PASSWORD,
    USER,
    Collector,
    error_code,
    relay_range,
    run_serve,
    run_turnutils_peer,
)
from tsunagu.auth.database import UserDatabase, keys_of_password
from tsunagu.auth.postgres import PostgresUserDatabase
from tsunagu.auth.redis import RedisUserDatabase
from tsunagu.auth.rest import mint_credentials

OUTAGE = float(os.environ.get("TSUNAGU_OUTAGE_SECONDS", "8"))
ALLOCATIONS = 50
PACKET_INTERVAL = 0.1  # per allocation: 500 packets a second in all
REFRESH_INTERVAL = 2.0
RECOVERY_LIMIT = 5.0
REALM = "example.org"

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120 + 3 * OUTAGE)]


def password(number: int) -> str:
    return f"pw-{number}"


@dataclass
class Stream:
    """One allocation's numbered packets to the echo peer, and the echoes counted by phase."""

    transport: Any
    app: Collector
    peer: tuple[str, int]
    sent: dict[str, int] = field(default_factory=dict)
    echoed: dict[str, int] = field(default_factory=dict)
    refreshes: int = 0
    refresh_failures: list[str] = field(default_factory=list)
    sequence: int = 0

    @property
    def inner(self) -> Any:
        return self.transport._TurnTransport__inner_protocol

    async def send(self, phase: str, until: float) -> None:
        while time.monotonic() < until:
            self.sequence += 1
            payload = f"{phase}:{self.sequence}:".encode().ljust(100, b"x")
            self.transport.sendto(payload, self.peer)
            self.sent[phase] = self.sent.get(phase, 0) + 1
            await asyncio.sleep(PACKET_INTERVAL)

    async def receive(self) -> None:
        while True:
            data, _ = await self.app.queue.get()
            phase = data.split(b":", 1)[0].decode()
            self.echoed[phase] = self.echoed.get(phase, 0) + 1

    async def refresh(self, until: float) -> None:
        """Refresh and ChannelBind, authenticated with the user's key, every 2 s."""
        channel = self.inner.peer_to_channel[self.peer]
        while time.monotonic() < until:
            request = aioice.stun.Message(
                message_method=aioice.stun.Method.REFRESH,
                message_class=aioice.stun.Class.REQUEST,
            )
            request.attributes["LIFETIME"] = 600
            try:
                await asyncio.wait_for(self.inner.request_with_retry(request), 5)
                await asyncio.wait_for(self.inner.channel_bind(channel, self.peer), 5)
                self.refreshes += 1
            except Exception as exc:
                self.refresh_failures.append(f"{type(exc).__name__} {error_code(exc)}")
            await asyncio.sleep(REFRESH_INTERVAL)


async def allocate(
    host: str, port: int, username: str, secret: str, timeout: float = 5.0
) -> tuple[Any, Collector]:
    transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector, server_addr=(host, port), username=username, password=secret
        ),
        timeout,
    )
    return transport, app


@dataclass
class Database:
    """A database server of one kind that the test stops and starts, and its connection."""

    kind: str
    server: Any
    flag: str
    connection: str

    def open(self) -> UserDatabase:
        if self.kind == "postgres":
            return PostgresUserDatabase(self.connection)
        return RedisUserDatabase(self.connection)


@contextlib.contextmanager
def database_server(kind: str) -> Iterator[Database]:
    if kind == "postgres":
        if not postgres_available():
            pytest.skip("PostgreSQL 15 is not installed (scripts/setup --test installs it)")
        with postgres_server() as pg:
            yield Database(kind, pg, "--psql-userdb", pg.connection(pg.new_database()))
    else:
        if not redis_available():
            pytest.skip("redis-server is not installed (scripts/setup --test installs it)")
        with redis_server(persistent=True) as redis:
            yield Database(kind, redis, "--redis-userdb", redis.connection(1))


def loss(stream_sent: int, echoed: int) -> float:
    return (stream_sent - echoed) / stream_sent if stream_sent else 0.0


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_a_database_outage_loses_no_allocation_and_no_packet(
    kind: str,
    tmp_path: Path,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with database_server(kind) as database:
        filled = database.open()
        try:
            for number in range(ALLOCATIONS):
                name = f"user{number:02d}"
                await filled.add_user(REALM, name, keys_of_password(name, REALM, password(number)))
            await filled.add_user(REALM, "late", keys_of_password("late", REALM, "late-pw"))
        finally:
            await filled.close()
        # Room for all allocations from one address on either worker.
        low, high = relay_range(400)
        limits = ["--min-port", str(low), "--max-port", str(high), "--address-quota", "0"]
        with (
            run_turnutils_peer(tmp_path) as peer,
            run_serve(
                tmp_path / "serve", database.flag, database.connection, "-r", REALM, *limits
            ) as server,
        ):
            figures = await outage_run(database, server, (peer.host, peer.port))
            # The 401 of the outage is logged with its cause (once per 10 s and worker).
            assert await server.wait_for_log_async("user database unavailable", 15), (
                server.log_text()[-3000:]
            )
            assert database.server.password not in server.log_text()
        for key, value in figures.items():
            record_property(key, value)
        with capsys.disabled():
            sys.stdout.write(
                f"\n{kind} outage of {OUTAGE:g} s: "
                + ", ".join(f"{key} {value}" for key, value in figures.items())
                + "\n"
            )


async def outage_run(database: Database, server: Any, peer: tuple[str, int]) -> dict[str, Any]:
    host, port = server.host, server.port
    made = await asyncio.gather(
        *(allocate(host, port, f"user{n:02d}", password(n), 15) for n in range(ALLOCATIONS))
    )
    streams = [Stream(transport, app, peer) for transport, app in made]
    receivers = [asyncio.create_task(stream.receive()) for stream in streams]
    try:
        # The first packet binds each channel; then the same load with the database up ...
        await asyncio.gather(*(stream.send("warmup", time.monotonic() + 1.0) for stream in streams))
        until = time.monotonic() + OUTAGE
        await asyncio.gather(*(stream.send("baseline", until) for stream in streams))

        # ... and with it down, refreshing every allocation meanwhile.
        database.server.stop()
        stopped = time.monotonic()
        until = stopped + OUTAGE
        late_refused: int | None = None

        async def late_user() -> None:
            nonlocal late_refused
            await asyncio.sleep(1.0)
            try:
                transport, _ = await allocate(host, port, "late", "late-pw")
            except Exception as exc:
                late_refused = error_code(exc)
            else:
                transport.close()
                late_refused = 0

        await asyncio.gather(
            *(stream.send("outage", until) for stream in streams),
            *(stream.refresh(until) for stream in streams),
            late_user(),
        )
        database.server.start()
        restarted = time.monotonic()

        # A user not cached allocates again once the database answers.
        recovered: float | None = None
        attempts = 0
        while time.monotonic() - restarted < 3 * RECOVERY_LIMIT:
            attempts += 1
            try:
                transport, _ = await allocate(host, port, "late", "late-pw", 3)
            except Exception:
                await asyncio.sleep(0.1)
                continue
            recovered = time.monotonic() - restarted
            transport.close()
            break

        await asyncio.gather(*(stream.send("after", time.monotonic() + 1.0) for stream in streams))
        await asyncio.sleep(1.0)  # the last echoes
    finally:
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)

    def total(phase: str, what: str) -> int:
        return sum(getattr(stream, what).get(phase, 0) for stream in streams)

    lost_allocations = sum(
        1
        for stream in streams
        if stream.app.closed.is_set() or stream.refresh_failures or not stream.echoed.get("after")
    )
    baseline = loss(total("baseline", "sent"), total("baseline", "echoed"))
    outage = loss(total("outage", "sent"), total("outage", "echoed"))
    figures = {
        "allocations": len(streams),
        "allocations_lost": lost_allocations,
        "refreshes_during_outage": sum(stream.refreshes for stream in streams),
        "refresh_failures": sum(len(stream.refresh_failures) for stream in streams),
        "packets_baseline": total("baseline", "sent"),
        "loss_baseline_percent": round(100 * baseline, 3),
        "packets_outage": total("outage", "sent"),
        "loss_outage_percent": round(100 * outage, 3),
        "late_user_during_outage": late_refused,
        "seconds_until_new_allocations": None if recovered is None else round(recovered, 2),
        "recovery_attempts": attempts,
    }
    for stream in streams:
        stream.transport.close()

    failures = [f for stream in streams for f in stream.refresh_failures]
    assert lost_allocations == 0, (figures, failures[:10])
    assert figures["refreshes_during_outage"] >= ALLOCATIONS * int(OUTAGE // REFRESH_INTERVAL)
    # Within one percentage point of what the same load loses with the database up.
    assert outage <= baseline + 0.01, figures
    assert late_refused == 401, figures
    assert recovered is not None and recovered <= RECOVERY_LIMIT, figures
    return figures


async def allocates(host: str, port: int, username: str, secret: str) -> int:
    """0 when an allocation succeeds, else its error code (or -1)."""
    try:
        transport, _ = await allocate(host, port, username, secret)
    except Exception as exc:
        return error_code(exc) or -1
    transport.close()
    return 0


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_a_database_down_at_start_does_not_stop_the_server(kind: str, tmp_path: Path) -> None:
    with database_server(kind) as database:
        filled = database.open()
        try:
            await filled.add_user(REALM, "dana", keys_of_password("dana", REALM, "dana-pw"))
            await filled.add_secret(REALM, "db-secret")
        finally:
            await filled.close()
        database.server.stop()
        with run_serve(
            tmp_path / "serve", database.flag, database.connection, "-r", REALM
        ) as server:
            host, port = server.host, server.port
            assert server.log_text().count("unavailable at start") == server.workers
            assert await allocates(host, port, USER, PASSWORD) == 0
            assert await allocates(host, port, "dana", "dana-pw") == 401
            database.server.start()
            started = time.monotonic()
            while await allocates(host, port, "dana", "dana-pw") != 0:
                assert time.monotonic() - started < 10, server.log_text()[-3000:]
                await asyncio.sleep(0.2)
            # The database's secrets are read every 5 s.
            username, credential = mint_credentials("db-secret", "fay", 600, time.time())
            while await allocates(host, port, username, credential) != 0:
                assert time.monotonic() - started < 15, server.log_text()[-3000:]
                await asyncio.sleep(0.5)
            log = server.log_text()
            assert "read again" in log
            assert database.server.password not in log
            assert database.server.password not in server.stdout_path.read_text()
