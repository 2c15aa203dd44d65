"""Key lookups in the user database, off the relay's path.

When the core has no key at hand for a request's user it returns a
:class:`~tsunagu.turn.KeyLookup`; the listener hands it here with a way to hand the same
request in again. :class:`KeyLookups` asks the database once per user however many requests
wait for it, puts the answer in the store's :class:`~tsunagu.auth.cache.KeyCache` (keys, "no
such user", or "the database did not answer"), then hands every waiting request in again,
which now finds its answer. The event loop never waits on the database: relaying, and users
already cached, carry on while a query runs, and while the database is away.

Only requests that passed the nonce check get this far, so over UDP a lookup costs the
sender a round trip from its own address first. Everything is bounded all the same: the
users being looked up at once (``pending_limit``: a flood of made-up names), the requests
waiting per user (``waiting_per_user``: retransmissions), the queries in flight
(``concurrency``) and each query's time (``timeout``). A request beyond a bound is dropped
and counted; its client retransmits.

:class:`SecretsRefresh` keeps the database's TURN REST secrets in the store, read every
``interval`` seconds, so that REST credentials never wait on a query; on an error the
secrets last read stay in use. :class:`RevocationWatch` reads new revocations every half
second (``tsunagu revoke`` writes them to the database), so that every worker, and every
other tsunagu process sharing the database, ends the allocations they cover within a second
and refuses the credentials from then on.

Failures are counted and written once per report interval (:meth:`KeyLookups.report`), not
once per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..auth.cache import KeyCache
from ..auth.database import DatabaseError, PeerRanges, UserDatabase
from ..auth.store import StaticCredentialStore
from ..logs import structured
from ..turn.authentication import KeyLookup
from ..turn.revocations import Revocation, RevocationList

__all__ = ["KeyLookups", "LookupFigures", "RevocationWatch", "SecretsRefresh"]

log = logging.getLogger("tsunagu")


@dataclass
class LookupFigures:
    """What the lookups did since the last report."""

    queries: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str = ""
    seen: dict[str, int] = field(default_factory=dict)


class KeyLookups:
    """Looks users up in ``database`` for the core, into ``cache``, bounded."""

    def __init__(
        self,
        database: UserDatabase,
        cache: KeyCache,
        *,
        concurrency: int = 8,
        pending_limit: int = 256,
        waiting_per_user: int = 8,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.cache = cache
        self.pending_limit = pending_limit
        self.waiting_per_user = waiting_per_user
        self.timeout = timeout
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting: dict[tuple[str, str], list[Callable[[], None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.figures = LookupFigures()
        self.total_queries = 0
        self.total_failed = 0

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def submit(self, lookup: KeyLookup, again: Callable[[], None]) -> bool:
        """Look ``lookup``'s user up, then call ``again``; False when a bound dropped it."""
        key = (lookup.realm, lookup.username)
        waiting = self._waiting.get(key)
        if waiting is not None:
            if len(waiting) >= self.waiting_per_user:
                self.figures.dropped += 1
                return False
            waiting.append(again)
            return True
        if len(self._waiting) >= self.pending_limit:
            self.figures.dropped += 1
            return False
        self._waiting[key] = [again]
        task = asyncio.get_running_loop().create_task(self._resolve(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _resolve(self, key: tuple[str, str]) -> None:
        realm, name = key
        try:
            async with self._slots:
                self.figures.queries += 1
                self.total_queries += 1
                generation = self.cache.generation
                try:
                    keys = await asyncio.wait_for(
                        self.database.user_keys(realm, name), self.timeout
                    )
                except (DatabaseError, TimeoutError, OSError) as exc:
                    self._failed(exc)
                    if self.cache.generation == generation:
                        self.cache.put_failure(realm, name, self._clock())
                else:
                    # A reload or revocation while the query ran may have dropped exactly
                    # this user: the waiting requests then look up again.
                    if self.cache.generation == generation:
                        self.cache.put(realm, name, keys, self._clock())
        finally:
            for again in self._waiting.pop(key, ()):
                try:
                    again()
                except Exception:  # one request's failure must not strand the others
                    log.exception("a request that waited for a key lookup failed")

    def _failed(self, exc: BaseException) -> None:
        self.figures.failed += 1
        self.total_failed += 1
        text = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            text = f"no answer in {self.timeout:g} s"
        self.figures.last_error = text

    def report(self, *, worker: int, interval: float) -> None:
        """Log what failed since the last report, once."""
        figures, self.figures = self.figures, LookupFigures()
        if not figures.failed and not figures.dropped:
            return
        text = (
            f"user database {self.database.description}: {figures.failed} of "
            f"{figures.queries} key lookups failed in the last {interval:g} s"
        )
        if figures.last_error:
            text += f" ({figures.last_error})"
        if figures.dropped:
            text += f"; {figures.dropped} requests dropped, too many lookups waiting"
        text += f"; cached users and live allocations carry on (worker {worker})"
        fields = {
            "event": "database",
            "cause": "lookups failed" if figures.failed else "lookups dropped",
            "database": self.database.description,
            "failed": figures.failed,
            "queries": figures.queries,
            "dropped": figures.dropped,
            "error": figures.last_error,
            "interval": interval,
            "worker": worker,
        }
        log.warning("%s", text, extra=structured(fields))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Periodic:
    """Reads something from ``database`` every ``interval`` seconds until closed; one log
    line when reading starts failing and one when it works again, not one a read."""

    what = "data"

    def __init__(self, database: UserDatabase, *, interval: float, timeout: float) -> None:
        self.database = database
        self.interval = interval
        self.timeout = timeout
        self.failed = 0
        self.last_error = ""
        self.working = True
        """Whether the last read worked."""
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def read(self) -> None:
        raise NotImplementedError

    async def refresh(self) -> bool:
        """Read once; whether it worked."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result of a
            # read that finished as the task was cancelled, and the cancellation is lost.
            async with asyncio.timeout(self.timeout):
                await self.read()
        except (DatabaseError, TimeoutError, OSError) as exc:
            self.failed += 1
            self.last_error = str(exc) or type(exc).__name__
            self.working = False
            return False
        self.working = True
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # From the state of the read before start: a database already down then was logged
        # by the caller, and is said to work again when it does.
        working = self.working
        while not self._closed:
            await asyncio.sleep(self.interval)
            if await self.refresh():
                if not working:
                    log.info(
                        "user database %s: %s read again", self.database.description, self.what
                    )
                working = True
            elif working:
                working = False
                log.warning(
                    "user database %s: cannot read the %s (%s); %s",
                    self.database.description,
                    self.what,
                    self.last_error,
                    self.meanwhile(),
                )

    def meanwhile(self) -> str:
        return "what was read last stays in use"

    async def close(self) -> None:
        # The flag ends the loop even if a cancellation is lost inside a read (a driver
        # that swallows it): close must not wait for a loop that goes on.
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class SecretsRefresh(_Periodic):
    """Reads the realm's REST secrets from ``database`` into ``store`` every ``interval``,
    and its allowed and denied peer ranges and its options (coturn's turn_realm_option),
    handed to ``on_ranges`` and ``on_options`` when they change."""

    what = "REST secrets, peer ranges and realm options"

    def __init__(
        self,
        database: UserDatabase,
        store: StaticCredentialStore,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        on_ranges: Callable[[PeerRanges], None] | None = None,
        on_options: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        super().__init__(database, interval=interval, timeout=timeout)
        self.store = store
        self.on_ranges = on_ranges
        self.ranges = PeerRanges()
        self.on_options = on_options
        self.options: dict[str, str] = {}

    async def read(self) -> None:
        self.store.database_secrets = await self.database.secrets(self.store.realm)
        if self.on_ranges is not None:
            ranges = await self.database.peer_ranges(self.store.realm)
            if ranges != self.ranges:
                self.ranges = ranges
                self.on_ranges(ranges)
        if self.on_options is not None:
            options = await self.database.realm_options(self.store.realm)
            if options != self.options:
                self.options = options
                self.on_options(options)

    def meanwhile(self) -> str:
        return f"the {len(self.store.database_secrets)} read last stay in use"


class RevocationWatch(_Periodic):
    """Reads new revocations from ``database`` every ``interval`` seconds into ``store``'s
    list, and hands each new one to ``revoked`` (which ends the allocations it covers)."""

    what = "revocations"

    def __init__(
        self,
        database: UserDatabase,
        store: StaticCredentialStore,
        revocations: RevocationList,
        revoked: Callable[[Revocation], None],
        *,
        interval: float = 0.5,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(database, interval=interval, timeout=timeout)
        self.store = store
        self.list = revocations
        store.revocations = revocations
        self._revoked = revoked
        self._clock = clock

    async def read(self) -> None:
        now = self._clock()
        found = await self.database.revocations(self.store.realm, self.list.last_number, now)
        self.list.prune(now)
        for revocation in found:
            if self.list.add(revocation):
                self._revoked(revocation)

    def meanwhile(self) -> str:
        return f"the {len(self.list)} revocations read last stay in force"
