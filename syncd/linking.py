"""Identity: which records across the two CRMs are the same person or the same deal.

Order of evidence: a stored link first; then Lead conversion (a converted Lead's
ConvertedContactId is the same person); then the normalised email. Two candidate
matches in the other system are a conflict: reported, never merged silently.
Deals link to Opportunities through a stored link, else the same normalised
name on the same person.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from syncd import catalogue
from syncd.store import RecordRow

log = structlog.get_logger()

Key = tuple[str, str, str]  # (system, object, id)


class EntityWrites(Protocol):
    """Making entities and linking records to them: the store's ``Tx``, or a :class:`_Links` buffer."""

    def new_entity(self, kind: str) -> str: ...

    def set_entity(self, keys: Iterable[Key], entity_id: str | None) -> None: ...


class LinkStore(EntityWrites, Protocol):
    """What linking needs of the store (a ``syncd.store.Tx`` is one)."""

    def get_records(self, keys: Iterable[Key], *, with_raw: bool = True) -> dict[Key, RecordRow]: ...

    def records_by_email(self, emails: Iterable[str], *, with_raw: bool = True) -> dict[str, list[RecordRow]]: ...

    def entity_ids(self, keys: Iterable[Key]) -> dict[Key, str | None]: ...

    def record_keys_by_entity(self, entity_ids: Iterable[str]) -> dict[str, list[Key]]: ...

    def deals_of_people(self, system: str, person_ids: Iterable[str], *,
                        with_raw: bool = True) -> list[RecordRow]: ...

    def add_link_conflict(self, email_norm: str, candidates: Sequence[Any]) -> int: ...

    def add_entities(self, entities: Mapping[str, str]) -> None: ...

    def set_entities(self, links: Mapping[Key, str | None]) -> None: ...


@dataclass
class LinkStats:
    linked: int = 0
    new_entities: int = 0
    conflicts: int = 0
    conflict_emails: set[str] = field(default_factory=set)
    touched_people: set[str] = field(default_factory=set)
    touched_deals: set[str] = field(default_factory=set)


def _key(row: RecordRow) -> Key:
    return (row.system, row.object, row.id)


def _values(row: RecordRow) -> Mapping[str, Any]:
    return row.canonical.get("values") or {}  # read-only: no copy


def _converts_to(row: RecordRow) -> str | None:
    """The object this record's type becomes when converted (a Lead: Contact), per the catalogue."""
    obj = catalogue.find(row.system, row.object)
    return obj.converts_to if obj is not None else None


def link_people(tx: LinkStore, rows: Iterable[RecordRow], stats: LinkStats) -> None:
    """Give every person record an entity; records already linked keep theirs."""
    rows = [r for r in rows if r.kind == "person"]
    _link_conversions(tx, rows, stats)  # first: the Contact a Lead became is the same person
    unlinked = [r for r in rows if not r.entity_id]
    emails = sorted({r.email_norm for r in unlinked if r.email_norm})
    by_email = tx.records_by_email(emails, with_raw=False) if emails else {}
    # The stored entity of every unlinked row, read once; links made below are tracked in
    # memory instead of re-reading each row (one query per row made linking the hot spot).
    stored = tx.entity_ids([_key(r) for r in unlinked]) if unlinked else {}
    links = _Links()
    for row in unlinked:
        fresh_entity = links.assigned.get(_key(row))
        if fresh_entity is None:
            fresh_entity = stored.get(_key(row))
        if fresh_entity:  # linked meanwhile (conversion, earlier row)
            stats.touched_people.add(fresh_entity)
            continue
        matched = _match_by_email(tx, links, row, by_email.get(row.email_norm or "", []), stats)
        if matched is None:
            entity = _ensure_entity(links, row, stats)
        else:
            entity = matched
            links.set_entity([_key(row)], entity)
            stats.linked += 1
        stats.touched_people.add(entity)
        # keep the in-memory candidate list current for later rows of this batch
        if row.email_norm:
            by_email.setdefault(row.email_norm, [])
            by_email[row.email_norm] = [r for r in by_email[row.email_norm] if _key(r) != _key(row)]
            by_email[row.email_norm].append(_with_entity(row, entity))
    links.flush(tx)
    for row in rows:
        if row.entity_id:
            stats.touched_people.add(row.entity_id)


