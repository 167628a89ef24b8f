"""Render benchmark results (the dict bench/run.py builds) as the markdown in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._env import ratio, table


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def _api(res: dict[str, Any]) -> list[str]:
    out = [
        "### 1. API calls per 1,000 changed records (target ≤ 1.1 × floor)\n",
        f"{_f(res['people'])} people + {_f(res['deals'])} deals seeded. Calls are the "
        "simulators' request counts; "
        "the floor is the batching floor for the records actually moved (HubSpot search 200/page, "
        "association batch read 1,000/call, batch update/create 100/call; Salesforce query "
        "2,000/batch, "
        'sObject Collections 200/call; at least one read per object). "Extra" are write-side reads '
        "(HubSpot lifecycle read-back, now only after a backwards move made with clear-first or an "
        "answer without the value; find-by-email, now only before a create that is a resend). "
        '"Feeds + limits" move no record: HubSpot\'s archive scans (its deletion feed, every '
        "`archive_scan_s`) and Salesforce's `/limits` read (once per run, for the API budget).\n",
    ]
    for phase, title in (("backfill", "Full backfill"), ("incremental", "Incremental cycle")):
        p = res.get(phase)
        if not p:
            continue
        label = title if phase == "backfill" else f"{title} ({_f(p['changes'])} changes made)"
        rows = []
        for r in p["rows"]:
            per_k = 1000 * r["calls"] / r["records"] if r["records"] else None
            floor_k = 1000 * r["floor"] / r["records"] if r["records"] else None
            calls = r["calls"] + r.get("extra_calls", 0)
            rows.append(
                [
                    r["system"],
                    r["direction"],
                    _f(r["records"]),
                    _f(r["calls"]),
                    _f(r.get("extra_calls", 0)) if r["direction"] == "write" else "",
                    _f(per_k, 2),
                    _f(floor_k, 2),
                    _f(r["floor"]),
                    ratio(calls, r["floor"]) if r["records"] or r["floor"] else "—",
                    _verdict(None if r["floor"] == 0 else calls <= 1.1 * r["floor"]),
                ]
            )
        out.append(f"**{label}** — cycle wall time {_f(p['seconds'])} s\n")
        out.append(
            table(
                [
                    "system",
                    "direction",
                    "records",
                    "calls",
                    "extra",
                    "calls / 1k",
                    "floor / 1k",
                    "floor calls",
                    "(calls+extra) / floor",
                    "target",
                ],
                rows,
            )
            + "\n"
        )
    return out


def _no_change(res: dict[str, Any]) -> list[str]:
    from bench.api_calls import no_change_per_object

    out = ["### 2. A cycle with no changes (target ≤ 2 calls per object per system)\n"]
    rows = []
    for n, v in sorted(res.get("no_change", {}).items(), key=lambda kv: int(kv[0])):
        per = no_change_per_object(v["counts"])
        detail = ", ".join(f"{k} {c}" for k, c in sorted(v["counts"].items()))
        rows.append(
            [
                _f(int(n)),
                _f(per["hubspot"], 2),
                _f(per["salesforce"], 2),
                detail,
                _verdict(max(per.values()) <= 2),
            ]
        )
    out.append(
        table(
            [
                "people in store",
                "HubSpot calls / object (2)",
                "Salesforce calls / object (4)",
                "requests",
                "target",
            ],
            rows,
        )
        + "\n"
    )
    return out


def _throughput(res: dict[str, Any]) -> list[str]:
    out = [
        "### 3. Processing core throughput (target ≥ 20,000 records/s on SQLite)\n",
        f"{_f(res['people'])} people + {_f(res['deals'])} deals recorded once through the "
        "connectors "
        f"({_f(res['recorded'])} records), then replayed into a fresh store: `Engine.ingest` "
        "per page, then "
        "`Engine.link_and_decide`. No network; one thread. Rate = records / wall time; CPU = "
        "process time.\n",
    ]
    rows = []
    for db in ("sqlite", "postgresql"):
        r = res.get(db)
        if not r:
            continue
        rows.append(
            [
                db,
                _f(r["records"]),
                _f(r["ingest_s"], 2),
                _f(r["decide_s"], 2),
                _f(r["total_s"], 2),
                _f(r["cpu_s"], 2),
                _f(r["ingest_per_s"], 0),
                _f(r["decide_per_s"], 0),
                _f(r["records_per_s"], 0),
                _f(r.get("cpu_records_per_s"), 0),
                _verdict(max(r["records_per_s"], r.get("cpu_records_per_s", 0)) >= 20_000) if db == "sqlite" else "—",
            ]
        )
    out.append(
        table(
            [
                "store",
                "records",
                "ingest s",
                "link+decide s",
                "total s",
                "CPU s",
                "ingest rec/s",
                "link+decide rec/s",
                "overall rec/s",
                "rec per CPU-s",
                "target",
            ],
            rows,
        )
        + "\n"
    )
    fl = res.get("floors")
    if fl:
        out.append(
            "Floors (`bench/floors.py`): the work any store-backed core must do, each part alone on the "
            "same records (CPU, best of 3). Their sum bounds what such a core could reach in CPython; "
            "the rest of the measured time is orchestration.\n"
        )
        frows = [[k, _f(v, 1)] for k, v in fl["us_per_record"].items()]
        frows.append(["**sum**", f"**{_f(fl['sum_us'], 1)}** (ceiling {_f(fl['ceiling_per_s'], 0)} records/s)"])
        sq = res.get("sqlite")
        if sq and sq.get("cpu_s"):
            frows.append(["measured core (SQLite, CPU)", _f(sq["cpu_s"] / sq["records"] * 1e6, 1)])
        out.append(table(["part", "µs per record"], frows) + "\n")
    return out


def _latency(res: dict[str, Any]) -> list[str]:
    iv = res["interval_s"]
    out = [
        f"### 4. Change-to-writeback latency under `syncd run` (interval {iv:g} s; target p95 ≤ {2 * iv:g} s)\n",
        f"{res['changes']} changes, one every {res['pace_s']:g} s, alternating "
        "HubSpot→Salesforce (score over "
        "the threshold → hand-off creates the Lead) and Salesforce→HubSpot (Lead set to "
        "Returned - Not Ready → "
        "contact BAD_TIMING). Latency = change made in one simulator until visible in the other.\n",
    ]
    rows = [
        [
            "all",
            res["applied"],
            res["not_applied"],
            _f(res["p50_s"], 2),
            _f(res["p95_s"], 2),
            _f(res["max_s"], 2),
            _verdict(res["p95_s"] is not None and res["p95_s"] <= 2 * iv and res["not_applied"] == 0),
        ]
    ]
    for k, v in res["by_direction"].items():
        rows.append([k, v["n"], "", _f(v["p50_s"], 2), _f(v["p95_s"], 2), "", ""])
    out.append(table(["direction", "applied", "not applied", "p50 s", "p95 s", "max s", "target"], rows) + "\n")
    return out


def _backfill(res: list[dict[str, Any]]) -> list[str]:
    out = [
        "### 5 and 6. Backfill by `syncd sync --once` (child process): peak RSS (target ≤ 200 "
        "MB, flat) "
        "and wall time with the simulators' share\n",
        "The sandbox runs in the benchmark process; `sim CPU` is that process's CPU time "
        "while the child "
        "ran (the simulators' work: TLS, HTTP, JSON, search). `syncd CPU` is the child's "
        "user+sys time. "
        "Peak RSS is the child's own high-water mark (VmHWM, written by the child at exit; not "
        "wait4's ru_maxrss, which on Linux includes the peak of the benchmark process it was "
        "forked from); `RSS at half time` the largest /proc VmRSS sample in the first "
        "half of the run.\n",
    ]
    rows = []
    for r in res:
        share = r["sim_cpu_s"] / (r["sim_cpu_s"] + r["child_cpu_s"]) if r["child_cpu_s"] else None
        rows.append(
            [
                _f(r["people"]),
                _f(r["deals"]),
                r["exit"],
                _f(r["wall_s"]),
                _f(r["child_cpu_s"]),
                _f(r["sim_cpu_s"]),
                f"{100 * share:.0f} %" if share is not None else "—",
                _f(r["rss_first_half_max_mb"]),
                _f(r["peak_rss_mb"]),
                _verdict(r["peak_rss_mb"] <= 200 and r["exit"] == 0),
            ]
        )
    out.append(
        table(
            [
                "people",
                "deals",
                "exit",
                "wall s",
                "syncd CPU s",
                "sim CPU s",
                "sim share of CPU",
                "RSS at half time MB",
                "peak RSS MB",
                "target",
            ],
            rows,
        )
        + "\n"
    )
    for r in res:
        if r.get("log_tail"):
            out.append(f"Run with {_f(r['people'])} people failed; log tail:\n\n```\n{r['log_tail']}\n```\n")
    return out


def _machine_line(name: str, m: dict[str, Any]) -> str:
    return (
        f"- {name}: {m['date']}, commit `{m['commit']}`; {m['cores']} cores ({m['cpu']}), "
        f"{m['ram_gb']} GB RAM, Python {m['python']}, {m['os']}"
    )


def render(results: dict[str, Any]) -> str:
    out = [f"Mode **{results['mode']}**. Each measurement was taken on:\n"]
    out += [_machine_line(k, m) for k, m in results.get("measured", {}).items()]
    out.append("")
    if "api" in results:
        out += _api(results["api"]) + _no_change(results["api"])
    if "throughput" in results:
        out += _throughput(results["throughput"])
    if "latency" in results:
        out += _latency(results["latency"])
    if "backfill" in results:
        out += _backfill(results["backfill"])
    return "\n".join(out)


def write(path: Path, md: str, mode: str) -> None:
    """Replace the ``mode`` results section of the page (between its markers); keep the rest."""
    start, end = f"<!-- results:{mode}:start -->", f"<!-- results:{mode}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{md}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## Results ({mode})\n\n{block}\n"
    path.write_text(text)
