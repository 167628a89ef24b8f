"""Deletes, archives, merges and restores, end to end (issue 16): the real clients against the
sandbox CRMs, through the runtime's engine.

Each scenario builds its situation with the simulators' direct-access APIs ("sales deleted
this Lead", "marketing merged these contacts"), runs real cycles and asserts the documented
state: a tombstone with its source, the record unlinked, an audit row, nothing asked of the
dead id after syncd saw it die (the simulators count requests per record id), and the live
twin handed off when the rules call for it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from _docs_json import documented

from syncd.engine import CycleStats, Engine
from syncd.report import status_data
from syncd.sla import Deletions
from syncd.store import TombstoneRow

if TYPE_CHECKING:
    from conftest import E2E


def person(e2e: E2E, email: str, *, hs_stage: str | None, score: int | None = None,
           sf: str | None = "Lead", sf_stage: str = "Lead") -> tuple[str | None, str | None]:
    """A person in HubSpot (contact) and/or Salesforce (Lead or Contact); their ids."""
    first, last = email.split("@")[0].split(".")
    hid = sid = None
    if hs_stage is not None:
        props: dict[str, Any] = {"email": email, "firstname": first.title(), "lastname": last.title(),
                                 "lifecyclestage": hs_stage}
        if score is not None:
            props["hubspotscore"] = str(score)
        hid = e2e.hs.add("contacts", props)
    if sf == "Lead":
        sid = e2e.sf.insert("Lead", {"Email": email, "FirstName": first.title(), "LastName": last.title(),
                                     "Company": "Acme", "Lifecycle_Stage__c": sf_stage})
    elif sf == "Contact":
        sid = e2e.sf.insert("Contact", {"Email": email, "FirstName": first.title(), "LastName": last.title(),
                                        "Lifecycle_Stage__c": sf_stage})
    return hid, sid


def engine(e2e: E2E, **sla: Any) -> Engine:
    """The runtime's engine, reading HubSpot's archive on every cycle (it is paced in service)."""
    eng = e2e.rt.engine()
    if sla:
        eng.sla = eng.sla.model_copy(update={"deletions": Deletions(**sla)})
        eng.writeback.sla = eng.sla
    eng.feed_interval_s["hubspot"] = 0.0
    return eng


def converge(e2e: E2E, max_cycles: int = 6, **sla: Any) -> list[CycleStats]:
    out = []
    for _ in range(max_cycles):
        st = engine(e2e, **sla).cycle()
        out.append(st)
        if st.sent == 0 and st.failed == 0 and e2e.outbox_depth() == 0:
            break
    return out


def tombstones(e2e: E2E) -> dict[str, TombstoneRow]:
    with e2e.rt.store.tx() as tx:
        return {t.record_id: t for t in tx.list_tombstones()}


def entity_of(e2e: E2E, system: str, obj: str, rid: str) -> str | None:
    with e2e.rt.store.tx() as tx:
        return tx.entity_ids([(system, obj, rid)]).get((system, obj, rid))


def stored(e2e: E2E, system: str, obj: str, rid: str) -> bool:
    with e2e.rt.store.tx() as tx:
        return bool(tx.get_records([(system, obj, rid)]))


def rules_of(e2e: E2E, record_id: str) -> list[tuple[str, Any, Any]]:
    return [(a.rule, a.before, a.after) for a in e2e.audit(record_id=record_id) if a.field == "record"]


def leads_with(e2e: E2E, email: str) -> list[dict[str, Any]]:
    return [r for r in e2e.sf.all("Lead") if (r.get("Email") or "").lower() == email]


def assert_quiet(e2e: E2E) -> None:
    before = e2e.writes()
    for _ in range(2):
        st = engine(e2e).cycle()
        assert st.sent == 0 and st.failed == 0, st.summary()
    assert e2e.writes() == before and e2e.outbox_depth() == 0


# -- Salesforce deletes ---------------------------------------------------------------------------


def test_a_deleted_lead_is_tombstoned_unlinked_audited_and_never_recreated(e2e: E2E) -> None:
    hid, lid = person(e2e, "dora.deleted@example.com", hs_stage="marketingqualifiedlead", score=70)
    assert lid is not None and hid is not None
    converge(e2e)
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"  # handed to sales
    entity = entity_of(e2e, "salesforce", "Lead", lid)

    e2e.sf.delete("Lead", lid)
    st = engine(e2e).cycle()
    assert st.dead == 1
    tomb = tombstones(e2e)[lid]
    assert (tomb.kind, tomb.source, tomb.entity_id) == ("deleted", "queryAll", entity)
    assert not stored(e2e, "salesforce", "Lead", lid)
    assert rules_of(e2e, lid) == [("D1-deleted", "live", "deleted")]
    reported = status_data(e2e.rt.store, datetime.now(UTC))["tombstones"]  # mark and report
    assert reported["count"] == 1 and reported["recent"][0]["record_id"] == lid
    seen = e2e.sf.id_requests[lid]

    # Marketing keeps working the contact: nothing is written to the dead Lead, and the person
    # is not created in Salesforce again because of the deletion (mark policy).
    e2e.hs.modify("contacts", hid, {"hubspotscore": "90"})
    converge(e2e)
    assert e2e.sf.id_requests[lid] == seen
    assert leads_with(e2e, "dora.deleted@example.com") == []
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    # nor is a follow-up breach reported a day later for a Lead sales deleted
    e2e.cycle(clock=lambda: datetime.now(UTC) + timedelta(hours=25))
    with e2e.rt.store.tx() as tx:
        assert tx.open_events("sla_breach") == []
    assert_quiet(e2e)


def test_the_live_twin_of_a_deleted_lead_is_handed_off_when_it_becomes_an_mql(e2e: E2E) -> None:
    hid, lid = person(e2e, "liv.twin@example.com", hs_stage="lead", score=10)
    assert lid is not None and hid is not None
    converge(e2e)
    e2e.sf.delete("Lead", lid)
    converge(e2e)
    assert lid in tombstones(e2e) and leads_with(e2e, "liv.twin@example.com") == []

    e2e.hs.modify("contacts", hid, {"hubspotscore": "75"})  # new evidence after the deletion
    converge(e2e)
    (new,) = leads_with(e2e, "liv.twin@example.com")
    assert new["Id"] != lid and new["Lifecycle_Stage__c"] == "MQL"
    assert entity_of(e2e, "salesforce", "Lead", new["Id"]) == entity_of(e2e, "hubspot", "contacts", hid)
    assert [a.rule for a in e2e.audit(rule="R8-handoff", system="salesforce")] != []


def test_a_deleted_contact_loses_its_pending_write_and_is_never_asked_for_again(e2e: E2E) -> None:
    hid, cid = person(e2e, "carl.contact@example.com", hs_stage="lead", score=10, sf="Contact",
                      sf_stage="Lead")
    assert cid is not None and hid is not None
    converge(e2e)
    e2e.hs.modify("contacts", hid, {"hubspotscore": "80"})  # MQL: a write to the Contact is planned
    e2e.decide_only()
    assert e2e.outbox_depth() > 0
    e2e.sf.delete("Contact", cid)
    seen = e2e.sf.id_requests[cid]

    converge(e2e)
    assert tombstones(e2e)[cid].kind == "deleted"
    assert e2e.sf.id_requests[cid] == seen  # the planned write was never sent
    superseded = [a for a in e2e.audit(record_id=cid) if a.rule == "superseded"]
    assert superseded and "deleted" in superseded[0].reason
    assert rules_of(e2e, cid) == [("D1-deleted", "live", "deleted")]
    assert not any(r.get("Email") == "carl.contact@example.com" for r in e2e.sf.all("Contact"))
    assert_quiet(e2e)


# -- HubSpot archive ------------------------------------------------------------------------------


def test_an_archived_hubspot_contact_is_tombstoned_and_its_lead_left_alone(e2e: E2E) -> None:
    hid, lid = person(e2e, "ada.archived@example.com", hs_stage="marketingqualifiedlead", score=70)
    assert lid is not None and hid is not None
    converge(e2e)
    writes = e2e.writes()
    e2e.hs.archive("contacts", hid)

    st = engine(e2e).cycle()
    assert st.dead == 1
    tomb = tombstones(e2e)[hid]
    assert (tomb.kind, tomb.source) == ("deleted", "archive") and tomb.deleted_at is not None
    assert rules_of(e2e, hid) == [("D1-deleted", "live", "deleted")]
    seen = e2e.hs.id_requests[hid]
    e2e.sf.modify("Lead", lid, {"Status": "Working - Contacted"})
    converge(e2e)
    assert e2e.hs.id_requests[hid] == seen
    assert e2e.sf.get("Lead", lid)["IsDeleted"] is False  # mark: nothing done to the other side
    assert not any(w["endpoint"].endswith("create") for w in e2e.hs.write_log)  # never re-created
    assert e2e.writes() == writes
    assert_quiet(e2e)


def test_propagate_deletes_the_twin_in_the_other_crm(e2e: E2E) -> None:
    hid, lid = person(e2e, "pia.propagate@example.com", hs_stage="lead", score=10)
    hid2, lid2 = person(e2e, "pat.propagate@example.com", hs_stage="lead", score=10)
    assert lid and hid and lid2 and hid2
    converge(e2e, other_side="propagate")
    e2e.hs.archive("contacts", hid)
    e2e.sf.delete("Lead", lid2)
    converge(e2e, other_side="propagate")
    assert lid in e2e.sf.deleted_ids("Lead")  # the archived contact's Lead is deleted
    assert e2e.hs.get("contacts", hid2) and hid2 not in {c["hs_object_id"] for c in e2e.hs.all("contacts")}
    for rid in (lid, hid2):  # audited as sent, then seen dead like any deletion
        assert [a.rule for a in e2e.audit(record_id=rid) if a.field == "record"] == ["D3-propagate", "D1-deleted"]
    assert_quiet(e2e)


# -- merges ---------------------------------------------------------------------------------------


def test_a_hubspot_merge_of_two_linked_contacts_moves_writes_to_the_survivor(e2e: E2E) -> None:
    a, x = person(e2e, "ann.a@example.com", hs_stage="marketingqualifiedlead", score=70)
    b, y = person(e2e, "ann.b@example.com", hs_stage="lead", score=10)
    assert a and b and x and y
    converge(e2e)
    e2e.sf.modify("Lead", y, {"Lifecycle_Stage__c": "SQL"})  # sales qualified B: HubSpot B to follow
    e2e.decide_only()
    e2e.hs.merge("contacts", a, b)  # marketing merges B into A meanwhile
    seen = e2e.hs.id_requests[b]

    converge(e2e)
    tomb = tombstones(e2e)[b]
    assert (tomb.kind, tomb.merged_into, tomb.source) == ("merged", a, "hs_merged_object_ids")
    assert rules_of(e2e, b) == [("D2-merged", "live", f"merged into {a}")]
    assert e2e.hs.id_requests[b] == seen  # the pending write went to the survivor
    assert e2e.hs.get("contacts", a)["lifecyclestage"] == "salesqualifiedlead"  # the furthest stage
    with e2e.rt.store.tx() as tx:
        assert tx.open_link_conflicts() == []
    assert entity_of(e2e, "hubspot", "contacts", a) == entity_of(e2e, "salesforce", "Lead", x)
    assert_quiet(e2e)


def test_a_write_answered_by_the_merge_survivor_is_that_merge(e2e: E2E) -> None:
    a, x = person(e2e, "mo.a@example.com", hs_stage="lead", score=10, sf=None)
    b, y = person(e2e, "mo.b@example.com", hs_stage="lead", score=10)
    assert a and b and y
    converge(e2e)
    e2e.sf.modify("Lead", y, {"Lifecycle_Stage__c": "SQL"})
    e2e.decide_only()
    e2e.hs.merge("contacts", a, b)

    eng = engine(e2e)
    stats = CycleStats()
    eng.flush(stats)  # sent before any pull could tell: the answer carries the survivor's id
    assert stats.sent >= 1 and stats.failed == 0
    tomb = tombstones(e2e)[b]  # the survivor, read again at once, names the merged-away id
    assert (tomb.kind, tomb.merged_into) == ("merged", a)
    assert e2e.hs.get("contacts", a)["lifecyclestage"] == "salesqualifiedlead"
    seen = e2e.hs.id_requests[b]
    converge(e2e)
    assert e2e.hs.id_requests[b] == seen
    # the survivor took the person over: linked to the Lead, no conflict with its dead twin
    assert entity_of(e2e, "hubspot", "contacts", a) == entity_of(e2e, "salesforce", "Lead", y)
    with e2e.rt.store.tx() as tx:
        assert tx.open_link_conflicts() == []
    assert_quiet(e2e)


def test_a_salesforce_merge_of_two_leads_hands_the_live_contact_to_the_master(e2e: E2E) -> None:
    b, y = person(e2e, "sam.b@example.com", hs_stage="marketingqualifiedlead", score=70)
    _, x = person(e2e, "sam.master@example.com", hs_stage=None)
    assert b and x and y
    converge(e2e)
    e2e.sf.merge("Lead", x, y)  # sales merges Lead Y into X (X is the master)
    st = engine(e2e).cycle()
    assert st.dead == 1
    tomb = tombstones(e2e)[y]
    assert (tomb.kind, tomb.merged_into, tomb.source) == ("merged", x, "queryAll")
    assert rules_of(e2e, y) == [("D2-merged", "live", f"merged into {x}")]
    seen = e2e.sf.id_requests[y]
    converge(e2e)
    assert e2e.sf.id_requests[y] == seen
    # HubSpot B now speaks to the master: its MQL is handed to sales there, nothing re-created
    assert entity_of(e2e, "hubspot", "contacts", b) == entity_of(e2e, "salesforce", "Lead", x)
    assert e2e.sf.get("Lead", x)["Lifecycle_Stage__c"] == "MQL"
    assert leads_with(e2e, "sam.b@example.com") == []
    assert_quiet(e2e)



def _deal_person(e2e: E2E) -> tuple[str, str, str]:
    """A person in both CRMs (HubSpot contact, Salesforce Contact on an Account): their ids."""
    hid = e2e.hs.add("contacts", {"email": "dee.deal@example.com", "firstname": "Dee", "lastname": "Deal",
                                  "lifecyclestage": "salesqualifiedlead"})
    acc = e2e.sf.insert("Account", {"Name": "Dee Inc"})
    cid = e2e.sf.insert("Contact", {"Email": "dee.deal@example.com", "FirstName": "Dee", "LastName": "Deal",
                                    "AccountId": acc, "Lifecycle_Stage__c": "SQL"})
    return hid, acc, cid


def test_a_hubspot_merge_of_two_deals_moves_the_link_and_the_pending_write_to_the_survivor(e2e: E2E) -> None:
    hid, acc, cid = _deal_person(e2e)
    converge(e2e)
    close = (datetime.now(UTC).date() + timedelta(days=30)).isoformat()
    # B is linked to the Opportunity (same name, same person); A is a HubSpot-only duplicate
    b = e2e.hs.add("deals", {"dealname": "Dee Inc - Platform", "dealstage": "appointmentscheduled",
                             "pipeline": "default", "amount": "1000"})
    a = e2e.hs.add("deals", {"dealname": "Dee Inc - Platform (copy)", "dealstage": "appointmentscheduled",
                             "pipeline": "default"})
    e2e.hs.associate(hid, b)
    e2e.hs.associate(hid, a)
    oid = e2e.sf.insert("Opportunity", {"Name": "Dee Inc - Platform", "AccountId": acc, "ContactId": cid,
                                        "StageName": "Prospecting", "CloseDate": close})
    converge(e2e)
    opp_entity = entity_of(e2e, "salesforce", "Opportunity", oid)
    assert opp_entity is not None and entity_of(e2e, "hubspot", "deals", b) == opp_entity
    assert entity_of(e2e, "hubspot", "deals", a) not in (None, opp_entity)

    e2e.sf.modify("Opportunity", oid, {"StageName": "Closed Won"})  # sales won it: HubSpot B to follow
    e2e.decide_only()
    with e2e.rt.store.tx() as tx:
        assert [w.record_id for w in tx.open_writes_to([("hubspot", "deals", b)])] == [b]
    e2e.hs.merge("deals", a, b)  # marketing merges B into A meanwhile
    seen = e2e.hs.id_requests[b]

    converge(e2e)
    tomb = tombstones(e2e)[b]
    assert (tomb.object, tomb.kind, tomb.merged_into, tomb.source) == ("deals", "merged", a, "hs_merged_object_ids")
    assert rules_of(e2e, b) == [("D2-merged", "live", f"merged into {a}")]
    assert e2e.hs.id_requests[b] == seen  # the pending write went to the survivor, nothing to B
    assert e2e.hs.get("deals", a)["dealstage"] == "closedwon"
    # the survivor took the link over: the Opportunity is the survivor's deal now
    assert entity_of(e2e, "salesforce", "Opportunity", oid) == entity_of(e2e, "hubspot", "deals", a)
    assert not stored(e2e, "hubspot", "deals", b)
    with e2e.rt.store.tx() as tx:
        assert tx.open_link_conflicts() == []
    # still in the sync through the survivor: sales reopens it, HubSpot A follows
    e2e.sf.modify("Opportunity", oid, {"StageName": "Negotiation/Review"})
    converge(e2e)
    assert e2e.hs.get("deals", a)["dealstage"] == "contractsent"
    assert e2e.hs.id_requests[b] == seen
    assert_quiet(e2e)


def test_a_salesforce_merge_moves_a_pending_write_from_the_merged_lead_to_the_master(e2e: E2E) -> None:
    b, y = person(e2e, "sue.b@example.com", hs_stage="lead", score=10)
    _, x = person(e2e, "sue.master@example.com", hs_stage=None)
    assert b and x and y
    converge(e2e)
    e2e.hs.modify("contacts", b, {"hubspotscore": "80"})  # an MQL: the hand-off to Lead Y is planned
    e2e.decide_only()
    with e2e.rt.store.tx() as tx:
        (pending,) = tx.open_writes_to([("salesforce", "Lead", y)])
    e2e.sf.merge("Lead", x, y)  # sales merges Y into X before the write goes
    seen = e2e.sf.id_requests[y]

    converge(e2e)
    assert (tombstones(e2e)[y].kind, tombstones(e2e)[y].merged_into) == ("merged", x)
    assert e2e.sf.id_requests[y] == seen  # nothing sent to the merged-away Lead
    with e2e.rt.store.tx() as tx:
        row = tx.get_outbox([pending.id])[pending.id]
    assert (row.record_id, row.state) == (x, "done")  # the write went to the master instead
    assert e2e.sf.get("Lead", x)["Lifecycle_Stage__c"] == "MQL"
    assert entity_of(e2e, "hubspot", "contacts", b) == entity_of(e2e, "salesforce", "Lead", x)
    assert leads_with(e2e, "sue.b@example.com") == []
    assert_quiet(e2e)


def test_a_record_held_in_quarantine_that_dies_is_tombstoned_and_its_entry_closed(e2e: E2E) -> None:
    hid = e2e.hs.add("contacts", {"email": "quinn.q@example.com", "firstname": "Quinn", "lastname": "Q",
                                  "lifecyclestage": "lead"})
    with e2e.hs._lock:  # the simulator's state: a value the CRM's own write path would refuse
        e2e.hs._store("contacts").records[hid].props["hubspotscore"] = "abc"
    converge(e2e)
    with e2e.rt.store.tx() as tx:
        (q,) = tx.open_quarantine("hubspot")
    assert (q.kind, q.record_id) == ("record", hid) and not stored(e2e, "hubspot", "contacts", hid)
    e2e.hs.archive("contacts", hid)

    st = engine(e2e).cycle()

    assert st.dead == 1
    assert (tombstones(e2e)[hid].kind, tombstones(e2e)[hid].source) == ("deleted", "archive")
    assert rules_of(e2e, hid) == [("D1-deleted", "live", "deleted")]
    with e2e.rt.store.tx() as tx:
        assert tx.open_quarantine() == []  # nothing is left to fix in a record that is gone

# -- restores -------------------------------------------------------------------------------------


def test_a_restored_contact_and_an_undeleted_lead_are_linked_again(e2e: E2E) -> None:
    hid, lid = person(e2e, "rob.restore@example.com", hs_stage="marketingqualifiedlead", score=70)
    assert lid is not None and hid is not None
    converge(e2e)
    entity = entity_of(e2e, "hubspot", "contacts", hid)
    e2e.hs.archive("contacts", hid)
    e2e.sf.delete("Lead", lid)
    converge(e2e)
    assert {hid, lid} <= set(tombstones(e2e))

    e2e.hs.restore("contacts", hid)
    e2e.sf.undelete("Lead", lid)
    st = engine(e2e).cycle()
    assert st.restored == 2
    assert tombstones(e2e) == {}
    assert entity_of(e2e, "hubspot", "contacts", hid) == entity == entity_of(e2e, "salesforce", "Lead", lid)
    assert rules_of(e2e, hid)[-1] == ("D4-restored", "deleted", "live")
    assert rules_of(e2e, lid)[-1] == ("D4-restored", "deleted", "live")
    # back in the sync: a change on one side reaches the other
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})
    converge(e2e)
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "salesqualifiedlead"
    assert_quiet(e2e)


def test_a_write_to_a_contact_archived_meanwhile_is_quarantined_then_tombstoned(e2e: E2E) -> None:
    hid, lid = person(e2e, "quin.quick@example.com", hs_stage="lead", score=10)
    assert lid and hid
    converge(e2e)
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})  # HubSpot is to follow
    e2e.decide_only()
    e2e.hs.archive("contacts", hid)  # archived before the write is sent, long before a scan
    stats = CycleStats()
    engine(e2e).flush(stats)
    assert stats.failed == 1 and stats.dead == 1
    with e2e.rt.store.tx() as tx:
        (q,) = tx.open_quarantine("hubspot")
        assert (q.record_id, q.attempts) == (hid, 1) and q.reason.startswith("OBJECT_NOT_FOUND")
    tomb = tombstones(e2e)[hid]
    assert (tomb.kind, tomb.source) == ("deleted", "re-pull")
    seen = e2e.hs.id_requests[hid]
    converge(e2e)
    assert e2e.hs.id_requests[hid] == seen
    assert_quiet(e2e)


# -- syncd tombstones -----------------------------------------------------------------------------


def test_syncd_tombstones_lists_what_died_how_and_what_the_other_side_got(e2e: E2E) -> None:
    hid, lid = person(e2e, "tess.tomb@example.com", hs_stage="lead", score=10)  # archived; propagate
    _, lid2 = person(e2e, "tom.tomb@example.com", hs_stage="lead", score=10)  # Lead deleted; mark
    a, _ = person(e2e, "tia.a@example.com", hs_stage="lead", sf=None)
    b, _ = person(e2e, "tia.b@example.com", hs_stage="lead", sf=None)
    assert hid and lid and lid2 and a and b
    converge(e2e)
    e2e.sf.delete("Lead", lid2)
    e2e.hs.merge("contacts", a, b)
    converge(e2e)
    e2e.hs.archive("contacts", hid)
    converge(e2e, other_side="propagate")

    r = e2e.syncd("tombstones", "--json")
    assert r.returncode == 0, r.stderr
    data = documented("tombstones", r.stdout)
    by = {t["id"]: t for t in data["tombstones"]}
    assert data["total"] == 4 and set(by) == {lid2, b, hid, lid}
    t = by[lid2]
    assert (t["key"], t["kind"], t["source"], t["other_side"], t["twins"]) == (
        f"salesforce:Lead:{lid2}", "deleted", "queryAll", "marked", [])
    assert t["email"] == "tom.tomb@example.com" and t["name"] == "Tom Tomb" and t["entity_id"]
    assert t["deleted_at"] is not None and t["restored_at"] is None
    assert (by[b]["kind"], by[b]["merged_into"], by[b]["source"], by[b]["other_side"]) == (
        "merged", a, "hs_merged_object_ids", "survivor")
    assert (by[hid]["source"], by[hid]["other_side"]) == ("archive", "propagated")
    assert by[hid]["twins"] == [{"key": f"salesforce:Lead:{lid}", "state": "done", "last_error": None}]
    assert by[lid]["source"] == "queryAll"  # the twin syncd deleted, seen dead by the feed after

    def ids(*args: str) -> tuple[int, list[str]]:
        r = e2e.syncd("tombstones", *args, "--json")
        assert r.returncode == 0, r.stderr
        d = documented("tombstones", r.stdout)
        return d["total"], [t["id"] for t in d["tombstones"]]

    total, got = ids("--system", "hubspot")
    assert total == 2 and set(got) == {b, hid}
    total, got = ids("--object", "Lead", "--limit", "1")
    assert total == 2 and got == [lid]  # the newest noticed first
    text = e2e.syncd("tombstones")
    assert text.returncode == 0, text.stderr
    assert f"salesforce:Lead:{lid2}" in text.stdout and f"merged into {a}" in text.stdout
    assert f"propagated (salesforce:Lead:{lid} done)" in text.stdout

    e2e.sf.undelete("Lead", lid2)  # restored: no longer listed, unless asked for
    converge(e2e)
    total, got = ids()
    assert total == 3 and lid2 not in got
    r = e2e.syncd("tombstones", "--restored", "--object", "Lead", "--json")
    restored = {t["id"]: t for t in documented("tombstones", r.stdout)["tombstones"]}
    assert restored[lid2]["restored_at"] is not None and restored[lid]["restored_at"] is None
    bad = e2e.syncd("tombstones", "--system", "pipedrive")
    assert bad.returncode == 2 and "pipedrive" in bad.stderr


def test_an_id_the_crm_only_stopped_answering_for_is_tombstoned_but_never_propagated(e2e: E2E) -> None:
    """Under ``propagate``, a twin is deleted only on the CRM's word (recycle bin, deletion feed).
    A contact purged, or no longer visible to syncd's user, is just gone from every answer: syncd
    stops writing to it (a tombstone), and keeps its Salesforce twin, whether the re-pull after a
    permanent write error or reconcile's settling of extras found it."""
    from syncd import reconcile

    hid, lid = person(e2e, "una.unseen@example.com", hs_stage="lead", score=10)
    hid2, lid2 = person(e2e, "ugo.unseen@example.com", hs_stage="lead", score=10)
    assert hid and lid and hid2 and lid2
    converge(e2e, other_side="propagate")
    e2e.hs.purge("contacts", hid)
    e2e.hs.purge("contacts", hid2)
    eng = engine(e2e, other_side="propagate")
    eng.repull("hubspot", "contacts", [hid], CycleStats())  # what a 404 on a write leads to
    diff = reconcile.ObjectDiff("hubspot", "contacts", extra=[hid2])
    reconcile.settle_extras(eng, [diff], CycleStats())
    converge(e2e, other_side="propagate")

    tomb = tombstones(e2e)
    assert (tomb[hid].source, tomb[hid2].source) == ("re-pull (not found)", "reconcile (not found)")
    assert not ({lid, lid2} & set(e2e.sf.deleted_ids("Lead")))  # the twins are kept
    assert not [w for w in e2e.sf.write_log if w["endpoint"].endswith("delete")]
    for rid in (hid, hid2):
        (audit,) = [a for a in e2e.audit(record_id=rid) if a.field == "record"]
        assert audit.rule == "D1-deleted" and "its twin is kept: the CRM did not confirm a deletion" in audit.reason
    assert_quiet(e2e)
