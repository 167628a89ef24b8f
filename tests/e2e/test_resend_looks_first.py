"""Resends look first (issue 14): an update found ``sending`` after a restart is compared with
what the CRM holds now before it is sent again, so it never overwrites a newer human change.

The crash is placed with the store: the row is marked ``sending`` and the CRM applies the write
(the real client against the sandbox), and the row is never marked done, which is what a
kill -9 between the CRM's answer and the outbox commit leaves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from syncd.engine import CycleStats
from syncd.model import FieldUpdate
from syncd.store import OutboxRow

if TYPE_CHECKING:
    from conftest import E2E

EMAIL = "rae.race@example.com"


def _scored_person(e2e: E2E) -> tuple[str, str]:
    hid = e2e.hs.add("contacts", {"email": EMAIL, "firstname": "Rae", "lastname": "Race",
                                  "lifecyclestage": "lead", "hubspotscore": "20"})
    lid = e2e.sf.insert("Lead", {"Email": EMAIL, "FirstName": "Rae", "LastName": "Race", "Company": "R",
                                 "Status": "Open - Not Contacted", "Lifecycle_Stage__c": "Lead"})
    e2e.converge()  # linked, nothing to do under the threshold
    e2e.hs.modify("contacts", hid, {"hubspotscore": "70"})
    e2e.decide_only()  # MQL decided for both; nothing sent yet
    return hid, lid


def _crash_after_the_crm_applied(e2e: E2E, system: str, obj: str) -> Sequence[OutboxRow]:
    """Mark the system's due updates sending, let the CRM apply them, never mark them done."""
    with e2e.rt.store.tx() as tx:
        due = [r for r in tx.due(system, obj, datetime.now(UTC), 100) if r.op == "update"]
        tx.mark_sending([r.id for r in due])
    results = e2e.rt.connectors[system].write(obj, [
        FieldUpdate(key=str(r.id), record_id=str(r.record_id), fields=r.fields,
                    clear_first=tuple(r.clear_first)) for r in due])
    assert all(res.ok for res in results)
    return due


def test_a_stale_resend_never_overwrites_a_newer_human_change(e2e: E2E) -> None:
    _, lid = _scored_person(e2e)
    (row,) = _crash_after_the_crm_applied(e2e, "salesforce", "Lead")
    assert row.basis == {"Lifecycle_Stage__c": "Lead"}  # what the decision was made on
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})  # sales moves on meanwhile

    e2e.converge()  # the restart
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"
    mql_writes = [w for w in e2e.sf.write_log if w["id"] == lid and w["fields"].get("Lifecycle_Stage__c") == "MQL"]
    assert len(mql_writes) == 1  # only the one the CRM applied before the crash
    superseded = e2e.audit(rule="superseded")
    assert [(a.system, a.record_id, a.field, a.outbox_id) for a in superseded] == [
        ("salesforce", lid, "lifecycle", row.id)]
    # found when deciding (the pulled SQL) or when resending (the look-first read): it says what changed
    assert "lifecycle" in superseded[0].reason.lower() and "'lead' -> 'sql'" in superseded[0].reason.lower()
    with e2e.rt.store.tx() as tx:
        assert tx.get_outbox([row.id])[row.id].state == "superseded"
    assert e2e.outbox_depth() == 0


def test_a_resend_the_crm_already_holds_is_marked_done_without_sending(e2e: E2E) -> None:
    _, lid = _scored_person(e2e)
    (row,) = _crash_after_the_crm_applied(e2e, "salesforce", "Lead")
    writes = len(e2e.sf.write_log)

    e2e.converge()  # the restart
    assert len(e2e.sf.write_log) == writes  # found applied: not sent again
    with e2e.rt.store.tx() as tx:
        assert tx.get_outbox([row.id])[row.id].state == "done"
    assert [a.rule for a in e2e.audit(system="salesforce", record_id=lid)] == [row.rule]  # audited once
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"


def test_a_resend_of_an_update_the_crm_never_got_is_sent(e2e: E2E) -> None:
    _, lid = _scored_person(e2e)
    with e2e.rt.store.tx() as tx:
        (row,) = [r for r in tx.due("salesforce", "Lead", datetime.now(UTC), 100) if r.op == "update"]
        tx.mark_sending([row.id])  # crashed before the request left

    e2e.converge()
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
    with e2e.rt.store.tx() as tx:
        assert tx.get_outbox([row.id])[row.id].state == "done"


def test_a_pending_write_overtaken_by_a_newer_crm_value_is_superseded_not_sent(e2e: E2E) -> None:
    """The pending-writes overlay never hides a value newer than the write: a write decided but
    not yet sent (backing off, or the cycle stopped before the flush) whose target changed
    since is cancelled when the person is decided again; the CRM's newer value wins."""
    _, lid = _scored_person(e2e)  # MQL decided, still pending
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})  # sales moves on before it is sent

    e2e.converge()
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"
    assert not [w for w in e2e.sf.write_log if w["id"] == lid and w["fields"].get("Lifecycle_Stage__c") == "MQL"]
    (row,) = e2e.audit(rule="superseded")
    assert (row.system, row.record_id, row.field) == ("salesforce", lid, "lifecycle")
    assert "'lead' -> 'sql'" in row.reason
    assert e2e.outbox_depth() == 0


def test_a_resend_whose_record_changes_after_the_look_first_read_is_superseded_not_sent(e2e: E2E) -> None:
    """On Salesforce the look-first and the resend are one atomic step: the resend is a
    single-record PATCH with If-Unmodified-Since (the time of the read), so an edit landing
    between the read and the resend is never overwritten (412: superseded, decided again)."""
    _, lid = _scored_person(e2e)
    with e2e.rt.store.tx() as tx:
        (row,) = [r for r in tx.due("salesforce", "Lead", datetime.now(UTC), 100) if r.op == "update"]
        tx.mark_sending([row.id])  # crashed before the request left: the look-first finds nothing done
    time.sleep(1.1)  # HTTP dates are whole seconds: the edit below must fall in a later second than the read
    server = e2e.sb.salesforce_server
    server.inject("hold_answer", endpoint="query", delay=1.0)  # the look-first read, its answer on its way
    reads = server.request_count("query")

    def rep_edits_meanwhile() -> None:
        deadline = time.monotonic() + 30
        while server.request_count("query") == reads and time.monotonic() < deadline:
            time.sleep(0.005)
        e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})

    edit = threading.Thread(target=rep_edits_meanwhile)
    edit.start()
    stats = CycleStats()
    e2e.engine().flush(stats, systems=["salesforce"])
    edit.join()
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"
    assert not [w for w in e2e.sf.write_log if w["id"] == lid and w["fields"].get("Lifecycle_Stage__c") == "MQL"]
    with e2e.rt.store.tx() as tx:
        assert tx.get_outbox([row.id])[row.id].state == "superseded"
    (audit,) = e2e.audit(rule="superseded")
    assert "modified after the look-first read" in audit.reason
