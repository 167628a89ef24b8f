"""Identity linking (syncd/linking.py) on a real SQLite state store: which records across the
two CRMs become one person or one deal, and when syncd refuses to guess."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from syncd.linking import LinkStats, link_deals, link_people, person_objects
from syncd.model import normalise_email
from syncd.store import RecordRow, Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    (tmp_path / "state").mkdir()
    s = Store.open(f"sqlite:///{tmp_path / 'state' / 'syncd.db'}")
    yield s
    s.close()


def person(system: str, obj: str, rid: str, email: str | None = None, **values: Any) -> RecordRow:
    values = {"email": email, **values}
    return RecordRow(system=system, object=obj, id=rid, kind="person", modified_at=T0,
                     raw={"id": rid, **values}, canonical={"terms": {}, "values": values, "unmapped": []},
                     email_norm=normalise_email(email))


def hs(rid: str, email: str | None = None, **values: Any) -> RecordRow:
    return person("hubspot", "contacts", rid, email, **values)


def lead(rid: str, email: str | None = None, **values: Any) -> RecordRow:
    return person("salesforce", "Lead", rid, email, **values)


def contact(rid: str, email: str | None = None, **values: Any) -> RecordRow:
    return person("salesforce", "Contact", rid, email, **values)


def deal(system: str, rid: str, name: str, contact_ids: list[str]) -> RecordRow:
    obj = "deals" if system == "hubspot" else "Opportunity"
    values = {"name": name, "contact_ids": contact_ids}
    return RecordRow(system=system, object=obj, id=rid, kind="deal", modified_at=T0,
                     raw={"id": rid, **values}, canonical={"terms": {}, "values": values, "unmapped": []})


def link(store: Store, *rows: RecordRow) -> LinkStats:
    """One batch as the engine handles it: ingest (upsert, and the person ids each deal points
    at), then link the changed records, people before deals."""
    stats = LinkStats()
    with store.tx() as tx:
        changed = tx.upsert_records(list(rows))
        tx.set_refs_many({r.key: [str(c) for c in r.canonical["values"]["contact_ids"]]
                          for r in changed if r.kind == "deal"})
    with store.tx() as tx:
        link_people(tx, changed, stats)
        link_deals(tx, changed, stats)
    return stats


def entity(store: Store, row: RecordRow) -> str | None:
    with store.tx() as tx:
        return tx.entity_ids([row.key]).get(row.key)


def entities(store: Store, *rows: RecordRow) -> list[str | None]:
    return [entity(store, r) for r in rows]


def open_conflicts(store: Store) -> list[tuple[str, list[str]]]:
    with store.tx() as tx:
        return [(c.email_norm, sorted(c.candidates)) for c in tx.open_link_conflicts()]


# ------------------------------------------------------------------ people by email

def test_the_same_email_in_both_crms_is_one_person(store: Store) -> None:
    a, b = hs("101", "Jane.Doe@Example.com "), lead("00Q1", "jane.doe@example.com")
    stats = link(store, a, b)
    ea, eb = entities(store, a, b)
    assert ea is not None and ea == eb
    assert (stats.linked, stats.new_entities, stats.conflicts) == (1, 1, 0)
    assert stats.touched_people == {ea}


def test_different_emails_are_different_people_and_each_gets_an_entity(store: Store) -> None:
    rows = [hs("101", "ann@example.com"), lead("00Q1", "bob@example.com"), hs("102", None)]
    stats = link(store, *rows)
    found = entities(store, *rows)
    assert None not in found and len(set(found)) == 3
    assert (stats.linked, stats.new_entities) == (0, 3)


def test_a_record_arriving_later_joins_the_person_already_linked(store: Store) -> None:
    a = hs("101", "ann@example.com")
    link(store, a)
    b = contact("0031", "ANN@example.com")
    stats = link(store, b)
    assert entity(store, b) == entity(store, a)
    assert (stats.linked, stats.new_entities) == (1, 0)


def test_two_records_with_one_email_in_the_same_crm_are_not_merged(store: Store) -> None:
    a, b = hs("101", "shared@example.com"), hs("102", "shared@example.com")
    link(store, a, b)
    ea, eb = entities(store, a, b)
    assert ea != eb
    assert open_conflicts(store) == []  # nothing to choose between: no match is made at all


def test_linking_the_same_batch_again_changes_nothing(store: Store) -> None:
    rows = [hs("101", "ann@example.com"), lead("00Q1", "ann@example.com"), contact("0032", "zed@example.com")]
    link(store, *rows)
    before = entities(store, *rows)
    with store.tx() as tx:
        again = list(tx.get_records([r.key for r in rows], with_raw=False).values())
        stats = LinkStats()
        link_people(tx, again, stats)
    assert entities(store, *rows) == before
    assert (stats.linked, stats.new_entities) == (0, 0)
    assert stats.touched_people == set(before)


# ------------------------------------------------------------------ stored links and conversion

def test_a_linked_record_keeps_its_entity_when_its_email_later_matches_another(store: Store) -> None:
    a, b = hs("101", "ann@example.com"), lead("00Q1", "bob@example.com")
    link(store, a, b)
    ea, eb = entities(store, a, b)
    link(store, hs("101", "ann@example.com", firstname="Ann"), lead("00Q1", "ann@example.com"))
    assert entities(store, a, b) == [ea, eb]


def test_a_converted_lead_is_the_same_person_as_its_contact_whatever_the_emails(store: Store) -> None:
    ld = lead("00Q1", "old@example.com", is_converted=True, converted_contact_id="0031")
    ct = contact("0031", "new@example.com")
    link(store, ld, ct)
    e_lead, e_contact = entities(store, ld, ct)
    assert e_lead is not None and e_lead == e_contact


def test_a_lead_converted_after_both_were_linked_brings_the_contact_to_the_leads_person(store: Store) -> None:
    ld, ct = lead("00Q1", "old@example.com"), contact("0031", "new@example.com")
    link(store, ld, ct)
    e_lead = entity(store, ld)
    assert entity(store, ct) != e_lead
    link(store, lead("00Q1", "old@example.com", is_converted=True, converted_contact_id="0031"))
    assert entity(store, ct) == e_lead


def test_a_lead_and_its_contact_with_the_hubspot_contacts_email_are_one_person_not_a_conflict(
        store: Store) -> None:
    rows = [hs("101", "ann@example.com"),
            lead("00Q1", "ann@example.com", is_converted=True, converted_contact_id="0031"),
            contact("0031", "ann@example.com")]
    stats = link(store, *rows)
    found = entities(store, *rows)
    assert found[0] is not None and len(set(found)) == 1
    assert stats.conflicts == 0 and open_conflicts(store) == []


# ------------------------------------------------------------------ conflicts

def test_two_candidates_in_the_other_crm_are_a_reported_conflict_never_a_merge(store: Store) -> None:
    rows = [hs("101", "ann@example.com"), lead("00Q1", "ann@example.com"), contact("0031", "ann@example.com")]
    stats = link(store, *rows)
    found = entities(store, *rows)
    assert None not in found and len(set(found)) == 3
    assert stats.conflicts == 1 and stats.conflict_emails == {"ann@example.com"}
    assert open_conflicts(store) == [
        ("ann@example.com", ["hubspot:contacts:101", "salesforce:Contact:0031", "salesforce:Lead:00Q1"])]


def test_duplicates_on_one_side_make_a_match_on_the_other_a_conflict(store: Store) -> None:
    rows = [hs("101", "ann@example.com"), hs("102", "ann@example.com"), lead("00Q1", "ann@example.com")]
    stats = link(store, *rows)
    assert len(set(entities(store, *rows))) == 3
    assert stats.conflicts == 1
    ((email, candidates),) = open_conflicts(store)
    assert email == "ann@example.com"
    assert set(candidates) == {"hubspot:contacts:101", "hubspot:contacts:102", "salesforce:Lead:00Q1"}


def test_a_conflict_seen_again_next_cycle_stays_one_open_conflict(store: Store) -> None:
    rows = [hs("101", "ann@example.com"), lead("00Q1", "ann@example.com"), contact("0031", "ann@example.com")]
    link(store, *rows)
    link(store, hs("103", "ann@example.com"))
    assert [email for email, _ in open_conflicts(store)] == ["ann@example.com"]


# ------------------------------------------------------------------ deals

def test_a_deal_and_an_opportunity_of_the_same_name_on_the_same_person_are_one_deal(store: Store) -> None:
    people = [hs("101", "ann@example.com"), contact("0031", "ann@example.com")]
    d = deal("hubspot", "9001", "Acme – Renewal 2026", ["101"])
    o = deal("salesforce", "0061", "  acme – renewal 2026 ", ["0031"])
    stats = link(store, *people, d, o)
    ed, eo = entities(store, d, o)
    assert ed is not None and ed == eo
    assert ed not in entities(store, *people)
    assert stats.touched_deals == {ed}


def test_deals_with_different_names_or_on_different_people_stay_apart(store: Store) -> None:
    people = [hs("101", "ann@example.com"), contact("0031", "ann@example.com"),
              hs("102", "bob@example.com"), lead("00Q2", "bob@example.com")]
    rows = [deal("hubspot", "9001", "Acme renewal", ["101"]),
            deal("salesforce", "0061", "Acme upsell", ["0031"]),  # same person, other name
            deal("salesforce", "0062", "Acme renewal", ["00Q2"])]  # same name, other person
    link(store, *people, *rows)
    found = entities(store, *rows)
    assert None not in found and len(set(found)) == 3


def test_an_opportunity_arriving_later_joins_the_deal_already_there(store: Store) -> None:
    d = deal("hubspot", "9001", "Acme renewal", ["101"])
    link(store, hs("101", "ann@example.com"), contact("0031", "ann@example.com"), d)
    o = deal("salesforce", "0061", "ACME RENEWAL", ["0031"])
    link(store, o)
    assert entity(store, o) == entity(store, d)


def test_a_deal_without_a_name_or_a_person_is_its_own_deal(store: Store) -> None:
    people = [hs("101", "ann@example.com"), contact("0031", "ann@example.com")]
    rows = [deal("hubspot", "9001", "", ["101"]), deal("salesforce", "0061", "", ["0031"]),
            deal("hubspot", "9002", "Acme", []), deal("salesforce", "0062", "Acme", [])]
    link(store, *people, *rows)
    found = entities(store, *rows)
    assert None not in found and len(set(found)) == 4


def test_the_person_objects_a_reference_can_name() -> None:
    assert person_objects("hubspot") == ("contacts",)
    assert set(person_objects("salesforce")) == {"Contact", "Lead"}
