"""The store's side of reconciliation on both backends: id pages, quarantined ids, open writes per
object, known gaps, and failing the run whose check found one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from syncd.store import OutboxItem, RecordRow, Store

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def test_record_ids_come_in_pages_in_id_order(store: Store) -> None:
    with store.tx() as tx:
        tx.upsert_records([RecordRow("hubspot", "contacts", f"{i:03d}", "person", T0, {"a": "1"}, {"values": {}})
                           for i in range(23)])
        tx.upsert_records([RecordRow("salesforce", "Lead", "00Q1", "person", T0, {"a": "1"}, {"values": {}})])
    with store.tx(readonly=True) as tx:
        pages = list(tx.iter_record_ids("hubspot", "contacts", batch=10))
    assert [len(p) for p in pages] == [10, 10, 3]
    assert [i for p in pages for i in p] == [f"{i:03d}" for i in range(23)]


def test_quarantined_ids_and_open_writes_per_object(store: Store) -> None:
    with store.tx() as tx:
        q = tx.quarantine_record("hubspot", "contacts", "7", "bad")
        tx.quarantine_record("hubspot", "contacts", "8", "bad")
        tx.quarantine_record("hubspot", "deals", "9", "bad")
        tx.resolve_quarantine([q])
        tx.enqueue([OutboxItem(key=f"k{i}", system="salesforce", object=obj, op="update", fields={"x": 1},
                               rule="R1", reason="r", mapping_rev="m", record_id=str(i))
                    for i, obj in enumerate(["Lead", "Lead", "Contact"])])
    with store.tx(readonly=True) as tx:
        assert tx.quarantined_record_ids("hubspot", "contacts") == {"8"}
        assert tx.open_writes_by_object() == {("salesforce", "Lead"): 2, ("salesforce", "Contact"): 1}


def test_gaps_round_trip_and_clear(store: Store) -> None:
    gap = {"missing": 3, "sample_missing": ["1", "2", "3"], "at": T0.isoformat()}
    with store.tx() as tx:
        tx.set_gap("hubspot", "contacts", gap)
        tx.set_gap("salesforce", "Lead", {"missing": 1})
        tx.set_gap("hubspot", "contacts", {**gap, "missing": 4})  # replaced, not duplicated
    with store.tx(readonly=True) as tx:
        assert tx.gaps() == {("hubspot", "contacts"): {**gap, "missing": 4}, ("salesforce", "Lead"): {"missing": 1}}
    with store.tx() as tx:
        tx.set_gap("salesforce", "Lead", None)
    with store.tx(readonly=True) as tx:
        assert set(tx.gaps()) == {("hubspot", "contacts")}


def test_fail_latest_run_marks_only_the_newest_ok_run_of_that_owner(store: Store) -> None:
    with store.tx() as tx:
        first = tx.start_run("cycle:contacts", now=T0, owner="me")
        tx.finish_run(first, "ok", {}, now=T0)
        second = tx.start_run("cycle:contacts", now=T0 + timedelta(minutes=1), owner="me")
        tx.finish_run(second, "ok", {}, now=T0 + timedelta(minutes=1))
        other = tx.start_run("cycle:contacts", now=T0 + timedelta(minutes=2), owner="someone else")
        tx.finish_run(other, "ok", {}, now=T0 + timedelta(minutes=2))
        assert tx.fail_latest_run("cycle:contacts", "me", "reconcile: a gap")
        assert not tx.fail_latest_run("cycle:deals", "me", "reconcile: a gap")
    with store.tx(readonly=True) as tx:
        runs = {r.run_id: r for r in tx.last_runs()}
    assert (runs[second].status, runs[second].error) == ("failed", "reconcile: a gap")
    assert runs[first].status == runs[other].status == "ok"
