"""The connectors' deletion feeds and dead-record answers, through the real clients against the
sandbox (issue 16): Salesforce's queryAll pull (IsDeleted, MasterRecordId) and getDeleted's window,
HubSpot's archive list and merged ids, and write answers that name a merge survivor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from simple_salesforce.exceptions import SalesforceError

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.hubspot import HubSpotConnector
from syncd.connectors.salesforce import SalesforceConnector
from syncd.model import Cursor, Deletion, FieldUpdate

if TYPE_CHECKING:
    from conftest_salesforce import SalesforceSandbox

    from tests.integration.conftest import HubSpotSandbox

FAST = RetryPolicy(max_attempts=3, base=0.001, cap=0.01, max_retry_after=0.05)
NOW = datetime.now(UTC)


def _sf(sb: SalesforceSandbox) -> SalesforceConnector:
    return SalesforceConnector(sb.url, sb.session_id, ca_bundle=sb.ca_path,
                               fields={"Lead": ["Email", "Lifecycle_Stage__c"], "Contact": ["Email"]}, retry=FAST)


def _hs(sb: HubSpotSandbox) -> HubSpotConnector:
    return HubSpotConnector(sb.url, sb.token, ca_bundle=sb.ca_path,
                            properties={"contacts": ["email", "lifecyclestage"]}, retry=FAST)


def _lead(sb: SalesforceSandbox, email: str) -> str:
    return sb.app.insert("Lead", {"Email": email, "LastName": "X", "Company": "Acme"})


def _sf_pull(conn: SalesforceConnector, obj: str, since: Cursor | None) -> tuple[list[str], list[Deletion]]:
    pages = list(conn.iter_changes(obj, since, overlap=timedelta(0)))
    return [r.id for p in pages for r in p.records], [d for p in pages for d in p.deleted]


def test_salesforce_deletions_and_merges_come_with_the_pull(sf_sandbox: SalesforceSandbox) -> None:
    """One queryAll per pull: the live rows are the changes, the deleted and merged-away rows the
    deaths (a delete moves SystemModstamp, so the incremental pull sees it)."""
    conn = _sf(sf_sandbox)
    try:
        gone, master, merged, live = (_lead(sf_sandbox, f"{n}@example.com") for n in "abcd")
        _, before = _sf_pull(conn, "Lead", None)
        assert before == []
        mark = Cursor(datetime.now(UTC) - timedelta(seconds=1), "")
        sf_sandbox.app.delete("Lead", gone)
        sf_sandbox.app.merge("Lead", master, merged)
        ids, found = _sf_pull(conn, "Lead", mark)
        assert {(d.id, d.merged_into, d.source) for d in found} == {(gone, None, "queryAll"),
                                                                    (merged, master, "queryAll")}
        assert gone not in ids and merged not in ids and master in ids  # the merge touched the master
        assert all(d.deleted_at and d.deleted_at >= mark.modified_at for d in found)
        assert conn.usage.calls == {"queryAll": 2}  # no second query for the deaths
        assert {d.id for d in conn.dead("Lead", [gone, live, merged])} == {gone, merged}
        # a write to a deleted record is a permanent failure with the CRM's reason
        (res,) = conn.write("Lead", [FieldUpdate("k", gone, {"Lifecycle_Stage__c": "MQL"})])
        assert not res.ok and not res.retriable and res.error and res.error.startswith("ENTITY_IS_DELETED")
        sf_sandbox.app.undelete("Lead", gone)
        assert conn.dead("Lead", [gone]) == []
        ids, found = _sf_pull(conn, "Lead", mark)
        assert gone in ids and gone not in {d.id for d in found}  # restored: a live change again
    finally:
        conn.close()


def test_salesforce_deletions_older_than_the_recycle_bin_are_said_to_be_unreadable(
        sf_sandbox: SalesforceSandbox, capsys: pytest.CaptureFixture[str]) -> None:
    conn = _sf(sf_sandbox)
    try:
        lid = _lead(sf_sandbox, "w@example.com")
        sf_sandbox.app.delete("Lead", lid, at=NOW - timedelta(minutes=5))
        ids, found = _sf_pull(conn, "Lead", Cursor(NOW - timedelta(days=90), ""))  # a daemon down for months
        assert [d.id for d in found] == [lid] and ids == []
        assert "salesforce.deleted_window_passed" in capsys.readouterr().out
        # the getDeleted endpoint refuses a start older than its 30-day window, like the real one
        sf = sf_sandbox.client()
        got = sf.Lead.deleted(NOW - timedelta(days=1), datetime.now(UTC))
        assert [d["id"] for d in got["deletedRecords"]] == [lid]
        with pytest.raises(SalesforceError, match="INVALID_REPLICATION_DATE"):
            sf.Lead.deleted(NOW - timedelta(days=31), datetime.now(UTC))
    finally:
        conn.close()


def test_hubspot_archive_is_read_since_the_watermark(hubspot_sandbox: HubSpotSandbox) -> None:
    conn = _hs(hubspot_sandbox)
    app = hubspot_sandbox.app
    a, b, c = (app.add("contacts", {"email": f"{n}@example.com"}) for n in "abc")
    app.archive("contacts", a, at=NOW - timedelta(hours=2))
    found, mark = conn.deleted("contacts", None)
    assert [(d.id, d.source) for d in found] == [(a, "archive")] and mark is not None
    app.archive("contacts", b, at=NOW)
    found, mark2 = conn.deleted("contacts", mark + timedelta(milliseconds=1))
    assert [d.id for d in found] == [b] and mark2 is not None and mark2 > mark
    assert {d.id for d in conn.dead("contacts", [a, b, c])} == {a, b}


def test_hubspot_merge_answers_name_the_survivor_and_a_backwards_move_keeps_a_stage(
        hubspot_sandbox: HubSpotSandbox) -> None:
    conn = _hs(hubspot_sandbox)
    app = hubspot_sandbox.app
    keep = app.add("contacts", {"email": "keep@example.com", "lifecyclestage": "salesqualifiedlead"})
    gone = app.add("contacts", {"email": "gone@example.com", "lifecyclestage": "lead"})
    app.merge("contacts", keep, gone)
    (rec,) = [r for r in conn.fetch("contacts", [keep])]
    assert rec.fields["hs_merged_object_ids"] == gone
    assert [(d.id, d.merged_into) for d in conn.merges_in([rec])] == [(gone, keep)]
    assert [(d.id, d.merged_into) for d in conn.dead("contacts", [gone])] == [(gone, keep)]
    # a backwards move (clear, then set) sent to the merged-away id: applied to the survivor,
    # reported applied with the survivor's id, and the survivor ends with the stage set
    (res,) = conn.write("contacts", [FieldUpdate("k", gone, {"lifecyclestage": "lead"},
                                                 clear_first=("lifecyclestage",))])
    assert res.ok and res.record_id == keep, res
    assert app.get("contacts", keep)["lifecyclestage"] == "lead"


def test_a_backwards_move_whose_clear_fails_once_is_sent_whole(hubspot_sandbox: HubSpotSandbox) -> None:
    conn = _hs(hubspot_sandbox)
    app = hubspot_sandbox.app
    rid = app.add("contacts", {"email": "back@example.com", "lifecyclestage": "salesqualifiedlead"})
    hubspot_sandbox.server.inject("partial", endpoint="contacts.batch_update", ids=[rid])  # the clear fails
    (res,) = conn.write("contacts", [FieldUpdate("k", rid, {"lifecyclestage": "lead"},
                                                 clear_first=("lifecyclestage",))])
    assert res.ok, res
    assert app.get("contacts", rid)["lifecyclestage"] == "lead"
    # a clear that keeps failing sends no set: the stage is left as it was, the write retried whole
    hubspot_sandbox.server.inject("partial", count=2, endpoint="contacts.batch_update", ids=[rid])
    (res,) = conn.write("contacts", [FieldUpdate("k2", rid, {"lifecyclestage": "subscriber"},
                                                 clear_first=("lifecyclestage",))])
    assert not res.ok and res.retriable and "clearing lifecyclestage failed" in (res.error or "")
    assert app.get("contacts", rid)["lifecyclestage"] == "lead"


def test_hubspot_deal_merges_are_read_like_contact_merges(hubspot_sandbox: HubSpotSandbox) -> None:
    """Deals carry ``hs_merged_object_ids`` too: a pulled survivor names the merged-away deal,
    a read of the old id answers with the survivor, and so does a write to it."""
    conn = HubSpotConnector(hubspot_sandbox.url, hubspot_sandbox.token, ca_bundle=hubspot_sandbox.ca_path,
                            properties={"deals": ["dealname", "dealstage"]}, retry=FAST)
    app = hubspot_sandbox.app
    try:
        contact = app.add("contacts", {"email": "deal.owner@example.com"})
        keep = app.add("deals", {"dealname": "Keep", "dealstage": "appointmentscheduled", "pipeline": "default"})
        gone = app.add("deals", {"dealname": "Gone", "dealstage": "contractsent", "pipeline": "default"})
        app.associate(contact, gone)
        app.merge("deals", keep, gone)
        assert app.associations("deals", keep) == [contact]  # the survivor takes the associations
        assert app.get("deals", keep)["dealstage"] == "appointmentscheduled"  # the primary's stage
        pulled = [r for page in conn.iter_changes("deals", None, overlap=timedelta(0)) for r in page.records]
        assert [r.id for r in pulled] == [keep]
        assert pulled[0].fields["_contact_ids"] == [contact]
        assert [(d.id, d.merged_into) for d in conn.merges_in(pulled)] == [(gone, keep)]
        assert [(d.id, d.merged_into) for d in conn.dead("deals", [gone, keep])] == [(gone, keep)]
        (res,) = conn.write("deals", [FieldUpdate("k", gone, {"dealstage": "closedwon"})])
        assert res.ok and res.record_id == keep, res
        assert app.get("deals", keep)["dealstage"] == "closedwon"
    finally:
        conn.close()
