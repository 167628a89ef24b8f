"""What operators look back on: the resync history (queued and inline requests, with outcomes)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import TxBase
from syncd.store.rows import ResyncRow

#: the outcomes a resync request can end in (``queued`` and ``running`` are not outcomes)
RESYNC_OUTCOMES = ("done", "failed", "interrupted")


class HistoryTx(TxBase):
    """The resync history `syncd status` shows."""

    def resync_history(self, limit: int = 10) -> list[ResyncRow]:
        """The last ``limit`` resync requests, whatever their state, newest first."""
        t = s.resync_requests
        q = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        return [ResyncRow(**m) for m in self.conn.execute(q).mappings()]

    def record_resync(self, params: Mapping[str, Any], state: str, result: Any, *, owner: str,
                      started_at: datetime, now: datetime | None = None) -> int:
        """A resync run inline (not through the queue), with its outcome, so that status shows it
        beside the queued ones. ``state``: done, failed or interrupted."""
        if state not in RESYNC_OUTCOMES:
            raise ValueError(f"resync outcome must be one of {', '.join(RESYNC_OUTCOMES)}, not {state!r}")
        t = s.resync_requests
        return int(self.conn.execute(sa.insert(t).values(
            requested_at=started_at, params={**params, "inline": True}, state=state, picked_by=owner,
            picked_at=started_at, done_at=now or utcnow(), result=result,
        ).returning(t.c.id)).scalar_one())
