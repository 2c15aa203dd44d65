"""One worker's user database: its users looked up through a cache, its secrets, peer ranges
and realm options read again every few seconds, its revocations followed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..auth.backends import open_user_database, remote
from ..auth.cache import KeyCache
from ..auth.database import DatabaseError, PeerRanges, UserDatabase
from ..auth.store import StaticCredentialStore
from ..config import Config
from ..logs import structured
from ..transport.driver import TurnDriver
from ..transport.lookups import KeyLookups, RevocationWatch, SecretsRefresh
from ..turn import PeerPolicy, TurnServer
from ..turn.policy import IPNetwork, parse_range
from ..turn.quotas import user_id
from ..turn.revocations import Revocation, RevocationList

log = logging.getLogger("tsunagu")


@dataclass
class WorkerUserDatabase:
    """The user database of one worker, its key lookups and its secrets' refresh."""

    database: UserDatabase
    lookups: KeyLookups | None
    refresh: SecretsRefresh
    watch: RevocationWatch | None = None
    kind: str = "sqlite"
    on_user_revoked: Callable[[str], None] | None = None
    """Closes a revoked user's signaling sessions, in the process that runs the web app."""
    config: Config | None = None
    """The configured quotas and max-bps, which the realm's options in the database override."""
    base_policy: PeerPolicy | None = None
    """The configured peer policy, to which the database's peer ranges are added."""

    async def watch_revocations(
        self, store: StaticCredentialStore, driver: TurnDriver, ttl: float, worker: int
    ) -> None:
        """Read the revocations in force, then follow new ones: each ends the allocations
        made with what it covers, and the user's signaling sessions."""

        def revoked(revocation: Revocation) -> None:
            ended = driver.server.revoke(revocation, ttl, time.time())
            driver.after_core_call()
            what = revocation.credential or revocation.user or "credentials"
            log.info(
                "revocation %d of %s: %d allocations ended (worker %d)",
                revocation.number,
                what,
                ended,
                worker,
                extra=structured(
                    {"event": "revoked", "revocation": revocation.number, "ended": ended}
                ),
            )
            user = revocation.user or (revocation.credential and user_id(revocation.credential))
            if user and self.on_user_revoked is not None:
                self.on_user_revoked(user)

        self.watch = RevocationWatch(self.database, store, RevocationList(ttl), revoked)
        if not await self.watch.refresh():
            log.warning(
                "user database %s: cannot read the revocations (%s)",
                self.database.description,
                self.watch.last_error,
            )
        self.watch.start()

    async def follow_peer_ranges(self, server: TurnServer) -> None:
        """Add the realm's allowed and denied peer ranges in the database to ``server``'s
        peer policy, now and whenever they change (coturn's allowed_peer_ip and
        denied_peer_ip tables, read with the secrets)."""
        self.base_policy = server.settings.policy

        def apply(ranges: PeerRanges) -> None:
            assert self.base_policy is not None
            lists: dict[str, list[IPNetwork]] = {"allowed": [], "denied": []}
            ignored = []
            for kind, texts in (("allowed", ranges.allowed), ("denied", ranges.denied)):
                for text in texts:
                    try:
                        lists[kind] += parse_range(text)
                    except ValueError:
                        ignored.append(text[:64])
            if ignored:
                log.warning(
                    "user database %s: peer ranges not understood, ignored: %s",
                    self.database.description,
                    ", ".join(ignored[:10]),
                )
            server.set_peer_policy(self.base_policy.with_ranges(lists["allowed"], lists["denied"]))
            log.info(
                "user database %s: %d allowed and %d denied peer ranges in force",
                self.database.description,
                len(ranges.allowed),
                len(ranges.denied),
            )

        self.refresh.on_ranges = apply
        await self.refresh.refresh()

    async def follow_realm_options(self, server: TurnServer, config: Config) -> None:
        """Apply the realm's user-quota, total-quota and max-bps from the database
        (coturn's turn_realm_option, ``turnadmin -g``) over the configured ones, now and
        whenever they change; 0 or no row means the configured value. A new max-bps
        applies to allocations made from then on."""
        self.config = config

        def quota(options: dict[str, str], name: str, configured: int | None) -> int | None:
            text = options.get(name)
            if text is None:
                return configured
            try:
                value = int(text)
            except ValueError:
                log.warning("user database: realm option %s=%r is not a number", name, text[:32])
                return configured
            return value if value > 0 else configured

        def apply(options: dict[str, str]) -> None:
            config = self.config
            assert config is not None
            user = quota(options, "user-quota", config.user_quota)
            total = quota(options, "total-quota", config.total_quota)
            server.set_quotas(user, total)
            log.info(
                "user database %s: realm %s quotas in force: %d allocations per user id, "
                "%d in all (per worker)",
                self.database.description,
                config.realm,
                server.quotas.user,
                server.quotas.total,
            )
            max_bps = quota(options, "max-bps", config.max_bps) or 0
            if max_bps != server.max_bps:
                server.set_max_bps(max_bps)
                log.info(
                    "user database %s: realm %s: %s bytes per second per allocation each way",
                    self.database.description,
                    config.realm,
                    server.max_bps or "unlimited",
                )

        self.refresh.on_options = apply
        await self.refresh.refresh()

    def reconfigure(self, config: Config, server: TurnServer) -> None:
        """After a reload gave ``server`` new settings: the database's peer ranges and realm
        options, as last read, on top of them again."""
        self.config = config
        self.base_policy = server.settings.policy
        if self.refresh.on_ranges is not None:
            self.refresh.on_ranges(self.refresh.ranges)
        if self.refresh.on_options is not None:
            self.refresh.on_options(self.refresh.options)

    def figures(self) -> dict[str, Any]:
        """What ``tsunagu status`` shows of the user database in this worker."""
        lookups = self.lookups
        errors = [self.refresh.last_error] if not self.refresh.working else []
        if self.watch is not None and not self.watch.working:
            errors.append(self.watch.last_error)
        return {
            "kind": self.kind,
            "description": self.database.description,
            "reachable": not errors,
            "last_error": errors[0] if errors else "",
            "secrets": len(self.refresh.store.database_secrets),
            "cached_users": 0 if lookups is None else len(lookups.cache),
            "lookups": 0 if lookups is None else lookups.total_queries,
            "lookups_failed": 0 if lookups is None else lookups.total_failed,
        }

    async def reload(self) -> dict[str, Any]:
        """Read what the database can change without a restart now (``tsunagu reload``):
        the REST secrets, the revocations; forget the cached users, so that each is looked
        up again on its next request."""
        secrets_read = await self.refresh.refresh()
        dropped = 0
        if self.lookups is not None:
            dropped = len(self.lookups.cache)
            self.lookups.cache.clear()
        revocations_read = None if self.watch is None else await self.watch.refresh()
        errors = [] if secrets_read else [self.refresh.last_error]
        if revocations_read is False and self.watch is not None:
            errors.append(self.watch.last_error)
        return {
            "description": self.database.description,
            "secrets_read": secrets_read,
            "secrets": len(self.refresh.store.database_secrets),
            "cached_users_dropped": dropped,
            "revocations_read": revocations_read,
            "error": "; ".join(errors),
        }

    async def close(self) -> None:
        if self.lookups is not None:
            await self.lookups.close()
        if self.watch is not None:
            await self.watch.close()
        await self.refresh.close()
        await self.database.close()


