"""Link, then decide: how the engine batches a cycle's work (no network; records fed to ingest).

Linking runs over the changed records in batches and marks the entities they touch as due;
deciding then takes every due entity once. What users rely on: a person whose records arrive
in different batches (a backfill) is decided once, on the whole picture; and a crash between
the two steps loses no decision.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from syncd import engine as engine_mod
from syncd import rules
from syncd.engine import CycleStats, Engine
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.model import RawRecord
from syncd.sla import load_sla
from syncd.store import Store

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


def _engine(store: Store) -> Engine:
    mappings = load_mappings(default_mappings_dir())
    return Engine(store, mappings, load_sla(default_mappings_dir()), {}, clock=lambda: NOW,
                  require_pulls=False)  # records are fed to ingest: no pulls to gate on


def _contact(i: int, **fields: Any) -> RawRecord:
    f = {"hs_object_id": str(i), "email": f"p{i}@example.com", "firstname": "P", "lastname": str(i),
         "lifecyclestage": "lead", "hubspotscore": "10", "lastmodifieddate": T0.isoformat(), **fields}
    return RawRecord("hubspot", "contacts", str(i), T0, f)


def _lead(i: int, **fields: Any) -> RawRecord:
    rid = f"00Q{i:012d}"
    f = {"Id": rid, "Email": f"p{i}@example.com", "FirstName": "P", "LastName": str(i), "Company": "Acme",
         "Status": "Open - Not Contacted", "IsConverted": False, "LastModifiedDate": T0.isoformat(), **fields}
    return RawRecord("salesforce", "Lead", rid, T0, f)


def _count_decisions(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    seen: Counter[str] = Counter()
    decide = rules.decide_person

    def counting(view: rules.PersonView, ctx: rules.RuleContext, now: datetime) -> rules.Outcome:
        seen[view.entity_id] += 1
        return decide(view, ctx, now)

    monkeypatch.setattr(rules, "decide_person", counting)
    return seen


def test_records_of_one_person_in_different_batches_are_decided_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "CHUNK", 1)  # 4 changed records per link batch
    seen = _count_decisions(monkeypatch)
    eng, stats = _engine(store), CycleStats()
    # contacts first, their leads in a later page: far apart in the dirty queue
    eng.ingest("hubspot", "contacts", [_contact(i) for i in range(10)], stats)
    eng.ingest("salesforce", "Lead", [_lead(i) for i in range(10)], stats)
    eng.link_and_decide(stats)
    with store.tx() as tx:
        entities = {r.entity_id for r in tx.iter_records()}
        assert tx.dirty_records() == []
        assert tx.due_batch(NOW) == []
    assert len(entities) == 10  # each contact linked to its lead
    assert sorted(seen.values()) == [1] * 10  # and each person decided exactly once


def test_a_crash_between_linking_and_deciding_loses_no_decision(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    handoff = _contact(1, lifecyclestage="lead", hubspotscore="90")  # over the MQL threshold: hand-off
    eng, stats = _engine(store), CycleStats()
    eng.ingest("hubspot", "contacts", [handoff], stats)

    def crash(*_a: Any, **_k: Any) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Engine, "_decide", crash)
    with pytest.raises(KeyboardInterrupt):
        eng.link_and_decide(stats)
    with store.tx() as tx:  # linked and committed, nothing decided yet
        assert tx.dirty_records() == []
        assert tx.open_writes([e for e, _ in tx.due_batch(NOW)]) == {}
        assert len(tx.due_batch(NOW)) == 1
    monkeypatch.undo()

    again = _engine(store)
    stats2 = CycleStats()
    again.link_and_decide(stats2)  # nothing dirty any more: the due mark carries the decision
    with store.tx() as tx:
        later = datetime.now(UTC)  # the outbox stamps rows with the wall clock
        writes = tx.due("hubspot", None, later, 100) + tx.due("salesforce", None, later, 100)
        assert tx.due_batch(NOW) == []
    assert stats2.decisions >= 1
    assert any(w.system == "salesforce" and w.op == "create" for w in writes), writes
