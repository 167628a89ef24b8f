"""Creates and the find-by-email look-up: only a create that may already have reached the CRM
(a resend) is looked up first; a first send creates directly.

The look-up is what keeps "exactly once" across a crash between the CRM accepting a create and
the outbox commit marking it done; it costs one read per create batch, so first sends skip it.
Counts are the simulators' own request counts around ``Engine.flush``.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncd.config import load_config
from syncd.engine import CycleStats, Engine
from syncd.mapping import default_mappings_dir
from syncd.model import RecordCreate
from syncd.runtime import open_runtime

EMAIL = "rey.resend@example.com"


def _handoff_to_salesforce(e2e: Any) -> None:
    """A HubSpot contact over the MQL threshold, unknown to Salesforce: a Lead create."""
    e2e.hs.add("contacts", {"email": EMAIL, "firstname": "Rey", "lastname": "Resend",
                            "lifecyclestage": "lead", "hubspotscore": "80"})


def _handoff_to_hubspot(e2e: Any) -> None:
    """A returned Salesforce Lead with no HubSpot contact: a HubSpot contact create."""
    e2e.sf.insert("Lead", {"Email": EMAIL, "FirstName": "Rey", "LastName": "Resend",
                           "Company": "R", "Status": "Returned - Not Ready", "Lead_Score__c": 60,
                           "Return_Reason__c": "no budget", "Lifecycle_Stage__c": "MQL"})


SCENARIOS = {
    # system the create goes to: (how to provoke it, object, email field, look-up endpoint)
    "salesforce": (_handoff_to_salesforce, "Lead", "Email", "query"),
    "hubspot": (_handoff_to_hubspot, "contacts", "email", "contacts.search"),
}
CREATE_ENDPOINT = {"salesforce": "collections.create", "hubspot": "contacts.batch_create"}


def _created(e2e: Any, system: str) -> list[dict[str, Any]]:
    _, obj, field, _ = SCENARIOS[system]
    app = e2e.sf if system == "salesforce" else e2e.hs
    return [r for r in app.all(obj) if str(r.get(field) or "").lower() == EMAIL]


def _flush(e2e: Any, engine: Engine | None = None) -> Counter[str]:
    """One write-back pass; the requests it made per system.endpoint."""
    for srv in (e2e.sb.hubspot_server, e2e.sb.salesforce_server):
        srv.reset_counts()
    (engine or e2e.engine()).flush(CycleStats())
    return Counter(e2e.sb.request_counts())


@pytest.mark.parametrize("system", sorted(SCENARIOS))
def test_first_send_of_a_create_makes_no_lookup(e2e: Any, system: str) -> None:
    provoke, obj, _, lookup = SCENARIOS[system]
    provoke(e2e)
    e2e.decide_only()
    assert _created(e2e, system) == []
    calls = _flush(e2e)
    assert len(_created(e2e, system)) == 1
    assert calls[f"{system}.{lookup}"] == 0, calls  # no find-by-email before a first send
    assert e2e.outbox_depth() == 0


@pytest.mark.parametrize("system", sorted(SCENARIOS))
def test_create_resent_after_a_crash_between_sending_and_done_is_not_duplicated(
    e2e: Any, system: str
) -> None:
    provoke, obj, _, lookup = SCENARIOS[system]
    provoke(e2e)
    e2e.decide_only()
    # What a kill -9 right after the CRM's answer leaves: the row marked sending (committed),
    # the record created in the CRM, the row never marked done.
    conn = e2e.rt.connectors[system]
    with e2e.rt.store.tx() as tx:
        due = [r for r in tx.due(system, obj, datetime.now(UTC), 100) if r.op == "create"]
        tx.mark_sending([r.id for r in due])
    assert len(due) == 1
    (first,) = conn.create(obj, [RecordCreate(key=str(due[0].id), fields=due[0].fields)])
    assert first.ok and len(_created(e2e, system)) == 1

    calls = _flush(e2e)  # the restart
    assert calls[f"{system}.{lookup}"] == 1, calls  # the resend is looked up ...
    assert len(_created(e2e, system)) == 1  # ... and found: not created twice
    with e2e.rt.store.tx() as tx:
        row = tx.get_outbox([due[0].id])[due[0].id]
    assert (row.state, row.result_id) == ("done", first.record_id)
    audited = Counter((a.outbox_id, a.field) for a in e2e.audit())
    assert audited and all(n == 1 for n in audited.values())
    assert {o for o, _ in audited} >= {row.id}


@pytest.mark.parametrize("system", sorted(SCENARIOS))
def test_create_whose_answer_timed_out_after_the_crm_took_it_is_not_duplicated(
    e2e: Any, system: str
) -> None:
    provoke, obj, _, lookup = SCENARIOS[system]
    provoke(e2e)
    e2e.decide_only()
    # The same config with a 0.5 s client timeout; the CRM answers the create after 1.5 s,
    # having applied it: the answer is lost, the record is there.
    # Mappings without [Lead] external_id: the weaker fallback of an org that cannot add the
    # field (with it, a Salesforce create is an upsert, retried at once; test_chaos.py has that).
    mdir = e2e.tmp / "mappings-no-external-id"
    shutil.copytree(default_mappings_dir(), mdir)
    sf_toml = mdir / "salesforce.toml"
    sf_toml.write_text(sf_toml.read_text().replace('external_id = "Syncd_Key__c"', ""))
    short = e2e.tmp / "short-timeout.toml"
    short.write_text(e2e.config.read_text().replace("timeout_s = 10", "timeout_s = 0.5")
                     + f'\n[mappings]\ndir = "{mdir}"\n')
    rt = open_runtime(load_config(short))
    try:
        server = e2e.sb.salesforce_server if system == "salesforce" else e2e.sb.hubspot_server
        server.inject("delay", endpoint=CREATE_ENDPOINT[system], delay=1.5)
        calls = _flush(e2e, rt.engine())
        assert calls[f"{system}.{CREATE_ENDPOINT[system]}"] == 1, calls  # not retried blindly
    finally:
        rt.close()
    deadline = time.monotonic() + 5
    while not _created(e2e, system) and time.monotonic() < deadline:
        time.sleep(0.05)
    (made,) = _created(e2e, system)
    with e2e.rt.store.tx() as tx:
        (row,) = [r for r in tx.due(system, obj, datetime.now(UTC) + timedelta(hours=1), 100)
                  if r.op == "create"]
    assert (row.state, row.attempts, row.resend) == ("pending", 1, True)

    later = e2e.engine(clock=lambda: datetime.now(UTC) + timedelta(hours=1))  # retry is due
    calls = _flush(e2e, later)
    assert calls[f"{system}.{lookup}"] == 1 and calls[f"{system}.{CREATE_ENDPOINT[system]}"] == 0
    assert len(_created(e2e, system)) == 1
    with e2e.rt.store.tx() as tx:
        done = tx.get_outbox([row.id])[row.id]
    made_id = made.get("Id") or made.get("hs_object_id")
    assert (done.state, done.result_id) == ("done", made_id)