async def open_worker_database(
    config: Config, store: StaticCredentialStore
) -> WorkerUserDatabase | None:
    """The user database the configuration names (SQLite, PostgreSQL or Redis), its users
    looked up through a cache in ``store`` (unless ``use_auth_secret``: REST credentials
    only) and its secrets read into it; None, after logging why, when it cannot be used.

    A SQLite file that cannot be opened stops the start: it is this machine's file, and
    the mistake is in the configuration. A PostgreSQL or Redis server that does not answer
    does not: it is another machine, and it may be restarting. The server starts with
    static users and REST secrets from the configuration; each lookup tries the database
    again (a failure is cached for a short while), and the secrets are read again every
    few seconds, so everything it holds serves as soon as it answers."""
    try:
        database = open_user_database(config)
    except DatabaseError as exc:
        log.error("user database: %s", exc)
        return None
    refresh = SecretsRefresh(database, store)
    if not await refresh.refresh():
        if not remote(config):
            log.error("user database %s: %s", database.description, refresh.last_error)
            await database.close()
            return None
        log.error(
            "user database %s unavailable at start (%s): serving static users and the"
            " configuration's REST secrets meanwhile; its users and secrets serve once it"
            " answers",
            database.description,
            refresh.last_error,
            extra=structured(
                {
                    "event": "database",
                    "cause": "user database unavailable",
                    "database": database.description,
                    "error": refresh.last_error,
                }
            ),
        )
    refresh.start()
    lookups = None
    if not config.use_auth_secret:
        cache = KeyCache()
        store.database = cache
        lookups = KeyLookups(database, cache)
    kind = "postgresql" if config.psql_userdb else "redis" if config.redis_userdb else "sqlite"
    return WorkerUserDatabase(database, lookups, refresh, kind=kind)
