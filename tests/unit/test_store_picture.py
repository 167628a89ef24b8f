"""The state store's half-picture and memory pieces, on every backend (SQLite and PostgreSQL):
pull state, run owners, per-entity open events, forgetting gone records, live lease owners.
And the freshness judgement (syncd.freshness) that reads the pull state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from syncd import freshness
from syncd.store import RecordRow, Store

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def test_pull_state_records_first_completion_success_and_failure(store: Store) -> None:
    with store.tx() as tx:
        tx.pull_failed("salesforce", "Lead", "AuthError: INVALID_SESSION_ID", T0)
        tx.pull_failed("salesforce", "Lead", "AuthError: INVALID_SESSION_ID", T0 + timedelta(seconds=30))
    with store.tx() as tx:
        st = tx.pull_states()[("salesforce", "Lead")]
    assert st.first_complete_at is None and st.last_ok_at is None
    assert st.failing_since == T0  # since the first failure, not the latest
    assert st.last_error_at == T0 + timedelta(seconds=30)

    with store.tx() as tx:
        tx.pull_succeeded("salesforce", "Lead", T0 + timedelta(minutes=1))
        tx.pull_succeeded("salesforce", "Lead", T0 + timedelta(minutes=2))
        tx.pull_failed("salesforce", "Lead", "RetriableError: 503", T0 + timedelta(minutes=3))
    with store.tx() as tx:
        st = tx.pull_states()[("salesforce", "Lead")]
    assert st.first_complete_at == T0 + timedelta(minutes=1)  # kept from the first success
    assert st.last_ok_at == T0 + timedelta(minutes=2)
    assert st.failing_since == T0 + timedelta(minutes=3) and st.last_error == "RetriableError: 503"


def test_picture_holds_decisions_until_first_pulls_and_within_the_bound(store: Store) -> None:
    bounds = freshness.bounds({"contacts": 30, "deals": 60}, 2)
    with store.tx() as tx:
        for system, obj in freshness.objects_read_by("person"):
            if (system, obj) != ("salesforce", "Lead"):
                tx.pull_succeeded(system, obj, T0)
        tx.pull_failed("salesforce", "Lead", "AuthError: bad session", T0)
        states = tx.pull_states()
    pic = freshness.Picture(states, bounds, T0)
    assert not pic.first_pulls_done()
    assert pic.blockers("person") == ["salesforce Lead: first full pull not finished: AuthError: bad session"]
    assert pic.ready("deal")  # deals read only the deal objects

    with store.tx() as tx:
        tx.pull_succeeded("salesforce", "Lead", T0)
        states = tx.pull_states()
    assert freshness.Picture(states, bounds, T0 + timedelta(seconds=60)).ready("person")  # at the bound
    late = freshness.Picture(states, bounds, T0 + timedelta(seconds=61))
    assert not late.ready("person") and late.ready("deal")  # contacts objects: 60 s, deals: 120 s
    assert "over the 60s freshness bound" in late.blockers("person")[0]
    assert set(late.by_system()) == {"hubspot", "salesforce"}


def test_runs_of_dead_owners_are_interrupted_live_ones_left_alone(store: Store) -> None:
    with store.tx() as tx:
        dead = tx.start_run("cycle:contacts", T0, owner="host:1:dead")
        live = tx.start_run("cycle:deals", T0, owner="host:2:live")
        legacy = tx.start_run("cycle:all", T0)  # written before runs had owners
        done = tx.start_run("cycle:all", T0, owner="host:1:dead")
        tx.finish_run(done, "partial", {}, "salesforce: AuthError", T0)
    with store.tx() as tx:
        assert tx.interrupt_running(now=T0, alive={"host:2:live"}) == 2
        runs = {r.run_id: r for r in tx.last_runs()}
    assert runs[dead].status == runs[legacy].status == "interrupted"
    assert runs[live].status == "running"
    assert runs[done].status == "partial" and runs[done].error == "salesforce: AuthError"


def test_open_events_per_entity_and_a_second_one_is_its_own_row(store: Store) -> None:
    with store.tx() as tx:
        a = tx.add_event("sla_breach", "e1", {"n": 1}, now=T0, dedupe=False)
        b = tx.add_event("sla_breach", "e1", {"n": 2}, now=T0, dedupe=False)
        tx.add_event("returned", "e2", {}, now=T0, open=False)
        tx.close_events([a])
    with store.tx() as tx:
        got = tx.open_events_of(["e1", "e2", "e3"])
    assert a != b
    assert {k: [e.id for e in v] for k, v in got.items()} == {"e1": [b]}


def test_forget_records_drops_the_record_and_its_references(store: Store) -> None:
    opp = RecordRow("salesforce", "Opportunity", "006A", "deal", T0, {"Name": "x"}, {"values": {}})
    lead = RecordRow("salesforce", "Lead", "00QA", "person", T0, {"Email": "a@b.c"}, {"values": {}}, "a@b.c")
    with store.tx() as tx:
        tx.upsert_records([opp, lead])
        tx.set_refs_many({opp.key: ["003X"]})
        tx.forget_records([opp.key])
    with store.tx() as tx:
        assert tx.get_records([opp.key, lead.key]).keys() == {lead.key}
        assert tx.referrers("salesforce", ["003X"]) == []


def test_live_lease_owners_and_pruned_heartbeats(store: Store) -> None:
    with store.tx() as tx:
        assert tx.acquire_lease("cycle:contacts", "a", 30, T0)
        assert tx.acquire_lease("cycle:deals", "b", 30, T0 - timedelta(minutes=5))  # lapsed
        tx.beat("old", {}, now=T0 - timedelta(hours=1), pid=1)
        tx.beat("new", {}, now=T0, pid=2)
        assert tx.lease_owners(T0) == {"a"}
        assert tx.prune_heartbeats(T0 - timedelta(minutes=1)) == 1
        assert [h.owner for h in tx.heartbeats()] == ["new"]


def test_sqlite_syncs_every_commit_by_default_and_normal_is_an_opt_in(tmp_path: Path) -> None:

    for mode, expected in (("full", 2), ("normal", 1)):  # PRAGMA synchronous: 2 = FULL, 1 = NORMAL
        kw = {} if mode == "full" else {"sqlite_synchronous": mode}
        store = Store.open(f"sqlite:///{tmp_path / (mode + '.db')}", **kw)
        try:
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
        finally:
            store.close()
    with pytest.raises(ValueError, match="synchronous must be one of full, normal"):
        Store.open(f"sqlite:///{tmp_path / 'x.db'}", sqlite_synchronous="off")
