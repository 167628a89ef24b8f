"""Measurement 3: the processing core (map + link + rules + state store) fed recorded pages,
no network. Pages are recorded once through the real connectors, then replayed into a fresh
store: records/s on one core (the replay is single-threaded), SQLite and PostgreSQL."""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import floors
from bench._env import Recorded, load_recorded, reset_pg, seeded, workdir
from syncd.engine import CycleStats, Engine
from syncd.model import OBJECT_GROUPS, SYSTEMS
from syncd.store import Store


def record(people: int, deals: int, path: Path) -> int:
    """Pull everything once through the connectors and pickle the pages; returns records."""
    pages: Recorded = []
    n = 0
    with seeded(people, deals) as env:
        for group in OBJECT_GROUPS.values():
            for system in SYSTEMS:
                for obj in group[system]:
                    got = list(env.rt.connectors[system].iter_changes(obj, None, overlap=timedelta(0)))
                    n += sum(len(p.records) for p in got)
                    pages.append((system, obj, got))
    path.write_bytes(pickle.dumps(pages))  # the mapping models are built at run time: not picklable
    return n


def replay(path: Path, state_url: str) -> dict[str, Any]:
    pages, mappings, sla = load_recorded(path)
    if state_url.startswith("postgresql"):
        reset_pg(state_url)
    store = Store.open(state_url)
    try:
        eng = Engine(store, mappings, sla, {}, require_pulls=False)  # offline replay: no pulls
        stats = CycleStats()
        n = sum(len(p.records) for _, _, ps in pages for p in ps)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for system, obj, ps in pages:
            for p in ps:
                eng.ingest(system, obj, p.records, stats)
        t1 = time.perf_counter()
        eng.link_and_decide(stats)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
    finally:
        store.close()
    return {
        "records": n,
        "ingest_s": t1 - t0,
        "decide_s": t2 - t1,
        "total_s": t2 - t0,
        "cpu_s": cpu,
        "records_per_s": n / (t2 - t0),
        "ingest_per_s": n / (t1 - t0),
        "decide_per_s": n / (t2 - t1),
        "decisions": stats.decisions,
        "cpu_records_per_s": n / cpu,
    }


def run(people: int, deals: int, pg_url: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"people": people, "deals": deals}
    with workdir("tp") as d:
        pages = d / "pages.pickle"
        out["recorded"] = record(people, deals, pages)
        out["sqlite"] = replay(pages, f"sqlite:///{d / 'replay.db'}")
        out["floors"] = floors.run(pages, d)
        if pg_url:
            out["postgresql"] = replay(pages, pg_url)
    return out
