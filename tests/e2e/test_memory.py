"""Memory that forgets nothing: second breaches and returns are recorded, link conflicts resolve
themselves when the CRM data no longer conflicts, runs left by a crash are marked interrupted.

Real cycles (Engine.cycle through open_runtime) against the sandbox CRMs with the real clients;
time moves with a fixed clock handed to the engine, never by sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from syncd.store import schema

if TYPE_CHECKING:
    from conftest import E2E


def at(t: datetime) -> Callable[[], datetime]:
    return lambda: t


def events(e2e: E2E, kind: str, entity: str) -> list[Any]:
    """Every event of ``kind`` for ``entity``, open or closed, oldest first."""
    t = schema.sla_events
    with e2e.rt.store.tx() as tx:
        return list(tx.conn.execute(sa.select(t).where(t.c.kind == kind, t.c.entity_id == entity)
                                    .order_by(t.c.id)).mappings())


def entity_of(e2e: E2E, system: str, obj: str, rid: str) -> str:
    with e2e.rt.store.tx() as tx:
        e = tx.entity_ids([(system, obj, rid)])[(system, obj, rid)]
    assert e is not None
    return e


def leads_with_email(e2e: E2E, email: str) -> list[dict[str, Any]]:
    return [r for r in e2e.sf.all("Lead") if (r.get("Email") or "").strip().lower() == email]


def test_a_second_breach_and_a_second_return_are_both_recorded(e2e: E2E) -> None:
    email = "rita.twice@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Rita", "lastname": "Twice",
                                  "lifecyclestage": "lead", "hubspotscore": "75"})
    t0 = datetime.now(UTC) + timedelta(minutes=1)  # ahead of the wall clock the outbox stamps rows with
    e2e.converge(clock=at(t0))  # MQL: handed to sales (a Lead is created)
    [lead] = leads_with_email(e2e, email)
    entity = entity_of(e2e, "hubspot", "contacts", hid)

    t1 = t0 + timedelta(hours=25)  # no connection attempt within the 24 h window
    e2e.converge(clock=at(t1))
    assert len(events(e2e, "sla_breach", entity)) == 1

    # Sales returns it; marketing nurtures it until the score rises clearly (new evidence).
    e2e.sf.modify("Lead", lead["Id"], {"Status": "Returned - Not Ready", "Return_Reason__c": "no budget"})
    e2e.converge(clock=at(t1 + timedelta(minutes=5)))
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "lead"
    e2e.hs.modify("contacts", hid, {"hubspotscore": "95"})
    t2 = t1 + timedelta(hours=1)
    e2e.converge(clock=at(t2))  # handed to sales again
    assert e2e.sf.get("Lead", lead["Id"])["Lifecycle_Stage__c"] == "MQL"

    t3 = t2 + timedelta(hours=25)  # and again nobody calls
    e2e.converge(clock=at(t3))
    breaches = events(e2e, "sla_breach", entity)
    assert len(breaches) == 2, breaches
    assert [b["open"] for b in breaches] == [False, True]  # the current one is open, the first is history

    e2e.sf.modify("Lead", lead["Id"], {"Status": "Returned - Not Ready", "Return_Reason__c": "still no budget"})
    e2e.converge(clock=at(t3 + timedelta(minutes=5)))
    returns = events(e2e, "returned", entity)
    assert len(returns) == 2, returns
    assert [json.loads(json.dumps(r["details"]))["return_reason"] for r in returns] == ["no budget", "still no budget"]


def test_a_link_conflict_resolves_itself_once_the_duplicate_lead_is_gone_and_the_handoff_follows(
        e2e: E2E) -> None:
    email = "dup.gone@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Dup", "lastname": "Gone",
                                  "lifecyclestage": "lead", "hubspotscore": "20"})
    fields = {"LastName": "Gone", "Company": "Dups", "Status": "Open - Not Contacted", "Email": email}
    keep = e2e.sf.insert("Lead", fields)
    dup = e2e.sf.insert("Lead", {**fields, "Email": email.upper()})
    e2e.converge()
    with e2e.rt.store.tx() as tx:
        assert [c.email_norm for c in tx.open_link_conflicts()] == [email]
    e2e.hs.modify("contacts", hid, {"hubspotscore": "80"})  # MQL now, but who is the Lead?
    e2e.converge()
    assert e2e.sf.get("Lead", keep).get("Lifecycle_Stage__c") != "MQL"  # held: never a guess

    e2e.sf.delete("Lead", dup)  # sales merged the duplicate away
    e2e.converge()  # the deletion feed tells the next cycle (issue 16): no hourly look-up needed
    with e2e.rt.store.tx() as tx:
        assert tx.open_link_conflicts() == []
        assert tx.get_records([("salesforce", "Lead", dup)]) == {}
    res = e2e.syncd("status", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["link_conflicts"] == 0
    # the hand-off happens on the one Lead left, and the person is one entity
    assert e2e.sf.get("Lead", keep)["Lifecycle_Stage__c"] == "MQL"
    assert entity_of(e2e, "hubspot", "contacts", hid) == entity_of(e2e, "salesforce", "Lead", keep)
    assert len(leads_with_email(e2e, email)) == 1


def test_a_link_conflict_resolves_itself_when_an_email_is_corrected(e2e: E2E) -> None:
    email = "typo.fixed@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Typo", "lastname": "Fixed",
                                  "lifecyclestage": "marketingqualifiedlead", "hubspotscore": "80"})
    fields = {"LastName": "Fixed", "Company": "Typos", "Status": "Open - Not Contacted", "Email": email}
    right = e2e.sf.insert("Lead", fields)
    wrong = e2e.sf.insert("Lead", {**fields, "LastName": "Other"})
    e2e.converge()
    with e2e.rt.store.tx() as tx:
        assert len(tx.open_link_conflicts()) == 1
    e2e.sf.modify("Lead", wrong, {"Email": "someone.else@example.com"})  # the rep fixes the typo
    e2e.converge()
    with e2e.rt.store.tx() as tx:
        assert tx.open_link_conflicts() == []
    assert entity_of(e2e, "hubspot", "contacts", hid) == entity_of(e2e, "salesforce", "Lead", right)
    assert entity_of(e2e, "salesforce", "Lead", wrong) != entity_of(e2e, "salesforce", "Lead", right)
    assert e2e.sf.get("Lead", right)["Lifecycle_Stage__c"] == "MQL"


def test_runs_left_running_by_a_crash_are_marked_interrupted_on_the_next_start(e2e: E2E) -> None:
    with e2e.rt.store.tx() as tx:
        dead = tx.start_run("cycle:contacts", owner="old-host:123:deadbeef")
    out = e2e.syncd("sync", "--once")
    assert out.returncode == 0, out.stderr
    with e2e.rt.store.tx() as tx:
        runs = {r.run_id: r for r in tx.last_runs(limit=50)}
    assert runs[dead].status == "interrupted"
    assert "stopped before the run finished" in (runs[dead].error or "")
    assert [r.status for r in runs.values() if r.run_id != dead] == ["ok"]
