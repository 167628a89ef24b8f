"""The catalogue: every object type syncd knows, declared once.

Each row of :data:`OBJECTS` is one CRM object type: which system holds it, its
name there (the CRM's own spelling), the kind of record it carries, the
``--object`` group that pulls it, its primary key and cursor field, which person
objects its references name, and its id prefix. :data:`KINDS` says what each
kind of record is. Everything else reads these tables: the connectors' streams,
the mapping-file schema, linking, the engine, ``mappings impact``, the CLI.

Row order matters and is kept on purpose: it is the order objects are pulled
in, the order of the tables in a mapping file's schema (and so of its "Field
required" errors), and the order person objects are looked up by email.

Adding an object type (say HubSpot companies ↔ Salesforce Accounts) is:

1. a row here per system; if it is a new kind of record, a :class:`Kind` too
   (its canonical value and term fields, whether it forms entities, the field
   naming the people it points at) and its name in ``RecordKind``;
2. a stream class in each connector, listed in that module's ``STREAMS``
   (``connectors/hubspot.py``: a ``HubSpotStream`` subclass, with an ``enrich``
   hook if the search does not return everything; ``connectors/salesforce.py``:
   an ``SObjectStream`` subclass naming the sObject);
3. a mapping table per system file (``[companies]`` in ``mappings/hubspot.toml``,
   ``[Account]`` in ``mappings/salesforce.toml``): the file schema requires it;
4. the rules that decide on it (``syncd/rules.py``), and for a new kind the way
   its records are linked across the systems (``syncd/linking.py``).

The pull order, ``--object`` choices, the mapping schema and kind checks, the
pulled fields, linking's reference look-ups and ``mappings impact`` follow from
the row. A new ``group`` also wants its schedule interval in the config.

Nothing else should name objects. This module imports nothing from syncd: it
is the top of the flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

System = Literal["hubspot", "salesforce"]
RecordKind = Literal["person", "deal", "attempt"]


@dataclass(frozen=True, slots=True)
class Kind:
    """What a kind of record is (the string is what the store keeps in ``records.kind``)."""

    name: RecordKind
    unit: str  # plural, for reports ("12 people")
    entity: bool  # records of this kind are linked into an entity (``entities.kind``)
    values: frozenset[str]  # canonical value fields (see syncd.model.CanonicalRecord)
    terms: frozenset[str]  # canonical term fields (glossary terms)
    refs_field: str | None = None  # the canonical value naming same-system person ids


@dataclass(frozen=True, slots=True)
class ObjectType:
    """One CRM object type."""

    system: System
    name: str  # the CRM's own name: HubSpot "contacts", Salesforce "Lead"
    kind: RecordKind
    group: str  # the ``--object`` group that pulls it
    key: str  # primary key field
    cursor: str  # the modification-time field incremental pulls filter and sort on
    refs: tuple[str, ...] = ()  # the person objects its references (Kind.refs_field) can name
    id_prefix: str | None = None  # Salesforce key prefix: an id names its object
    rank: int = 0  # which record speaks for an entity in its system: the lowest rank first
    converts_to: str | None = None  # the object a converted record becomes (Lead -> Contact)


KINDS: dict[RecordKind, Kind] = {k.name: k for k in (
    Kind("person", "people", entity=True,
         values=frozenset({
             "email", "first_name", "last_name", "company", "lead_source", "score",
             "return_reason", "is_converted", "converted_contact_id",
             "converted_opportunity_id", "qualification_reason",
         }),
         terms=frozenset({"lifecycle", "lead_status", "lead_type"})),
    Kind("deal", "deals", entity=True,
         values=frozenset({"name", "amount", "close_date", "contact_ids", "pipeline"}),
         terms=frozenset({"deal_stage"}), refs_field="contact_ids"),
    Kind("attempt", "tasks", entity=False,
         values=frozenset({"who_id", "type", "status", "at"}),
         terms=frozenset(), refs_field="who_id"),
)}

_SF_PEOPLE = ("Contact", "Lead")

OBJECTS: tuple[ObjectType, ...] = (
    ObjectType("hubspot", "contacts", "person", "contacts", key="hs_object_id", cursor="lastmodifieddate"),
    ObjectType("hubspot", "deals", "deal", "deals", key="hs_object_id", cursor="hs_lastmodifieddate",
               refs=("contacts",)),
    ObjectType("salesforce", "Lead", "person", "contacts", key="Id", cursor="SystemModstamp",
               id_prefix="00Q", rank=1, converts_to="Contact"),
    ObjectType("salesforce", "Contact", "person", "contacts", key="Id", cursor="SystemModstamp",
               id_prefix="003"),
    ObjectType("salesforce", "Opportunity", "deal", "deals", key="Id", cursor="SystemModstamp",
               refs=_SF_PEOPLE, id_prefix="006"),
    ObjectType("salesforce", "Task", "attempt", "contacts", key="Id", cursor="SystemModstamp",
               refs=_SF_PEOPLE, id_prefix="00T"),
)

SYSTEMS: tuple[System, ...] = tuple(dict.fromkeys(o.system for o in OBJECTS))
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(o.group for o in OBJECTS))
ENTITY_KINDS: tuple[RecordKind, ...] = tuple(k for k, spec in KINDS.items() if spec.entity)
# kinds whose records point at people (deals, connection attempts): the store keeps their refs
REFERRING_KINDS: tuple[RecordKind, ...] = tuple(k for k, spec in KINDS.items() if spec.refs_field)

_BY_KEY: dict[tuple[str, str], ObjectType] = {(o.system, o.name): o for o in OBJECTS}
_KIND_BY_NAME: dict[str, Kind] = {k: spec for k, spec in KINDS.items()}


def get(system: str, name: str) -> ObjectType:
    """The object type ``name`` of ``system``; KeyError when the catalogue has none."""
    return _BY_KEY[(system, name)]


def find(system: str, name: str) -> ObjectType | None:
    """:func:`get`, or None."""
    return _BY_KEY.get((system, name))


def objects(system: str | None = None, *, group: str | None = None,
            kind: str | None = None) -> tuple[ObjectType, ...]:
    """The object types matching every filter given, in catalogue order."""
    return tuple(o for o in OBJECTS if (system is None or o.system == system)
                 and (group is None or o.group == group) and (kind is None or o.kind == kind))


def names(system: str, *, group: str | None = None, kind: str | None = None) -> tuple[str, ...]:
    """The names of :func:`objects`."""
    return tuple(o.name for o in objects(system, group=group, kind=kind))


def object_groups() -> dict[str, dict[str, tuple[str, ...]]]:
    """group -> system -> the objects that group pulls there (``--object``)."""
    return {g: {s: names(s, group=g) for s in SYSTEMS} for g in GROUPS}


def speaking_order(system: str, kind: str) -> tuple[str, ...]:
    """The objects of ``kind`` in ``system``, the one that speaks for an entity first
    (a Contact over the Lead it was converted from)."""
    return tuple(o.name for o in sorted(objects(system, kind=kind), key=lambda o: o.rank))


def person_objects(system: str) -> tuple[str, ...]:
    """The person objects a reference (a deal's contact ids, a task's WhoId) can name in ``system``."""
    return tuple(dict.fromkeys(r for o in objects(system) for r in o.refs))


def id_prefixes(system: str) -> dict[str, str]:
    """id prefix -> object name, for the objects of ``system`` that have one."""
    return {o.id_prefix: o.name for o in objects(system) if o.id_prefix}


def by_id(system: str, record_id: str) -> ObjectType | None:
    """The object type a record id names by its prefix (Salesforce ids), else None."""
    return next((o for o in objects(system) if o.id_prefix and record_id.startswith(o.id_prefix)), None)


def kind_spec(name: str) -> Kind | None:
    """The :class:`Kind` called ``name`` (a kind as the store keeps it), or None."""
    return _KIND_BY_NAME.get(name)
