"""SQLite specifics: WAL, pragmas, IMMEDIATE transactions; read-only connections (the file is
created 0600 by :mod:`syncd.store._open`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

BUSY_TIMEOUT_MS = 30_000
READONLY = "syncd_readonly"  # connection execution option: a deferred (reading) BEGIN


SYNCHRONOUS = ("full", "normal")


def configure(engine: sa.Engine, *, synchronous: str = "full") -> None:
    """Pragmas on every connection; every transaction is ``BEGIN IMMEDIATE``.

    ``synchronous``: ``full`` (the default) syncs the WAL on every commit, so a committed
    transaction survives a power cut or a filesystem forced read-only; ``normal`` is faster
    but may lose the last commits then (an outbox row whose CRM write already happened).

    IMMEDIATE takes the write lock up front, so a transaction never fails half-way
    on a read→write upgrade (SQLITE_BUSY_SNAPSHOT), and guarded updates (resync
    claims, leases) are atomic. Read-only transactions (execution option
    ``READONLY``) use a plain deferred BEGIN: with WAL they block no writer.
    """

    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
    mode = synchronous.upper()

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute(f"PRAGMA synchronous = {mode}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        readonly = conn.get_execution_options().get(READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def configure_readonly(engine: sa.Engine) -> None:
    """Read-only connections: no pragma that writes (journal mode), ``query_only`` on, and a
    plain deferred ``BEGIN`` (it blocks no writer)."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA query_only = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")
