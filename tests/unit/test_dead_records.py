"""Permanent write errors (issue 16 item 3): a write the CRM refuses for good (the record is
deleted or merged, a converted Lead, a validation error, a picklist value that no longer
exists) is quarantined at once with the CRM's reason and the record id, never retried; the
record is read again at once and the person decided on what is true now.

The CRM here is an in-process fake of syncd's own Connector protocol (no client library is
involved): it refuses every write with a given error and answers reads as told."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncd.engine import CycleStats, Engine
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.metrics import ServiceMetrics
from syncd.model import ApiUsage, Deletion, FieldUpdate, RawRecord, RecordCreate, WriteResult
from syncd.sla import load_sla
from syncd.store import Store

T0 = datetime.now(UTC) - timedelta(hours=3)
LEAD = "00Q000000000001"


class RefusingSalesforce:
    """Salesforce as a fake Connector: every write fails with ``error`` (not retriable)."""

    system = "salesforce"

    def __init__(self, error: str, live: Sequence[RawRecord] = (), dead: Sequence[Deletion] = ()) -> None:
        self.usage = ApiUsage()
        self.error, self.live, self.dead_records = error, list(live), list(dead)
        self.writes: Counter[str] = Counter()
        self.fetched: list[list[str]] = []

    def objects(self) -> Sequence[str]:
        return ["Lead"]

    def iter_changes(self, *_a: Any, **_k: Any) -> Any:
        return iter(())

    def fetch(self, obj: str, ids: Sequence[str]) -> list[RawRecord]:
        self.fetched.append(list(ids))
        return [r for r in self.live if r.object == obj and r.id in ids]

    def dead(self, obj: str, ids: Sequence[str], *, answered: Sequence[RawRecord] | None = None) -> list[Deletion]:
        return [d for d in self.dead_records if d.object == obj and d.id in ids]

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        return []

    def write(self, obj: str, updates: Sequence[FieldUpdate]) -> list[WriteResult]:
        self.writes.update(u.record_id for u in updates)
        return [WriteResult(u.key, False, u.record_id, self.error, retriable=False) for u in updates]

    def create(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        raise AssertionError("no create expected")

    def allowed_values(self) -> dict[tuple[str, str], list[str]]:
        return {}

    def close(self) -> None:
        pass


def _contact() -> RawRecord:
    f = {"hs_object_id": "1", "email": "p1@example.com", "firstname": "P", "lastname": "One",
         "lifecyclestage": "marketingqualifiedlead", "hubspotscore": "70", "lastmodifieddate": T0.isoformat()}
    return RawRecord("hubspot", "contacts", "1", T0, f)


def _lead(at: datetime = T0, **fields: Any) -> RawRecord:
    f = {"Id": LEAD, "Email": "p1@example.com", "FirstName": "P", "LastName": "One", "Company": "Acme",
         "Status": "Open - Not Contacted", "Lifecycle_Stage__c": "Lead", "IsConverted": False,
         "SystemModstamp": at.isoformat(), **fields}
    return RawRecord("salesforce", "Lead", LEAD, at, f)


def _world(store: Store, crm: RefusingSalesforce) -> Engine:
    eng = Engine(store, load_mappings(default_mappings_dir()), load_sla(default_mappings_dir()),
                 {"salesforce": crm}, clock=lambda: datetime.now(UTC),  # outbox rows are due by the wall clock
                 require_pulls=False)
    stats = CycleStats()
    eng.ingest("hubspot", "contacts", [_contact()], stats)
    eng.ingest("salesforce", "Lead", [_lead()], stats)
    eng.link_and_decide(stats)  # the MQL is to be handed to sales: Lead stage -> MQL
    with store.tx() as tx:
        assert tx.outbox_depth("salesforce") == 1
    return eng


@pytest.mark.parametrize("error", [
    "ENTITY_IS_DELETED: entity is deleted (fields: Id)",
    "CANNOT_UPDATE_CONVERTED_LEAD: cannot reference converted lead",
    "FIELD_CUSTOM_VALIDATION_EXCEPTION: Company must not be Acme",
    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST: bad value for restricted picklist field: MQL",
])
def test_a_permanent_error_is_quarantined_at_once_and_the_record_read_again(store: Store, error: str) -> None:
    crm = RefusingSalesforce(error, live=[_lead(T0 + timedelta(hours=1), Description="edited")])
    eng = _world(store, crm)
    stats = CycleStats()
    eng.flush(stats)
    assert stats.failed == 1 and stats.sent == 0
    with store.tx() as tx:
        (q,) = tx.open_quarantine("salesforce")
        assert (q.kind, q.record_id, q.reason, q.attempts) == ("write", LEAD, error, 1)
        assert tx.outbox_depth("salesforce") == 0
        # read again at once: the store holds the record as it is now, its person is due
        row = tx.get_records([("salesforce", "Lead", LEAD)])[("salesforce", "Lead", LEAD)]
        assert row.raw["Description"] == "edited"
        assert tx.due_entities(datetime.now(UTC))
    assert crm.fetched == [[LEAD]]
    eng.flush(CycleStats())  # never retried
    assert crm.writes[LEAD] == 1


def test_a_write_refused_because_the_record_died_tombstones_it(store: Store) -> None:
    crm = RefusingSalesforce("ENTITY_IS_DELETED: entity is deleted (fields: Id)",
                             dead=[Deletion("salesforce", "Lead", LEAD, T0, None, "re-pull")])
    eng = _world(store, crm)
    stats = CycleStats()
    eng.flush(stats)
    assert stats.dead == 1
    with store.tx() as tx:
        (tomb,) = tx.list_tombstones()
        assert (tomb.record_id, tomb.kind, tomb.source) == (LEAD, "deleted", "re-pull")
        assert not tx.get_records([("salesforce", "Lead", LEAD)])
        assert [a.rule for a in tx.query_audit(record_id=LEAD)] == ["D1-deleted"]
    metrics = ServiceMetrics({"contacts": 30.0, "deals": 60.0})
    metrics.observe_store(store)
    assert 'syncd_tombstones{system="salesforce"} 1.0' in metrics.render().decode()
    # decided again on what is true now: the Lead is gone, the person is not re-created
    stats = CycleStats()
    eng.link_and_decide(stats)
    eng.flush(stats)
    assert stats.sent == 0 and crm.writes[LEAD] == 1


def test_a_write_refused_for_a_merged_record_moves_the_person_to_the_survivor(store: Store) -> None:
    master = "00Q000000000009"
    survivor = RawRecord("salesforce", "Lead", master, T0, {**_lead().fields, "Id": master, "Email": "x@example.com"})
    crm = RefusingSalesforce("ENTITY_IS_DELETED: entity is deleted (fields: Id)", live=[survivor],
                             dead=[Deletion("salesforce", "Lead", LEAD, T0, master, "re-pull")])
    eng = _world(store, crm)
    eng.ingest("salesforce", "Lead", [survivor], CycleStats())
    eng.link_and_decide(CycleStats())
    eng.flush(CycleStats())
    with store.tx() as tx:
        (tomb,) = tx.list_tombstones()
        assert (tomb.kind, tomb.merged_into) == ("merged", master)
        ids = tx.entity_ids([("hubspot", "contacts", "1"), ("salesforce", "Lead", master)])
        assert len(set(ids.values())) == 1 and None not in ids.values()
