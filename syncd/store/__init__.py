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

import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from syncd.errors import ConfigError, FatalError
from syncd.model import Cursor, utcnow
from syncd.store import _sqlite, migrations
from syncd.store import schema as s
from syncd.store.migrations import StoreVersionError
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

_CHUNK = 500  # keys per IN (...) list; well under SQLite's variable limit
_T = TypeVar("_T")

OUTBOX_OPEN = ("pending", "sending")


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


def _chunks(items: Sequence[_T], n: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _padded(values: Sequence[_T]) -> list[_T]:
    """``values`` lengthened to the next power of two by repeating the last one (for an IN
    list: same rows, and one SQL text per power of two instead of one per length)."""
    out = list(values)
    if out:
        size = 1 << (len(out) - 1).bit_length()
        out += [out[-1]] * (size - len(out))
    return out


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

    def __init__(self, url: str) -> None:
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
            _sqlite.configure(self.engine)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, **_JSON)

    @classmethod
    def open(cls, url: str) -> Store:
        """Open the store and bring its schema to this code's version.

        Raises ConfigError (bad url, or a store newer than this code:
        StoreVersionError) or FatalError (the database cannot be reached).
        """
        store = cls(url)
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


class Tx:
    """The unit of work: every state-store operation, inside one transaction."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name

    def _in(self, col: sa.Column[Any], values: Sequence[str]) -> sa.ColumnElement[bool]:
        """``col IN values`` for string keys; on PostgreSQL one array parameter
        (``= ANY(:v)``): one statement whatever the length (psycopg prepares it once)
        instead of hundreds of bind parameters.

        On SQLite the list is padded (repeating its last value, which changes nothing) to
        the next power of two: ``IN (?, ?, …)`` is a different SQL text for every length,
        and the driver keeps up to 128 prepared statements per connection, so lists of
        every length from 1 to 500 kept 128 large statements (~6-8 MB) prepared and
        re-prepared the rest. Padded, each query has at most 10 texts."""
        if self.dialect == "postgresql":
            return col == sa.any_(sa.bindparam(None, list(values), type_=pg_dialect.ARRAY(sa.Text)))
        return col.in_(_padded(values))

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    # ------------------------------------------------------------------ records

    def upsert_records(self, rows: Sequence[RecordRow],
                       now: datetime | None = None) -> list[RecordRow]:
        """Insert new records and update changed ones; return those (marked dirty).

        A row is "changed" when its ``raw_hash`` differs from the stored one and it
        is not older (``modified_at``) than the stored one. Unchanged rows (overlap
        duplicates) are left alone, not marked dirty and not returned. A stored
        ``entity_id`` is kept unless the row brings one. Within ``rows`` the last
        row per key wins.
        """
        if not rows:
            return []
        now = now or utcnow()
        latest: dict[RecordKey, RecordRow] = {}
        for r in rows:
            latest[r.key] = r
        t = s.records
        ins = self._insert(t)
        stmt = ins.on_conflict_do_update(
            index_elements=[t.c.system, t.c.object, t.c.id],
            set_={
                "kind": ins.excluded.kind,
                "email_norm": ins.excluded.email_norm,
                "modified_at": ins.excluded.modified_at,
                "raw": ins.excluded.raw,
                "canonical": ins.excluded.canonical,
                "raw_hash": ins.excluded.raw_hash,
                "entity_id": sa.func.coalesce(ins.excluded.entity_id, t.c.entity_id),
                "dirty": True,
                "updated_at": ins.excluded.updated_at,
            },
            where=sa.and_(
                t.c.raw_hash != ins.excluded.raw_hash,
                t.c.modified_at <= ins.excluded.modified_at,
            ),
        ).returning(t.c.system, t.c.object, t.c.id, t.c.entity_id)
        params = [
            {
                "system": r.system, "object": r.object, "id": r.id, "kind": r.kind,
                "email_norm": r.email_norm, "modified_at": r.modified_at, "raw": r.raw,
                "canonical": r.canonical, "raw_hash": r.raw_hash, "entity_id": r.entity_id,
                "dirty": True, "updated_at": now,
            }
            for r in latest.values()
        ]
        changed: list[RecordRow] = []
        for batch in _chunks(params):
            result = self.conn.execute(stmt, list(batch))
            for system, obj, rid, entity_id in result.all():
                r = latest[(system, obj, rid)]
                r.dirty, r.updated_at, r.entity_id = True, now, entity_id
                changed.append(r)
        return changed

    def _records_where(self, keys: Iterable[RecordKey]) -> Iterator[sa.ColumnElement[bool]]:
        t = s.records
        by_obj: dict[tuple[str, str], list[str]] = defaultdict(list)
        for system, obj, rid in keys:
            by_obj[(system, obj)].append(rid)
        for (system, obj), ids in by_obj.items():
            for chunk in _chunks(sorted(set(ids))):
                yield sa.and_(t.c.system == system, t.c.object == obj, self._in(t.c.id, chunk))

    def get_records(self, keys: Iterable[RecordKey], *, with_raw: bool = True) -> dict[RecordKey, RecordRow]:
        """Records by key; unknown keys are absent. ``with_raw=False`` leaves ``raw`` empty
        (``{}``): linking and the rules read only the canonical side, and decoding the raw
        JSON of every row they look at was a large share of their time."""
        out: dict[RecordKey, RecordRow] = {}
        for cond in self._records_where(keys):
            for row in self.conn.execute(_select_records(with_raw).where(cond)):
                r = _record_of(row, with_raw)
                out[r.key] = r
        return out

    def entity_ids(self, keys: Iterable[RecordKey]) -> dict[RecordKey, str | None]:
        """The entity of each known record (None: not linked yet); unknown keys are absent.
        Nothing is decoded: for callers that need only the link, not the record."""
        t = s.records
        out: dict[RecordKey, str | None] = {}
        for cond in self._records_where(keys):
            for system, obj, rid, entity_id in self.conn.execute(
                    sa.select(t.c.system, t.c.object, t.c.id, t.c.entity_id).where(cond)):
                out[(system, obj, rid)] = entity_id
        return out

    def record_keys_by_entity(self, entity_ids: Iterable[str]) -> dict[str, list[RecordKey]]:
        """The keys of each entity's records, in key order (nothing decoded)."""
        t = s.records
        out: dict[str, list[RecordKey]] = {}
        for chunk in _chunks(sorted(set(entity_ids))):
            q = (sa.select(t.c.entity_id, t.c.system, t.c.object, t.c.id).where(self._in(t.c.entity_id, chunk))
                 .order_by(t.c.system, t.c.object, t.c.id))
            for entity_id, system, obj, rid in self.conn.execute(q):
                out.setdefault(entity_id, []).append((system, obj, rid))
        return out

    def _records_by(self, col: sa.Column[Any], values: Iterable[str],
                    with_raw: bool) -> dict[str, list[RecordRow]]:
        out: dict[str, list[RecordRow]] = {}
        vals = sorted({v for v in values if v is not None})
        t = s.records
        for chunk in _chunks(vals):
            q = _select_records(with_raw).where(self._in(col, chunk)).order_by(t.c.system, t.c.object, t.c.id)
            for row in self.conn.execute(q):
                r = _record_of(row, with_raw)
                out.setdefault(getattr(r, col.name), []).append(r)
        return out

    def records_by_email(self, emails: Iterable[str], *, with_raw: bool = True) -> dict[str, list[RecordRow]]:
        """Records per normalised email; emails with no record are absent."""
        return self._records_by(s.records.c.email_norm, emails, with_raw)

    def records_by_entity(self, entity_ids: Iterable[str], *,
                          with_raw: bool = True) -> dict[str, list[RecordRow]]:
        return self._records_by(s.records.c.entity_id, entity_ids, with_raw)

    def dirty_records(self, limit: int = 1000, *, with_raw: bool = True,
                      kinds: Sequence[str] | None = None) -> list[RecordRow]:
        """Records that need a decision, oldest change first (only of ``kinds`` when given)."""
        t = s.records
        # ``dirty = true``: the form the partial index ix_records_dirty_queue (migration 2) names;
        # it holds exactly this queue in this order.
        q = (_select_records(with_raw).where(t.c.dirty == sa.true())
             .order_by(t.c.updated_at, t.c.system, t.c.object, t.c.id).limit(limit))
        if kinds is not None:
            q = q.where(t.c.kind.in_(sorted(kinds)))
        return [_record_of(row, with_raw) for row in self.conn.execute(q)]

    def clear_dirty(self, keys: Iterable[RecordKey]) -> None:
        for cond in self._records_where(keys):
            self.conn.execute(sa.update(s.records).where(cond).values(dirty=False))

    def forget_records(self, keys: Iterable[RecordKey]) -> None:
        """Drop records the CRM no longer has (and what they point at)."""
        for system, obj, rid in sorted(set(keys)):
            for t in (s.records, s.record_refs):
                self.conn.execute(sa.delete(t).where(t.c.system == system, t.c.object == obj, t.c.id == rid))

    def set_entity(self, keys: Iterable[RecordKey], entity_id: str | None) -> None:
        for cond in self._records_where(keys):
            self.conn.execute(sa.update(s.records).where(cond).values(entity_id=entity_id))

    def set_entities(self, links: Mapping[RecordKey, str | None]) -> None:
        """Many links at once (one executemany): record key -> entity id."""
        if not links:
            return
        t = s.records
        stmt = sa.update(t).where(t.c.system == sa.bindparam("k_system"), t.c.object == sa.bindparam("k_object"),
                                  t.c.id == sa.bindparam("k_id")).values(entity_id=sa.bindparam("k_entity"))
        self.conn.execute(stmt, [{"k_system": k[0], "k_object": k[1], "k_id": k[2], "k_entity": e}
                                 for k, e in sorted(links.items())])

    def iter_records(self, system: str | None = None, object: str | None = None,
                     batch: int = 1000) -> Iterator[RecordRow]:
        """Every record (optionally of one system/object) in key order, ``batch`` at a
        time (keyset pages, bounded memory). Use a ``tx(readonly=True)`` for long scans."""
        t = s.records
        last: RecordKey | None = None
        while True:
            q = sa.select(t).order_by(t.c.system, t.c.object, t.c.id).limit(batch)
            if system is not None:
                q = q.where(t.c.system == system)
            if object is not None:
                q = q.where(t.c.object == object)
            if last is not None:
                q = q.where(sa.tuple_(t.c.system, t.c.object, t.c.id) > sa.tuple_(*last))
            rows = [_record(m) for m in self.conn.execute(q).mappings()]
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1].key

    def count_records(self, system: str | None = None, object: str | None = None,
                      dirty: bool | None = None) -> int:
        t = s.records
        q = sa.select(sa.func.count()).select_from(t)
        if system is not None:
            q = q.where(t.c.system == system)
        if object is not None:
            q = q.where(t.c.object == object)
        if dirty is not None:
            q = q.where(t.c.dirty.is_(dirty))
        return int(self.conn.execute(q).scalar_one())

    # -------------------------------------------------------------- record refs

    def set_refs(self, key: RecordKey, refs: Iterable[str]) -> None:
        """Replace the same-system person ids a deal/attempt record points at."""
        self.set_refs_many({key: refs})

    def set_refs_many(self, refs: Mapping[RecordKey, Iterable[str]]) -> None:
        """:meth:`set_refs` for many records at once (one executemany per statement)."""
        if not refs:
            return
        t = s.record_refs
        delete = sa.delete(t).where(t.c.system == sa.bindparam("k_system"), t.c.object == sa.bindparam("k_object"),
                                    t.c.id == sa.bindparam("k_id"))
        self.conn.execute(delete, [{"k_system": k[0], "k_object": k[1], "k_id": k[2]} for k in sorted(refs)])
        rows = [{"system": k[0], "object": k[1], "id": k[2], "ref_id": r}
                for k, ids in sorted(refs.items()) for r in sorted(set(ids))]
        if rows:
            self.conn.execute(sa.insert(t), rows)

    def referrers(self, system: str, ids: Iterable[str],
                  kind: str | None = None, *, with_raw: bool = True) -> list[RecordRow]:
        """Records of ``system`` (optionally of one ``kind``) pointing at any of ``ids``
        (see :meth:`set_refs`), each once, in key order."""
        t, r = s.records, s.record_refs
        out: dict[RecordKey, RecordRow] = {}
        for chunk in _chunks(sorted(set(ids))):
            q = (_select_records(with_raw).join(r, sa.and_(r.c.system == t.c.system, r.c.object == t.c.object,
                                              r.c.id == t.c.id))
                 .where(r.c.system == system, self._in(r.c.ref_id, chunk)))
            if kind is not None:
                q = q.where(t.c.kind == kind)
            for found in self.conn.execute(q):
                row = _record_of(found, with_raw)
                out[row.key] = row
        return [out[k] for k in sorted(out)]

    def deals_of_people(self, system: str, person_ids: Iterable[str], *,
                        with_raw: bool = True) -> list[RecordRow]:
        """Deal records of ``system`` pointing at any of these same-system person ids."""
        return self.referrers(system, person_ids, kind="deal", with_raw=with_raw)

    # ----------------------------------------------------------------- entities

    def new_entity(self, kind: str, memory: Mapping[str, Any] | None = None,
                   now: datetime | None = None) -> str:
        """A new linked identity (``person`` or ``deal``); returns its uuid4 id."""
        if kind not in ("person", "deal"):
            raise ValueError(f"entity kind must be person or deal, not {kind!r}")
        now = now or utcnow()
        eid = str(uuid.uuid4())
        self.conn.execute(sa.insert(s.entities).values(
            entity_id=eid, kind=kind, memory=dict(memory or {}), created_at=now, updated_at=now))
        return eid

    def add_entities(self, entities: Mapping[str, str], now: datetime | None = None) -> None:
        """Insert new entities whose ids the caller made (``str(uuid.uuid4())``): id -> kind."""
        if not entities:
            return
        for kind in set(entities.values()):
            if kind not in ("person", "deal"):
                raise ValueError(f"entity kind must be person or deal, not {kind!r}")
        now = now or utcnow()
        self.conn.execute(sa.insert(s.entities), [
            {"entity_id": eid, "kind": kind, "memory": {}, "created_at": now, "updated_at": now}
            for eid, kind in entities.items()])

    def get_memory(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The engine's memory (JSON) per entity id; unknown ids are absent."""
        t = s.entities
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(set(ids))):
            for eid, mem in self.conn.execute(
                    sa.select(t.c.entity_id, t.c.memory).where(self._in(t.c.entity_id, chunk))):
                out[eid] = mem
        return out

    def set_memory(self, entity_id: str, memory: Mapping[str, Any],
                   now: datetime | None = None) -> None:
        t = s.entities
        n = self.conn.execute(sa.update(t).where(t.c.entity_id == entity_id).values(
            memory=dict(memory), updated_at=now or utcnow())).rowcount
        if n != 1:
            raise KeyError(f"no entity {entity_id}")

    def set_memories(self, items: Mapping[str, tuple[Mapping[str, Any], datetime | None]],
                     now: datetime | None = None) -> None:
        """Memory and due timer of many entities at once (one executemany): id -> (memory, due_at)."""
        if not items:
            return
        t = s.entities
        now = now or utcnow()
        stmt = sa.update(t).where(t.c.entity_id == sa.bindparam("k_id")).values(
            memory=sa.bindparam("k_memory"), due_at=sa.bindparam("k_due"), updated_at=now)
        self.conn.execute(stmt, [{"k_id": eid, "k_memory": dict(mem), "k_due": due}
                                 for eid, (mem, due) in sorted(items.items())])

    def set_due(self, entity_id: str, due_at: datetime | None) -> None:
        """When the rules must look at this entity again (None: no timer)."""
        t = s.entities
        self.conn.execute(sa.update(t).where(t.c.entity_id == entity_id).values(due_at=due_at))

    def set_due_many(self, entity_ids: Iterable[str], due_at: datetime | None) -> None:
        """Set (or clear, with None) the timer of many entities at once. The engine marks the
        entities a change touched as due *now*: linking and deciding are separate steps, and
        the mark is what carries one to the other across a crash."""
        t = s.entities
        for chunk in _chunks(sorted(set(entity_ids))):
            self.conn.execute(sa.update(t).where(self._in(t.c.entity_id, chunk)).values(due_at=due_at))

    def due_batch(self, now: datetime, after: str = "", limit: int = 500) -> list[tuple[str, str]]:
        """(entity id, kind) of entities due at ``now`` with an id above ``after``, in id
        order: a keyset walk that visits each due entity once even if it stays due."""
        t = s.entities
        q = (sa.select(t.c.entity_id, t.c.kind).where(t.c.due_at <= now, t.c.entity_id > after)
             .order_by(t.c.entity_id).limit(limit))
        return [(str(e), str(k)) for e, k in self.conn.execute(q)]

    def due_entities(self, now: datetime, limit: int | None = None) -> list[str]:
        """Entities whose timer is due at ``now``, earliest first. The timer stays set
        until :meth:`set_due` moves or clears it."""
        t = s.entities
        q = (sa.select(t.c.entity_id).where(t.c.due_at <= now)
             .order_by(t.c.due_at, t.c.entity_id).limit(limit))
        return list(self.conn.execute(q).scalars())

    # ----------------------------------------------------------- link conflicts

    def add_link_conflict(self, email_norm: str, candidates: Sequence[Any],
                          now: datetime | None = None) -> int:
        """Record (or refresh) the open conflict for this email; returns its id."""
        t = s.link_conflicts
        now = now or utcnow()
        existing = self.conn.execute(sa.select(t.c.id).where(
            t.c.email_norm == email_norm, t.c.resolved_at.is_(None))).scalar()
        if existing is not None:
            self.conn.execute(sa.update(t).where(t.c.id == existing).values(
                candidates=list(candidates)))
            return int(existing)
        return int(self.conn.execute(sa.insert(t).values(
            email_norm=email_norm, candidates=list(candidates), detected_at=now,
        ).returning(t.c.id)).scalar_one())

    def open_link_conflicts(self) -> list[LinkConflictRow]:
        t = s.link_conflicts
        q = sa.select(t).where(t.c.resolved_at.is_(None)).order_by(t.c.id)
        return [LinkConflictRow(**m) for m in self.conn.execute(q).mappings()]

    def resolve_link_conflicts(self, ids: Iterable[int], now: datetime | None = None) -> None:
        t = s.link_conflicts
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk), t.c.resolved_at.is_(None))
                              .values(resolved_at=now or utcnow()))

    # ------------------------------------------------------------------ cursors

    def get_cursor(self, system: str, object: str) -> Cursor | None:
        t = s.cursors
        row = self.conn.execute(sa.select(t.c.modified_at, t.c.id).where(
            t.c.system == system, t.c.object == object)).first()
        return Cursor(row.modified_at, row.id) if row else None

    def set_cursor(self, system: str, object: str, cursor: Cursor,
                   now: datetime | None = None) -> Cursor:
        """Advance the cursor; it never moves backwards (keeps the max). Returns the stored one.

        Order is :class:`Cursor`'s (modified_at, then id as a string), decided in
        Python so it does not depend on the database's collation.
        """
        t = s.cursors
        now = now or utcnow()
        self.conn.execute(self._insert(t).values(
            system=system, object=object, modified_at=cursor.modified_at, id=cursor.id,
            updated_at=now).on_conflict_do_nothing())
        q = sa.select(t.c.modified_at, t.c.id).where(t.c.system == system, t.c.object == object)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        row = self.conn.execute(q).one()
        current = Cursor(row.modified_at, row.id)
        if current >= cursor:
            return current
        self._write_cursor(system, object, cursor, now)
        return cursor

    def reset_cursor(self, system: str, object: str, to: Cursor | None,
                     now: datetime | None = None) -> None:
        """Move the cursor anywhere, also backwards (resync --since); None = full re-read."""
        t = s.cursors
        if to is None:
            self.conn.execute(sa.delete(t).where(t.c.system == system, t.c.object == object))
            return
        self.conn.execute(self._insert(t).values(
            system=system, object=object, modified_at=to.modified_at, id=to.id,
            updated_at=now or utcnow()).on_conflict_do_nothing())
        self._write_cursor(system, object, to, now or utcnow())

    def _write_cursor(self, system: str, object: str, cursor: Cursor, now: datetime) -> None:
        t = s.cursors
        self.conn.execute(sa.update(t).where(t.c.system == system, t.c.object == object).values(
            modified_at=cursor.modified_at, id=cursor.id, updated_at=now))

    # --------------------------------------------------------------------- runs

    def start_run(self, job: str, now: datetime | None = None, owner: str | None = None) -> str:
        run_id = uuid.uuid4().hex
        self.conn.execute(sa.insert(s.runs).values(
            run_id=run_id, job=job, started_at=now or utcnow(), status="running", stats={}, owner=owner))
        return run_id

    def finish_run(self, run_id: str, status: str, stats: Mapping[str, Any],
                   error: str | None = None, now: datetime | None = None) -> None:
        if status not in ("ok", "partial", "failed", "interrupted"):
            raise ValueError(f"run status must be ok, partial, failed or interrupted, not {status!r}")
        t = s.runs
        self.conn.execute(sa.update(t).where(t.c.run_id == run_id).values(
            status=status, stats=dict(stats), error=error, finished_at=now or utcnow()))

    def interrupt_running(self, job: str | None = None, now: datetime | None = None, *,
                          alive: Iterable[str] | None = None) -> int:
        """Mark runs left ``running`` (their process died) as ``interrupted``.

        With ``alive``, runs whose owner is in it are left alone (another live process is
        running them); runs of any other owner, or of none (written before schema 3), are
        interrupted."""
        t = s.runs
        q = sa.update(t).where(t.c.status == "running")
        if job is not None:
            q = q.where(t.c.job == job)
        live = sorted(set(alive or ()))
        if live:
            q = q.where(sa.or_(t.c.owner.is_(None), t.c.owner.not_in(live)))
        return int(self.conn.execute(q.values(
            status="interrupted", finished_at=now or utcnow(),
            error="its process stopped before the run finished (crash or kill)")).rowcount)

    # --------------------------------------------------------------- pull state

    def pull_succeeded(self, system: str, object: str, now: datetime) -> None:
        """A pull of ``system``/``object`` reached the end of the changes."""
        t = s.pull_state
        done = self.conn.execute(sa.update(t).where(t.c.system == system, t.c.object == object).values(
            first_complete_at=sa.func.coalesce(t.c.first_complete_at, now), last_ok_at=now,
            last_attempt_at=now, last_error=None, last_error_at=None, failing_since=None)).rowcount
        if not done:
            self.conn.execute(sa.insert(t).values(system=system, object=object, first_complete_at=now,
                                                  last_ok_at=now, last_attempt_at=now))

    def pull_failed(self, system: str, object: str, error: str, now: datetime) -> None:
        """A pull of ``system``/``object`` could not run or stopped on an error (one line)."""
        t = s.pull_state
        done = self.conn.execute(sa.update(t).where(t.c.system == system, t.c.object == object).values(
            last_attempt_at=now, last_error=error, last_error_at=now,
            failing_since=sa.func.coalesce(t.c.failing_since, now))).rowcount
        if not done:
            self.conn.execute(sa.insert(t).values(system=system, object=object, last_attempt_at=now,
                                                  last_error=error, last_error_at=now, failing_since=now))

    def pull_states(self) -> dict[tuple[str, str], PullStateRow]:
        t = s.pull_state
        return {(m["system"], m["object"]): PullStateRow(**m)
                for m in self.conn.execute(sa.select(t)).mappings()}

    def last_runs(self, limit: int = 20, job: str | None = None) -> list[RunRow]:
        """Most recent first."""
        t = s.runs
        q = sa.select(t).order_by(t.c.started_at.desc(), t.c.run_id).limit(limit)
        if job is not None:
            q = q.where(t.c.job == job)
        return [RunRow(**m) for m in self.conn.execute(q).mappings()]

    # ------------------------------------------------------------------- outbox

    def enqueue(self, items: Sequence[OutboxItem], now: datetime | None = None) -> int:
        """Persist intended writes as ``pending``; returns how many were new.

        ``key`` is unique for ever: an item whose key is already in the outbox, in
        ANY state (pending, sending, done, skipped, quarantined), is ignored. So
        re-deciding the same write after a crash or an overlap re-read is
        harmless. To make the same change again after it was done, the caller
        must derive a different key (e.g. from the record's new raw_hash).
        """
        if not items:
            return 0
        now = now or utcnow()
        t = s.outbox
        seen: set[str] = set()
        params = []
        for i in items:
            if i.op not in ("update", "create"):
                raise ValueError(f"outbox op must be update or create, not {i.op!r}")
            if i.op == "update" and not i.record_id:
                raise ValueError(f"outbox update {i.key!r} needs a record_id")
            if i.key in seen:
                continue
            seen.add(i.key)
            params.append({
                "key": i.key, "entity_id": i.entity_id, "email_norm": i.email_norm,
                "system": i.system, "object": i.object, "record_id": i.record_id, "op": i.op,
                "fields": dict(i.fields), "clear_first": list(i.clear_first),
                "canonical": {f: list(v) for f, v in i.canonical.items()},
                "rule": i.rule, "reason": i.reason, "mapping_rev": i.mapping_rev,
                "state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now,
            })
        stmt = self._insert(t).on_conflict_do_nothing(index_elements=[t.c.key]).returning(t.c.id)
        n = 0
        for batch in _chunks(params):
            n += len(self.conn.execute(stmt, list(batch)).all())
        return n

    def due(self, system: str, object: str | None, now: datetime,
            limit: int = 500) -> list[OutboxRow]:
        """Pending or sending (a crash mid-send) entries due at ``now``, in id order."""
        t = s.outbox
        q = (sa.select(t).where(t.c.system == system, t.c.state.in_(OUTBOX_OPEN),
                                t.c.next_attempt_at <= now)
             .order_by(t.c.id).limit(limit))
        if object is not None:
            q = q.where(t.c.object == object)
        return [_outbox(m) for m in self.conn.execute(q).mappings()]

    def get_outbox(self, ids: Iterable[int]) -> dict[int, OutboxRow]:
        t = s.outbox
        out: dict[int, OutboxRow] = {}
        for chunk in _chunks(sorted(set(ids))):
            for m in self.conn.execute(sa.select(t).where(t.c.id.in_(chunk))).mappings():
                out[m["id"]] = _outbox(m)
        return out

    def mark_sending(self, ids: Iterable[int]) -> None:
        """About to send: counts one attempt. Commit this before sending."""
        t = s.outbox
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk), t.c.state.in_(OUTBOX_OPEN))
                              .values(state="sending", attempts=t.c.attempts + 1))

    def mark_done(self, id: int, result_id: str | None = None,
                  now: datetime | None = None) -> bool:
        """The CRM accepted the write: state done + one audit row per canonical field.

        Exactly once: returns False (and writes nothing) when the entry was not
        pending/sending (already done, skipped or quarantined).
        """
        t = s.outbox
        now = now or utcnow()
        done = self.conn.execute(
            sa.update(t).where(t.c.id == id, t.c.state.in_(OUTBOX_OPEN))
            .values(state="done", done_at=now, result_id=result_id, last_error=None)
            .returning(*t.c)
        ).mappings().first()
        if done is None:
            return False
        row = _outbox(done)
        audit_rows = [
            {
                "at": now, "entity_id": row.entity_id, "email_norm": row.email_norm,
                "system": row.system, "object": row.object,
                "record_id": row.record_id or result_id, "field": field,
                "before": ba[0], "after": ba[1], "rule": row.rule, "reason": row.reason,
                "mapping_rev": row.mapping_rev, "outbox_id": row.id,
            }
            for field, ba in sorted(row.canonical.items())
        ]
        if audit_rows:
            self.conn.execute(sa.insert(s.audit), audit_rows)
        return True

    def mark_skipped(self, id: int, why: str, now: datetime | None = None) -> bool:
        """Not sent because the target already held the value; no audit row. ``why`` is
        kept in ``last_error``."""
        t = s.outbox
        return bool(self.conn.execute(
            sa.update(t).where(t.c.id == id, t.c.state.in_(OUTBOX_OPEN))
            .values(state="skipped", done_at=now or utcnow(), last_error=why)).rowcount)

    def mark_failed(self, id: int, error: str, next_attempt_at: datetime,
                    max_attempts: int, now: datetime | None = None) -> bool:
        """A send failed: back to pending at ``next_attempt_at``, or quarantined (True)
        once ``attempts`` reached ``max_attempts``. A failure of an entry not marked
        sending counts one attempt itself. A quarantined write also gets a
        ``quarantine`` row (kind ``write``)."""
        t = s.outbox
        now = now or utcnow()
        row = self.conn.execute(sa.select(t.c.state, t.c.attempts).where(t.c.id == id)).first()
        if row is None or row.state not in OUTBOX_OPEN:
            return False
        attempts = row.attempts + (0 if row.state == "sending" else 1)
        quarantined = attempts >= max_attempts
        self.conn.execute(sa.update(t).where(t.c.id == id).values(
            state="quarantined" if quarantined else "pending", attempts=attempts,
            last_error=error, next_attempt_at=next_attempt_at))
        if quarantined:
            o = self.get_outbox([id])[id]
            self.conn.execute(sa.insert(s.quarantine).values(
                system=o.system, object=o.object, record_id=o.record_id, kind="write",
                reason=error, raw={"key": o.key, "op": o.op, "fields": o.fields},
                at=now, attempts=attempts, outbox_id=o.id))
        return quarantined

    def open_writes(self, entity_ids: Iterable[str]) -> dict[str, list[OutboxRow]]:
        """Updates not yet done (pending or sending) per entity, in id order: what syncd has
        decided and not yet seen applied, so the rules can see their own pending writes."""
        t = s.outbox
        out: dict[str, list[OutboxRow]] = {}
        for chunk in _chunks(sorted(set(entity_ids))):
            q = (sa.select(t).where(self._in(t.c.entity_id, chunk), t.c.state.in_(OUTBOX_OPEN),
                                    t.c.op == "update")
                 .order_by(t.c.id))
            for m in self.conn.execute(q).mappings():
                row = _outbox(m)
                out.setdefault(str(row.entity_id), []).append(row)
        return out

    def outbox_depth(self, system: str | None = None) -> int:
        """Writes not yet done: pending + sending (quarantined ones are not counted)."""
        t = s.outbox
        q = sa.select(sa.func.count()).select_from(t).where(t.c.state.in_(OUTBOX_OPEN))
        if system is not None:
            q = q.where(t.c.system == system)
        return int(self.conn.execute(q).scalar_one())

    def requeue_quarantined(self, ids: Iterable[int] | None = None, system: str | None = None,
                            now: datetime | None = None) -> int:
        """Quarantined outbox entries (all, or these ids / this system) → pending now,
        attempts reset; their quarantine rows are resolved. Returns how many."""
        t, q = s.outbox, s.quarantine
        now = now or utcnow()
        sel = sa.select(t.c.id).where(t.c.state == "quarantined")
        if system is not None:
            sel = sel.where(t.c.system == system)
        found = [r for (r,) in self.conn.execute(sel)]
        if ids is not None:
            wanted = set(ids)
            found = [i for i in found if i in wanted]
        for chunk in _chunks(found):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk)).values(
                state="pending", attempts=0, next_attempt_at=now))
            self.conn.execute(sa.update(q).where(q.c.outbox_id.in_(chunk),
                                                 q.c.resolved_at.is_(None))
                              .values(resolved_at=now))
        return len(found)

    # -------------------------------------------------------------------- audit

    def query_audit(self, email: str | None = None, record_id: str | None = None,
                    rule: str | None = None, system: str | None = None,
                    since: datetime | None = None, until: datetime | None = None,
                    entity_id: str | None = None, limit: int = 1000,
                    newest: bool = False) -> list[AuditRow]:
        """Audit rows matching every given filter, oldest first; ``until`` is exclusive.

        ``limit`` keeps the oldest rows, or with ``newest=True`` the most recent ones
        (still returned oldest first): "why did this change?" asks about the latest.
        """
        t = s.audit
        if newest:
            q = sa.select(t).order_by(t.c.at.desc(), t.c.id.desc()).limit(limit)
        else:
            q = sa.select(t).order_by(t.c.at, t.c.id).limit(limit)
        for col, val in ((t.c.email_norm, email), (t.c.record_id, record_id),
                         (t.c.rule, rule), (t.c.system, system), (t.c.entity_id, entity_id)):
            if val is not None:
                q = q.where(col == val)
        if since is not None:
            q = q.where(t.c.at >= since)
        if until is not None:
            q = q.where(t.c.at < until)
        rows = [AuditRow(**m) for m in self.conn.execute(q).mappings()]
        return rows[::-1] if newest else rows

    # --------------------------------------------------------------- quarantine

    def quarantine_record(self, system: str, object: str, record_id: str | None, reason: str,
                          raw: Any = None, now: datetime | None = None) -> int:
        """Quarantine a bad record. An open entry for the same record is refreshed
        (reason, raw, attempts + 1) instead of duplicated. Returns its id."""
        t = s.quarantine
        now = now or utcnow()
        existing = self.conn.execute(sa.select(t.c.id).where(
            t.c.system == system, t.c.object == object, t.c.record_id == record_id,
            t.c.kind == "record", t.c.resolved_at.is_(None))).scalar()
        if existing is not None:
            self.conn.execute(sa.update(t).where(t.c.id == existing).values(
                reason=reason, raw=raw, at=now, attempts=t.c.attempts + 1))
            return int(existing)
        return int(self.conn.execute(sa.insert(t).values(
            system=system, object=object, record_id=record_id, kind="record", reason=reason,
            raw=raw, at=now, attempts=1).returning(t.c.id)).scalar_one())

    def open_quarantine(self, system: str | None = None) -> list[QuarantineRow]:
        t = s.quarantine
        q = sa.select(t).where(t.c.resolved_at.is_(None)).order_by(t.c.id)
        if system is not None:
            q = q.where(t.c.system == system)
        return [QuarantineRow(**m) for m in self.conn.execute(q).mappings()]

    def resolve_quarantine(self, ids: Iterable[int], now: datetime | None = None) -> int:
        t = s.quarantine
        n = 0
        for chunk in _chunks(sorted(set(ids))):
            n += self.conn.execute(sa.update(t).where(t.c.id.in_(chunk),
                                                      t.c.resolved_at.is_(None))
                                   .values(resolved_at=now or utcnow())).rowcount
        return n

    # ----------------------------------------------------------------- unmapped

    def count_unmapped(self, items: Iterable[tuple[str, str, str, str]],
                       now: datetime | None = None) -> None:
        """Add one sighting per (system, object, field, value) item (bulk increment)."""
        counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for item in items:
            counts[item] += 1
        if not counts:
            return
        now = now or utcnow()
        t = s.unmapped
        ins = self._insert(t)
        stmt = ins.on_conflict_do_update(
            index_elements=[t.c.system, t.c.object, t.c.field, t.c.value],
            set_={"count": t.c.count + ins.excluded.count, "last_seen": ins.excluded.last_seen})
        params = [{"system": k[0], "object": k[1], "field": k[2], "value": k[3], "count": c,
                   "last_seen": now} for k, c in sorted(counts.items())]
        for batch in _chunks(params):
            self.conn.execute(stmt, list(batch))

    def unmapped_values(self, system: str | None = None) -> list[UnmappedRow]:
        """Most frequent first."""
        t = s.unmapped
        q = sa.select(t).order_by(t.c.count.desc(), t.c.system, t.c.object, t.c.field, t.c.value)
        if system is not None:
            q = q.where(t.c.system == system)
        return [UnmappedRow(**m) for m in self.conn.execute(q).mappings()]

    # --------------------------------------------------------------- sla events

    def add_event(self, kind: str, entity_id: str | None, details: Mapping[str, Any],
                  now: datetime | None = None, dedupe: bool = True, open: bool = True) -> int:
        """Record an SLA event (sla_breach, promotion_blocked, conflict, returned, …).

        With ``dedupe`` an open event of the same kind for the same entity is kept
        and its id returned (an SLA breach is recorded once, not every cycle).
        """
        t = s.sla_events
        if dedupe and entity_id is not None:
            existing = self.conn.execute(sa.select(t.c.id).where(
                t.c.kind == kind, t.c.entity_id == entity_id, t.c.open.is_(True))).scalar()
            if existing is not None:
                return int(existing)
        return int(self.conn.execute(sa.insert(t).values(
            kind=kind, entity_id=entity_id, details=dict(details), at=now or utcnow(),
            open=open).returning(t.c.id)).scalar_one())

    def open_events(self, kind: str | None = None) -> list[EventRow]:
        t = s.sla_events
        q = sa.select(t).where(t.c.open.is_(True)).order_by(t.c.at, t.c.id)
        if kind is not None:
            q = q.where(t.c.kind == kind)
        return [EventRow(**m) for m in self.conn.execute(q).mappings()]

    def open_events_of(self, entity_ids: Iterable[str]) -> dict[str, list[EventRow]]:
        """Open events per entity, for a chunk of entities being decided."""
        t = s.sla_events
        out: dict[str, list[EventRow]] = {}
        for chunk in _chunks(sorted(set(entity_ids))):
            q = sa.select(t).where(t.c.open.is_(True), self._in(t.c.entity_id, chunk)).order_by(t.c.id)
            for m in self.conn.execute(q).mappings():
                out.setdefault(m["entity_id"], []).append(EventRow(**m))
        return out

    def close_events(self, ids: Iterable[int]) -> None:
        t = s.sla_events
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk)).values(open=False))

    # ------------------------------------------------------------------- resync

    def queue_resync(self, params: Mapping[str, Any], now: datetime | None = None) -> int:
        t = s.resync_requests
        return int(self.conn.execute(sa.insert(t).values(
            requested_at=now or utcnow(), params=dict(params), state="queued",
        ).returning(t.c.id)).scalar_one())

    def claim_resync(self, owner: str, now: datetime | None = None) -> ResyncRow | None:
        """Take the oldest queued request (→ running, picked_by=owner). Atomic: two
        claimants never get the same request. None when the queue is empty."""
        t = s.resync_requests
        now = now or utcnow()
        while True:
            q = sa.select(t.c.id).where(t.c.state == "queued").order_by(t.c.id).limit(1)
            if self.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            rid = self.conn.execute(q).scalar()
            if rid is None:
                return None
            row = self.conn.execute(
                sa.update(t).where(t.c.id == rid, t.c.state == "queued")
                .values(state="running", picked_by=owner, picked_at=now).returning(*t.c)
            ).mappings().first()
            if row is not None:
                return ResyncRow(**row)

    def finish_resync(self, id: int, state: str, result: Any = None,
                      now: datetime | None = None) -> None:
        if state not in ("done", "failed"):
            raise ValueError(f"resync state must be done or failed, not {state!r}")
        t = s.resync_requests
        self.conn.execute(sa.update(t).where(t.c.id == id).values(
            state=state, result=result, done_at=now or utcnow()))

    def requeue_stale_resyncs(self, picked_before: datetime) -> int:
        """Running requests picked before ``picked_before`` (their daemon died) go back
        to the queue. Returns how many."""
        t = s.resync_requests
        return int(self.conn.execute(
            sa.update(t).where(t.c.state == "running", t.c.picked_at < picked_before)
            .values(state="queued", picked_by=None, picked_at=None)).rowcount)

    def resync_queue(self, include_finished: bool = False, limit: int = 100) -> list[ResyncRow]:
        """Queued and running requests (and finished ones if asked), oldest first."""
        t = s.resync_requests
        q = sa.select(t).order_by(t.c.id).limit(limit)
        if not include_finished:
            q = q.where(t.c.state.in_(("queued", "running")))
        return [ResyncRow(**m) for m in self.conn.execute(q).mappings()]

    # ------------------------------------------------------------------- leases

    def acquire_lease(self, name: str, owner: str, ttl_s: float, now: datetime) -> bool:
        """Take (or extend) the lease if it is free, expired or already ours. Atomic:
        one row per name, taken with one INSERT … ON CONFLICT DO UPDATE … WHERE.
        Commit right away (own short ``tx()``) so others see it."""
        t = s.leases
        ins = self._insert(t)
        stmt = ins.values(name=name, owner=owner,
                          expires_at=now + timedelta(seconds=ttl_s)).on_conflict_do_update(
            index_elements=[t.c.name],
            set_={"owner": ins.excluded.owner, "expires_at": ins.excluded.expires_at},
            where=sa.or_(t.c.owner == ins.excluded.owner, t.c.expires_at <= now),
        ).returning(t.c.name)
        return self.conn.execute(stmt).first() is not None

    def renew_lease(self, name: str, owner: str, ttl_s: float, now: datetime) -> bool:
        """Extend a lease we still hold (even if it lapsed and nobody took it)."""
        t = s.leases
        return bool(self.conn.execute(sa.update(t).where(t.c.name == name, t.c.owner == owner)
                                      .values(expires_at=now + timedelta(seconds=ttl_s))).rowcount)

    def release_lease(self, name: str, owner: str) -> bool:
        t = s.leases
        return bool(self.conn.execute(
            sa.delete(t).where(t.c.name == name, t.c.owner == owner)).rowcount)

    def lease_holder(self, name: str, now: datetime) -> str | None:
        """Who holds the lease at ``now`` (None if free or expired)."""
        t = s.leases
        return self.conn.execute(sa.select(t.c.owner).where(
            t.c.name == name, t.c.expires_at > now)).scalar()

    def lease_owners(self, now: datetime) -> set[str]:
        """Everyone holding an unexpired lease at ``now`` (alive, as far as the store knows)."""
        t = s.leases
        return set(self.conn.execute(sa.select(t.c.owner).where(t.c.expires_at > now)).scalars())

    # ---------------------------------------------------------------- heartbeat

    def beat(self, owner: str, info: Mapping[str, Any] | None = None,
             now: datetime | None = None, pid: int | None = None) -> None:
        """A running service says it is alive (``started_at`` kept from its first beat)."""
        t = s.heartbeat
        now = now or utcnow()
        ins = self._insert(t).values(owner=owner, started_at=now, seen_at=now,
                                     pid=pid if pid is not None else os.getpid(),
                                     info=dict(info or {}))
        self.conn.execute(ins.on_conflict_do_update(
            index_elements=[t.c.owner],
            set_={"seen_at": ins.excluded.seen_at, "pid": ins.excluded.pid,
                  "info": ins.excluded.info}))

    def heartbeats(self, seen_since: datetime | None = None) -> list[HeartbeatRow]:
        """Services that beat at or after ``seen_since`` (all if None), latest first."""
        t = s.heartbeat
        q = sa.select(t).order_by(t.c.seen_at.desc(), t.c.owner)
        if seen_since is not None:
            q = q.where(t.c.seen_at >= seen_since)
        return [HeartbeatRow(**m) for m in self.conn.execute(q).mappings()]

    def remove_heartbeat(self, owner: str) -> None:
        t = s.heartbeat
        self.conn.execute(sa.delete(t).where(t.c.owner == owner))

    def prune_heartbeats(self, seen_before: datetime) -> int:
        """Forget services that stopped beating before ``seen_before`` (they are dead)."""
        t = s.heartbeat
        return int(self.conn.execute(sa.delete(t).where(t.c.seen_at < seen_before)).rowcount)


