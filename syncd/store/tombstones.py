"""Tombstones: records the CRM deleted or merged away (issue 16).

A tombstone is written once per dead record, with when the CRM says it died, when syncd
noticed, which feed or answer told it, the person it was part of and the record as last
stored. The record's own row is forgotten at the same time (linking and the views no longer
see it); the tombstone is what keeps writes away from the dead id and keeps hand-offs from
re-creating the person because of the deletion. A restore (HubSpot restore, Salesforce
undelete) closes it (``restored_at``). Deletion feeds keep their watermark here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.model import Deletion
from syncd.store import schema as s
from syncd.store._base import OUTBOX_OPEN, TxBase, _chunks, _outbox
from syncd.store.rows import OutboxRow, RecordKey


@dataclass(frozen=True, slots=True)
class TombstoneRow:
    system: str
    object: str
    record_id: str
    kind: str  # deleted | merged
    merged_into: str | None
    deleted_at: datetime | None
    detected_at: datetime
    source: str
    entity_id: str | None
    canonical: dict[str, Any] | None
    restored_at: datetime | None

    @property
    def key(self) -> RecordKey:
        return (self.system, self.object, self.record_id)


class TombstonesTx(TxBase):
    """Tombstones and deletion-feed watermarks (part of :class:`syncd.store.Tx`)."""

    def add_tombstone(self, d: Deletion, *, now: datetime, entity_id: str | None,
                      canonical: Mapping[str, Any] | None) -> bool:
        """Record ``d`` as dead. An open tombstone for it already: nothing (False). A restored
        one is opened again (the record died a second time)."""
        t = s.tombstones
        values = {"kind": "merged" if d.merged_into else "deleted", "merged_into": d.merged_into,
                  "deleted_at": d.deleted_at, "detected_at": now, "source": d.source,
                  "entity_id": entity_id, "canonical": dict(canonical) if canonical else None,
                  "restored_at": None}
        where = (t.c.system == d.system, t.c.object == d.object, t.c.record_id == d.id)
        row = self.conn.execute(sa.select(t.c.restored_at).where(*where)).first()
        if row is None:
            self.conn.execute(sa.insert(t).values(system=d.system, object=d.object, record_id=d.id, **values))
            return True
        if row.restored_at is None:
            return False
        self.conn.execute(sa.update(t).where(*where).values(**values))
        return True

    def tombstones(self, keys: Iterable[RecordKey], *, open_only: bool = True) -> dict[RecordKey, TombstoneRow]:
        """The tombstones of these records (open ones only, unless ``open_only=False``)."""
        t = s.tombstones
        out: dict[RecordKey, TombstoneRow] = {}
        by_sys_obj: dict[tuple[str, str], list[str]] = {}
        for system, obj, rid in set(keys):
            by_sys_obj.setdefault((system, obj), []).append(rid)
        for (system, obj), ids in sorted(by_sys_obj.items()):
            for chunk in _chunks(sorted(ids)):
                q = sa.select(t).where(t.c.system == system, t.c.object == obj, self._in(t.c.record_id, chunk))
                if open_only:
                    q = q.where(t.c.restored_at.is_(None))
                for m in self.conn.execute(q).mappings():
                    row = TombstoneRow(**m)
                    out[row.key] = row
        return out

    def tombstones_of_entities(self, entity_ids: Iterable[str]) -> dict[str, list[TombstoneRow]]:
        """Open tombstones of records that were part of these entities."""
        t = s.tombstones
        out: dict[str, list[TombstoneRow]] = {}
        for chunk in _chunks(sorted(set(entity_ids))):
            q = sa.select(t).where(self._in(t.c.entity_id, chunk), t.c.restored_at.is_(None))
            for m in self.conn.execute(q.order_by(t.c.detected_at)).mappings():
                row = TombstoneRow(**m)
                out.setdefault(str(row.entity_id), []).append(row)
        return out

    def restore_tombstone(self, key: RecordKey, now: datetime) -> TombstoneRow | None:
        """The record is back (restored, undeleted): its tombstone closes. Returns it, or None."""
        row = self.tombstones([key]).get(key)
        if row is None:
            return None
        t = s.tombstones
        self.conn.execute(sa.update(t).where(t.c.system == key[0], t.c.object == key[1],
                                             t.c.record_id == key[2]).values(restored_at=now))
        return row

    def list_tombstones(self, system: str | None = None, limit: int = 100, *, object: str | None = None,
                        include_restored: bool = False) -> list[TombstoneRow]:
        """Tombstones, most recently detected first: open ones (and restored ones too with
        ``include_restored``), of one system / object when given."""
        t = s.tombstones
        q = sa.select(t).order_by(t.c.detected_at.desc(), t.c.system, t.c.object, t.c.record_id).limit(limit)
        if not include_restored:
            q = q.where(t.c.restored_at.is_(None))
        if system is not None:
            q = q.where(t.c.system == system)
        if object is not None:
            q = q.where(t.c.object == object)
        return [TombstoneRow(**m) for m in self.conn.execute(q).mappings()]

    def count_tombstones(self, system: str | None = None, *, object: str | None = None,
                         include_restored: bool = False) -> int:
        t = s.tombstones
        q = sa.select(sa.func.count()).select_from(t)
        if not include_restored:
            q = q.where(t.c.restored_at.is_(None))
        if system is not None:
            q = q.where(t.c.system == system)
        if object is not None:
            q = q.where(t.c.object == object)
        return int(self.conn.execute(q).scalar_one())

    def propagated_deletes(self, keys: Iterable[RecordKey]) -> dict[RecordKey, list[OutboxRow]]:
        """The outbox rows that delete these dead records' twins (``[deletions] other_side =
        "propagate"``, keyed ``propagate-delete:SYSTEM:ID:…``), by dead record: what became of the
        other side. Read-only (``syncd tombstones``)."""
        t = s.outbox
        out: dict[RecordKey, list[OutboxRow]] = {}
        for system, obj, rid in sorted(set(keys)):
            q = (sa.select(t).where(t.c.op == "delete", t.c.key.like(f"propagate-delete:{system}:{rid}:%"))
                 .order_by(t.c.id))
            rows = [_outbox(m) for m in self.conn.execute(q).mappings()]
            if rows:
                out[(system, obj, rid)] = rows
        return out

    def open_writes_to(self, keys: Iterable[RecordKey]) -> list[OutboxRow]:
        """Outbox rows not yet done (pending or sending) whose target is one of ``keys``."""
        t = s.outbox
        out: list[OutboxRow] = []
        by_sys_obj: dict[tuple[str, str], list[str]] = {}
        for system, obj, rid in set(keys):
            by_sys_obj.setdefault((system, obj), []).append(rid)
        for (system, obj), ids in sorted(by_sys_obj.items()):
            for chunk in _chunks(sorted(ids)):
                q = (sa.select(t).where(t.c.system == system, t.c.object == obj, self._in(t.c.record_id, chunk),
                                        t.c.state.in_(OUTBOX_OPEN)).order_by(t.c.id))
                out.extend(_outbox(m) for m in self.conn.execute(q).mappings())
        return out

    def open_record_quarantine(self, keys: Iterable[RecordKey]) -> dict[RecordKey, list[int]]:
        """Open quarantine entries of these records themselves (kind ``record``: they did not map,
        so the store holds no row for them), by record: their ids."""
        t = s.quarantine
        out: dict[RecordKey, list[int]] = {}
        by_sys_obj: dict[tuple[str, str], list[str]] = {}
        for system, obj, rid in set(keys):
            by_sys_obj.setdefault((system, obj), []).append(rid)
        for (system, obj), ids in sorted(by_sys_obj.items()):
            for chunk in _chunks(sorted(ids)):
                q = sa.select(t.c.id, t.c.record_id).where(
                    t.c.system == system, t.c.object == obj, t.c.kind == "record", t.c.resolved_at.is_(None),
                    self._in(t.c.record_id, chunk)).order_by(t.c.id)
                for qid, rid in self.conn.execute(q):
                    out.setdefault((system, obj, str(rid)), []).append(int(qid))
        return out

    def enqueue_deletes(self, targets: Iterable[tuple[str, str, str, str | None]], *, rule: str, reason: str,
                        mapping_rev: str, key_prefix: str, email_norm: str | None, now: datetime) -> int:
        """Outbox rows (op ``delete``) deleting these records, (system, object, id, entity):
        ``[deletions] other_side = "propagate"``. Idempotent by key like every outbox row."""
        t = s.outbox
        params: list[dict[str, Any]] = [
                  {"key": f"{key_prefix}:{system}:{rid}", "entity_id": entity, "email_norm": email_norm,
                   "system": system, "object": obj, "record_id": rid, "op": "delete", "fields": {},
                   "clear_first": [], "canonical": {"record": ["live", "deleted"]}, "rule": rule,
                   "reason": reason, "mapping_rev": mapping_rev, "basis": None, "state": "pending",
                   "attempts": 0, "next_attempt_at": now, "created_at": now}
                  for system, obj, rid, entity in targets]
        if not params:
            return 0
        stmt = self._insert(t).on_conflict_do_nothing(index_elements=[t.c.key]).returning(t.c.id)
        return len(self.conn.execute(stmt, params).all())

    def retarget_write(self, outbox_id: int, record_id: str, entity_id: str | None, *,
                       canonical: Mapping[str, Any] | None = None, basis: Mapping[str, Any] | None = None) -> bool:
        """A pending write to a merged-away record goes to its survivor instead (``canonical``
        and ``basis``: the decision's before-values, as the survivor holds them)."""
        t = s.outbox
        values: dict[str, Any] = {"record_id": record_id, "entity_id": entity_id, "state": "pending"}
        if canonical is not None:
            values["canonical"] = {f: list(v) for f, v in canonical.items()}
        if basis is not None:
            values["basis"] = dict(basis)
        return bool(self.conn.execute(
            sa.update(t).where(t.c.id == outbox_id, t.c.state.in_(OUTBOX_OPEN)).values(**values)).rowcount)

    def audit_lifecycle(self, *, system: str, object: str, record_id: str, entity_id: str | None,
                        email_norm: str | None, before: Any, after: Any, rule: str, reason: str,
                        mapping_rev: str, now: datetime) -> None:
        """One audit row for a record's life (deleted, merged, restored): field ``record``."""
        self.conn.execute(sa.insert(s.audit).values(
            at=now, entity_id=entity_id, email_norm=email_norm, system=system, object=object,
            record_id=record_id, field="record", before=before, after=after, rule=rule, reason=reason,
            mapping_rev=mapping_rev, outbox_id=None))

    def deletion_watermark(self, system: str, object: str) -> tuple[datetime | None, datetime | None]:
        """(watermark, last scanned at) of a deletion feed; (None, None) before its first read."""
        t = s.deletion_feeds
        row = self.conn.execute(sa.select(t.c.watermark, t.c.scanned_at)
                                .where(t.c.system == system, t.c.object == object)).first()
        return (row.watermark, row.scanned_at) if row is not None else (None, None)

    def set_deletion_watermark(self, system: str, object: str, watermark: datetime | None,
                               scanned_at: datetime) -> None:
        t = s.deletion_feeds
        done = self.conn.execute(sa.update(t).where(t.c.system == system, t.c.object == object)
                                 .values(watermark=watermark, scanned_at=scanned_at)).rowcount
        if not done:
            self.conn.execute(sa.insert(t).values(system=system, object=object, watermark=watermark,
                                                  scanned_at=scanned_at))
