"""The catalogue of object types, and everything that reads it.

The derived tables must stay what they were when each module spelled them out
(no behaviour change), and every catalogue row must have its stream in its
connector and its table in the mapping files.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime

import pytest

from syncd import catalogue, linking, mapping, model, runtime
from syncd.connectors import hubspot, salesforce
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.store import RecordRow

CONNECTOR_STREAMS: dict[str, dict[str, type[hubspot.HubSpotStream] | type[salesforce.SObjectStream]]] = {
    "hubspot": dict(hubspot.STREAMS), "salesforce": dict(salesforce.STREAMS)}


def test_the_derived_tables_are_what_the_modules_used_to_spell_out() -> None:
    assert model.SYSTEMS == ("hubspot", "salesforce")
    assert model.OBJECT_GROUPS == {
        "contacts": {"hubspot": ("contacts",), "salesforce": ("Lead", "Contact", "Task")},
        "deals": {"hubspot": ("deals",), "salesforce": ("Opportunity",)},
    }
    assert runtime.PULL_OBJECTS == {"hubspot": ("contacts", "deals"),
                                    "salesforce": ("Lead", "Contact", "Opportunity", "Task")}
    assert mapping.EXPECTED_KIND == {
        ("hubspot", "contacts"): "person", ("hubspot", "deals"): "deal",
        ("salesforce", "Lead"): "person", ("salesforce", "Contact"): "person",
        ("salesforce", "Opportunity"): "deal", ("salesforce", "Task"): "attempt",
    }
    assert hubspot.MODIFIED_PROP == {"contacts": "lastmodifieddate", "deals": "hs_lastmodifieddate"}
    assert linking.person_objects("hubspot") == ("contacts",)
    assert linking.person_objects("salesforce") == ("Contact", "Lead")
    # resync's PERSON_OBJECTS and SF_ID_PREFIX
    assert {s: catalogue.names(s, kind="person") for s in catalogue.SYSTEMS} == {
        "hubspot": ("contacts",), "salesforce": ("Lead", "Contact")}
    assert catalogue.id_prefixes("salesforce") == {"00Q": "Lead", "003": "Contact",
                                                   "006": "Opportunity", "00T": "Task"}
    assert catalogue.id_prefixes("hubspot") == {}
    # the engine's and impact's pick order: a Contact speaks over the Lead it came from
    assert catalogue.speaking_order("salesforce", "person") == ("Contact", "Lead")
    assert catalogue.speaking_order("hubspot", "person") == ("contacts",)
    assert catalogue.speaking_order("salesforce", "deal") == ("Opportunity",)
    assert catalogue.GROUPS == ("contacts", "deals")
    assert catalogue.ENTITY_KINDS == ("person", "deal")  # the kinds store.new_entity accepts
    assert catalogue.REFERRING_KINDS == ("deal", "attempt")  # the engine's ("deal", "attempt")


def test_rows_are_unique_and_consistent() -> None:
    keys = [(o.system, o.name) for o in catalogue.OBJECTS]
    assert len(keys) == len(set(keys))
    for o in catalogue.OBJECTS:
        assert o.kind in catalogue.KINDS
        assert o.group in catalogue.GROUPS
        for ref in o.refs:
            assert catalogue.get(o.system, ref).kind == "person", (o, ref)
        if o.refs:
            assert catalogue.KINDS[o.kind].refs_field is not None, o
        if o.converts_to:
            assert catalogue.get(o.system, o.converts_to).kind == o.kind
    prefixes = [o.id_prefix for o in catalogue.OBJECTS if o.id_prefix]
    assert len(prefixes) == len(set(prefixes))


@pytest.mark.parametrize(("rid", "obj"), [("00Q5e00000AbCdEEAV", "Lead"), ("0035e00000AbCdEEAV", "Contact"),
                                          ("0065e00000AbCdEEAV", "Opportunity"), ("00T5e00000AbCdE", "Task"),
                                          ("001xx", None), ("", None)])
def test_a_salesforce_id_names_its_object(rid: str, obj: str | None) -> None:
    found = catalogue.by_id("salesforce", rid)
    assert (found.name if found else None) == obj
    assert catalogue.by_id("hubspot", "101") is None


def test_every_row_has_its_stream_and_every_stream_its_row() -> None:
    for system, streams in CONNECTOR_STREAMS.items():
        assert tuple(streams) == catalogue.names(system)
        for name, cls in streams.items():
            row = catalogue.get(system, name)
            assert (cls.name, cls.primary_key, cls.replication_key) == (row.name, row.key, row.cursor)


def test_a_stream_outside_the_catalogue_is_refused_at_import() -> None:
    with pytest.raises(KeyError):
        type("Companies", (hubspot.HubSpotStream,), {"name": "companies"})
    with pytest.raises(KeyError):
        type("Account", (salesforce.SObjectStream,), {"name": "Account"})


def test_the_mapping_schema_has_one_table_per_row_in_catalogue_order() -> None:
    for system, model_cls in mapping.SYSTEM_FILES.items():
        assert tuple(model_cls.model_fields) == catalogue.names(system)
        assert all(f.is_required() for f in model_cls.model_fields.values())
    assert tuple(mapping.SYSTEM_FILES) == catalogue.SYSTEMS


def test_the_default_mapping_files_declare_each_row_with_its_kind() -> None:
    m = load_mappings(default_mappings_dir())
    assert sorted(m.objects()) == sorted((o.system, o.name) for o in catalogue.OBJECTS)
    for o in catalogue.OBJECTS:
        assert m.kind(o.system, o.name) == o.kind
        doc = tomllib.loads((default_mappings_dir() / f"{o.system}.toml").read_text())
        assert doc[o.name]["kind"] == o.kind


def test_kinds_carry_the_canonical_fields_the_mapping_layer_checks() -> None:
    assert mapping.VALUE_FIELDS["deal"] == frozenset({"name", "amount", "close_date", "contact_ids", "pipeline"})
    term_fields = mapping.TERM_FIELDS
    assert term_fields == {"person": frozenset({"lifecycle", "lead_status", "lead_type"}),
                           "deal": frozenset({"deal_stage"}), "attempt": frozenset()}
    assert {k: s.unit for k, s in catalogue.KINDS.items()} == {"person": "people", "deal": "deals",
                                                              "attempt": "tasks"}
    assert catalogue.kind_spec("nope") is None


def _row(system: str, obj: str, kind: str, **values: object) -> RecordRow:
    return RecordRow(system, obj, "1", kind, datetime(2026, 1, 1, tzinfo=UTC), {}, {"values": values})


@pytest.mark.parametrize(("row", "refs"), [
    (_row("hubspot", "deals", "deal", contact_ids=["7", "9"]), ["7", "9"]),
    (_row("hubspot", "deals", "deal"), []),
    (_row("salesforce", "Task", "attempt", who_id="00Q1"), ["00Q1"]),
    (_row("salesforce", "Task", "attempt", who_id=None), []),
    (_row("salesforce", "Lead", "person", who_id="x"), None),
])
def test_references_read_the_kinds_refs_field(row: RecordRow, refs: list[str] | None) -> None:
    # what engine._refs_of returns for the same rows
    assert linking.references(row) == refs
