"""Pruning while a cycle runs (SQLite and PostgreSQL): the prune's batches commit between the
cycle's pages, the cycle completes as usual, old audit rows go and the cycle's own new audit rows
stay."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from syncd import retention
from syncd.config import RetentionConfig
from syncd.model import utcnow
from syncd.resync import make_engine
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import schema as s

if TYPE_CHECKING:
    from conftest import E2E

OLD_ROWS = 6000
DEADLINE_S = 120.0  # generous: only a hang fails the test


@pytest.fixture
def state_url(store_url: str) -> str:
    """The e2e store on each backend (tests/conftest.py's ``store_url``), not only SQLite."""
    return store_url


def test_prune_in_batches_while_a_cycle_runs(e2e: E2E) -> None:
    seed(e2e.hs, e2e.sf, SeedSpec(seed=11, people=150, deals=30))
    old = utcnow() - timedelta(days=800)
    with e2e.rt.store.tx() as tx:
        tx.conn.execute(sa.insert(s.audit), [
            {"at": old, "system": "hubspot", "object": "contacts", "record_id": str(i), "field": "lifecycle",
             "before": "a", "after": "b", "rule": "R1", "reason": "old", "mapping_rev": "abc"}
            for i in range(OLD_ROWS)])
    cfg = e2e.rt.config.model_copy(update={"retention": RetentionConfig(batch_size=250, pause_s=0)})
    cycle_started, pruned_during, cycle_done = threading.Event(), threading.Event(), threading.Event()
    during: list[int] = []

    def on_batch(kind: str, n: int) -> None:
        if kind != "audit":
            return
        if not cycle_started.is_set():
            assert cycle_started.wait(DEADLINE_S)  # first batch done: let the cycle begin
        elif not cycle_done.is_set():
            during.append(n)
            pruned_during.set()

    result: list[list[retention.PruneLine]] = []
    pruner = threading.Thread(target=lambda: result.append(retention.prune(e2e.rt.store, cfg, on_batch=on_batch)))

    def on_page(_system: str, _obj: str, _n: int) -> None:
        if not cycle_started.is_set():
            cycle_started.set()
            assert pruned_during.wait(DEADLINE_S)  # a prune batch commits mid-cycle

    engine = make_engine(e2e.rt, on_page=on_page)
    pruner.start()
    stats = engine.cycle()
    cycle_done.set()
    pruner.join(DEADLINE_S)

    assert not pruner.is_alive()
    assert not stats.partial and stats.pulled and stats.sent > 0
    assert during and max(during) <= 250
    assert {x.kind: x.rows for x in result[0]}["audit"] == OLD_ROWS
    with e2e.rt.store.tx() as tx:
        left = tx.conn.execute(sa.select(sa.func.count()).select_from(s.audit).where(s.audit.c.at < utcnow()
                               - timedelta(days=400))).scalar_one()
        new = tx.conn.execute(sa.select(sa.func.count()).select_from(s.audit)).scalar_one()
    assert left == 0 and new > 0  # the cycle's writes are audited, the old rows are gone