def _link_conversions(tx: LinkStore, rows: list[RecordRow], stats: LinkStats) -> None:
    """A converted Lead and the Contact it became are one person (one entity)."""
    conversions: list[tuple[RecordRow, Key]] = []
    for row in rows:
        v = _values(row)
        cid = v.get("converted_contact_id")
        target = _converts_to(row)
        if target and v.get("is_converted") and cid:
            conversions.append((row, (row.system, target, str(cid))))
    if not conversions:
        return
    contacts = tx.get_records([k for _, k in conversions], with_raw=False)
    # A converted Lead seen for the first time may belong to a person already linked on the
    # other side (its HubSpot contact was pulled earlier, e.g. while Salesforce was down): it
    # joins that person rather than starting a new one that would never meet it again.
    fresh_leads = sorted({r.email_norm for r, _ in conversions if not r.entity_id and r.email_norm})
    lead_peers = tx.records_by_email(fresh_leads, with_raw=False) if fresh_leads else {}
    for row, contact_key in conversions:
        entity = row.entity_id or _peer_entity(row, lead_peers.get(row.email_norm or "", [])) \
            or _ensure_entity(tx, row, stats)
        if not row.entity_id:
            tx.set_entity([_key(row)], entity)
        contact = contacts.get(contact_key)
        if contact is not None and contact.entity_id != entity:
            tx.set_entity([contact_key], entity)
            contacts[contact_key] = _with_entity(contact, entity)
            stats.touched_people.add(entity)


class _Links:
    """Entities and links made during one batch, held back and written in bulk by :meth:`flush`
    (one executemany each instead of a statement per record), and remembered (``assigned``)
    for the rest of the batch. Reads go to the store, which does not see them until the flush:
    callers consult ``assigned`` first."""

    def __init__(self) -> None:
        self.assigned: dict[Key, str | None] = {}
        self.created: dict[str, str] = {}

    def new_entity(self, kind: str) -> str:
        entity = str(uuid.uuid4())
        self.created[entity] = kind
        return entity

    def set_entity(self, keys: Iterable[Key], entity_id: str | None) -> None:
        for k in keys:
            self.assigned[k] = entity_id

    def flush(self, tx: LinkStore) -> None:
        tx.add_entities(self.created)
        tx.set_entities(self.assigned)
        self.created = {}


def _match_by_email(tx: LinkStore, links: EntityWrites, row: RecordRow, candidates: list[RecordRow],
                    stats: LinkStats) -> str | None:
    """The entity of the one person in the other system with this email; None when there is
    none, or when there are two (a conflict: reported, not merged)."""
    if not row.email_norm:
        return None
    others = [c for c in candidates if c.system != row.system and c.kind == "person"]
    # Two people with this email on our own side (true duplicates) make any match ambiguous:
    # whichever of them is linked first, the link would be a guess.
    twins = [c for c in candidates if c.system == row.system and c.kind == "person"
             and _key(c) != _key(row) and not _converted_pair(c, row)]
    if others and twins:
        _conflict(tx, row, [*others, *twins], stats)
        return None
    # A Lead and the Contact it was converted to are one person, not two candidates.
    by_key: dict[Key, RecordRow] = {}
    for c in others:
        by_key.setdefault(_key(c), c)
    groups: dict[str, list[RecordRow]] = {}
    for c in others:
        cid = _values(c).get("converted_contact_id")
        target = _converts_to(c)
        converted = by_key.get((c.system, target, str(cid))) if target and cid else None
        anchor = converted if converted is not None else c
        gid = anchor.entity_id or c.entity_id or f"unlinked:{anchor.object}:{anchor.id}"
        groups.setdefault(gid, []).append(c)
    if not groups:
        return None
    if len(groups) > 1:
        _conflict(tx, row, others, stats)
        return None
    ((gid, members),) = groups.items()
    if gid.startswith("unlinked:"):
        entity = links.new_entity("person")
        stats.new_entities += 1
        links.set_entity([_key(m) for m in members], entity)
        return entity
    unlinked = [_key(m) for m in members if m.entity_id != gid]
    if unlinked:
        links.set_entity(unlinked, gid)
    return gid


def _peer_entity(row: RecordRow, candidates: list[RecordRow]) -> str | None:
    """The one linked person in the other system with ``row``'s email, if exactly one."""
    entities = {c.entity_id for c in candidates if c.system != row.system and c.kind == "person" and c.entity_id}
    return entities.pop() if len(entities) == 1 else None


def _conflict(tx: LinkStore, row: RecordRow, candidates: list[RecordRow], stats: LinkStats) -> None:
    """Report (once per email and cycle) that ``row`` has more than one possible match."""
    email = row.email_norm or ""
    tx.add_link_conflict(email, sorted(f"{c.system}:{c.object}:{c.id}" for c in [*candidates, row]))
    if email not in stats.conflict_emails:
        stats.conflict_emails.add(email)
        stats.conflicts += 1
        log.warning("link_conflict", system=row.system, object=row.object, record_id=row.id,
                    candidates=len(candidates))


