"""Write faults the outbox must ride out (issue 14): a transient outage of the CRM's write side
never loses a write (retried until it lands, alerted on, never quarantined), while a permanent
per-record refusal is quarantined on its first attempt and its person decided again.

The real clients against the sandbox over HTTPS; the outage is the sandbox answering 503 to
every HubSpot batch update until the test lifts it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from syncd.config import load_config
from syncd.engine import CycleStats
from syncd.model import utcnow
from syncd.resync import make_engine
from syncd.runtime import Runtime, open_runtime

if TYPE_CHECKING:
    from conftest import E2E

OUTAGE_S = 20.0  # "two minutes", scaled down with the retry caps below
FAST_RETRIES = """
[sync]
retry_max_attempts = 2
retry_cap_s = 0.2
write_retry_base_s = 0.2
write_retry_cap_s = 1.0
"""


@pytest.fixture
def fast(e2e: E2E) -> Iterator[Runtime]:
    """A runtime on the same sandbox and store whose retry caps are seconds, not minutes."""
    path = e2e.tmp / "fast-retries.toml"
    path.write_text(e2e.config.read_text() + FAST_RETRIES)
    rt = open_runtime(load_config(path))
    try:
        yield rt
    finally:
        rt.close()


def _people(e2e: E2E, n: int) -> dict[str, str]:
    """n people over the score threshold, at ``lead`` in HubSpot: each needs a HubSpot update."""
    out = {}
    for i in range(n):
        email = f"out.age{i}@example.com"
        out[email] = e2e.hs.add("contacts", {"email": email, "firstname": "Out", "lastname": f"Age{i}",
                                             "lifecyclestage": "lead", "hubspotscore": "70"})
        e2e.sf.insert("Lead", {"Email": email, "FirstName": "Out", "LastName": f"Age{i}", "Company": "O",
                               "Status": "Open - Not Contacted", "Lifecycle_Stage__c": "Lead"})
    return out


def _failing(rt: Runtime) -> int:
    with rt.store.tx() as tx:
        return tx.count_failing_writes(rt.sla.writeback.max_tries)


@pytest.mark.slow
def test_a_write_only_outage_loses_nothing_and_every_write_lands_after_it(e2e: E2E, fast: Runtime) -> None:
    ids = _people(e2e, 12)
    e2e.sb.hubspot_server.inject("server_error", count=1_000_000, endpoint="contacts.batch_update", status=503)
    started = time.monotonic()
    while time.monotonic() - started < OUTAGE_S or _failing(fast) == 0:
        make_engine(fast).cycle()
        time.sleep(0.2)
    # The outage: every HubSpot write failed at least max_tries sends, none is quarantined,
    # and they are reported as failing (status and the metric read this).
    with fast.store.tx() as tx:
        assert tx.open_quarantine() == []
        failing = tx.failing_writes(fast.sla.writeback.max_tries, system="hubspot")
    assert {r.record_id for r in failing} == set(ids.values())
    assert all("503" in (r.last_error or "") for r in failing)
    assert all(e2e.hs.get("contacts", h)["lifecyclestage"] == "lead" for h in ids.values())
    status = json.loads(e2e.syncd("status", "--json").stdout)
    assert status["quarantine"] == []

    e2e.sb.hubspot_server.faults.clear()  # the CRM is back
    deadline = time.monotonic() + 60
    while e2e.outbox_depth() and time.monotonic() < deadline:
        make_engine(fast).cycle()
        time.sleep(0.2)
    assert e2e.outbox_depth() == 0
    assert {e2e.hs.get("contacts", h)["lifecyclestage"] for h in ids.values()} == {"marketingqualifiedlead"}
    assert _failing(fast) == 0
    with fast.store.tx() as tx:
        assert tx.open_quarantine() == []
        done = [a for a in tx.query_audit(system="hubspot") if a.field == "lifecycle"]
    assert sorted(a.record_id for a in done) == sorted(ids.values())  # each landed once


def test_a_permanent_per_record_error_is_quarantined_on_its_first_attempt(e2e: E2E) -> None:
    (email, hid), *_ = _people(e2e, 2).items()
    e2e.decide_only()  # the writes are in the outbox, nothing sent
    lead = next(r for r in e2e.sf.all("Lead") if r["Email"] == email)
    e2e.sf.delete("Lead", lead["Id"])  # gone before the write reaches it
    stats = CycleStats()
    e2e.engine().flush(stats)
    with e2e.rt.store.tx() as tx:
        (q,) = tx.open_quarantine()
        key = ("salesforce", "Lead", lead["Id"])
        # read again at once: the Lead is found deleted (issue 16), a tombstone of its person
        entity = tx.entity_ids([key]).get(key) or tx.tombstones([key])[key].entity_id
        due = tx.due_entities(utcnow())
    assert (q.system, q.record_id, q.kind, q.attempts) == ("salesforce", lead["Id"], "write", 1)
    assert "NOT_FOUND" in q.reason or "ENTITY_IS_DELETED" in q.reason
    assert entity in due  # decided again on what is true now
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"  # the rest went on
    assert stats.failed == 1