def _first_line(e: BaseException | None) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# Record columns in RecordRow's field order, raw last; rows are read positionally (a
# RowMapping per row cost more than the SQL on the hot paths).
_RECORD_COLS = (s.records.c.system, s.records.c.object, s.records.c.id, s.records.c.kind,
                s.records.c.modified_at, s.records.c.canonical, s.records.c.email_norm, s.records.c.raw_hash,
                s.records.c.entity_id, s.records.c.dirty, s.records.c.updated_at)


def _select_records(with_raw: bool) -> sa.Select[Any]:
    return sa.select(*_RECORD_COLS, s.records.c.raw) if with_raw else sa.select(*_RECORD_COLS)


def _record_of(row: Sequence[Any], with_raw: bool) -> RecordRow:
    """A row of :func:`_select_records` as a RecordRow (``raw`` is ``{}`` when not selected)."""
    system, obj, rid, kind, modified_at, canonical, email_norm, rhash, entity_id, dirty, updated_at = row[:11]
    return RecordRow(system, obj, rid, kind, modified_at, row[11] if with_raw else {}, canonical, email_norm,
                     rhash, entity_id, bool(dirty), updated_at)


def _record(m: Mapping[Any, Any]) -> RecordRow:
    return RecordRow(
        system=m["system"], object=m["object"], id=m["id"], kind=m["kind"],
        modified_at=m["modified_at"], raw=m.get("raw") or {}, canonical=m["canonical"],
        email_norm=m["email_norm"], raw_hash=m["raw_hash"], entity_id=m["entity_id"],
        dirty=bool(m["dirty"]), updated_at=m["updated_at"],
    )


def _outbox(m: Mapping[Any, Any]) -> OutboxRow:
    d = dict(m)
    d["clear_first"] = tuple(d["clear_first"] or ())
    return OutboxRow(**d)
