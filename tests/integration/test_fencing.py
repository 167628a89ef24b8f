"""Fencing (issue 14): a process that stalled past its lease's TTL (SIGSTOP, a long GC, a VM
pause) and lost it to another sends nothing more when it resumes, and cannot mark writes done;
the new holder finishes them. Two daemons on one store (SQLite and PostgreSQL), the real
clients against the sandbox.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.engine import CycleStats
from syncd.model import OBJECT_GROUPS, utcnow
from syncd.resync import DECIDE_LEASE, LeaseKeeper, cycle_leases, fence_writes, make_engine
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox


@pytest.fixture
def rt(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Sandbox, Runtime]]:
    with Sandbox(tmp_path / "sandbox") as sb:
        for k, v in sb.env().items():
            monkeypatch.setenv(k, v)
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=store_url)
        runtime = open_runtime(load_config(cfg))
        try:
            yield sb, runtime
        finally:
            runtime.close()


def _decided(sb: Sandbox, rt: Runtime, n: int) -> None:
    for i in range(n):
        email = f"fen.ce{i}@example.com"
        sb.hubspot.add("contacts", {"email": email, "lifecyclestage": "lead", "hubspotscore": "70"})
        sb.salesforce.insert("Lead", {"Email": email, "LastName": f"Ce{i}", "Company": "F",
                                      "Status": "Open - Not Contacted", "Lifecycle_Stage__c": "Lead"})
    eng, stats = make_engine(rt), CycleStats()
    for group in OBJECT_GROUPS.values():
        for system, objects in group.items():
            for obj in objects:
                eng.pull(system, obj, stats)
    eng.link_and_decide(stats)


def test_a_daemon_that_lost_its_lease_sends_nothing_and_the_new_holder_finishes(
        rt: tuple[Sandbox, Runtime]) -> None:
    sb, runtime = rt
    _decided(sb, runtime, 3)
    with runtime.store.tx() as tx:
        open_rows = tx.outbox_depth()
    assert open_rows >= 6  # MQL for each person in both CRMs (and what comes with it)

    leases = cycle_leases(None)
    a = LeaseKeeper(runtime.store, "daemon-a", ttl_s=1.0)
    b = LeaseKeeper(runtime.store, "daemon-b", ttl_s=30.0)
    try:
        assert all(a.try_acquire(n) for n in leases)
        engine_a = make_engine(runtime, owner="daemon-a")
        fence_writes(engine_a, a, leases)
        stale_fence = a.fence(DECIDE_LEASE)
        a._stop.set()  # daemon A freezes: nothing renews its leases any more
        a._thread.join()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with runtime.store.tx() as tx:
                if tx.lease_holder(DECIDE_LEASE, utcnow()) is None:
                    break
            time.sleep(0.1)
        assert all(b.try_acquire(n) for n in leases)  # B takes the work over
        fence_b = b.fence(DECIDE_LEASE)
        assert stale_fence is not None and fence_b is not None and fence_b[2] > stale_fence[2]

        before = len(sb.hubspot.write_log) + len(sb.salesforce.write_log)
        stats = CycleStats()
        engine_a.flush(stats)  # A resumes with its batch: it must send nothing
        assert engine_a.writeback.fenced and stats.sent == 0
        assert len(sb.hubspot.write_log) + len(sb.salesforce.write_log) == before
        with runtime.store.tx() as tx:  # nor can it mark a write done
            (row,) = tx.due("salesforce", "Lead", utcnow(), 1)
            tx.mark_sending([row.id])
            assert not tx.mark_done(row.id, fence=stale_fence)

        engine_b = make_engine(runtime, owner="daemon-b")
        fence_writes(engine_b, b, leases)
        stats = CycleStats()
        engine_b.flush(stats)
        assert not engine_b.writeback.fenced
        with runtime.store.tx() as tx:
            assert tx.outbox_depth() == 0
            assert tx.get_outbox([row.id])[row.id].state == "done"
        written = [(w["id"], f) for w in sb.salesforce.write_log for f in w["fields"]]
        written += [(w["id"], f) for w in sb.hubspot.write_log for f in w["properties"]]
        assert len(written) == len(set(written)) and {i for i, _ in written} >= {row.record_id}  # once each
    finally:
        b.close()
        a.close()
