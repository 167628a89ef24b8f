"""Link conflicts that resolve themselves once the CRM data no longer conflicts.

Linking (:mod:`syncd.linking`) reports an email with two possible matches as a conflict and
links nothing. Each cycle re-checks the open conflicts against what is true now:
- candidates that no longer exist in their CRM (the duplicate Lead was merged or deleted)
  are found by a fetch by id and dropped from the store;
- the email's person records as stored now (an email corrected is re-pulled like any
  change) are judged by the same rules linking uses.

A conflict that no longer holds is resolved, and the records of that email are merged
into one entity (the person is then decided on the whole picture, e.g. handed off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

import structlog

from syncd.linking import _converted_pair, _converts_to, _values
from syncd.store import LinkConflictRow, RecordRow, Tx

log = structlog.get_logger()

Key = tuple[str, str, str]
MAX_CHECKED = 500  # conflicts whose candidates are looked up in the CRMs per cycle (oldest first)


def candidate_keys(conflict: LinkConflictRow) -> list[Key]:
    out: list[Key] = []
    for c in conflict.candidates:
        system, _, rest = str(c).partition(":")
        obj, _, rid = rest.partition(":")
        if system and obj and rid:
            out.append((system, obj, rid))
    return out


def gone_candidates(conflicts: Sequence[LinkConflictRow], live: Callable[[str, str, Sequence[str]], set[str]],
                    reachable: Iterable[str]) -> set[Key]:
    """Candidates of these conflicts that their CRM no longer has (one fetch per object)."""
    systems = set(reachable)
    wanted: dict[tuple[str, str], set[str]] = {}
    for c in conflicts[:MAX_CHECKED]:
        for system, obj, rid in candidate_keys(c):
            if system in systems:
                wanted.setdefault((system, obj), set()).add(rid)
    gone: set[Key] = set()
    for (system, obj), ids in sorted(wanted.items()):
        found = live(system, obj, sorted(ids))
        gone |= {(system, obj, rid) for rid in ids - found}
    return gone


def still_conflicts(rows: Sequence[RecordRow]) -> bool:
    """Would linking still see more than one possible match among these person records (all
    of one email)? Two same-system records that are not a Lead and its converted Contact,
    with a match on the other side; or two distinct people on one side."""
    persons = [r for r in rows if r.kind == "person"]
    for row in persons:
        others = [c for c in persons if c.system != row.system]
        if not others:
            continue
        twins = [c for c in persons if c.system == row.system and c.key != row.key and not _converted_pair(c, row)]
        if twins:
            return True
        # a converted record and the record it became are one person (as linking groups them)
        keys = {c.key for c in others}
        groups = set()
        for c in others:
            cid, target = _values(c).get("converted_contact_id"), _converts_to(c)
            became = (c.system, target, str(cid)) if target and cid else None
            groups.add(became if became in keys else c.key)
        if len(groups) > 1:
            return True
    return False


def resolve_stale(tx: Tx, conflicts: Sequence[LinkConflictRow], gone: set[Key], now: datetime) -> int:
    """Drop ``gone`` records, resolve the conflicts that no longer hold and merge each one's
    records into one entity (marked due). Returns how many conflicts were resolved."""
    dead = sorted(gone)
    if dead:
        tx.forget_records(dead)
        for system, obj, rid in dead:
            log.info("record_gone", system=system, object=obj, record_id=rid,
                     note="no longer in the CRM (merged or deleted): dropped from the store")
    resolved = 0
    by_email = tx.records_by_email(sorted({c.email_norm for c in conflicts}), with_raw=False)
    for c in conflicts:
        rows = [r for r in by_email.get(c.email_norm, []) if r.kind == "person" and r.key not in gone]
        if still_conflicts(rows):
            continue
        tx.resolve_link_conflicts([c.id], now)
        resolved += 1
        entities = sorted({r.entity_id for r in rows if r.entity_id},
                          key=lambda e: min(r.key for r in rows if r.entity_id == e))
        if entities and len({r.system for r in rows}) > 1:  # one person on each side: one entity
            keep, merge = entities[0], entities[1:]
            keys = [k for ks in tx.record_keys_by_entity(merge).values() for k in ks] if merge else []
            keys += [r.key for r in rows if not r.entity_id]
            if keys:
                tx.set_entities({k: keep for k in keys})
            tx.set_due_many([keep], now)
        log.info("link_conflict_resolved", conflict_id=c.id, records=len(rows),
                 merged_entities=max(0, len(entities) - 1))
    return resolved
