"""The store's records: raw + canonical rows, the dirty queue, what deals and attempts point at."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import (
    TxBase,
    _chunks,
    _record,
    _record_of,
    _select_records,
)
from syncd.store.rows import (
    RecordKey,
    RecordRow,
)


class RecordsTx(TxBase):
    """Records as pulled and mapped, the dirty queue, references."""

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