def _converted_pair(a: RecordRow, b: RecordRow) -> bool:
    """A Lead and the Contact it was converted to (the same person)."""
    for lead, contact in ((a, b), (b, a)):
        if _converts_to(lead) == contact.object and \
                str(_values(lead).get("converted_contact_id") or "") == contact.id:
            return True
    return False


def _ensure_entity(tx: EntityWrites, row: RecordRow, stats: LinkStats) -> str:
    if row.entity_id:
        return row.entity_id
    entity = tx.new_entity(row.kind)
    stats.new_entities += 1
    tx.set_entity([_key(row)], entity)
    return entity


def _with_entity(row: RecordRow, entity: str) -> RecordRow:
    return replace(row, entity_id=entity)


def link_deals(tx: LinkStore, rows: Iterable[RecordRow], stats: LinkStats) -> None:
    """Deals ↔ Opportunities: stored link, else same normalised name on the same person."""
    deals = [r for r in rows if r.kind == "deal"]
    links = _Links()
    seen = _DealNeighbourhood(tx, [r for r in deals if r.entity_id is None])
    for row in deals:
        entity = row.entity_id
        if entity is None:
            entity = _match_deal(row, seen, links.assigned) or _ensure_entity(links, row, stats)
            links.set_entity([_key(row)], entity)
        stats.touched_deals.add(entity)
    links.flush(tx)


class _DealNeighbourhood:
    """What :func:`_match_deal` reads, fetched once for all unlinked deals of a batch: the
    entities of the person records their contact ids name, those entities' record keys in
    both systems, and the deals pointing at those persons."""

    def __init__(self, tx: LinkStore, deals: list[RecordRow]) -> None:
        keys = {(r.system, obj, str(cid)) for r in deals
                for obj in person_objects(r.system)
                for cid in (_values(r).get("contact_ids") or [])}
        self.person_entity = tx.entity_ids(keys) if keys else {}
        entities = sorted({e for e in self.person_entity.values() if e})
        self.keys_of = tx.record_keys_by_entity(entities) if entities else {}
        self.deals_of: dict[tuple[str, str], list[RecordRow]] = {}
        for system in catalogue.SYSTEMS:
            ids = {k[2] for ks in self.keys_of.values() for k in ks if k[0] == system}
            if not ids:
                continue
            for deal in tx.deals_of_people(system, ids, with_raw=False):
                for cid in {str(c) for c in (_values(deal).get("contact_ids") or [])}:
                    if cid in ids:
                        self.deals_of.setdefault((system, cid), []).append(deal)


def references(row: RecordRow) -> list[str] | None:
    """The same-system person ids a record names (a deal's contact ids, a task's WhoId), read
    from its kind's ``refs_field`` in the catalogue; None for a kind that names none."""
    spec = catalogue.kind_spec(row.kind)
    if spec is None or spec.refs_field is None:
        return None
    v = _values(row).get(spec.refs_field)
    if isinstance(v, list | tuple):
        return [str(x) for x in v]
    return [str(v)] if v else []


def person_objects(system: str) -> tuple[str, ...]:
    """The person objects a deal's contact ids (or a task's WhoId) can name in ``system``
    (the catalogue's ``refs``)."""
    return catalogue.person_objects(system)


def _match_deal(row: RecordRow, seen: _DealNeighbourhood, assigned: dict[Key, str | None]) -> str | None:
    """The deal entity in the other system with the same normalised name on the same person."""
    v = _values(row)
    name = str(v.get("name") or "").strip().lower()
    if not name:
        return None
    found = (seen.person_entity.get((row.system, obj, str(cid)))
             for cid in (v.get("contact_ids") or []) for obj in person_objects(row.system))
    persons = {e for e in found if e}
    if not persons:
        return None
    other = next(s for s in catalogue.SYSTEMS if s != row.system)
    # each person's records in key order, persons ordered by their first record
    groups = sorted((seen.keys_of[e] for e in persons if e in seen.keys_of), key=lambda ks: ks[0])
    for keys in groups:
        for system, _obj, pid in keys:
            if system != other:
                continue
            by_key = {_key(d): d for d in seen.deals_of.get((other, pid), [])}
            for k in sorted(by_key):
                deal = by_key[k]
                deal_entity = assigned.get(k) or deal.entity_id
                if str(_values(deal).get("name") or "").strip().lower() == name and deal_entity:
                    return deal_entity
    return None
