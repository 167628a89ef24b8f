"""One end-to-end scenario per SLA rule, against the sandbox CRMs with the real clients.

Each test builds its situation with the simulators' direct-access APIs ("a
marketer / a sales rep changed this"), runs real cycles (Engine.cycle through
open_runtime, or the ``syncd`` command), then asserts the FINAL raw values in
both simulated CRMs, the audit trail (rule, before -> after, mapping revision)
and that a converged state stays quiet (two more cycles write nothing: no
ping-pong).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from syncd.store import schema

if TYPE_CHECKING:
    from conftest import E2E

THRESHOLD = 50  # mappings/sla.toml [score] threshold


# -- helpers --------------------------------------------------------------------------------------


def assert_quiet(e2e: E2E) -> None:
    """After convergence two more cycles make zero API writes and leave nothing queued."""
    before = (len(e2e.hs.write_log), len(e2e.sf.write_log))
    for _ in range(2):
        st = e2e.cycle()
        assert st.sent == 0 and st.failed == 0, st.summary()
    assert (len(e2e.hs.write_log), len(e2e.sf.write_log)) == before
    assert e2e.outbox_depth() == 0


def audited(e2e: E2E, **filters: Any) -> list[tuple[str, str, str, Any, Any]]:
    """(system, rule, field, before, after) of the audit rows matching ``filters``."""
    return [(a.system, a.rule, a.field, a.before, a.after) for a in e2e.audit(**filters)]


def assert_revision(e2e: E2E) -> None:
    rows = e2e.audit()
    assert rows, "nothing audited"
    assert {a.mapping_rev for a in rows} == {e2e.rt.mappings.revision}


def person(
    e2e: E2E,
    email: str,
    *,
    hs_stage: str | None,
    score: int | None = None,
    sf_stage: str | None = None,
    sf_status: str = "Open - Not Contacted",
    hs_extra: dict[str, Any] | None = None,
) -> tuple[str | None, str | None]:
    """A person in HubSpot (contact) and/or Salesforce (Lead); returns (hubspot id, lead id)."""
    first, last = email.split("@")[0].split(".")
    hid = lid = None
    if hs_stage is not None:
        props: dict[str, Any] = {
            "email": email,
            "firstname": first.title(),
            "lastname": last.title(),
            "lifecyclestage": hs_stage,
            **(hs_extra or {}),
        }
        if score is not None:
            props["hubspotscore"] = str(score)
        hid = e2e.hs.add("contacts", props)
    if sf_stage is not None:
        lid = e2e.sf.insert(
            "Lead",
            {
                "Email": email,
                "FirstName": first.title(),
                "LastName": last.title(),
                "Company": "Acme",
                "Status": sf_status,
                "Lifecycle_Stage__c": sf_stage,
            },
        )
    return hid, lid


def leads_with_email(e2e: E2E, email: str) -> list[dict[str, Any]]:
    return [
        r for r in e2e.sf.all("Lead") if (r.get("Email") or "").strip().lower() == email.lower()
    ]


def hs_stage_writes(e2e: E2E, hid: str) -> list[Any]:
    return [
        w["properties"]["lifecyclestage"]
        for w in e2e.hs.write_log
        if w["id"] == hid and "lifecyclestage" in w["properties"]
    ]


# -- R1 -------------------------------------------------------------------------------------------


def test_r1_stages_move_forward_only(e2e: E2E) -> None:
    hid, lid = person(
        e2e,
        "rita.one@example.com",
        hs_stage="salesqualifiedlead",
        score=70,
        sf_stage="MQL",
        sf_status="Working - Contacted",
    )
    e2e.converge()
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"  # the system behind is written
    assert audited(e2e, system="salesforce", rule="R1-forward-only") == [
        ("salesforce", "R1-forward-only", "lifecycle", "mql", "sql")
    ]

    # A rep sets the stage back: it never pulls HubSpot back, and SF is put forward again.
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "MQL"})
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "salesqualifiedlead"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"
    assert not audited(e2e, system="hubspot", rule="R1-forward-only")
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R2 -------------------------------------------------------------------------------------------


def test_r2_returned_not_ready_goes_back_to_lead_in_both(e2e: E2E) -> None:
    hid, lid = person(
        e2e, "ben.two@example.com", hs_stage="marketingqualifiedlead", score=55, sf_stage="MQL"
    )
    e2e.converge()
    e2e.sf.modify(
        "Lead", lid, {"Status": "Returned - Not Ready", "Return_Reason__c": "budget next year"}
    )
    e2e.converge()

    hs = e2e.hs.get("contacts", hid)
    assert hs["lifecyclestage"] == "lead"
    assert hs["hs_lead_status"] == "BAD_TIMING"
    sf = e2e.sf.get("Lead", lid)
    assert (sf["Lifecycle_Stage__c"], sf["Status"]) == ("Lead", "Returned - Not Ready")
    # HubSpot refuses a backwards lifecyclestage: syncd clears it first, then sets it.
    assert hs_stage_writes(e2e, hid)[-2:] in ([None, "lead"], ["", "lead"])
    rows = audited(e2e, system="hubspot", rule="R2-returned")
    assert ("hubspot", "R2-returned", "lifecycle", "mql", "lead") in rows
    assert ("hubspot", "R2-returned", "lead_status", "new", "returned_not_ready") in rows
    with e2e.rt.store.tx() as tx:
        returned = tx.open_events("returned")
    # the reason and the time of the return are recorded
    assert [e.details.get("return_reason") for e in returned] == ["budget next year"]
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R3 -------------------------------------------------------------------------------------------


def _returned_person(e2e: E2E, email: str, score: int = 55) -> tuple[str, str]:
    hid, lid = person(e2e, email, hs_stage="marketingqualifiedlead", score=score, sf_stage="MQL")
    assert hid and lid
    e2e.converge()
    e2e.sf.modify(
        "Lead", lid, {"Status": "Returned - Not Ready", "Return_Reason__c": "not a buyer yet"}
    )
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "lead"
    return hid, lid


def test_r3_no_rehandoff_without_new_evidence(e2e: E2E) -> None:
    hid, lid = _returned_person(e2e, "cleo.three@example.com", score=55)
    # +5 keeps it under max(threshold, 55) + margin 10 = 65: not new evidence.
    e2e.hs.modify("contacts", hid, {"hubspotscore": "60"})
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "lead"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "Lead"
    assert e2e.sf.get("Lead", lid)["Status"] == "Returned - Not Ready"
    with e2e.rt.store.tx() as tx:
        blocked = tx.open_events("promotion_blocked")
    assert blocked, "a blocked promotion is recorded, never silent"
    assert blocked[-1].details.get("rule") == "R3-rehandoff-guard"
    assert_quiet(e2e)


def test_r3_rehandoff_with_new_score_evidence(e2e: E2E) -> None:
    hid, lid = _returned_person(e2e, "dan.three@example.com", score=55)
    e2e.hs.modify("contacts", hid, {"hubspotscore": "66"})  # >= 55 + 10
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
    assert ("salesforce", "lifecycle", "lead", "mql") in [
        (a.system, a.field, a.before, a.after) for a in e2e.audit(record_id=lid)
    ]
    assert_revision(e2e)
    assert_quiet(e2e)


def test_r3_rehandoff_with_bofu_conversion(e2e: E2E) -> None:
    hid, lid = _returned_person(e2e, "eve.three@example.com", score=55)
    e2e.hs.modify(
        "contacts",
        hid,
        {
            "recent_conversion_event_name": "Demo request",
            "recent_conversion_date": datetime.now(UTC).isoformat(),
        },
    )
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
    assert_quiet(e2e)


# -- R4 -------------------------------------------------------------------------------------------


def test_r4_score_over_threshold_makes_mql_in_both(e2e: E2E) -> None:
    hid, lid = person(e2e, "fay.four@example.com", hs_stage="lead", score=30, sf_stage="Lead")
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "lead"  # under the threshold: nothing
    e2e.hs.modify("contacts", hid, {"hubspotscore": str(THRESHOLD)})  # at the threshold counts
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
    rows = audited(e2e, rule="R4-lead-score")
    assert ("hubspot", "R4-lead-score", "lifecycle", "lead", "mql") in rows
    assert ("salesforce", "R4-lead-score", "lifecycle", "lead", "mql") in rows
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R5 -------------------------------------------------------------------------------------------


def test_r5_unanswered_attempts_return_the_lead(e2e: E2E) -> None:
    hid, lid = person(
        e2e, "gus.five@example.com", hs_stage="marketingqualifiedlead", score=60, sf_stage="MQL"
    )
    assert hid and lid
    e2e.converge()
    for _ in range(2):
        e2e.sf.log_task(lid, "Call", "Completed", subject="no answer")
    e2e.converge()
    assert e2e.sf.get("Lead", lid)["Status"] == "Open - Not Contacted"  # 2 < 3: not yet
    e2e.sf.log_task(lid, "Call", "Completed", subject="no answer")
    e2e.converge()

    sf = e2e.sf.get("Lead", lid)
    assert (sf["Status"], sf["Lifecycle_Stage__c"]) == ("Returned - Not Ready", "Lead")
    assert "3 unanswered attempts" in (sf["Return_Reason__c"] or "")
    hs = e2e.hs.get("contacts", hid)
    assert (hs["lifecyclestage"], hs["hs_lead_status"]) == ("lead", "BAD_TIMING")
    rows = audited(e2e, system="salesforce", rule="R5-attempts")
    assert ("salesforce", "R5-attempts", "lead_status", "new", "returned_not_ready") in rows
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R6 -------------------------------------------------------------------------------------------


def test_r6_deals_make_opportunity_then_customer_and_stages_sync_both_ways(e2e: E2E) -> None:
    email = "hal.six@example.com"
    hid = e2e.hs.add(
        "contacts",
        {
            "email": email,
            "firstname": "Hal",
            "lastname": "Six",
            "lifecyclestage": "salesqualifiedlead",
            "hubspotscore": "70",
        },
    )
    acc = e2e.sf.insert("Account", {"Name": "Hal Inc"})
    cid = e2e.sf.insert(
        "Contact",
        {
            "Email": email,
            "FirstName": "Hal",
            "LastName": "Six",
            "AccountId": acc,
            "Lifecycle_Stage__c": "SQL",
        },
    )
    e2e.converge()
    did = e2e.hs.add(
        "deals",
        {
            "dealname": "Hal Inc - Platform",
            "dealstage": "appointmentscheduled",
            "pipeline": "default",
            "amount": "1000",
        },
    )
    e2e.hs.associate(hid, did)
    oid = e2e.sf.insert(
        "Opportunity",
        {
            "Name": "Hal Inc - Platform",
            "AccountId": acc,
            "ContactId": cid,
            "StageName": "Prospecting",
            "CloseDate": (date.today() + timedelta(days=30)).isoformat(),
        },
    )
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "opportunity"
    assert e2e.sf.get("Contact", cid)["Lifecycle_Stage__c"] == "Opportunity"

    # HubSpot -> Salesforce: the quote is presented
    e2e.hs.modify("deals", did, {"dealstage": "contractsent"})
    e2e.converge()
    assert e2e.sf.get("Opportunity", oid)["StageName"] in (
        "Proposal/Price Quote",
        "Negotiation/Review",
    )
    # Salesforce -> HubSpot: won
    e2e.sf.modify("Opportunity", oid, {"StageName": "Closed Won"})
    e2e.converge()
    assert e2e.hs.get("deals", did)["dealstage"] == "closedwon"
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "customer"
    assert e2e.sf.get("Contact", cid)["Lifecycle_Stage__c"] == "Customer"
    rows = audited(e2e, rule="R6-deals")
    assert ("salesforce", "R6-deals", "deal_stage", "exploration", "quote_presented") in rows
    assert ("hubspot", "R6-deals", "deal_stage", "quote_presented", "closed_won") in rows
    assert ("hubspot", "R6-deals", "lifecycle", "opportunity", "customer") in rows
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R7 -------------------------------------------------------------------------------------------


def test_r7_owner_wins_on_conflicting_edits(e2e: E2E) -> None:
    hid, lid = person(
        e2e, "ida.seven@example.com", hs_stage="marketingqualifiedlead", score=60, sf_stage="MQL"
    )
    e2e.converge()
    # Only one side changes: copied to the other.
    e2e.hs.modify("contacts", hid, {"hs_lead_status": "CONNECTED"})
    e2e.converge()
    assert e2e.sf.get("Lead", lid)["Status"] == "Working - Contacted"
    # Both change the same field in one cycle: Salesforce owns lead_status.
    e2e.hs.modify("contacts", hid, {"hs_lead_status": "UNQUALIFIED"})
    e2e.sf.modify("Lead", lid, {"Status": "Open - Not Contacted"})
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["hs_lead_status"] in ("NEW", "OPEN")
    assert e2e.sf.get("Lead", lid)["Status"] == "Open - Not Contacted"
    rows = audited(e2e, rule="R7-ownership")
    assert ("hubspot", "R7-ownership", "lead_status", "disqualified", "new") in rows
    assert_revision(e2e)
    assert_quiet(e2e)


# -- R8 -------------------------------------------------------------------------------------------


def test_r8_handoff_creates_the_lead_with_travelling_fields_and_placeholders(e2e: E2E) -> None:
    hid, _ = person(
        e2e,
        "jo.eight@example.com",
        hs_stage="lead",
        score=72,
        hs_extra={"syncd_lead_type": "new_business", "hs_analytics_source": "ORGANIC_SEARCH"},
    )
    # Present in SF under another casing: no hand-off create for this one.
    kid, klid = person(e2e, "kim.eight@example.com", hs_stage="lead", score=80, sf_stage=None)
    klid = e2e.sf.insert(
        "Lead",
        {
            "Email": "  KIM.Eight@Example.COM ",
            "LastName": "Eight",
            "Company": "K",
            "Status": "Open - Not Contacted",
            "Lifecycle_Stage__c": "Lead",
        },
    )
    e2e.converge()

    [lead] = leads_with_email(e2e, "jo.eight@example.com")
    assert lead["Status"] == "Open - Not Contacted"
    assert lead["Lifecycle_Stage__c"] == "MQL"
    assert (lead["FirstName"], lead["LastName"]) == ("Jo", "Eight")
    assert lead["Company"] == "[not provided]"  # the SLA file's placeholder for a required field
    assert lead["Lead_Type__c"] == "New Business"
    assert float(lead["Lead_Score__c"]) == 72
    assert "72" in (lead["Description"] or "")  # the reason it qualified travels
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert len(leads_with_email(e2e, "kim.eight@example.com")) == 1
    assert e2e.sf.get("Lead", klid)["Lifecycle_Stage__c"] == "MQL"
    creates = [w for w in e2e.sf.write_log if w["endpoint"].endswith(("create", "upsert"))]  # upsert: on Syncd_Key__c
    assert len(creates) == 1
    rows = audited(e2e, system="salesforce", rule="R8-handoff")
    assert ("salesforce", "R8-handoff", "company", None, "[not provided]") in rows
    assert_revision(e2e)
    assert_quiet(e2e)
    assert len(leads_with_email(e2e, "jo.eight@example.com")) == 1  # no duplicate on re-run


def test_r8_reverse_handoff_creates_the_returned_lead_in_hubspot(e2e: E2E) -> None:
    lid = e2e.sf.insert(
        "Lead",
        {
            "Email": "lou.eight@example.com",
            "FirstName": "Lou",
            "LastName": "Eight",
            "Company": "Lou GmbH",
            "Status": "Returned - Not Ready",
            "Return_Reason__c": "no budget",
            "Lifecycle_Stage__c": "MQL",
        },
    )
    e2e.converge()
    found = [
        c for c in e2e.hs.all("contacts") if c.get("email", "").lower() == "lou.eight@example.com"
    ]
    assert len(found) == 1
    c = found[0]
    assert (c["firstname"], c["lastname"]) == ("Lou", "Eight")
    assert c["lifecyclestage"] == "lead"
    assert c.get("hs_lead_status") == "BAD_TIMING"
    assert c.get("syncd_return_reason") == "no budget"
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "Lead"
    assert audited(e2e, system="hubspot", rule="R8-handoff")
    assert_quiet(e2e)
    assert (
        len([c for c in e2e.hs.all("contacts") if c.get("email") == "lou.eight@example.com"]) == 1
    )


# -- R9 -------------------------------------------------------------------------------------------


def test_r9_followup_breach_recorded_and_in_status(e2e: E2E) -> None:
    late, _ = person(e2e, "max.nine@example.com", hs_stage="lead", score=75)
    on_time, _ = person(e2e, "ned.nine@example.com", hs_stage="lead", score=75)
    e2e.converge()  # both handed to sales now
    [ned] = leads_with_email(e2e, "ned.nine@example.com")
    e2e.sf.log_task(ned["Id"], "Call", "Completed", subject="first call")
    e2e.converge()
    with e2e.rt.store.tx() as tx:
        assert not tx.open_events("sla_breach")  # the window has not passed yet

    later = datetime.now(UTC) + timedelta(hours=25)
    clock: Callable[[], datetime] = lambda: later  # noqa: E731 - a fixed clock
    e2e.converge(clock=clock)
    with e2e.rt.store.tx() as tx:
        breaches = tx.open_events("sla_breach")
    assert len(breaches) == 1  # max (no attempt), not ned (called in time)

    res = e2e.syncd("status", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [b["entity_id"] for b in data["sla_breaches"]] == [breaches[0].entity_id]
    e2e.converge(clock=clock)
    with e2e.rt.store.tx() as tx:
        assert len(tx.open_events("sla_breach")) == 1  # recorded once, not per cycle


# -- write-back behaviour -------------------------------------------------------------------------


def test_noop_writes_are_skipped(e2e: E2E) -> None:
    hid, lid = person(e2e, "olga.noop@example.com", hs_stage="lead", score=20, sf_stage="Lead")
    e2e.converge()
    sf_before = len(e2e.sf.write_log)
    # Marketing's score crosses the threshold while a rep already set MQL by hand.
    e2e.hs.modify("contacts", hid, {"hubspotscore": "90"})
    e2e.sf.modify("Lead", lid, {"Lifecycle_Stage__c": "MQL"})
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert len(e2e.sf.write_log) == sf_before  # SF already held MQL: no write sent
    assert not audited(e2e, system="salesforce")
    assert_quiet(e2e)


def test_dry_run_prints_the_plan_and_changes_nothing(e2e: E2E) -> None:
    person(e2e, "pia.dry@example.com", hs_stage="lead", score=88)
    _, lid = person(
        e2e,
        "quin.dry@example.com",
        hs_stage="marketingqualifiedlead",
        score=60,
        sf_stage="MQL",
        sf_status="Returned - Not Ready",
    )
    res = e2e.syncd("sync", "--once", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "R8-handoff" in res.stdout and "R2-returned" in res.stdout
    assert e2e.writes() == 0
    engine = e2e.rt.store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.outbox)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.audit)).scalar_one() == 0
    # The plan was real: a real cycle does it.
    e2e.converge()
    assert len(leads_with_email(e2e, "pia.dry@example.com")) == 1
    assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == "Lead"


def test_per_record_transient_failure_retried_alone_until_it_lands_never_quarantined(e2e: E2E) -> None:
    # Issue 14: a transient per-record error (UNABLE_TO_LOCK_ROW) is retried until it lands; past
    # max_tries it is reported as failing (status), never quarantined. (It used to be quarantined
    # after max_tries and needed a resync.)
    ids = []
    for name in ("ray", "sue", "tom"):
        _, lid = person(
            e2e,
            f"{name}.batch@example.com",
            hs_stage="marketingqualifiedlead",
            score=60,
            sf_stage="Lead",
        )
        ids.append(lid)
    bad = ids[1]
    max_tries = e2e.rt.sla.writeback.max_tries
    e2e.sb.salesforce_server.inject(
        "partial", count=max_tries, endpoint="collections.update", ids=frozenset({bad})
    )
    t0 = datetime.now(UTC)
    i = 0
    while i <= max_tries:  # each cycle 10 min later: past the retry backoff
        e2e.cycle(clock=lambda i=i: t0 + timedelta(minutes=10 * i))
        i += 1
        with e2e.rt.store.tx() as tx:
            if tx.failing_writes(max_tries):
                break
    for lid in ids:
        want = "Lead" if lid == bad else "MQL"
        assert e2e.sf.get("Lead", lid)["Lifecycle_Stage__c"] == want
    # the others were written once, in the first batch; the bad one never went through
    written = [w["id"] for w in e2e.sf.write_log]
    assert sorted(written) == sorted(i for i in ids if i != bad)
    res = e2e.syncd("status", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["quarantine"] == []
    with e2e.rt.store.tx() as tx:
        (failing,) = tx.failing_writes(max_tries)
    assert (failing.record_id, failing.attempts) == (bad, max_tries)
    assert "UNABLE_TO_LOCK_ROW" in (failing.last_error or "")

    e2e.cycle(clock=lambda: t0 + timedelta(minutes=10 * i))  # the lock is gone
    assert e2e.sf.get("Lead", bad)["Lifecycle_Stage__c"] == "MQL"
    with e2e.rt.store.tx() as tx:
        assert tx.failing_writes(1) == []
    assert json.loads(e2e.syncd("status", "--json").stdout)["quarantine"] == []
    assert len(audited(e2e, record_id=bad, system="salesforce")) == 1  # applied exactly once
    assert_quiet(e2e)
