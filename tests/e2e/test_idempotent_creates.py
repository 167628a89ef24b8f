"""Idempotent creates (issue 14): HubSpot keeps one contact per email and says so (409 CONFLICT
naming the existing id), and syncd takes that answer as "applied" with the named id; a create
the CRM applied but answered with a 504 is therefore never made twice, whether the resend's
look-up finds it or not.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hubspot import HubSpot

from syncd.engine import CycleStats
from syncd.model import RecordCreate

if TYPE_CHECKING:
    from conftest import E2E

EMAIL = "ida.idem@example.com"


def _returned_lead(e2e: E2E) -> str:
    """A returned Salesforce Lead with no HubSpot contact: syncd creates the contact."""
    return e2e.sf.insert("Lead", {"Email": EMAIL, "FirstName": "Ida", "LastName": "Idem", "Company": "I",
                                  "Status": "Returned - Not Ready", "Lead_Score__c": 60,
                                  "Return_Reason__c": "no budget", "Lifecycle_Stage__c": "MQL"})


def _contacts(e2e: E2E) -> list[dict[str, Any]]:
    return [r for r in e2e.hs.all("contacts") if str(r.get("email") or "").lower() == EMAIL]


def test_the_sandbox_refuses_a_second_contact_with_the_same_email_like_hubspot(e2e: E2E) -> None:
    hid = e2e.hs.add("contacts", {"email": EMAIL, "firstname": "Ida"})
    client = HubSpot(access_token=e2e.sb.env()["SYNCD_HUBSPOT_TOKEN"], host=e2e.sb.hubspot_url,
                     ssl_ca_cert=str(e2e.sb.ca_path))
    from hubspot.crm.contacts import ApiException, BatchInputSimplePublicObjectBatchInputForCreate

    body = BatchInputSimplePublicObjectBatchInputForCreate(
        inputs=[{"properties": {"email": EMAIL.upper()}, "associations": []}])
    try:
        client.crm.contacts.batch_api.create(body)
    except ApiException as e:
        assert e.status == 409
        err = json.loads(e.body)
        assert (err["category"], err["message"]) == ("CONFLICT", f"Contact already exists. Existing ID: {hid}")
    else:
        raise AssertionError("a duplicate email was created")
    assert len(_contacts(e2e)) == 1


def test_the_connector_takes_a_409_as_applied_with_the_named_id(e2e: E2E) -> None:
    hid = e2e.hs.add("contacts", {"email": EMAIL, "firstname": "Ida"})
    conn = e2e.rt.connectors["hubspot"]
    new, dup = conn.create("contacts", [RecordCreate(key="a", fields={"email": "other@example.com"}),
                                        RecordCreate(key="b", fields={"email": EMAIL})])
    assert new.ok and new.record_id not in (None, hid)
    assert (dup.ok, dup.record_id) == (True, hid)
    assert len(_contacts(e2e)) == 1


def test_a_create_applied_but_answered_504_is_made_once(e2e: E2E) -> None:
    lid = _returned_lead(e2e)
    e2e.decide_only()
    e2e.hs.lose_answers("contacts.batch_create")  # applied, then a gateway timeout
    stats = CycleStats()
    eng = e2e.engine()
    eng.writeback.retry_base_s = eng.writeback.retry_cap_s = 0.001  # resend at once
    eng.flush(stats)
    assert stats.failed == 1  # syncd cannot know it was applied
    assert len(_contacts(e2e)) == 1
    with e2e.rt.store.tx() as tx:
        (row,) = [r for r in tx.due("hubspot", "contacts", datetime.now(UTC), 10) if r.op == "create"]
        assert row.resend and "504" in (row.last_error or "")

    e2e.converge()  # the resend
    (contact,) = _contacts(e2e)
    with e2e.rt.store.tx() as tx:
        done = tx.get_outbox([row.id])[row.id]
    assert (done.state, done.result_id) == ("done", contact["hs_object_id"])
    assert e2e.outbox_depth() == 0
    assert lid


def test_a_resend_whose_look_up_misses_the_record_gets_the_409_and_links_it(e2e: E2E) -> None:
    """The look-up can miss a record the CRM has (its search index lags): the create is then
    refused with 409, and the named record is the result."""
    _returned_lead(e2e)
    e2e.decide_only()
    conn = e2e.rt.connectors["hubspot"]
    with e2e.rt.store.tx() as tx:
        (row,) = tx.due("hubspot", "contacts", datetime.now(UTC), 10)
        tx.mark_sending([row.id])
    (first,) = conn.create("contacts", [RecordCreate(key=str(row.id), fields=row.fields)])
    assert first.ok
    # a second create of the same contact, as a resend that did not look first would send it
    (again,) = conn.create("contacts", [RecordCreate(key=str(row.id), fields=row.fields)])
    assert (again.ok, again.record_id) == (True, first.record_id)
    assert len(_contacts(e2e)) == 1
