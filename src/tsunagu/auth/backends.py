"""The user database the configuration names.

Apart from :mod:`.database`, the interface every backend implements, so that the interface
does not import its implementations. Each backend's driver is imported only when it is the
one configured.
"""

from __future__ import annotations

from ..config import Config, userdb_path
from .database import DatabaseError, UserDatabase

__all__ = ["open_user_database", "remote"]


def remote(config: Config) -> bool:
    """Whether the user database is a server elsewhere (PostgreSQL, Redis) rather than a
    file of this machine: one that does not answer is an outage, not a mistake."""
    return config.psql_userdb is not None or config.redis_userdb is not None


def open_user_database(config: Config) -> UserDatabase:
    """PostgreSQL (``psql_userdb``), Redis (``redis_userdb``), else the SQLite file
    (``userdb``, default users.db in the state directory). Nothing is connected yet. Raises
    :class:`~.database.DatabaseError` for a connection string that cannot be read, or a
    driver that is not installed."""
    try:
        if config.psql_userdb is not None:
            from .postgres import PostgresUserDatabase

            return PostgresUserDatabase(config.psql_userdb)
        if config.redis_userdb is not None:
            from .redis import RedisUserDatabase

            return RedisUserDatabase(config.redis_userdb)
    except ImportError as exc:
        raise DatabaseError(f"the database driver is not installed ({exc.name})") from None
    from .sqlite import SqliteUserDatabase

    return SqliteUserDatabase(userdb_path(config))
