"""The store's side of reconciliation: the ids it holds, the gaps found, the cycle that found one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from syncd.store import schema as s
from syncd.store._base import OUTBOX_OPEN, TxBase

_GAP = "reconcile:"  # meta keys: reconcile:<system>:<object> -> the last gap found (JSON)


class ReconcileTx(TxBase):
    """Id sets, known gaps (kept in ``meta``), and open work per object for cost plans."""

    def iter_record_ids(self, system: str, object: str, batch: int = 5000) -> Iterator[list[str]]:
        """The ids of one object in the store, in id order, ``batch`` at a time (keyset pages)."""
        t = s.records
        last: str | None = None
        while True:
            q = sa.select(t.c.id).where(t.c.system == system, t.c.object == object).order_by(t.c.id).limit(batch)
            if last is not None:
                q = q.where(t.c.id > last)
            ids = [str(r) for r in self.conn.execute(q).scalars()]
            if ids:
                yield ids
            if len(ids) < batch:
                return
            last = ids[-1]

    def count_records_until(self, system: str, object: str, until: datetime) -> int:
        """Records of one object whose stored copy was modified at or before ``until``."""
        t = s.records
        q = sa.select(sa.func.count()).select_from(t).where(
            t.c.system == system, t.c.object == object, t.c.modified_at <= until)
        return int(self.conn.execute(q).scalar_one())

    def quarantined_record_ids(self, system: str, object: str) -> set[str]:
        """Ids of records of one object that are quarantined (not in ``records``: they did not map)."""
        q = s.quarantine
        rows = self.conn.execute(sa.select(q.c.record_id).where(
            q.c.system == system, q.c.object == object, q.c.kind == "record",
            q.c.resolved_at.is_(None), q.c.record_id.is_not(None)))
        return {str(r) for r in rows.scalars()}

    def open_writes_by_object(self) -> dict[tuple[str, str], int]:
        """Pending or sending outbox rows per (system, object)."""
        t = s.outbox
        rows = self.conn.execute(sa.select(t.c.system, t.c.object, sa.func.count())
                                 .where(t.c.state.in_(OUTBOX_OPEN)).group_by(t.c.system, t.c.object))
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # ------------------------------------------------------------------ gaps
    def set_gap(self, system: str, object: str, gap: Mapping[str, Any] | None) -> None:
        """Record the gap found for one object (None: there is none any more)."""
        m = s.meta
        key = f"{_GAP}{system}:{object}"
        self.conn.execute(sa.delete(m).where(m.c.key == key))
        if gap is not None:
            self.conn.execute(sa.insert(m).values(key=key, value=orjson.dumps(dict(gap)).decode()))

    def gaps(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every known gap: (system, object) -> what was found, when, with sample ids."""
        m = s.meta
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for key, value in self.conn.execute(sa.select(m.c.key, m.c.value).where(m.c.key.like(f"{_GAP}%"))):
            system, _, obj = str(key)[len(_GAP):].partition(":")
            out[(system, obj)] = orjson.loads(value)
        return out

    def fail_latest_run(self, job: str, owner: str | None, error: str) -> bool:
        """Mark the newest finished ``ok`` run of ``job`` (by ``owner``) failed with ``error``:
        a cycle whose reconciliation found a gap is not reported as a success."""
        r = s.runs
        q = sa.select(r.c.run_id).where(r.c.job == job, r.c.status == "ok")
        if owner is not None:
            q = q.where(r.c.owner == owner)
        run_id = self.conn.execute(q.order_by(r.c.started_at.desc()).limit(1)).scalar_one_or_none()
        if run_id is None:
            return False
        self.conn.execute(sa.update(r).where(r.c.run_id == run_id).values(status="failed", error=error))
        return True
