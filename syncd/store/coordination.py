"""Coordination between syncd processes sharing a store: runs, leases, the resync queue, heartbeats."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import (
    TxBase,
)
from syncd.store.rows import (
    HeartbeatRow,
    ResyncRow,
)


class CoordinationTx(TxBase):
    """Runs, leases, the resync queue, heartbeats."""

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
