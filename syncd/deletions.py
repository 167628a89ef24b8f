"""Deleted, archived and merged records (issue 16): what syncd does when a record dies.

A dead record (a :class:`~syncd.model.Deletion` from a deletion feed, a survivor's list of
merged ids, a write answer naming another id, a re-pull after a permanent write error, or an
id reconciliation found in the store and no longer in the CRM, confirmed by a fetch by id:
:func:`syncd.reconcile.settle_extras`)
becomes, in one transaction:

- a **tombstone** (time, source, the person it was part of, the record as last stored);
- its row is **forgotten** (linking and the views no longer see it: no link conflict with a
  dead twin, nothing decided on it) and an **audit** row says so (field ``record``, rule
  ``D1-deleted`` / ``D2-merged``);
- its **pending writes** are cancelled (superseded, audited: nothing is ever written to a dead
  id) or, for a merge, moved to the survivor, unless they would move the survivor's stage
  backwards (the furthest stage is kept);
- for a **merge**, the person's records in the other CRM move to the survivor's person when it
  has none there (the survivor takes the links over);
- the people involved are marked due: they are decided again on what is true now.

What happens to the other CRM is the SLA file's ``[deletions] other_side``: ``mark`` (the
default) writes nothing there and never re-creates the person because of the deletion
(:func:`blocked_creates`); ``propagate`` archives (HubSpot) or deletes (Salesforce) the twin
through the outbox. A restore (HubSpot restore, Salesforce undelete) closes the tombstone and
re-links the record to its former person (:func:`restore_pulled`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from syncd import rules
from syncd.model import Deletion, RawRecord
from syncd.store import OutboxRow, RecordKey, RecordRow, TombstoneRow, Tx

log = structlog.get_logger()

Rank = Callable[[Any], int | None]  # a lifecycle term -> its position (RuleContext.rank)
DELETE_OP = "delete"  # the outbox op of a propagated deletion


@dataclass
class DeathStats:
    deleted: int = 0
    merged: int = 0
    restored: int = 0
    writes_cancelled: int = 0
    writes_moved: int = 0
    propagated: int = 0
    quarantine_resolved: int = 0  # quarantined (unmappable) records that died: their entries close

    def add(self, other: DeathStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class ReadById:
    """What a read of some ids by id found (:func:`read_by_id`)."""

    alive: list[RawRecord]  # answered as themselves
    others: list[RawRecord]  # answered for one of the ids under another id (a HubSpot merge survivor)
    dead: list[Deletion]  # the rest, as the CRM tells of them, or unconfirmed when it knows nothing


def read_by_id(conn: Any, system: str, obj: str, ids: Sequence[str], *, unknown: str) -> ReadById:
    """Read ``ids`` by id, then ask the CRM about the ones that did not answer as themselves
    (``Connector.dead``: deleted, or merged into which survivor; HubSpot is handed the fetch's
    answers, so it does not read them live again). An id the CRM knows nothing of (purged, or no
    longer visible to syncd's user) is an unconfirmed deletion with source ``unknown``: it is
    tombstoned, never propagated."""
    wanted = set(ids)
    got = conn.fetch(obj, list(ids))
    alive = [r for r in got if r.id in wanted]
    others = [r for r in got if r.id not in wanted]
    gone = [i for i in dict.fromkeys(ids) if i not in {r.id for r in alive}]
    dead_of = getattr(conn, "dead", None)
    told = [x for x in (dead_of(obj, gone, answered=got) if dead_of is not None and gone else [])
            if x.id in wanted]
    named = {x.id for x in told}
    told += [Deletion(system, obj, i, None, None, unknown, confirmed=False) for i in gone if i not in named]
    return ReadById(alive, others, told)


def record_deaths(tx: Tx, deaths: Iterable[Deletion], *, now: datetime, mapping_rev: str,
                  rank: Rank, policy: str = "mark") -> DeathStats:
    """Tombstone, unlink and audit each dead record syncd knows (see the module docstring).
    Records the store never held, and records already tombstoned, are left alone. A record held
    only in quarantine (it did not map) is tombstoned too, and its quarantine entry resolved."""
    out = DeathStats()
    todo = {d.key: d for d in deaths}
    if not todo:
        return out
    open_ = tx.tombstones(todo)
    stored = tx.get_records([k for k in todo if k not in open_], with_raw=False)
    pending = tx.open_writes_to(todo)
    unmapped = tx.open_record_quarantine([k for k in todo if k not in open_ and k not in stored])
    due: set[str] = set()
    for key, d in sorted(todo.items()):
        row = stored.get(key)
        writes = [w for w in pending if (w.system, w.object, str(w.record_id)) == key]
        held_bad = unmapped.get(key, [])
        if key in open_ or (row is None and not writes and not held_bad):
            continue
        due |= _one_death(tx, d, row, writes, now=now, mapping_rev=mapping_rev, rank=rank, policy=policy, out=out)
        if held_bad:  # a record that never mapped died: nothing is left to fix in it
            out.quarantine_resolved += tx.resolve_quarantine(held_bad, now)
    if due:
        tx.set_due_many(due, now)
    return out


def _one_death(tx: Tx, d: Deletion, row: RecordRow | None, writes: Sequence[OutboxRow], *, now: datetime,
               mapping_rev: str, rank: Rank, policy: str, out: DeathStats) -> set[str]:
    """One dead record (see :func:`record_deaths`); returns the people to decide again."""
    due: set[str] = set()
    entity = row.entity_id if row is not None else next((w.entity_id for w in writes), None)
    tx.add_tombstone(d, now=now, entity_id=entity, canonical=row.canonical if row else None)
    if d.merged_into:
        out.merged += 1
        survivor = _survivor(tx, d)
        _move_writes(tx, writes, d, survivor, rank, now, out)
        if survivor is not None and survivor.entity_id and entity and entity != survivor.entity_id:
            _move_links(tx, entity, survivor.entity_id, d.system, d.key)
            due.add(survivor.entity_id)
    else:
        out.deleted += 1
        for w in writes:
            if tx.mark_superseded(w.id, f"not sent: {d.system} {d.object} {d.id} was deleted "
                                        f"({d.source}); nothing is written to a deleted record", now=now):
                out.writes_cancelled += 1
    tx.forget_records([d.key])
    if entity:
        due.add(entity)
        if policy == "propagate" and not d.merged_into and d.confirmed:
            out.propagated += _propagate(tx, entity, d, row, mapping_rev, now)
    _audit_death(tx, d, row, entity, mapping_rev, now, policy)
    log.warning("record_dead", system=d.system, object=d.object, record_id=d.id,
                merged_into=d.merged_into, source=d.source, entity_id=entity,
                next="tombstoned, unlinked; nothing is written to it")
    return due


def _survivor(tx: Tx, d: Deletion) -> RecordRow | None:
    if not d.merged_into:
        return None
    key = (d.system, d.object, d.merged_into)
    return tx.get_records([key], with_raw=False).get(key)


def _stage(row: RecordRow | None) -> Any:
    return ((row.canonical.get("terms") or {}).get("lifecycle")) if row is not None else None


def _move_writes(tx: Tx, writes: Sequence[OutboxRow], d: Deletion, survivor: RecordRow | None,
                 rank: Rank, now: datetime, out: DeathStats) -> None:
    """Pending writes to a merged-away record go to the survivor; one that would move the
    survivor's stage backwards is superseded instead (the furthest stage is kept)."""
    held = rank(_stage(survivor))
    for w in writes:
        after = (w.canonical.get("lifecycle") or [None, None])[1]
        to = rank(after) if after is not None else None
        if held is not None and to is not None and to < held:
            if tx.mark_superseded(w.id, f"not sent: {d.id} was merged into {d.merged_into}, whose stage "
                                        f"{_stage(survivor)!r} is further than {after!r}", now=now):
                out.writes_cancelled += 1
            continue
        entity = survivor.entity_id if survivor is not None else w.entity_id
        if tx.retarget_write(w.id, str(d.merged_into), entity, **_rebased(w, survivor)):
            out.writes_moved += 1


def _rebased(w: OutboxRow, survivor: RecordRow | None) -> dict[str, Any]:
    """A moved write's decision basis, as the survivor holds it now: the move is syncd's own
    choice, so the survivor's values are what the write was decided on (without this the
    pending-writes overlay reads the survivor's other values as a newer human change, and
    supersedes the write)."""
    if survivor is None:
        return {}
    terms, values = survivor.canonical.get("terms", {}), survivor.canonical.get("values", {})
    canonical = {f: [(terms if f in rules.TERM_FIELDS else values).get(f), after]
                 for f, (_before, after) in w.canonical.items()}
    return {"canonical": canonical, "basis": {k: survivor.raw.get(k) for k in w.fields}}


def _move_links(tx: Tx, dead_entity: str, survivor_entity: str, system: str, dead_key: RecordKey) -> None:
    """The dead record's person gives its records in the other CRMs to the survivor's person,
    for each CRM where the survivor's person has none (otherwise they stay: two records of one
    CRM are never merged silently)."""
    keys = tx.record_keys_by_entity([dead_entity, survivor_entity])
    has = {k[0] for k in keys.get(survivor_entity, [])}
    moving = [k for k in keys.get(dead_entity, []) if k != dead_key and k[0] != system and k[0] not in has]
    if moving:
        tx.set_entity(moving, survivor_entity)


def _propagate(tx: Tx, entity: str, d: Deletion, row: RecordRow | None, mapping_rev: str,
               now: datetime) -> int:
    """``other_side = "propagate"``: the dead record's twins in the other CRMs are deleted too."""
    twins = [(k[0], k[1], k[2], entity) for k in tx.record_keys_by_entity([entity]).get(entity, [])
             if k[0] != d.system]
    return tx.enqueue_deletes(
        twins, rule="D3-propagate", mapping_rev=mapping_rev, key_prefix=f"propagate-delete:{d.system}:{d.id}",
        reason=f"its twin {d.system} {d.object} {d.id} was deleted; [deletions] other_side = propagate",
        email_norm=row.email_norm if row else None, now=now)


def _audit_death(tx: Tx, d: Deletion, row: RecordRow | None, entity: str | None, mapping_rev: str,
                 now: datetime, policy: str) -> None:
    when = f" at {d.deleted_at.isoformat()}" if d.deleted_at else ""
    if d.merged_into:
        rule, after = "D2-merged", f"merged into {d.merged_into}"
        reason = (f"merged into {d.system} {d.object} {d.merged_into}{when} ({d.source}); unlinked, "
                  "its links and pending writes moved to the survivor")
    else:
        rule, after = "D1-deleted", "deleted"
        if policy == "propagate" and d.confirmed:
            other = "its twin is deleted too"
        elif policy == "propagate":
            other = ("its twin is kept: the CRM did not confirm a deletion (not in its recycle bin: purged, or "
                     "no longer visible to syncd's user); nothing written to the other side")
        else:
            other = "nothing written to the other side, the person is not re-created because of it"
        reason = f"deleted in {d.system}{when} ({d.source}); unlinked; {other}"
    tx.audit_lifecycle(system=d.system, object=d.object, record_id=d.id, entity_id=entity,
                       email_norm=row.email_norm if row else None, before="live", after=after, rule=rule,
                       reason=reason, mapping_rev=mapping_rev, now=now)


def restore_pulled(tx: Tx, rows: Sequence[RecordRow], *, now: datetime, mapping_rev: str) -> int:
    """Pulled records that had an open tombstone came back (a restore, an undelete): the
    tombstone closes, the record re-joins its former person (if that person still exists and
    has no other record of this CRM), and an audit row says so. Returns how many."""
    if not rows:
        return 0
    found = tx.tombstones([r.key for r in rows])
    n = 0
    for row in rows:
        tomb = found.get(row.key)
        if tomb is None:
            continue
        tx.restore_tombstone(row.key, now)
        entity = _former_entity(tx, tomb, row)
        if entity is not None:
            tx.set_entity([row.key], entity)
            tx.set_due_many([entity], now)
        tx.audit_lifecycle(system=row.system, object=row.object, record_id=row.id, entity_id=entity,
                           email_norm=row.email_norm, before=tomb.kind, after="live", rule="D4-restored",
                           reason=f"restored in {row.system} after it was {tomb.kind} ({tomb.source}); "
                                  + ("re-linked to its person" if entity else "linked afresh"),
                           mapping_rev=mapping_rev, now=now)
        log.info("record_restored", system=row.system, object=row.object, record_id=row.id, entity_id=entity)
        n += 1
    return n


def _former_entity(tx: Tx, tomb: TombstoneRow, row: RecordRow) -> str | None:
    if not tomb.entity_id:
        return None
    keys = tx.record_keys_by_entity([tomb.entity_id]).get(tomb.entity_id, [])
    if not keys and not tx.get_memory([tomb.entity_id]):
        return None  # the person is gone too
    if any(k[0] == row.system and k[1] == row.object for k in keys):
        return None  # replaced meanwhile: linked afresh (a conflict if need be), never merged silently
    return tomb.entity_id


def blocked_creates(tombs: Sequence[TombstoneRow], handed_off: bool, rank: Rank,
                    score_stage: str) -> frozenset[str]:
    """Systems where a person must not be created again because their record there was deleted
    (policy ``mark``): a person already handed off, or whose dead record had reached the score
    stage. A person who becomes an MQL only after the deletion is handed off as the rules say."""
    need = rank(score_stage)
    out = set()
    for t in tombs:
        if t.kind != "deleted":
            continue
        stage = ((t.canonical or {}).get("terms") or {}).get("lifecycle")
        reached = need is not None and (r := rank(stage)) is not None and r >= need
        if handed_off or reached:
            out.add(t.system)
    return frozenset(out)
