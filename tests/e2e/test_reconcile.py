"""Reconciliation against the sandbox (real clients over HTTPS): a gap planted by deleting rows
from the store is found by the id diff and by the count check, and the repair fetches exactly
those ids (as the sandbox's request log shows)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from _docs_json import documented
from test_deletions import converge, engine, entity_of, person, rules_of, stored, tombstones

from syncd import reconcile
from syncd.engine import CycleStats
from syncd.metrics import ServiceMetrics
from syncd.model import utcnow
from syncd.report import status_data
from syncd.resync import make_engine
from syncd.sandbox._server import Request
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store.rows import RecordKey

if TYPE_CHECKING:
    from conftest import E2E


@pytest.fixture
def state_url(store_url: str) -> str:
    """The e2e store on each backend (tests/conftest.py's ``store_url``), not only SQLite."""
    return store_url


def _seeded(e2e: E2E) -> None:
    seed(e2e.hs, e2e.sf, SeedSpec(seed=7, people=80, deals=16))
    e2e.converge()


def _plant_gap(e2e: E2E, n_hubspot: int = 3, n_salesforce: int = 2) -> dict[tuple[str, str], set[str]]:
    """Delete some HubSpot contacts and Salesforce Leads from the store (not from the CRMs), of
    those not modified lately (a cycle's overlap re-read would bring back the others by itself)."""
    planted: dict[tuple[str, str], set[str]] = {}
    day_ago = utcnow() - timedelta(days=1)
    with e2e.rt.store.tx() as tx:
        for system, obj, n in (("hubspot", "contacts", n_hubspot), ("salesforce", "Lead", n_salesforce)):
            ids = sorted(r.id for r in tx.iter_records(system, obj) if r.modified_at < day_ago)[5:5 + n]
            planted[(system, obj)] = set(ids)
            keys: list[RecordKey] = [(system, obj, i) for i in ids]
            tx.forget_records(keys)
    return planted


def _fetched_ids(log: list[tuple[str, Request]]) -> dict[str, set[str]]:
    """Record ids asked for by fetch-type reads in a sandbox request log: HubSpot batch reads of
    the pulled properties, Salesforce ``WHERE Id IN (...)`` queries."""
    out: dict[str, set[str]] = {}
    for endpoint, req in log:
        if endpoint.endswith(".batch_read"):
            body = req.json()
            if body.get("properties") != ["lifecyclestage"]:  # not a write's read-back
                out.setdefault(endpoint, set()).update(str(i["id"]) for i in body["inputs"])
        elif endpoint == "query":
            q = req.q("q") or ""
            if " WHERE Id IN (" in q:
                ids = q.split(" IN (", 1)[1].rstrip(")").split(", ")
                out.setdefault("query " + q.split(" FROM ", 1)[1].split()[0], set()).update(
                    i.strip("'") for i in ids)
    return out


def _other_reads(log: list[tuple[str, Request]]) -> list[str]:
    """Reads that pull records other than by id: searches, and queries without an Id list."""
    out = [e for e, _ in log if e.endswith(".search")]
    out += [req.q("q") or "" for e, req in log if e == "query" and " WHERE Id IN (" not in (req.q("q") or "")]
    return out


def test_reconcile_finds_a_planted_gap_and_repair_fetches_only_those_ids(e2e: E2E) -> None:
    _seeded(e2e)
    planted = _plant_gap(e2e)

    diffs = reconcile.run(e2e.rt, group=None)

    missing = {(d.system, d.object): set(d.missing) for d in diffs if d.missing}
    assert missing == planted
    assert all(not d.extra for d in diffs)
    with e2e.rt.store.tx() as tx:
        gaps = tx.gaps()
    assert set(gaps) == set(planted)
    assert set(gaps[("hubspot", "contacts")]["sample_missing"]) == planted[("hubspot", "contacts")]

    hs_log = e2e.sb.hubspot_server.log_requests()
    sf_log = e2e.sb.salesforce_server.log_requests()
    result = reconcile.repair(e2e.rt, diffs)

    assert result["fetched"] == sum(len(v) for v in planted.values())
    assert _fetched_ids(hs_log) == {"contacts.batch_read": planted[("hubspot", "contacts")]}
    assert _fetched_ids(sf_log) == {"query Lead": planted[("salesforce", "Lead")]}
    assert _other_reads(hs_log) + _other_reads(sf_log) == []
    with e2e.rt.store.tx() as tx:
        assert tx.gaps() == {}
        for (system, obj), ids in planted.items():
            assert set(tx.get_records([(system, obj, i) for i in ids])) == {(system, obj, i) for i in ids}
    assert all(not d.missing for d in reconcile.run(e2e.rt, group=None))


def test_count_check_flags_a_gap_fails_the_cycle_and_shows_in_status_and_metrics(e2e: E2E) -> None:
    _seeded(e2e)
    engine = make_engine(e2e.rt, owner="test-owner")
    stats = engine.cycle("contacts")
    assert not stats.partial
    check = reconcile.CountCheck(ServiceMetrics({"contacts": 30, "deals": 60}))
    assert check.after_cycle(e2e.rt, "contacts", engine, stats) is None  # no gap: nothing said
    planted = _plant_gap(e2e, n_hubspot=2, n_salesforce=0)
    check.last.clear()  # due again (count_every_s)

    reason = check.after_cycle(e2e.rt, "contacts", engine, stats)

    assert reason is not None and "hubspot contacts: 2 records missing from the store" in reason
    for rid in planted[("hubspot", "contacts")]:
        assert rid in reason  # sample ids
    metric = check.metrics.registry.get_sample_value(
        "syncd_reconcile_missing_records", {"system": "hubspot", "object": "contacts"})
    assert metric == 2
    data = status_data(e2e.rt.store, engine.clock())
    assert data["runs"][0]["job"] == "cycle:contacts" and data["runs"][0]["status"] == "failed"
    assert any("2 records missing" in line for line in data["reconcile"]["lines"])
    json.dumps(data, default=str)  # status --json still serialises


def test_reconcile_cli_exits_1_on_a_gap_and_reports_json(e2e: E2E) -> None:
    _seeded(e2e)
    planted = _plant_gap(e2e, n_hubspot=1, n_salesforce=1)

    r = e2e.syncd("reconcile", "--object", "contacts", "--json")

    assert r.returncode == 1, r.stderr
    assert "2 records missing from the store" in r.stderr and "--repair" in r.stderr
    out: dict[str, Any] = documented("reconcile", r.stdout)
    got = {(o["system"], o["object"]): set(o["missing_ids"]) for o in out["objects"] if o["missing"]}
    assert got == planted
    r = e2e.syncd("reconcile", "--object", "contacts", "--repair")
    assert r.returncode == 0, r.stderr
    assert "repaired: fetched 2 missing records" in r.stdout
    assert e2e.syncd("reconcile").returncode == 0


# -- extras: in the store, no longer in the CRM ----------------------------------------------------


def _writes_to(e2e: E2E, ids: set[str], since: tuple[int, int] = (0, 0)) -> list[dict[str, Any]]:
    """Write-log entries of both simulators that name one of ``ids`` (from ``since``: the logs'
    lengths, HubSpot's and Salesforce's, at some earlier point)."""
    logs = [*e2e.hs.write_log[since[0]:], *e2e.sf.write_log[since[1]:]]
    return [w for w in logs if ids & {str(v) for v in w.values()}]


def test_repair_settles_extras_the_deletion_feeds_missed(e2e: E2E) -> None:
    """Three deaths no feed tells syncd of: a Lead deleted beyond the recycle-bin window the
    feed reads (with a write to it pending), a HubSpot contact purged for good (GDPR delete),
    and a merge whose survivor the pull never saw move. ``reconcile`` reports them as extra;
    ``--repair`` confirms each by id and settles it the feeds' way, writing nothing to them."""
    hid, lid = person(e2e, "ella.extra@example.com", hs_stage="lead", score=10)
    pid, _ = person(e2e, "pete.purged@example.com", hs_stage="lead", sf=None)
    a, _ = person(e2e, "mia.a@example.com", hs_stage="lead", score=10, sf=None)
    b, y = person(e2e, "mia.b@example.com", hs_stage="lead", score=10)
    assert hid and lid and pid and a and b and y
    converge(e2e)
    e2e.sf.modify("Lead", lid, {"Status": "Working - Contacted"})
    e2e.hs.modify("contacts", hid, {"hubspotscore": "80"})  # an MQL: the hand-off to the Lead is planned
    e2e.decide_only()
    with e2e.rt.store.tx() as tx:
        (pending,) = tx.open_writes_to([("salesforce", "Lead", lid)])
    long_ago = utcnow() - timedelta(days=40)
    e2e.sf.delete("Lead", lid, at=long_ago)  # older than the 30 days the deletion feed reads
    e2e.hs.purge("contacts", pid)  # not in the recycle bin: the archive list never shows it
    e2e.hs.merge("contacts", a, b, at=utcnow() - timedelta(days=2))  # dated before the pull's cursor
    eng = engine(e2e)
    st = CycleStats()
    for system, obj in (("salesforce", "Lead"), ("hubspot", "contacts")):
        eng.pull(system, obj, st)
        eng.pull_deletions(system, obj, st)
    assert st.dead == 0 and tombstones(e2e) == {}  # the feeds and the pull missed all three

    diffs = reconcile.run(e2e.rt, group="contacts")
    assert {(d.system, d.object): set(d.extra) for d in diffs if d.extra} == {
        ("salesforce", "Lead"): {lid}, ("hubspot", "contacts"): {pid, b}}
    assert all(not d.missing for d in diffs)
    hs_log, sf_log = e2e.sb.hubspot_server.log_requests(), e2e.sb.salesforce_server.log_requests()
    logged = (len(e2e.hs.write_log), len(e2e.sf.write_log))
    result = reconcile.repair(e2e.rt, diffs)

    assert result["extras"] == {"alive": 0, "deleted": 2, "merged": 1, "already": 0, "tombstoned_ids": {
        "hubspot contacts": sorted([pid, b]), "salesforce Lead": [lid]}}
    tomb = tombstones(e2e)
    assert (tomb[lid].kind, tomb[lid].source) == ("deleted", "reconcile")
    assert (tomb[pid].kind, tomb[pid].source) == ("deleted", "reconcile (not found)")
    assert (tomb[b].kind, tomb[b].merged_into, tomb[b].source) == ("merged", a, "reconcile")
    assert rules_of(e2e, lid) == [("D1-deleted", "live", "deleted")]
    assert rules_of(e2e, pid) == [("D1-deleted", "live", "deleted")]
    assert rules_of(e2e, b) == [("D2-merged", "live", f"merged into {a}")]
    for key in (("salesforce", "Lead", lid), ("hubspot", "contacts", pid), ("hubspot", "contacts", b)):
        assert not stored(e2e, *key)
    with e2e.rt.store.tx() as tx:  # the pending hand-off to the dead Lead was never sent
        row = tx.get_outbox([pending.id]).get(pending.id)
        assert row is not None and row.state == "superseded" and "was deleted" in (row.last_error or "")
        assert tx.open_link_conflicts() == []
    assert _writes_to(e2e, {lid, pid, b}, logged) == []
    # the settling read the extras by id only (their survivor's read answers for ``b``)
    assert _fetched_ids(hs_log).get("contacts.batch_read", set()) <= {pid, b, a}
    assert _fetched_ids(sf_log).get("query Lead", set()) <= {lid}
    # one live read of the two extras (it answers ``b`` with its survivor), one recycle-bin read of
    # the one left; the live read is not made again to look for merges
    reads = [((req.q("archived") or "false").lower(), sorted(str(i["id"]) for i in req.json()["inputs"]))
             for endpoint, req in hs_log if endpoint == "contacts.batch_read"]
    assert reads[:2] == [("false", sorted([pid, b])), ("true", [pid])], reads
    # the survivor took Mia's Lead over
    assert entity_of(e2e, "hubspot", "contacts", a) == entity_of(e2e, "salesforce", "Lead", y)

    seen = {i: e2e.hs.id_requests[i] for i in (pid, b)} | {lid: e2e.sf.id_requests[lid]}
    converge(e2e)
    assert {i: e2e.hs.id_requests[i] for i in (pid, b)} | {lid: e2e.sf.id_requests[lid]} == seen
    assert _writes_to(e2e, {lid, pid, b}, logged) == []
    assert all(not d.extra and not d.missing for d in reconcile.run(e2e.rt, group="contacts"))


def test_an_extra_a_fetch_finds_alive_is_only_re_pulled(e2e: E2E) -> None:
    hid, lid = person(e2e, "al.alive@example.com", hs_stage="lead", score=10)
    assert hid and lid
    converge(e2e)
    writes = e2e.writes()
    stats = CycleStats()

    got = reconcile.settle_extras(engine(e2e), [reconcile.ObjectDiff("hubspot", "contacts", extra=[hid]),
                                                reconcile.ObjectDiff("salesforce", "Lead", extra=[lid])], stats)

    assert (got.alive, got.deleted, got.merged) == (2, 0, 0)
    assert tombstones(e2e) == {} and stats.dead == 0
    assert stored(e2e, "hubspot", "contacts", hid) and stored(e2e, "salesforce", "Lead", lid)
    assert entity_of(e2e, "hubspot", "contacts", hid) == entity_of(e2e, "salesforce", "Lead", lid)
    assert e2e.writes() == writes


def test_reconcile_cli_repair_settles_a_purged_contact(e2e: E2E) -> None:
    hid, _ = person(e2e, "gus.gone@example.com", hs_stage="lead", sf=None)
    assert hid
    converge(e2e)
    e2e.hs.purge("contacts", hid)

    r = e2e.syncd("reconcile", "--object", "contacts", "--json")
    assert r.returncode == 1, r.stderr  # drift a cron job must notice; --repair settles it
    assert r.stderr.strip().splitlines()[-1] == (
        "syncd: error: reconcile: 1 records in the store no longer in the CRM (hubspot contacts 1); `syncd reconcile "
        "--repair` fetches the missing ones and confirms each extra by id, settling the dead ones"), r.stderr
    out: dict[str, Any] = documented("reconcile", r.stdout)
    assert [(o["system"], o["extra_ids"]) for o in out["objects"] if o["extra"]] == [("hubspot", [hid])]

    r = e2e.syncd("reconcile", "--object", "contacts", "--repair", "--json")
    assert r.returncode == 0, r.stderr
    out = documented("reconcile", r.stdout)
    assert out["repaired"]["extras"]["deleted"] == 1
    assert out["repaired"]["extras"]["tombstoned_ids"] == {"hubspot contacts": [hid]}
    assert (tombstones(e2e)[hid].source) == "reconcile (not found)"
    r = e2e.syncd("reconcile", "--object", "contacts")
    assert r.returncode == 0 and "no longer in the CRM" not in r.stderr


def test_the_count_checks_id_diff_settles_the_extras_it_finds(e2e: E2E) -> None:
    """The service's count check: a counted gap is diffed by id; an extra that diff finds (a
    contact purged in HubSpot, no feed says so) is confirmed by id and tombstoned at once, under
    the cycle leases; the missing ones stay reported for ``--repair``."""
    _seeded(e2e)
    engine_ = make_engine(e2e.rt, owner="test-owner")
    stats = engine_.cycle("contacts")
    with e2e.rt.store.tx() as tx:
        gone = sorted(r.id for r in tx.iter_records("hubspot", "contacts"))[-1]
    e2e.hs.purge("contacts", gone)
    planted = _plant_gap(e2e, n_hubspot=2, n_salesforce=0)
    check = reconcile.CountCheck(ServiceMetrics({"contacts": 30, "deals": 60}))
    seen = e2e.hs.id_requests[gone]

    reason = check.after_cycle(e2e.rt, "contacts", engine_, stats)

    assert reason is not None and "hubspot contacts: 2 records missing from the store" in reason
    with e2e.rt.store.tx() as tx:
        (tomb,) = tx.list_tombstones()
        assert set(tx.gaps()[("hubspot", "contacts")]["sample_missing"]) == planted[("hubspot", "contacts")]
    assert (tomb.record_id, tomb.kind, tomb.source) == (gone, "deleted", "reconcile (not found)")
    assert e2e.hs.id_requests[gone] > seen  # asked about by id once, to confirm
    seen = e2e.hs.id_requests[gone]
    e2e.converge()
    assert e2e.hs.id_requests[gone] == seen
