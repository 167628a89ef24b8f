"""The store's write side: the outbox, the audit log, quarantine, unmapped values."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import (
    OUTBOX_OPEN,
    TxBase,
    _chunks,
    _outbox,
)
from syncd.store.rows import (
    AuditRow,
    OutboxItem,
    OutboxRow,
    QuarantineRow,
    UnmappedRow,
)


class OutboxTx(TxBase):
    """The outbox and its audit rows, quarantine, unmapped values."""

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
                "basis": dict(i.basis) if i.basis is not None else None,
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

    def mark_sending(self, ids: Iterable[int], fence: int | None = None) -> None:
        """About to send: counts one attempt (``fence``: the lease token it is sent under).
        Commit this before sending."""
        t = s.outbox
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk), t.c.state.in_(OUTBOX_OPEN))
                              .values(state="sending", attempts=t.c.attempts + 1, fence=fence))

    def mark_done(self, id: int, result_id: str | None = None,
                  now: datetime | None = None, fence: tuple[str, str, int] | None = None) -> bool:
        """The CRM accepted the write: state done + one audit row per canonical field.

        Exactly once: returns False (and writes nothing) when the entry was not
        pending/sending (already done, skipped or quarantined), or, with ``fence`` (lease
        name, owner, token), when that acquisition of the lease is no longer the latest
        (another process took the work over; it looks first and finishes the row).
        """
        return id in self.mark_done_many([(id, result_id)], now=now, fence=fence)

    def mark_done_many(self, done: Sequence[tuple[int, str | None]], now: datetime | None = None,
                       fence: tuple[str, str, int] | None = None) -> set[int]:
        """:meth:`mark_done` for many rows, (outbox id, the CRM's record id) each, in one UPDATE
        and one audit INSERT per chunk; returns the ids marked done (the others were not open, or
        the fence no longer holds)."""
        t = s.outbox
        now = now or utcnow()
        out: set[int] = set()
        for chunk in _chunks(sorted(dict(done).items())):
            ids = [i for i, _ in chunk]
            where: list[Any] = [t.c.id.in_(ids), t.c.state.in_(OUTBOX_OPEN)]
            if fence is not None:
                le = s.leases
                where.append(sa.exists().where(le.c.name == fence[0], le.c.owner == fence[1],
                                               le.c.token == fence[2]))
            named = {i: rid for i, rid in chunk if rid is not None}
            result_id: Any = sa.case(named, value=t.c.id, else_=sa.null()) if named else None
            rows = [_outbox(m) for m in self.conn.execute(
                sa.update(t).where(*where)
                .values(state="done", done_at=now, result_id=result_id, last_error=None)
                .returning(*t.c)
            ).mappings()]
            self._audit_many([(row, now, row.record_id or named.get(row.id), row.rule, row.reason)
                              for row in rows])
            out.update(row.id for row in rows)
        return out

    def _audit(self, row: OutboxRow, now: datetime, record_id: str | None, rule: str, reason: str) -> None:
        """One audit row per canonical field the outbox row writes (before → after)."""
        self._audit_many([(row, now, record_id, rule, reason)])

    def _audit_many(self, entries: Sequence[tuple[OutboxRow, datetime, str | None, str, str]]) -> None:
        """:meth:`_audit` of many outbox rows, in one INSERT."""
        audit_rows = [
            {
                "at": now, "entity_id": row.entity_id, "email_norm": row.email_norm,
                "system": row.system, "object": row.object, "record_id": record_id, "field": field,
                "before": ba[0], "after": ba[1], "rule": rule, "reason": reason,
                "mapping_rev": row.mapping_rev, "outbox_id": row.id,
            }
            for row, now, record_id, rule, reason in entries
            for field, ba in sorted(row.canonical.items())
        ]
        if audit_rows:
            self.conn.execute(sa.insert(s.audit), audit_rows)

    def mark_superseded(self, id: int, why: str, now: datetime | None = None) -> bool:
        """A resend found its target changed since the decision: the write is cancelled
        (state ``superseded``, ``why`` in ``last_error``), one audit row per canonical field
        says so (rule ``superseded``, before → the value it would have written), and its
        entity is marked due, so the person is decided again on what is true now."""
        t = s.outbox
        now = now or utcnow()
        done = self.conn.execute(
            sa.update(t).where(t.c.id == id, t.c.state.in_(OUTBOX_OPEN))
            .values(state="superseded", done_at=now, last_error=why)
            .returning(*t.c)
        ).mappings().first()
        if done is None:
            return False
        row = _outbox(done)
        self._audit(row, now, row.record_id, "superseded", f"{row.rule}: {why}")
        if row.entity_id is not None:
            e = s.entities
            self.conn.execute(sa.update(e).where(e.c.entity_id == row.entity_id).values(due_at=now))
        return True

    def mark_skipped(self, id: int, why: str, now: datetime | None = None) -> bool:
        """Not sent because the target already held the value; no audit row. ``why`` is
        kept in ``last_error``."""
        t = s.outbox
        return bool(self.conn.execute(
            sa.update(t).where(t.c.id == id, t.c.state.in_(OUTBOX_OPEN))
            .values(state="skipped", done_at=now or utcnow(), last_error=why)).rowcount)

    def mark_failed(self, id: int, error: str, next_attempt_at: datetime, *, retriable: bool,
                    now: datetime | None = None) -> bool:
        """A send failed. Returns True when the write was quarantined.

        ``retriable`` (a 5xx, a timeout, a dropped connection, a lock): back to ``pending``
        at ``next_attempt_at``, however often it failed before; it is never quarantined
        (:meth:`failing_writes` reports the ones that keep failing). Not retriable (the CRM
        refused this record: not found, deleted, a validation error): quarantined at once
        with the CRM's reason (a ``quarantine`` row of kind ``write``), and its entity is
        marked due, so the person is decided again on what is true now. A failure of an
        entry not marked sending counts one attempt itself."""
        t = s.outbox
        now = now or utcnow()
        row = self.conn.execute(sa.select(t.c.state, t.c.attempts).where(t.c.id == id)).first()
        if row is None or row.state not in OUTBOX_OPEN:
            return False
        attempts = row.attempts + (0 if row.state == "sending" else 1)
        quarantined = not retriable
        self.conn.execute(sa.update(t).where(t.c.id == id).values(
            state="quarantined" if quarantined else "pending", attempts=attempts,
            last_error=error, next_attempt_at=next_attempt_at))
        if quarantined:
            o = self.get_outbox([id])[id]
            self.conn.execute(sa.insert(s.quarantine).values(
                system=o.system, object=o.object, record_id=o.record_id, kind="write",
                reason=error, raw={"key": o.key, "op": o.op, "fields": o.fields},
                at=now, attempts=attempts, outbox_id=o.id))
            if o.entity_id is not None:
                e = s.entities
                self.conn.execute(sa.update(e).where(e.c.entity_id == o.entity_id).values(due_at=now))
        return quarantined

    def failing_writes(self, min_attempts: int, system: str | None = None,
                       limit: int = 100) -> list[OutboxRow]:
        """Writes still open that failed at least ``min_attempts`` sends (transient failures
        are retried for ever; these are the ones to alert on), oldest first."""
        t = s.outbox
        q = (sa.select(t).where(t.c.state.in_(OUTBOX_OPEN), t.c.attempts >= min_attempts,
                                t.c.last_error.is_not(None))
             .order_by(t.c.id).limit(limit))
        if system is not None:
            q = q.where(t.c.system == system)
        return [_outbox(m) for m in self.conn.execute(q).mappings()]

    def count_failing_writes(self, min_attempts: int, system: str | None = None) -> int:
        """How many writes :meth:`failing_writes` would list (without a limit)."""
        t = s.outbox
        q = sa.select(sa.func.count()).select_from(t).where(
            t.c.state.in_(OUTBOX_OPEN), t.c.attempts >= min_attempts, t.c.last_error.is_not(None))
        if system is not None:
            q = q.where(t.c.system == system)
        return int(self.conn.execute(q).scalar_one())

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
