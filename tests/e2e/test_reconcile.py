"""Reconciliation against the sandbox (real clients over HTTPS): a gap planted by deleting rows
from the store is found by the id diff and by the count check, and the repair fetches exactly
those ids (as the sandbox's request log shows)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from _docs_json import documented

from syncd import reconcile
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
