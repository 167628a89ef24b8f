"""Coordination between syncd processes sharing a store: runs, leases, the resync queue, heartbeats."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
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

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a released lease's expiry: before any ``now``


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
        if state not in ("done", "failed", "interrupted"):
            raise ValueError(f"resync state must be done, failed or interrupted, not {state!r}")
        t = s.resync_requests
        self.conn.execute(sa.update(t).where(t.c.id == id).values(
            state=state, result=result, done_at=now or utcnow()))

    def requeue_interrupted_resyncs(self) -> list[ResyncRow]:
        """Requests stopped part-way (``interrupted``: the service was shut down) go back to the
        queue, their params marked ``resume`` (a full resync goes on from the stored cursors
        instead of re-reading from the start), what they did before kept in ``result``."""
        t = s.resync_requests
        rows = [ResyncRow(**m) for m in self.conn.execute(
            sa.select(t).where(t.c.state == "interrupted").order_by(t.c.id)).mappings()]
        for r in rows:
            self.conn.execute(sa.update(t).where(t.c.id == r.id, t.c.state == "interrupted").values(
                state="queued", picked_by=None, picked_at=None, params={**dict(r.params), "resume": True}))
        return rows

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
        """Take (or extend) the lease if it is free, expired or already ours (see
        :meth:`acquire_lease_token`)."""
        return self.acquire_lease_token(name, owner, ttl_s, now) is not None

    def acquire_lease_token(self, name: str, owner: str, ttl_s: float, now: datetime) -> int | None:
        """Take the lease if it is free, expired or already ours; returns its fencing token
        (one more than the previous acquisition's: lease rows are never deleted, so tokens only
        grow), None when someone else holds it. Atomic: one INSERT … ON CONFLICT DO UPDATE …
        WHERE. Commit right away (own short ``tx()``) so others see it."""
        t = s.leases
        ins = self._insert(t)
        stmt = ins.values(name=name, owner=owner, token=1,
                          expires_at=now + timedelta(seconds=ttl_s)).on_conflict_do_update(
            index_elements=[t.c.name],
            set_={"owner": ins.excluded.owner, "expires_at": ins.excluded.expires_at, "token": t.c.token + 1},
            where=sa.or_(t.c.owner == ins.excluded.owner, t.c.expires_at <= now),
        ).returning(t.c.token)
        token = self.conn.execute(stmt).scalar()
        return int(token) if token is not None else None

    def take_over_lease(self, name: str, previous: str, owner: str, ttl_s: float, now: datetime) -> int | None:
        """Take the lease from ``previous`` (a holder known dead) if it still holds it; returns
        the new fencing token (one more, so anything the dead holder left in flight is fenced)."""
        t = s.leases
        token = self.conn.execute(
            sa.update(t).where(t.c.name == name, t.c.owner == previous)
            .values(owner=owner, expires_at=now + timedelta(seconds=ttl_s), token=t.c.token + 1)
            .returning(t.c.token)).scalar()
        return int(token) if token is not None else None

    def renew_lease(self, name: str, owner: str, ttl_s: float, now: datetime,
                    token: int | None = None) -> bool:
        """Extend a lease we still hold (even if it lapsed and nobody took it); with ``token``,
        only the acquisition that got it."""
        t = s.leases
        q = sa.update(t).where(t.c.name == name, t.c.owner == owner)
        if token is not None:
            q = q.where(t.c.token == token)
        return bool(self.conn.execute(q.values(expires_at=now + timedelta(seconds=ttl_s))).rowcount)

    def confirm_lease(self, name: str, owner: str, token: int, now: datetime, for_s: float) -> bool:
        """Fencing, right before a CRM call: True when this acquisition (``owner`` + ``token``)
        still holds the lease, unexpired; it is then extended to last at least ``for_s`` more
        (the call's timeout), so nobody can take it over while the call may still land."""
        t = s.leases
        # typed like the column: an untyped bind inside CASE is stored in SQLite's default datetime
        # text, which sorts before the column's ISO text, and the lease then reads as expired
        until = sa.literal(now + timedelta(seconds=for_s), type_=t.c.expires_at.type)
        return bool(self.conn.execute(
            sa.update(t).where(t.c.name == name, t.c.owner == owner, t.c.token == token, t.c.expires_at > now)
            .values(expires_at=sa.case((t.c.expires_at < until, until), else_=t.c.expires_at))).rowcount)

    def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease up: it lapses at once (the row and its token stay)."""
        t = s.leases
        return bool(self.conn.execute(
            sa.update(t).where(t.c.name == name, t.c.owner == owner, t.c.expires_at > _EPOCH)
            .values(expires_at=_EPOCH)).rowcount)

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
