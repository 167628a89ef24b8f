"""Run the syncd benchmarks against the sandbox and write docs/benchmarks.md.

    .venv/bin/python bench/run.py            # full sizes (long: run it in the background)
    .venv/bin/python bench/run.py --quick    # small sizes, a few minutes
    .venv/bin/python bench/run.py --only api,throughput

Results also go to bench/results-<full|quick>.json; the markdown section between the
``results`` markers in docs/benchmarks.md is replaced, the rest of the page is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402 - after the path fix, so `python bench/run.py` works
from bench._env import PG_URL, ROOT, machine, pg_available  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "api": (50_000, 10_000),
        "no_change": (5_000, 50_000),
        "changes": 1000,
        "throughput": (10_000, 2_000),
        "latency": 100,
        "backfill": (50_000, 200_000),
    },
    "quick": {
        "api": (5_000, 1_000),
        "no_change": (1_000, 5_000),
        "changes": 1000,
        "throughput": (2_000, 400),
        "latency": 20,
        "backfill": (5_000, 20_000),
    },
}
ALL = ("api", "throughput", "latency", "backfill")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not an hour)")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--no-write", action="store_true", help="print JSON only, leave docs/benchmarks.md alone")
    ap.add_argument("--backfill-sizes", default=None, help="people per backfill run, e.g. 50000,200000")
    args = ap.parse_args(argv)
    from syncd import logs

    logs.configure(level="error", fmt="json")
    mode = "quick" if args.quick else "full"
    sz = dict(SIZES[mode])
    if args.backfill_sizes:
        sz["backfill"] = tuple(int(x) for x in args.backfill_sizes.split(","))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for name in only:
        if name not in ALL:
            ap.error(f"unknown measurement {name!r}")
    for name in only:
        t0 = time.perf_counter()
        print(f"[bench] {name} ({mode}) ...", file=sys.stderr, flush=True)
        started = machine()  # the code measured is the code at the start
        _save(
            mode,
            name,
            _measure(name, mode, sz, lambda partial, n=name, m=started: _save(mode, n, partial, m)),
            started,
        )
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results = load(mode)
    md = report.render(results)
    if args.no_write:
        print(md)
    else:
        report.write(ROOT / "docs" / "benchmarks.md", md, mode)
        print(f"wrote {ROOT / 'docs' / 'benchmarks.md'} ({mode})", file=sys.stderr)
    return 0


def _measure(name: str, mode: str, sz: dict[str, Any], partial: Any) -> Any:
    if name == "api":
        from bench import api_calls

        people, deals = sz["api"]
        return api_calls.run(people, deals, changes=sz["changes"], no_change_sizes=sz["no_change"])
    if name == "throughput":
        from bench import throughput

        people, deals = sz["throughput"]
        return throughput.run(people, deals, PG_URL if pg_available() else None)
    if name == "latency":
        from bench import latency

        return latency.run(changes=sz["latency"])
    from bench import backfill

    done: list[dict[str, Any]] = []
    for n in sz["backfill"]:  # saved after each size: the largest may be cut short
        done.append(backfill.run(n))
        partial(done)
    return done


def _path(mode: str, name: str) -> Path:
    return ROOT / "bench" / f"results-{mode}-{name}.json"


def _save(mode: str, name: str, value: Any, started: dict[str, Any]) -> None:
    """One file per measurement (runs of different measurements may overlap)."""
    rec = {"result": value, "machine": started}
    _path(mode, name).write_text(json.dumps(rec, indent=1, default=str))


def load(mode: str) -> dict[str, Any]:
    """Every stored measurement of ``mode``, each with the machine/commit it was taken on."""
    out: dict[str, Any] = {"mode": mode, "measured": {}}
    for name in ALL:
        p = _path(mode, name)
        if p.exists():
            rec = json.loads(p.read_text())
            out[name] = rec["result"]
            out["measured"][name] = rec["machine"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
