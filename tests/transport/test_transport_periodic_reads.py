"""The user database's periodic readers (transport/lookups.py) end when closed, whatever a
read does with the cancellation.

A stop waits for them (``serve`` closes the user database after the drain). Python 3.11's
``asyncio.wait_for`` returns the result of a read that finished just as its task was
cancelled, losing the cancellation; the reader then went back to sleep, and the stop waited
for it forever. Here a read loses the cancellation itself, every time: the reader must end
all the same.
"""

from __future__ import annotations

import asyncio

import pytest

from tsunagu.auth.store import StaticCredentialStore
from tsunagu.transport.lookups import SecretsRefresh


class SwallowingDatabase:
    """A database whose driver loses a cancellation (stands in for the race above)."""

    description = "a database that loses cancellations"

    def __init__(self) -> None:
        self.reads = 0
        self.reading = asyncio.Event()

    async def secrets(self, realm: str) -> tuple[str, ...]:
        self.reads += 1
        self.reading.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # lost
        return ("s3cret",)


async def reading(database: SwallowingDatabase | GatedDatabase) -> SecretsRefresh:
    """A reader of ``database``'s secrets, once its first read has begun; its next read
    an hour away, so that a reader that goes back to sleep would hold close for an hour."""
    store = StaticCredentialStore("tsunagu", [], ())
    refresh = SecretsRefresh(database, store, interval=0.0, timeout=5.0)  # type: ignore[arg-type]
    refresh.start()
    await asyncio.wait_for(database.reading.wait(), 2.0)
    refresh.interval = 3600.0
    return refresh


async def test_close_ends_a_reader_whose_read_loses_the_cancellation() -> None:
    database = SwallowingDatabase()
    refresh = await reading(database)
    store = refresh.store
    await asyncio.wait_for(refresh.close(), 2.0)
    assert database.reads == 1
    assert store.database_secrets == ("s3cret",)


class GatedDatabase:
    """A database whose read finishes when the test says."""

    description = "a gated database"

    def __init__(self) -> None:
        self.gate: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self.reading = asyncio.Event()

    async def secrets(self, realm: str) -> tuple[str, ...]:
        self.reading.set()
        return await self.gate


@pytest.mark.parametrize("turns", range(8))
async def test_close_ends_a_reader_whose_read_finishes_as_it_is_cancelled(turns: int) -> None:
    """The cancellation comes ``turns`` turns of the event loop after the read's answer: one
    of them is the moment wait_for lost it."""
    database = GatedDatabase()
    refresh = await reading(database)
    database.gate.set_result(("s3cret",))
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.wait_for(refresh.close(), 2.0)


async def test_a_read_that_takes_too_long_fails_and_the_reader_goes_on() -> None:
    class Slow:
        description = "a slow database"
        reads = 0

        async def secrets(self, realm: str) -> tuple[str, ...]:
            Slow.reads += 1
            await asyncio.sleep(10)
            return ()

    store = StaticCredentialStore("tsunagu", [], ())
    refresh = SecretsRefresh(Slow(), store, interval=0.01, timeout=0.05)  # type: ignore[arg-type]
    assert await refresh.refresh() is False
    assert refresh.last_error == "TimeoutError" and not refresh.working
    refresh.start()
    await asyncio.sleep(0.3)
    await asyncio.wait_for(refresh.close(), 2.0)
    assert Slow.reads >= 3
