"""Backfill at syncd's default pace against a sandbox that enforces the lowest HubSpot tier
(100 requests per 10 s, 5 searches per second; issue 17), next to the floor those limits allow.

    python -m bench.paced [--people 20000]

The floor is the least wall time the rate limits permit for the calls the backfill made:
HubSpot searches at 5/s and every HubSpot call within 100 per 10 s (Salesforce has no
per-second limit; its daily one is not reached). The default-pace floor is the same at syncd's
own pace (3 searches/s, 90 calls per 10 s). Prints one JSON object; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from bench._env import workdir
from syncd.config import load_config
from syncd.runtime import open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

LOWEST_TIER = {"enforce_burst": True, "burst_limit": 100, "search_per_s": 5}
LOGGING = '\n[logging]\nlevel = "warning"\nformat = "json"\n'


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(people: int, *, paced: bool = True) -> dict[str, Any]:
    """``paced=False``: the same backfill unpaced against a sandbox enforcing nothing (the
    baseline: syncd's and the simulators' own time)."""
    with workdir("paced") as d, Sandbox(d / "sb", hubspot_options=LOWEST_TIER if paced else None) as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=1, people=people, deals=people // 5))
        sb.export_env()
        cfg = sb.write_config(d / "syncd.toml", state_url=f"sqlite:///{d / 'state.db'}", extra=LOGGING,
                              paced=paced)
        rt = open_runtime(load_config(cfg))
        start = time.monotonic()
        cycles = 0
        try:  # until settled: a paced backfill can outlast the freshness bound (a second cycle decides)
            while cycles < 5:
                stats = rt.engine().cycle()
                cycles += 1
                with rt.store.tx() as tx:
                    if not stats.partial and stats.sent == 0 and tx.outbox_depth() == 0:
                        break
        finally:
            rt.close()
        wall = time.monotonic() - start
        hs = sb.hubspot_server
        searches = hs.request_count("contacts.search") + hs.request_count("deals.search")
        calls = hs.request_count()
        return {
            "people": people, "deals": people // 5, "paced": paced, "wall_s": round(wall, 1),
            "floor_lowest_tier_s": round(max(searches / 5, calls / 10), 1),
            "floor_default_pace_s": round(max(searches / 3, calls / 9), 1),
            "hubspot_calls": calls, "hubspot_searches": searches,
            "salesforce_calls": sb.salesforce_server.request_count(),
            "hubspot_429": hs.statuses[429], "max_per_10s": hs.max_in_window(10.0),
            "max_searches_per_1s": max(hs.max_in_window(1.0, "contacts.search"),
                                       hs.max_in_window(1.0, "deals.search")),
            "cycles": cycles, "settled": not stats.partial, "commit": _commit(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.now(UTC).date().isoformat(),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=20_000)
    p.add_argument("--unpaced", action="store_true", help="the baseline: no pace, nothing enforced")
    args = p.parse_args()
    print(json.dumps(run(args.people, paced=not args.unpaced)))


if __name__ == "__main__":
    main()
