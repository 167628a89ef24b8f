"""The store's side of retention: what ``syncd prune`` may delete, counted or deleted a batch at a time.

Each kind of finished row has one condition ("older than the cutoff and finished"); a batch is
``DELETE … WHERE key IN (SELECT key … WHERE condition LIMIT n)``, run by the caller in its own
short transaction, so pruning never holds a lock longer than one batch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.store import schema as s
from syncd.store._base import TxBase

PRUNE_KINDS = ("outbox", "runs", "quarantine", "tombstones", "audit")


def _target(kind: str, cutoff: datetime) -> tuple[sa.Table, sa.ColumnElement[Any], sa.ColumnElement[bool]]:
    """(table, key, condition) of the rows of ``kind`` older than ``cutoff``."""
    if kind == "outbox":
        t = s.outbox
        # the predicate of the partial index ix_outbox_finished, literally (so the planner uses it)
        finished = sa.text("outbox.state IN ('done', 'skipped', 'superseded')")
        return t, t.c.id, sa.and_(finished, t.c.done_at < cutoff)
    if kind == "runs":
        r = s.runs
        return r, r.c.run_id, sa.and_(r.c.status != "running", r.c.started_at < cutoff)
    if kind == "quarantine":
        q = s.quarantine
        return q, q.c.id, sa.and_(q.c.resolved_at.is_not(None), q.c.resolved_at < cutoff)
    if kind == "audit":
        a = s.audit
        return a, a.c.id, a.c.at < cutoff
    if kind == "tombstones":
        return _tombstones(cutoff)
    raise ValueError(f"unknown prune kind {kind!r} (one of {', '.join(PRUNE_KINDS)})")


def _tombstones(cutoff: datetime) -> tuple[sa.Table, sa.ColumnElement[Any], sa.ColumnElement[bool]]:
    """Tombstones detected before ``cutoff``, keyed by (system, object, record_id)."""
    t = s.tombstones
    return t, sa.tuple_(t.c.system, t.c.object, t.c.record_id), t.c.detected_at < cutoff


class RetentionTx(TxBase):
    """Counting and deleting rows past their retention (see :mod:`syncd.retention`)."""

    def count_prunable(self, kind: str, cutoff: datetime) -> int:
        """How many rows of ``kind`` are older than ``cutoff`` and finished."""
        table, _, cond = _target(kind, cutoff)
        return int(self.conn.execute(sa.select(sa.func.count()).select_from(table).where(cond)).scalar_one())

    def prune_batch(self, kind: str, cutoff: datetime, limit: int) -> int:
        """Delete up to ``limit`` rows of ``kind`` older than ``cutoff``; returns how many went."""
        table, key, cond = _target(kind, cutoff)
        cols = list(key.clauses) if isinstance(key, sa.Tuple) else [key]
        batch = sa.select(*cols).where(cond).limit(limit)
        return int(self.conn.execute(sa.delete(table).where(key.in_(batch))).rowcount or 0)
