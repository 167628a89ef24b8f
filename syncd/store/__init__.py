"""The state store: syncd's only state, on SQLAlchemy Core (SQLite or PostgreSQL).

    store = Store.open("sqlite:///var/syncd.db")      # runs migrations
    with store.tx() as tx:                             # one transaction
        changed = tx.upsert_records(rows)
        tx.enqueue(items)
        tx.set_cursor("hubspot", "contacts", page_cursor)

Everything done through one ``Tx`` commits together or not at all: a page of
records, the outbox entries they produce and the cursor advance are durable as
one unit (design: "commit the cursor only after everything the page produced is
durable"). Leases and resync claims are atomic across processes sharing one
PostgreSQL store; keep those in their own short ``tx()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import make_url

from syncd.errors import ConfigError, FatalError
from syncd.store import _sqlite, migrations
from syncd.store import schema as s
from syncd.store.coordination import CoordinationTx
from syncd.store.cursors import CursorsTx
from syncd.store.entities import EntitiesTx
from syncd.store.ledger import LedgerTx
from syncd.store.migrations import StoreVersionError
from syncd.store.outbox import OutboxTx
from syncd.store.records import RecordsTx
from syncd.store.rows import (
    AuditRow,
    EventRow,
    HeartbeatRow,
    LinkConflictRow,
    OutboxItem,
    OutboxRow,
    PullStateRow,
    QuarantineRow,
    RecordKey,
    RecordRow,
    ResyncRow,
    RunRow,
    UnmappedRow,
    raw_hash,
)

__all__ = [
    "AuditRow", "EventRow", "HeartbeatRow", "LinkConflictRow", "OutboxItem", "OutboxRow",
    "PullStateRow", "QuarantineRow", "RecordKey", "RecordRow", "ResyncRow", "RunRow", "Store",
    "StoreVersionError", "Tx", "UnmappedRow", "normalise_url", "raw_hash",
]

log = structlog.get_logger()


def normalise_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` → the psycopg 3 driver; SQLite kept as is."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    u = make_url(url)
    if u.drivername in ("postgresql", "postgresql+psycopg"):
        return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if u.drivername == "sqlite":
        if not u.database or u.database == ":memory:":
            raise ConfigError("[state] url: an SQLite store needs a file path (sqlite:///path)")
        return url
    raise ConfigError(
        f"[state] url: unsupported database {u.drivername!r} (use sqlite:///… or postgresql://…)"
    )


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_loads(value: Any) -> Any:
    if isinstance(value, int | float):  # SQLite hands back a JSON number column as a number
        return value
    return orjson.loads(value)


# Every record row carries JSON (canonical, raw) and the engine reads and writes thousands per
# batch: orjson encodes/decodes them several times faster than the standard library.
_JSON: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": _json_loads}


class Store:
    """A handle on one state store. Thread-safe; each ``tx()`` takes its own connection."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "full") -> None:
        self.url = normalise_url(url)
        u = make_url(self.url)
        self.dialect = "sqlite" if u.drivername == "sqlite" else "postgresql"
        if self.dialect == "sqlite":
            assert u.database is not None
            try:
                _sqlite.create_private_file(u.database)
            except OSError as e:
                raise ConfigError(f"[state] url: cannot create {u.database}: {e.strerror}") from e
            self.engine = sa.create_engine(self.url, connect_args={"check_same_thread": False}, **_JSON)
            _sqlite.configure(self.engine, synchronous=sqlite_synchronous)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, **_JSON)

    @classmethod
    def open(cls, url: str, *, sqlite_synchronous: str = "full") -> Store:
        """Open the store and bring its schema to this code's version.

        Raises ConfigError (bad url, or a store newer than this code:
        StoreVersionError) or FatalError (the database cannot be reached).
        """
        store = cls(url, sqlite_synchronous=sqlite_synchronous)
        try:
            with store.engine.begin() as conn:
                migrations.migrate(conn)
        except sa.exc.OperationalError as e:
            store.close()
            where = make_url(store.url).render_as_string(hide_password=True)
            raise FatalError(f"state store {where} unreachable: {_first_line(e.orig)}") from e
        except BaseException:
            store.close()
            raise
        return store

    def analyze(self) -> None:
        """Refresh the query planner's statistics (``ANALYZE``).

        Worth calling after a bulk load such as a full resync: until a table has
        statistics PostgreSQL may scan a whole object to find a few keys
        (autovacuum normally does this on its own; it may be off)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                for table in s.metadata.sorted_tables:
                    conn.exec_driver_sql(f'ANALYZE "{table.name}"')
            else:
                conn.exec_driver_sql("ANALYZE")

    def schema_version(self) -> int:
        with self.engine.begin() as conn:
            return migrations.current_version(conn)

    @contextmanager
    def tx(self, readonly: bool = False) -> Iterator[Tx]:
        """One connection, one transaction: commit on exit, roll back on exception.

        ``readonly=True`` for reports and long scans (status, audit, ``mappings
        impact``): it reads one consistent snapshot and, on SQLite, does not take
        the write lock, so the daemon keeps writing meanwhile. PostgreSQL refuses
        writes in it.
        """
        with self.engine.connect() as conn:
            if readonly:
                conn.execution_options(**{_sqlite.READONLY: True})
            with conn.begin():
                if readonly and self.dialect == "postgresql":
                    conn.exec_driver_sql(
                        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield Tx(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tx(RecordsTx, EntitiesTx, CursorsTx, OutboxTx, CoordinationTx, LedgerTx):
    """The unit of work: every state-store operation, inside one transaction. Each concern
    lives in its own module (records, entities, cursors, outbox, coordination); they share
    one connection, so whatever is done through one ``Tx`` commits together or not at all."""


def _first_line(e: BaseException | None) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
