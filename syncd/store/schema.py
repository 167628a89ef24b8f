"""The state store's tables (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Datetimes go through :class:`UTCDateTime`: ``timestamptz`` on PostgreSQL, a
fixed-width ISO-8601 UTC string on SQLite (``2026-01-02T03:04:05.000006+00:00``),
so values round-trip exactly and compare correctly (lexically) in SQL on both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A tz-aware UTC datetime. Naive datetimes are refused (they are a bug upstream)."""

    impl = sa.String(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.DateTime(timezone=True))
        return dialect.type_descriptor(sa.String(32))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"the state store takes tz-aware datetimes, got {value!r}")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.isoformat(timespec="microseconds")

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text on SQLite.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

metadata = sa.MetaData()

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

records = sa.Table(
    "records", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("email_norm", sa.String(320), nullable=True, index=True),
    sa.Column("modified_at", UTCDateTime(), nullable=False),
    sa.Column("raw", JSONType, nullable=False),
    sa.Column("canonical", JSONType, nullable=False),
    sa.Column("raw_hash", sa.String(64), nullable=False),
    sa.Column("entity_id", sa.String(36), nullable=True, index=True),
    sa.Column("dirty", sa.Boolean, nullable=False, default=False, index=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

# What a deal or connection attempt points at: same-system person ids
# (HubSpot deal → contact ids, Salesforce Opportunity → Contact ids, Task → WhoId).
record_refs = sa.Table(
    "record_refs", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("ref_id", sa.String(64), primary_key=True),
    sa.Index("ix_record_refs_ref", "system", "ref_id"),
)

entities = sa.Table(
    "entities", metadata,
    sa.Column("entity_id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("memory", JSONType, nullable=False),
    # when the rules must look at this entity again even if nothing changes (SLA timers)
    sa.Column("due_at", UTCDateTime(), nullable=True, index=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

link_conflicts = sa.Table(
    "link_conflicts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email_norm", sa.String(320), nullable=False, index=True),
    sa.Column("candidates", JSONType, nullable=False),
    sa.Column("detected_at", UTCDateTime(), nullable=False),
    sa.Column("resolved_at", UTCDateTime(), nullable=True),
)

cursors = sa.Table(
    "cursors", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("modified_at", UTCDateTime(), nullable=False),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    # running | ok | partial | failed | interrupted
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stats", JSONType, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    # the process that ran it (schema 3): a run left ``running`` by a dead owner is interrupted
    sa.Column("owner", sa.String(128), nullable=True),
)

# How complete and how fresh the store's copy of each CRM object is (schema 3): the engine
# decides an entity only when every object it reads finished a first full pull and pulled
# successfully within the freshness bound ("never act on half a picture").
pull_state = sa.Table(
    "pull_state", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("first_complete_at", UTCDateTime(), nullable=True),  # first pull that reached the end
    sa.Column("last_ok_at", UTCDateTime(), nullable=True),  # latest pull that reached the end
    sa.Column("last_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),  # one line, when the latest attempt failed
    sa.Column("last_error_at", UTCDateTime(), nullable=True),
    sa.Column("failing_since", UTCDateTime(), nullable=True),  # first failure after the last success
)

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(255), nullable=False, unique=True),
    sa.Column("entity_id", sa.String(36), nullable=True, index=True),
    sa.Column("email_norm", sa.String(320), nullable=True),
    sa.Column("system", sa.String(32), nullable=False),
    sa.Column("object", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=True),
    sa.Column("op", sa.String(8), nullable=False),  # update | create
    sa.Column("fields", JSONType, nullable=False),
    sa.Column("clear_first", JSONType, nullable=False),
    sa.Column("canonical", JSONType, nullable=False),  # {field: [before, after]}
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("mapping_rev", sa.String(64), nullable=False),
    # pending | sending | done | skipped | quarantined | superseded
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("done_at", UTCDateTime(), nullable=True),
    sa.Column("result_id", sa.String(64), nullable=True),
    # schema 4: the held raw values of the fields being written, when the decision was made (a
    # resend compares the CRM with them first), and the lease token the row was sent under
    sa.Column("basis", JSONType, nullable=True),
    sa.Column("fence", sa.BigInteger, nullable=True),
    sa.Index("ix_outbox_due", "system", "object", "state", "next_attempt_at"),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime(), nullable=False, index=True),
    sa.Column("entity_id", sa.String(36), nullable=True),
    sa.Column("email_norm", sa.String(320), nullable=True, index=True),
    sa.Column("system", sa.String(32), nullable=False),
    sa.Column("object", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=True, index=True),
    sa.Column("field", sa.String(128), nullable=False),
    sa.Column("before", JSONType, nullable=True),
    sa.Column("after", JSONType, nullable=True),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("mapping_rev", sa.String(64), nullable=False),
    sa.Column("outbox_id", sa.Integer, nullable=True, index=True),
)

quarantine = sa.Table(
    "quarantine", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("system", sa.String(32), nullable=False),
    sa.Column("object", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=True),
    sa.Column("kind", sa.String(8), nullable=False),  # record | write
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw", JSONType, nullable=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("outbox_id", sa.Integer, nullable=True),
    sa.Column("resolved_at", UTCDateTime(), nullable=True),
)

unmapped = sa.Table(
    "unmapped", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("field", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(255), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("last_seen", UTCDateTime(), nullable=False),
)

sla_events = sa.Table(
    "sla_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("entity_id", sa.String(36), nullable=True, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("details", JSONType, nullable=False),
    sa.Column("open", sa.Boolean, nullable=False, index=True),
)

resync_requests = sa.Table(
    "resync_requests", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("requested_at", UTCDateTime(), nullable=False),
    sa.Column("params", JSONType, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # queued|running|done|failed|interrupted
    sa.Column("picked_by", sa.String(128), nullable=True),
    sa.Column("picked_at", UTCDateTime(), nullable=True),
    sa.Column("done_at", UTCDateTime(), nullable=True),
    sa.Column("result", JSONType, nullable=True),
)

leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    # schema 4: the fencing token, one more at every acquisition (rows are never deleted, so it
    # only grows); a holder checks it before each CRM call and when it marks writes done
    sa.Column("token", sa.BigInteger, nullable=False, default=0),
)

heartbeat = sa.Table(
    "heartbeat", metadata,
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("seen_at", UTCDateTime(), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("info", JSONType, nullable=False),
)

# schema 5: deleted and merged records (syncd/store/tombstones.py). A tombstone stays after the
# record's row is forgotten: nothing is written to a dead id, nothing re-created because of it.
tombstones = sa.Table(
    "tombstones", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("record_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # deleted | merged
    sa.Column("merged_into", sa.String(64), nullable=True),
    sa.Column("deleted_at", UTCDateTime(), nullable=True),  # as the CRM says
    sa.Column("detected_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("source", sa.String(64), nullable=False),  # which feed or answer told syncd
    sa.Column("entity_id", sa.String(36), nullable=True, index=True),  # the person it was part of
    sa.Column("canonical", JSONType, nullable=True),  # the record as last stored
    sa.Column("restored_at", UTCDateTime(), nullable=True),
)

# schema 5: how far each deletion feed was read (Salesforce queryAll IsDeleted, HubSpot archive).
deletion_feeds = sa.Table(
    "deletion_feeds", metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("object", sa.String(64), primary_key=True),
    sa.Column("watermark", UTCDateTime(), nullable=True),
    sa.Column("scanned_at", UTCDateTime(), nullable=False),
)
