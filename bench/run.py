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
        "throughput": (20_000, 4_000),
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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not an hour)")
    ap.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    ap.add_argument(
        "--no-write", action="store_true", help="print JSON only, leave docs/benchmarks.md alone"
    )
    args = ap.parse_args(argv)
    from syncd import logs

    logs.configure(level="error", fmt="json")
    mode = "quick" if args.quick else "full"
    sz = SIZES[mode]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    out_path = ROOT / "bench" / f"results-{mode}.json"
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["machine"] = machine()
    results["mode"] = mode
    for name in only:
        t0 = time.perf_counter()
        print(f"[bench] {name} ({mode}) ...", file=sys.stderr, flush=True)
        if name == "api":
            from bench import api_calls

            people, deals = sz["api"]
            results["api"] = api_calls.run(
                people, deals, changes=sz["changes"], no_change_sizes=sz["no_change"]
            )
        elif name == "throughput":
            from bench import throughput

            people, deals = sz["throughput"]
            results["throughput"] = throughput.run(
                people, deals, PG_URL if pg_available() else None
            )
        elif name == "latency":
            from bench import latency

            results["latency"] = latency.run(changes=sz["latency"])
        elif name == "backfill":
            from bench import backfill

            results["backfill"] = [backfill.run(n) for n in sz["backfill"]]
        else:
            ap.error(f"unknown measurement {name!r}")
        results.setdefault("measured_at", {})[name] = results["machine"]["date"]
        print(
            f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
        )
        out_path.write_text(json.dumps(results, indent=1, default=str))
    md = report.render(results)
    if args.no_write:
        print(md)
    else:
        report.write(ROOT / "docs" / "benchmarks.md", md, mode)
        print(f"wrote {ROOT / 'docs' / 'benchmarks.md'} ({mode})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
