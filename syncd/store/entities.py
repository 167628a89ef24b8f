"""The store's entities: people and deals, their memory and due marks, link conflicts, SLA events."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd import catalogue
from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import (
    TxBase,
    _chunks,
)
from syncd.store.rows import (
    EventRow,
    LinkConflictRow,
)


class EntitiesTx(TxBase):
    """Entities and memory, due marks, link conflicts, SLA events."""

    # ----------------------------------------------------------------- entities

    def new_entity(self, kind: str, memory: Mapping[str, Any] | None = None,
                   now: datetime | None = None) -> str:
        """A new linked identity (``person`` or ``deal``); returns its uuid4 id."""
        if kind not in catalogue.ENTITY_KINDS:
            raise ValueError(f"entity kind must be one of {', '.join(catalogue.ENTITY_KINDS)}, not {kind!r}")
        now = now or utcnow()
        eid = str(uuid.uuid4())
        self.conn.execute(sa.insert(s.entities).values(
            entity_id=eid, kind=kind, memory=dict(memory or {}), created_at=now, updated_at=now))
        return eid

    def add_entities(self, entities: Mapping[str, str], now: datetime | None = None) -> None:
        """Insert new entities whose ids the caller made (``str(uuid.uuid4())``): id -> kind."""
        if not entities:
            return
        for kind in set(entities.values()):
            if kind not in catalogue.ENTITY_KINDS:
                raise ValueError(f"entity kind must be one of {', '.join(catalogue.ENTITY_KINDS)}, not {kind!r}")
        now = now or utcnow()
        self.conn.execute(sa.insert(s.entities), [
            {"entity_id": eid, "kind": kind, "memory": {}, "created_at": now, "updated_at": now}
            for eid, kind in entities.items()])

    def get_memory(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The engine's memory (JSON) per entity id; unknown ids are absent."""
        t = s.entities
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(set(ids))):
            for eid, mem in self.conn.execute(
                    sa.select(t.c.entity_id, t.c.memory).where(self._in(t.c.entity_id, chunk))):
                out[eid] = mem
        return out

    def set_memory(self, entity_id: str, memory: Mapping[str, Any],
                   now: datetime | None = None) -> None:
        t = s.entities
        n = self.conn.execute(sa.update(t).where(t.c.entity_id == entity_id).values(
            memory=dict(memory), updated_at=now or utcnow())).rowcount
        if n != 1:
            raise KeyError(f"no entity {entity_id}")

    def set_memories(self, items: Mapping[str, tuple[Mapping[str, Any], datetime | None]],
                     now: datetime | None = None) -> None:
        """Memory and due timer of many entities at once (one executemany): id -> (memory, due_at)."""
        if not items:
            return
        t = s.entities
        now = now or utcnow()
        stmt = sa.update(t).where(t.c.entity_id == sa.bindparam("k_id")).values(
            memory=sa.bindparam("k_memory"), due_at=sa.bindparam("k_due"), updated_at=now)
        self.conn.execute(stmt, [{"k_id": eid, "k_memory": dict(mem), "k_due": due}
                                 for eid, (mem, due) in sorted(items.items())])

    def set_due(self, entity_id: str, due_at: datetime | None) -> None:
        """When the rules must look at this entity again (None: no timer)."""
        t = s.entities
        self.conn.execute(sa.update(t).where(t.c.entity_id == entity_id).values(due_at=due_at))

    def set_due_many(self, entity_ids: Iterable[str], due_at: datetime | None) -> None:
        """Set (or clear, with None) the timer of many entities at once. The engine marks the
        entities a change touched as due *now*: linking and deciding are separate steps, and
        the mark is what carries one to the other across a crash."""
        t = s.entities
        for chunk in _chunks(sorted(set(entity_ids))):
            self.conn.execute(sa.update(t).where(self._in(t.c.entity_id, chunk)).values(due_at=due_at))

    def due_batch(self, now: datetime, after: str = "", limit: int = 500) -> list[tuple[str, str]]:
        """(entity id, kind) of entities due at ``now`` with an id above ``after``, in id
        order: a keyset walk that visits each due entity once even if it stays due."""
        t = s.entities
        q = (sa.select(t.c.entity_id, t.c.kind).where(t.c.due_at <= now, t.c.entity_id > after)
             .order_by(t.c.entity_id).limit(limit))
        return [(str(e), str(k)) for e, k in self.conn.execute(q)]

    def due_entities(self, now: datetime, limit: int | None = None) -> list[str]:
        """Entities whose timer is due at ``now``, earliest first. The timer stays set
        until :meth:`set_due` moves or clears it."""
        t = s.entities
        q = (sa.select(t.c.entity_id).where(t.c.due_at <= now)
             .order_by(t.c.due_at, t.c.entity_id).limit(limit))
        return list(self.conn.execute(q).scalars())

    # ----------------------------------------------------------- link conflicts

    def add_link_conflict(self, email_norm: str, candidates: Sequence[Any],
                          now: datetime | None = None) -> int:
        """Record (or refresh) the open conflict for this email; returns its id."""
        t = s.link_conflicts
        now = now or utcnow()
        existing = self.conn.execute(sa.select(t.c.id).where(
            t.c.email_norm == email_norm, t.c.resolved_at.is_(None))).scalar()
        if existing is not None:
            self.conn.execute(sa.update(t).where(t.c.id == existing).values(
                candidates=list(candidates)))
            return int(existing)
        return int(self.conn.execute(sa.insert(t).values(
            email_norm=email_norm, candidates=list(candidates), detected_at=now,
        ).returning(t.c.id)).scalar_one())

    def open_link_conflicts(self) -> list[LinkConflictRow]:
        t = s.link_conflicts
        q = sa.select(t).where(t.c.resolved_at.is_(None)).order_by(t.c.id)
        return [LinkConflictRow(**m) for m in self.conn.execute(q).mappings()]

    def resolve_link_conflicts(self, ids: Iterable[int], now: datetime | None = None) -> None:
        t = s.link_conflicts
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk), t.c.resolved_at.is_(None))
                              .values(resolved_at=now or utcnow()))

    # --------------------------------------------------------------- sla events

    def add_event(self, kind: str, entity_id: str | None, details: Mapping[str, Any],
                  now: datetime | None = None, dedupe: bool = True, open: bool = True) -> int:
        """Record an SLA event (sla_breach, promotion_blocked, conflict, returned, …).

        With ``dedupe`` an open event of the same kind for the same entity is kept
        and its id returned (an SLA breach is recorded once, not every cycle).
        """
        t = s.sla_events
        if dedupe and entity_id is not None:
            existing = self.conn.execute(sa.select(t.c.id).where(
                t.c.kind == kind, t.c.entity_id == entity_id, t.c.open.is_(True))).scalar()
            if existing is not None:
                return int(existing)
        return int(self.conn.execute(sa.insert(t).values(
            kind=kind, entity_id=entity_id, details=dict(details), at=now or utcnow(),
            open=open).returning(t.c.id)).scalar_one())

    def open_events(self, kind: str | None = None) -> list[EventRow]:
        t = s.sla_events
        q = sa.select(t).where(t.c.open.is_(True)).order_by(t.c.at, t.c.id)
        if kind is not None:
            q = q.where(t.c.kind == kind)
        return [EventRow(**m) for m in self.conn.execute(q).mappings()]

    def open_events_of(self, entity_ids: Iterable[str]) -> dict[str, list[EventRow]]:
        """Open events per entity, for a chunk of entities being decided."""
        t = s.sla_events
        out: dict[str, list[EventRow]] = {}
        for chunk in _chunks(sorted(set(entity_ids))):
            q = sa.select(t).where(t.c.open.is_(True), self._in(t.c.entity_id, chunk)).order_by(t.c.id)
            for m in self.conn.execute(q).mappings():
                out.setdefault(m["entity_id"], []).append(EventRow(**m))
        return out

    def close_events(self, ids: Iterable[int]) -> None:
        t = s.sla_events
        for chunk in _chunks(sorted(set(ids))):
            self.conn.execute(sa.update(t).where(t.c.id.in_(chunk)).values(open=False))
