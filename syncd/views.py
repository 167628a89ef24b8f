"""What the rules see: views of people and deals built from stored records (pure; no I/O
except the reads a caller's ``Tx`` is asked for).

The engine decides on these views and ``syncd mappings impact`` re-decides on the very same
ones, so impact sees exactly what the rules see: the record chosen per system (a Contact
over the Lead it was converted from), the pending-writes overlay, the deals and connection
attempts pointing at a person, the memory, and whether an identity conflict is open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from syncd import catalogue, rules
from syncd.linking import person_objects
from syncd.linking import references as refs_of  # one definition: the catalogue's refs_field
from syncd.mapping import CLEARED_FIRST_TERM, Mappings
from syncd.model import SYSTEMS, CanonicalRecord
from syncd.sla import SLA
from syncd.store import OutboxRow, RecordRow, Tx

_DATETIME_VALUES = ("bofu_conversion_at", "at")


def rule_context(mappings: Mappings, sla: SLA) -> rules.RuleContext:
    closed = frozenset(t for t in mappings.deal_stages if mappings.deal_stage_closed(t))
    won = frozenset(t for t in mappings.deal_stages if mappings.deal_stage_won(t))
    return rules.RuleContext(sla=sla, stages=mappings.stages, closed_won_terms=won, closed_terms=closed,
                             writable=mappings.writable_fields())


def canonical_of(row: RecordRow) -> CanonicalRecord:
    values = dict(row.canonical.get("values", {}))
    for k in _DATETIME_VALUES:
        v = values.get(k)
        if isinstance(v, str):
            values[k] = datetime.fromisoformat(v)
    return CanonicalRecord(system=row.system, object=row.object, id=row.id, kind=row.kind,  # type: ignore[arg-type]
                           modified_at=row.modified_at, terms=dict(row.canonical.get("terms", {})),
                           values=values, unmapped=tuple(tuple(u) for u in row.canonical.get("unmapped", [])))


def with_pending(by_entity: dict[str, list[RecordRow]],
                  pending: Mapping[str, Sequence[OutboxRow]],
                  stale: list[tuple[OutboxRow, dict[str, Any]]] | None = None) -> dict[str, list[RecordRow]]:
    """The records as they will be once syncd's own pending writes land.

    The rules must not read a value that an outbox entry of ours is about to change (a
    write killed before it was sent, or backing off after a failure) as news from the CRM:
    that would re-decide settled things (a returned person read as promoted again, or a
    second copy of a write whose first copy is still pending).

    It never hides a value newer than the write: a write whose target now holds, in a field
    it writes, neither the value the decision saw nor the one it writes (someone changed the
    record since the decision) is not overlaid, and is appended to ``stale`` with what
    changed (field -> [the value decided on, the value now]); the caller supersedes it: the
    CRM's newer value wins and the person is decided on it.
    """
    if not pending:
        return by_entity
    out = dict(by_entity)
    for entity, writes in pending.items():
        rows = out.get(entity)
        if not rows:
            continue
        by_key = {r.key: r for r in rows}
        for w in writes:
            target = by_key.get((w.system, w.object, str(w.record_id)))
            if target is None:
                continue
            changed = _overtaken(target, w)
            if changed:
                if stale is not None:
                    stale.append((w, changed))
                continue
            canonical = {"terms": dict(target.canonical.get("terms", {})),
                         "values": dict(target.canonical.get("values", {})),
                         "unmapped": target.canonical.get("unmapped", [])}
            for fld, (_before, after) in w.canonical.items():
                canonical["terms" if fld in rules.TERM_FIELDS else "values"][fld] = after
            by_key[target.key] = replace(target, canonical=canonical)
        out[entity] = [by_key[r.key] for r in rows]
    return out


def _overtaken(target: RecordRow, w: OutboxRow) -> dict[str, Any]:
    """The fields ``w`` writes that the CRM changed since ``w`` was decided (they hold neither
    the value the decision saw nor the value ``w`` writes): field -> [decided on, now]. A
    stage found empty while ``w`` clears it first, and was handed out before (``w.resend``), is
    ``w``'s own half-done backwards move (a crash or a failure between the clear and the set),
    not a change: the write stays and is finished."""
    out: dict[str, Any] = {}
    for fld, (before, after) in w.canonical.items():
        now = target.canonical.get("terms" if fld in rules.TERM_FIELDS else "values", {}).get(fld)
        if now is None and w.clear_first and fld == CLEARED_FIRST_TERM and w.resend:
            continue
        if not _same_value(now, before) and not _same_value(now, after):
            out[fld] = [before, now]
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Canonical values as stored (JSON): numbers compare as numbers (70 == 70.0)."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return bool(a == b)


def pending_overlay(record: CanonicalRecord, writes: Sequence[OutboxRow]) -> CanonicalRecord:
    """``record`` as it will be once these pending writes of ours to it land (the overlay of
    :func:`with_pending`, for a record mapped afresh, as ``mappings impact`` maps them)."""
    mine = [w for w in writes if (w.system, w.object, str(w.record_id)) == (record.system, record.object, record.id)]
    if not mine:
        return record
    terms, values = dict(record.terms), dict(record.values)
    for w in mine:
        for fld, (_before, after) in w.canonical.items():
            (terms if fld in rules.TERM_FIELDS else values)[fld] = after
    return replace(record, terms=terms, values=values)


def person_view(entity: str, rows: Sequence[RecordRow], memory: Any,
                referrers: Callable[[str, list[str]], Iterable[RecordRow]],
                to_canonical: Callable[[RecordRow], CanonicalRecord | None],
                conflicts: frozenset[str] = frozenset()) -> rules.PersonView | None:
    """What the rules see of one person: the record chosen per system (a Contact over the Lead
    it was converted from), the deals and connection attempts pointing at any of the person's
    records, the memory, and whether an identity conflict is open on the email.

    ``to_canonical`` may refuse a record (None): a person record refused makes no view at all,
    a refused deal or attempt is left out (the daemon quarantines such records).
    """
    persons = [r for r in rows if r.kind == "person"]
    if not persons:
        return None
    chosen: dict[str, CanonicalRecord | None] = {}
    for system in SYSTEMS:
        row = pick_record(persons, system, catalogue.speaking_order(system, "person"), prefer_converted=True)
        chosen[system] = to_canonical(row) if row is not None else None
        if row is not None and chosen[system] is None:
            return None
    deals: list[CanonicalRecord] = []
    attempts: list[CanonicalRecord] = []
    for system in SYSTEMS:
        ids = [r.id for r in persons if r.system == system]
        for ref in referrers(system, ids) if ids else ():
            c = to_canonical(ref)
            if c is not None and ref.kind in catalogue.REFERRING_KINDS:
                (deals if ref.kind == "deal" else attempts).append(c)
    return rules.PersonView(
        entity_id=entity, hubspot=chosen["hubspot"], salesforce=chosen["salesforce"],
        deals=tuple(deals), attempts=tuple(attempts), memory=memory_of(memory),
        link_conflict=any(r.email_norm in conflicts for r in persons if r.email_norm),
    )


def prefetched_person_view(entity: str, rows: Sequence[RecordRow], memory: Any,
                           refs: Mapping[tuple[str, str], list[RecordRow]],
                           conflicts: frozenset[str] = frozenset()) -> rules.PersonView | None:
    """:func:`person_view` over referrers read once for a whole chunk (:func:`referrers_by_ref`)."""
    def referrers(system: str, ids: list[str]) -> Iterable[RecordRow]:
        found = {ref.key: ref for rid in ids for ref in refs.get((system, rid), ())}
        return [found[k] for k in sorted(found)]  # each once, in key order, as Tx.referrers gives them

    return person_view(entity, rows, memory, referrers, canonical_of, conflicts)


def conflicted_emails(tx: Tx) -> frozenset[str]:
    """Emails with an open identity conflict (see syncd.linking)."""
    return frozenset(c.email_norm for c in tx.open_link_conflicts())


def memory_of(stored: Any) -> rules.Memory:
    return rules.Memory.from_dict(stored)


def people_of_rows(tx: Tx, rows: Sequence[RecordRow]) -> set[str]:
    """Entities of the people these deal/attempt rows point at: one store lookup for all rows."""
    keys: set[tuple[str, str, str]] = set()
    for row in rows:
        keys.update((row.system, obj, str(cid)) for cid in (refs_of(row) or []) for obj in person_objects(row.system))
    if not keys:
        return set()
    return {e for e in tx.entity_ids(keys).values() if e}


def referrers_by_ref(tx: Tx,
                      persons: Sequence[RecordRow]) -> dict[tuple[str, str], list[RecordRow]]:
    """``Tx.referrers`` for many person records at once, keyed by (system, person id)."""
    out: dict[tuple[str, str], list[RecordRow]] = {}
    for system in SYSTEMS:
        ids = {r.id for r in persons if r.system == system}
        if not ids:
            continue
        for ref in tx.referrers(system, ids, with_raw=False):
            for rid in set(refs_of(ref) or ()):
                if rid in ids:
                    out.setdefault((system, rid), []).append(ref)
    return out


def pick_record(rows: list[RecordRow], system: str, objects: tuple[str, ...], *,
                prefer_converted: bool = False) -> RecordRow | None:
    """The record that speaks for a person/deal in ``system`` (a Contact over the Lead it
    was converted from, then the most recently modified)."""
    cands = [r for r in rows if r.system == system and r.object in objects]
    if not cands:
        return None
    # The first listed object type (a Contact over the Lead it came from); with
    # ``prefer_converted`` a record not yet converted over one that was; then the latest.
    def order(r: RecordRow) -> tuple[int, bool, float]:
        converted = bool(prefer_converted and r.canonical.get("values", {}).get("is_converted"))
        return objects.index(r.object), converted, -r.modified_at.timestamp()

    return min(cands, key=order)


def view_records(view: rules.PersonView) -> list[CanonicalRecord]:
    return [r for r in (view.hubspot, view.salesforce) if r is not None]


def first_email(records: Sequence[CanonicalRecord]) -> str | None:
    return next((r.email for r in records if r.email), None)


def deal_view(entity: str, rows: Sequence[RecordRow], memory: Any = None,
              to_canonical: Callable[[RecordRow], CanonicalRecord | None] = canonical_of) -> rules.DealView | None:
    """What the rules see of one deal: the record chosen per system, and the memory.
    ``to_canonical`` may refuse a record (None): then there is no view at all (the daemon
    quarantines such records; ``mappings impact`` counts them as unmappable)."""
    deals = [r for r in rows if r.kind == "deal"]
    if not deals:
        return None
    chosen: dict[str, CanonicalRecord | None] = {}
    for system in SYSTEMS:
        row = pick_record(deals, system, catalogue.speaking_order(system, "deal"))
        chosen[system] = to_canonical(row) if row is not None else None
        if row is not None and chosen[system] is None:
            return None
    return rules.DealView(entity_id=entity, hubspot=chosen["hubspot"], salesforce=chosen["salesforce"],
                          memory=memory_of(memory))
