"""Pruning 1M old audit rows while cycles run (issue 16): how long the prune takes, how long one
batch (one transaction, so the longest any lock is held) takes, and what it does to the cycles.

    .venv/bin/python bench/prune.py [--rows 1000000] [--people 2000] [--backends sqlite,postgresql]

Per backend: a store with ``--rows`` audit rows 500 days old, a seeded sandbox and a converged
store; a few baseline cycles (each with ``--changes`` records changed in the CRMs first); then
``syncd.retention.prune`` with the default ``[retention]`` (1,000 rows per batch, 50 ms apart)
on a thread while the same cycles keep running. PostgreSQL is
``postgresql://postgres@127.0.0.1:5432/test``, in a schema made for the run and dropped after.
Prints a markdown table; results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
import structlog

from syncd import retention
from syncd.config import RetentionConfig, load_config
from syncd.runtime import open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import Store
from syncd.store import schema as s

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CHUNK = 20_000


@contextmanager
def state_url(backend: str, d: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{d / 'state.db'}"
        return
    name = f"bench_prune_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def fill_audit(url: str, rows: int) -> float:
    store = Store.open(url)
    old = datetime.now(UTC) - timedelta(days=500)
    t = time.perf_counter()
    try:
        for start in range(0, rows, CHUNK):
            with store.tx() as tx:
                tx.conn.execute(sa.insert(s.audit), [
                    {"at": old + timedelta(seconds=i), "system": "hubspot", "object": "contacts",
                     "record_id": str(i), "field": "lifecycle", "before": "lead", "after": "mql", "rule": "R1",
                     "reason": "an old decision", "mapping_rev": "abc123"}
                    for i in range(start, min(rows, start + CHUNK))])
        store.analyze()
    finally:
        store.close()
    return time.perf_counter() - t


def change(sb: Sandbox, ids: list[str], n: int, k: int) -> None:
    """``n`` HubSpot contacts get a new score: the next cycle pulls, stores and decides them."""
    for rid in ids[(k * n) % len(ids):][:n]:
        sb.hubspot.modify("contacts", rid, {"hubspotscore": str(10 + k)})


def run(backend: str, rows: int, people: int, changes: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, Sandbox(Path(tmp) / "sb") as sb, state_url(backend, Path(tmp)) as url:
        sb.export_env()
        seed(sb.hubspot, sb.salesforce, SeedSpec(people=people, deals=people // 5))
        cfg_path = sb.write_config(Path(tmp) / "syncd.toml", state_url=url)
        fill_s = fill_audit(url, rows)
        rt = open_runtime(load_config(cfg_path))
        try:
            engine = rt.engine()
            for _ in range(3):
                engine.cycle()
            ids = [str(r["hs_object_id"]) for r in sb.hubspot.all("contacts")][:changes * 20]

            def timed_cycle(k: int) -> float:
                change(sb, ids, changes, k)
                t = time.perf_counter()
                st = rt.engine().cycle()
                assert not st.partial
                return time.perf_counter() - t

            baseline = [timed_cycle(k) for k in range(5)]
            marks: list[float] = []
            done: list[list[retention.PruneLine]] = []
            # the default [retention] for audit rows; the other kinds kept, so every batch is an audit batch
            cfg = rt.config.model_copy(update={"retention": RetentionConfig(
                outbox_done_days=0, runs_days=0, quarantine_resolved_days=0)})
            pause = cfg.retention.pause_s

            def prune() -> None:
                marks.append(time.perf_counter())
                done.append(retention.prune(rt.store, cfg, on_batch=lambda _k, _n: marks.append(time.perf_counter())))

            th = threading.Thread(target=prune)
            t0 = time.perf_counter()
            th.start()
            during: list[float] = []
            k = 5
            while th.is_alive():
                during.append(timed_cycle(k))
                k += 1
            th.join()
            prune_s = time.perf_counter() - t0
            # one batch = its transaction: the gap between two batch ends, less the pause between them
            batch = [b - a - (pause if i else 0) for i, (a, b) in enumerate(zip(marks, marks[1:], strict=False))]
            gone = {x.kind: x.rows for x in done[0]}
        finally:
            rt.close()
    return {"backend": backend, "rows": rows, "fill_s": fill_s, "prune_s": prune_s, "gone": gone.get("audit", 0),
            "batches": len(batch), "batch_p50_ms": statistics.median(batch) * 1000,
            "batch_p95_ms": sorted(batch)[int(len(batch) * 0.95)] * 1000, "batch_max_ms": max(batch) * 1000,
            "cycle_base_ms": statistics.median(baseline) * 1000, "cycles_during": len(during),
            "cycle_during_p50_ms": statistics.median(during) * 1000 if during else 0.0,
            "cycle_during_max_ms": max(during) * 1000 if during else 0.0}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, "
            f"commit {commit}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--people", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    print(f"machine: {machine()}")
    print("| backend | old audit rows | deleted | prune wall | rows/s | batches | batch p50 / p95 / max | "
          "cycle before (p50) | cycles during | cycle during p50 / max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        r = run(backend, args.rows, args.people, args.changes)
        print(f"| {r['backend']} | {r['rows']:,} | {r['gone']:,} | {r['prune_s']:.1f} s | "
              f"{r['gone'] / r['prune_s']:,.0f} | {r['batches']:,} | "  # type: ignore[operator]
              f"{r['batch_p50_ms']:.1f} / {r['batch_p95_ms']:.1f} / {r['batch_max_ms']:.1f} ms | "
              f"{r['cycle_base_ms']:.0f} ms | {r['cycles_during']} | "
              f"{r['cycle_during_p50_ms']:.0f} / {r['cycle_during_max_ms']:.0f} ms |", flush=True)
        print(f"  (filling the store took {r['fill_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
