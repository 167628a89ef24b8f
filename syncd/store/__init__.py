"""The state store: syncd's only state, on SQLAlchemy Core (SQLite or PostgreSQL).

    store = Store.open("sqlite:///var/syncd.db")      # runs migrations
    store = open_store_readonly(url)                   # status, audit…: never writes
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

from syncd.errors import ConfigError
from syncd.store import _open, _sqlite, migrations
from syncd.store import schema as s
from syncd.store._open import CorruptStore, StoreNeedsMigration
from syncd.store.coordination import CoordinationTx
from syncd.store.cursors import CursorsTx
from syncd.store.entities import EntitiesTx
from syncd.store.history import HistoryTx
from syncd.store.ledger import LedgerTx
from syncd.store.migrations import StoreVersionError
from syncd.store.outbox import OutboxTx
from syncd.store.reconcile import ReconcileTx
from syncd.store.records import RecordsTx
from syncd.store.retention import RetentionTx
from syncd.store.review import ReviewTx
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
from syncd.store.tombstones import TombstoneRow, TombstonesTx

__all__ = [
    "AuditRow", "CorruptStore", "EventRow", "HeartbeatRow", "LinkConflictRow", "OutboxItem", "OutboxRow",
    "PullStateRow", "QuarantineRow", "RecordKey", "RecordRow", "ResyncRow", "RunRow", "Store",
    "StoreNeedsMigration", "StoreVersionError", "TombstoneRow", "Tx", "UnmappedRow", "normalise_url",
    "open_store_readonly", "raw_hash",
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
    """A handle on one state store. Thread-safe; each ``tx()`` takes its own connection.

    ``readonly=True`` (see :func:`open_store_readonly`): every transaction is read-only and
    nothing is ever written, not even a missing SQLite file."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "full", readonly: bool = False) -> None:
        self.url = normalise_url(url)
        self.readonly = readonly
        self.migrated_from: int | None = None  # the schema version Store.open found, when it migrated
        u = make_url(self.url)
        self.dialect = "sqlite" if u.drivername == "sqlite" else "postgresql"
        self.sqlite_path = u.database if self.dialect == "sqlite" else None
        if self.sqlite_path is not None and readonly:
            uri = _open.sqlite_readonly_uri(self.sqlite_path)
            self.engine = _open.readonly_engine(uri, **_JSON)
            _sqlite.configure_readonly(self.engine)
        elif self.sqlite_path is not None:
            _open.check_sqlite_for_writing(self.sqlite_path)
            self.engine = sa.create_engine(self.url, connect_args={"check_same_thread": False}, **_JSON)
            _sqlite.configure(self.engine, synchronous=sqlite_synchronous)
        else:
            args = {"options": _pg_readonly_options(u)} if readonly else {}
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, connect_args=args, **_JSON)

    @property
    def where(self) -> str:
        """The store for an error line: the SQLite file, or the URL without its password."""
        return self.sqlite_path or make_url(self.url).render_as_string(hide_password=True)

    @classmethod
    def open(cls, url: str, *, sqlite_synchronous: str = "full") -> Store:
        """Open the store and bring its schema to this code's version (the service, ``sync``,
        ``resync``, ``syncd migrate``).

        Raises ConfigError (exit 2: bad url, missing directory, corrupt SQLite file, or a store
        newer than this code: StoreVersionError) or FatalError (exit 1: the store exists but
        cannot be opened or reached now).
        """
        store = cls(url, sqlite_synchronous=sqlite_synchronous)
        with store._first_connection(), store.engine.begin() as conn:
            before = migrations.current_version(conn)
            if migrations.migrate(conn) != before:
                store.migrated_from = before
        return store

    @contextmanager
    def _first_connection(self) -> Iterator[None]:
        """The store's first use: a database error becomes one clear line; the store is closed
        on any failure."""
        try:
            yield
        except sa.exc.DBAPIError as e:
            self.close()
            raise _open.open_error(e, where=self.where, sqlite_path=self.sqlite_path) from e
        except BaseException:
            self.close()
            raise

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
        readonly = readonly or self.readonly
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


def _pg_readonly_options(u: sa.URL) -> str:
    """libpq ``options`` of the URL (a search_path, say) plus read-only transactions by default."""
    given = u.query.get("options", "")
    given = " ".join(given) if isinstance(given, tuple) else given
    return f"{given} -c default_transaction_read_only=on".strip()


def open_store_readonly(url: str) -> Store:
    """Open the store for a read-only command (status, audit, ``mappings impact``, ``auth
    check``): nothing is written, and a store that needs migrating (or does not exist yet) is
    refused with one line, "run `syncd migrate` or start the service" (exit 2). A store newer
    than this code is refused too (StoreVersionError). Other errors as :meth:`Store.open`."""
    store = Store(url, readonly=True)
    with store._first_connection():
        with store.engine.connect() as conn, conn.begin():
            version = migrations.current_version(conn)
        if version > migrations.LATEST:
            raise StoreVersionError(
                f"the state store {store.where} is at schema version {version} but this syncd knows only "
                f"up to {migrations.LATEST}: upgrade syncd (a newer release wrote this store)")
        if version < migrations.LATEST:
            raise _open.needs_migration(store.where, version, migrations.LATEST)
    return store


class Tx(RecordsTx, EntitiesTx, CursorsTx, OutboxTx, CoordinationTx, TombstonesTx, ReconcileTx, RetentionTx,
         ReviewTx, HistoryTx, LedgerTx):
    """The unit of work: every state-store operation, inside one transaction. Each concern
    lives in its own module (records, entities, cursors, outbox, coordination, tombstones,
    reconcile, retention, review); they share one connection, so whatever is done through one
    ``Tx`` commits together or not at all."""

