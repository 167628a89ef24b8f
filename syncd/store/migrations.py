"""Schema versions of the state store: an ordered list of steps, applied once each.

The version lives in ``meta`` (key ``schema_version``). ``migrate`` runs inside
one transaction under a lock (a PostgreSQL advisory lock; SQLite's ``BEGIN
IMMEDIATE``), so daemons starting together on one store migrate it once.

Adding a change: append a ``Step`` with the next version and explicit DDL
(``ALTER TABLE …``). Never edit a released step; step 1 creates the version-1
tables, so when a table in ``schema.py`` changes, freeze step 1's definition
(copy the version-1 ``Table`` into it) in the same commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog

from syncd.errors import ConfigError
from syncd.store import schema

log = structlog.get_logger()

# Any fixed 64-bit number: "syncd" as ASCII.
_PG_LOCK_ID = 0x73796E6364


class StoreVersionError(ConfigError):
    """The store was written by a newer syncd than this one: upgrade syncd (exit 2)."""


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


_V1_TABLES = [
    "records", "record_refs", "entities", "link_conflicts", "cursors", "runs", "outbox", "audit",
    "quarantine", "unmapped", "sla_events", "resync_requests", "leases", "heartbeat",
]


# ``runs`` as version 1 created it (schema 3 added ``owner``).
_v1_metadata = sa.MetaData()
_V1_RUNS = sa.Table(
    "runs", _v1_metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("started_at", schema.UTCDateTime(), nullable=False, index=True),
    sa.Column("finished_at", schema.UTCDateTime(), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stats", schema.JSONType, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
)


# ``outbox`` and ``leases`` as version 1 created them (schema 4 added basis, fence and token).
_V1_OUTBOX = sa.Table(
    "outbox", _v1_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(255), nullable=False, unique=True),
    sa.Column("entity_id", sa.String(36), nullable=True, index=True),
    sa.Column("email_norm", sa.String(320), nullable=True),
    sa.Column("system", sa.String(32), nullable=False),
    sa.Column("object", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=True),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("fields", schema.JSONType, nullable=False),
    sa.Column("clear_first", schema.JSONType, nullable=False),
    sa.Column("canonical", schema.JSONType, nullable=False),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("mapping_rev", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("next_attempt_at", schema.UTCDateTime(), nullable=False),
    sa.Column("created_at", schema.UTCDateTime(), nullable=False),
    sa.Column("done_at", schema.UTCDateTime(), nullable=True),
    sa.Column("result_id", sa.String(64), nullable=True),
    sa.Index("ix_outbox_due", "system", "object", "state", "next_attempt_at"),
)
_V1_LEASES = sa.Table(
    "leases", _v1_metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("expires_at", schema.UTCDateTime(), nullable=False),
)
_V1_FROZEN = {"runs", "outbox", "leases"}


def _v1(conn: sa.Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.metadata.tables[t] for t in _V1_TABLES if t not in _V1_FROZEN])
    _v1_metadata.create_all(conn, tables=[_V1_RUNS, _V1_OUTBOX, _V1_LEASES])


def _v2(conn: sa.Connection) -> None:
    """Partial indexes for the engine's two work queues, so that taking the next batch costs the
    batch, not the store: the dirty records in change order (without it every batch sorted
    *all* dirty rows: quadratic in a backfill), and the entities with a due mark in id order
    (without it each cycle's walk read every entity). Both hold only the rows in the queue.
    The plain index on records.dirty goes: the queue index serves every ``dirty = true``
    lookup, and while it existed SQLite (without statistics) preferred it and sorted."""
    true = "1" if conn.dialect.name == "sqlite" else "true"
    conn.execute(sa.text("DROP INDEX ix_records_dirty"))
    conn.execute(sa.text("CREATE INDEX ix_records_dirty_queue ON records (updated_at, system, object, id) "
                         f"WHERE dirty = {true}"))
    conn.execute(sa.text("CREATE INDEX ix_entities_due_walk ON entities (entity_id, due_at) "
                         "WHERE due_at IS NOT NULL"))


def _v3(conn: sa.Connection) -> None:
    """Pull completeness and freshness per object (the half-picture gate), and the owner of
    each run (so runs left ``running`` by a dead process can be marked interrupted)."""
    schema.metadata.create_all(conn, tables=[schema.pull_state], checkfirst=True)
    if "owner" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}:
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN owner VARCHAR(128)"))


def _v4(conn: sa.Connection) -> None:
    """Exactly-once effects: each outbox row keeps the basis of its decision (the held raw
    values of the fields it writes) and the fencing token it was sent under; each lease a
    fencing token that grows with every acquisition."""
    json_type = "JSONB" if conn.dialect.name == "postgresql" else "JSON"
    have = {t: {c["name"] for c in sa.inspect(conn).get_columns(t)} for t in ("outbox", "leases")}
    for table, column, ddl in (("outbox", "basis", json_type), ("outbox", "fence", "BIGINT"),
                               ("leases", "token", "BIGINT NOT NULL DEFAULT 0")):
        if column not in have[table]:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def _v5(conn: sa.Connection) -> None:
    """Deleted and merged records are tombstones (never written to, never re-created), and each
    deletion feed keeps how far it was read."""
    schema.metadata.create_all(conn, tables=[schema.tombstones, schema.deletion_feeds], checkfirst=True)


def _v6(conn: sa.Connection) -> None:
    """Retention: finished outbox rows are found by age (``syncd prune``) without a scan of the
    whole outbox; the index holds only finished rows."""
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_outbox_finished ON outbox (done_at) "
                         "WHERE state IN ('done', 'skipped', 'superseded')"))


def _v7(conn: sa.Connection) -> None:
    """The API ledger shared by every process on the store: calls per system, endpoint class and
    time bucket, claims against the cap, holds after a 429, the CRMs' reported numbers, pacers."""
    from syncd.store import ledger

    ledger.create_tables(conn)


STEPS: list[Step] = [
    Step(1, "initial schema", _v1),
    Step(2, "work-queue indexes (dirty records, due entities)", _v2),
    Step(3, "pull state per object; run owners", _v3),
    Step(4, "outbox basis and fence; lease fencing tokens", _v4),
    Step(5, "tombstones of deleted and merged records; deletion feed watermarks", _v5),
    Step(6, "retention: index of finished outbox rows by age", _v6),
    Step(7, "API ledger: calls, claims, holds, reports, pacers", _v7),
]

LATEST = STEPS[-1].version


def current_version(conn: sa.Connection) -> int:
    """The store's schema version; 0 for an empty database."""
    if not sa.inspect(conn).has_table("meta"):
        return 0
    v = conn.execute(
        sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
    ).scalar_one_or_none()
    return int(v) if v is not None else 0


def migrate(conn: sa.Connection) -> int:
    """Bring the store to ``LATEST`` inside the caller's transaction; return the version.

    Raises :class:`StoreVersionError` when the store is newer than this code.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_ID)))
    schema.meta.create(conn, checkfirst=True)
    version = current_version(conn)
    if version > LATEST:
        raise StoreVersionError(
            f"the state store is at schema version {version} but this syncd knows only up "
            f"to {LATEST}: upgrade syncd (a newer release wrote this store)"
        )
    for step in STEPS:
        if step.version <= version:
            continue
        log.info("store_migrate", version=step.version, step=step.description)
        step.apply(conn)
        version = step.version
    _set_version(conn, version)
    return version


def _set_version(conn: sa.Connection, version: int) -> None:
    m = schema.meta
    updated = conn.execute(
        sa.update(m).where(m.c.key == "schema_version").values(value=str(version))
    ).rowcount
    if not updated:
        conn.execute(sa.insert(m).values(key="schema_version", value=str(version)))
