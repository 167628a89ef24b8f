"""The cost of SQLite ``synchronous=FULL`` (the default) against ``NORMAL`` (an opt-in), on the
commit-heavy part of a cycle: N transactions, each storing one page of records and its cursor.

    .venv/bin/python bench/sqlite_sync.py [--commits 1000] [--page 50] [--runs 3]

Prints the median wall time per mode and the cost per commit. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from syncd.model import Cursor
from syncd.store import RecordRow, Store

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def run(mode: str, commits: int, page: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(f"sqlite:///{Path(d) / 's.db'}", sqlite_synchronous=mode)
        try:
            t = time.perf_counter()
            for i in range(commits):
                with store.tx() as tx:
                    tx.upsert_records([RecordRow("hubspot", "contacts", f"{i}-{j}", "person", T0, {"a": str(j)},
                                                 {"values": {}}) for j in range(page)])
                    tx.set_cursor("hubspot", "contacts", Cursor(T0, str(i)))
            return time.perf_counter() - t
        finally:
            store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--page", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet migrations
    times: dict[str, list[float]] = {"normal": [], "full": []}
    for _ in range(args.runs):
        for mode in times:  # interleaved, so drift in the machine's load hits both
            times[mode].append(run(mode, args.commits, args.page))
    med = {m: statistics.median(v) for m, v in times.items()}
    for m, v in times.items():
        print(f"{m:6} median {med[m]:.2f} s  runs {', '.join(f'{x:.2f}' for x in v)}")
    extra = (med["full"] - med["normal"]) / args.commits * 1000
    print(f"full costs {extra:.2f} ms per commit (+{(med['full'] / med['normal'] - 1) * 100:.0f} %)")


if __name__ == "__main__":
    main()
