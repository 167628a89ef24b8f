"""Exactly-once Salesforce writes (issue 14), the real simple-salesforce against the sandbox.

A create keyed on the External ID syncd owns is an sObject Collections upsert (PATCH
/composite/sobjects/Lead/Syncd_Key__c), so sending it twice makes one Lead; an org without the
field gets plain creates (the weaker email look-up), said once in the log. A resend is a
single-record PATCH with If-Unmodified-Since: refused (412) when the record changed since."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from conftest_salesforce import SalesforceSandbox
from structlog.testing import capture_logs

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.salesforce import SalesforceConnector
from syncd.model import FieldUpdate, RecordCreate

FAST = RetryPolicy(max_attempts=3, base=0.01, cap=0.05, max_retry_after=0.1)
LEAD = {"LastName": "Upsert", "Company": "Co", "Email": "ups@example.com", "Lifecycle_Stage__c": "MQL"}


@pytest.fixture
def conn(sf_sandbox: SalesforceSandbox) -> Iterator[SalesforceConnector]:
    c = SalesforceConnector(sf_sandbox.url, sf_sandbox.session_id, ca_bundle=sf_sandbox.ca_path,
                            fields={"Lead": ["Email", "Syncd_Key__c"]}, retry=FAST)
    yield c
    c.close()


def _leads(sb: SalesforceSandbox) -> list[dict[str, object]]:
    return [r for r in sb.app.all("Lead") if r["Email"] == "ups@example.com"]


def test_a_keyed_create_sent_twice_makes_one_lead(sf_sandbox: SalesforceSandbox, conn: SalesforceConnector) -> None:
    create = RecordCreate("1", {**LEAD, "Syncd_Key__c": "syncd-abc"}, upsert_on="Syncd_Key__c")
    (first,) = conn.create("Lead", [create])
    (again,) = conn.create("Lead", [create])  # a resend, or a stalled daemon's copy
    assert first.ok and again.ok and first.record_id == again.record_id
    (lead,) = _leads(sf_sandbox)
    assert lead["Syncd_Key__c"] == "syncd-abc"
    assert [w["endpoint"] for w in sf_sandbox.app.write_log] == ["collections.upsert"] * 2


def test_keys_are_unique_in_the_sandbox_like_an_external_id(sf_sandbox: SalesforceSandbox,
                                                            conn: SalesforceConnector) -> None:
    sf_sandbox.app.insert("Lead", {**LEAD, "Syncd_Key__c": "syncd-abc"})
    (plain,) = conn.create("Lead", [RecordCreate("1", {**LEAD, "Syncd_Key__c": "SYNCD-ABC"})])
    assert not plain.ok and plain.error is not None and plain.error.startswith("DUPLICATE_VALUE")
    assert len(_leads(sf_sandbox)) == 1


def test_an_org_without_the_field_gets_plain_creates_said_once(sf_sandbox: SalesforceSandbox,
                                                               conn: SalesforceConnector) -> None:
    creates = [RecordCreate(str(i), {**LEAD, "LastName": f"U{i}", "Missing__c": f"k{i}"}, upsert_on="Missing__c")
               for i in range(2)]
    with capture_logs() as logs:
        results = conn.create("Lead", creates[:1]) + conn.create("Lead", creates[1:])
    assert all(r.ok for r in results)
    assert len(_leads(sf_sandbox)) == 2
    missing = [e for e in logs if e["event"] == "salesforce_external_id_missing"]
    assert len(missing) == 1 and missing[0]["field"] == "Missing__c"
    assert [w["endpoint"] for w in sf_sandbox.app.write_log] == ["collections.create"] * 2


def test_an_update_unless_modified_lands_only_on_an_unchanged_record(sf_sandbox: SalesforceSandbox,
                                                                    conn: SalesforceConnector) -> None:
    lid = sf_sandbox.app.insert("Lead", LEAD, at=datetime.now(UTC) - timedelta(minutes=5))
    (read,) = conn.fetch("Lead", [lid])
    (ok,) = conn.write_unless_modified("Lead", [(FieldUpdate("1", lid, {"Lifecycle_Stage__c": "SAL"}),
                                                 read.modified_at)])
    assert ok.ok and sf_sandbox.app.get("Lead", lid)["Lifecycle_Stage__c"] == "SAL"
    # now the record is newer than that read: a second conditional write is refused, not applied
    (refused,) = conn.write_unless_modified("Lead", [(FieldUpdate("2", lid, {"Lifecycle_Stage__c": "MQL"}),
                                                      read.modified_at)])
    assert not refused.ok and not refused.retriable
    assert refused.error is not None and refused.error.startswith("PRECONDITION_FAILED")
    assert sf_sandbox.app.get("Lead", lid)["Lifecycle_Stage__c"] == "SAL"
    (gone,) = conn.write_unless_modified("Lead", [(FieldUpdate("3", "00Q5e00000zzzzzEAA", {"Company": "X"}),
                                                   read.modified_at)])
    assert not gone.ok and gone.error is not None and gone.error.startswith("NOT_FOUND")
