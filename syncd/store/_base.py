"""What every concern of the store's unit of work shares: the connection, key lists, row readers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from syncd.store import schema as s
from syncd.store.rows import OutboxRow, RecordRow

_CHUNK = 500  # keys per IN (...) list; well under SQLite's variable limit
_T = TypeVar("_T")

OUTBOX_OPEN = ("pending", "sending")


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


class TxBase:
    """One transaction's connection; each concern of the store adds its methods."""

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
