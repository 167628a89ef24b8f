"""The store's pull positions: cursors, and how complete and fresh each object's copy is."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from syncd.model import Cursor, utcnow
from syncd.store import schema as s
from syncd.store._base import (
    TxBase,
)
from syncd.store.rows import (
    PullStateRow,
    RunRow,
)


class CursorsTx(TxBase):
    """Cursors and pull state."""

    # ------------------------------------------------------------------ cursors

    def get_cursor(self, system: str, object: str) -> Cursor | None:
        t = s.cursors
        row = self.conn.execute(sa.select(t.c.modified_at, t.c.id).where(
            t.c.system == system, t.c.object == object)).first()
        return Cursor(row.modified_at, row.id) if row else None

    def get_cursor_read_at(self, system: str, object: str) -> tuple[Cursor, datetime] | None:
        """The cursor and when the record it names was last read (the pull stores the cursor
        with each page it ingests)."""
        t = s.cursors
        row = self.conn.execute(sa.select(t.c.modified_at, t.c.id, t.c.updated_at).where(
            t.c.system == system, t.c.object == object)).first()
        return (Cursor(row.modified_at, row.id), row.updated_at) if row else None

    def set_cursor(self, system: str, object: str, cursor: Cursor,
                   now: datetime | None = None) -> Cursor:
        """Advance the cursor; it never moves backwards (keeps the max). Returns the stored one.
        Its ``updated_at`` is when the record it names was last read (set again when a pull
        re-reads that record: :func:`syncd.engine.pull_overlap` reads it).

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
        if current > cursor:
            return current
        # equal: the record it names was read again (a pull's overlap): when it moved becomes now
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
