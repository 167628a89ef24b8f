"""The floors under measurement 3: what the work every design of the core must do costs per
record, each part measured alone on the same recorded pages (best of three, CPU time):
mapping, encoding raw + canonical as JSON, one plain ``sqlite3`` insert (no SQLAlchemy, no
indexes), one decode of the canonical JSON, and the rules for every person. Their sum is an
upper bound on what any store-backed core in CPython could reach; the gap between it and the
measured core is orchestration (SQLAlchemy, indexes, transactions, building views)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from bench._env import load_recorded
from syncd import rules
from syncd.engine import CycleStats, Engine, record_row
from syncd.model import RawRecord
from syncd.store import Store
from syncd.store import schema as s
from syncd.views import prefetched_person_view
from syncd.views import referrers_by_ref as _referrers_by_ref


def _best(fn: Callable[[], object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def run(pages_path: Path, workdir: Path) -> dict[str, Any]:
    pages, mappings, sla = load_recorded(pages_path)
    raws: list[RawRecord] = [r for _, _, ps in pages for p in ps for r in p.records]
    rows = [record_row(r, mappings.to_canonical(r)) for r in raws]
    raw_docs = [orjson.dumps(r.raw) for r in rows]
    canon_docs = [orjson.dumps(r.canonical) for r in rows]

    def insert() -> None:
        con = sqlite3.connect(":memory:")
        con.execute("create table r (k text primary key, raw text, canonical text)")
        con.executemany("insert into r values (?, ?, ?)",
                        [("\x1f".join(r.key), a, b) for r, a, b in zip(rows, raw_docs, canon_docs, strict=True)])
        con.commit()
        con.close()

    parts = {
        "map (to_canonical)": _best(lambda: [mappings.to_canonical(r) for r in raws]),
        "encode raw + canonical JSON": _best(lambda: [(orjson.dumps(r.raw), orjson.dumps(r.canonical)) for r in rows]),
        "plain sqlite3 insert": _best(insert),
        "decode canonical JSON once": _best(lambda: [orjson.loads(d) for d in canon_docs]),
    }
    # the rules, on the views of a store the real core filled from the same pages
    store = Store.open(f"sqlite:///{workdir / 'floors.db'}")
    try:
        eng = Engine(store, mappings, sla, {}, require_pulls=False)  # offline replay: no pulls
        stats = CycleStats()
        for system, obj, ps in pages:
            for p in ps:
                eng.ingest(system, obj, p.records, stats)
        eng.link_and_decide(stats)
        with store.tx() as tx:
            people = list(tx.conn.execute(sa.select(s.entities.c.entity_id).where(s.entities.c.kind == "person"))
                          .scalars())
            by_entity = tx.records_by_entity(people, with_raw=False)
            memories = tx.get_memory(people)
            refs = _referrers_by_ref(tx, [r for rs in by_entity.values() for r in rs if r.kind == "person"])
            views = [v for e in people
                     if (v := prefetched_person_view(e, by_entity.get(e, []), memories.get(e), refs)) is not None]
    finally:
        store.close()
    now = datetime.now(UTC)
    parts[f"rules for {len(views):,} people"] = _best(lambda: [rules.decide_person(v, eng.ctx, now) for v in views])
    n = len(raws)
    us = {k: v / n * 1e6 for k, v in parts.items()}
    return {"records": n, "us_per_record": us, "sum_us": sum(us.values()), "ceiling_per_s": n / sum(parts.values())}
