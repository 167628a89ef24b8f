"""Shared set-up for the benchmarks: a seeded sandbox, a config, a runtime, counters."""

from __future__ import annotations

import math
import os
import pickle
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd.config import load_config
from syncd.model import Page
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, SeedSummary, seed

ROOT = Path(__file__).resolve().parent.parent
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

# The batching floor: records per call (crm-api.md §6).
FLOOR = {
    "hubspot.search": 200,
    "hubspot.batch_read": 100,
    "hubspot.batch_update": 100,
    "hubspot.batch_create": 100,
    "hubspot.associations": 1000,
    "salesforce.query": 2000,
    "salesforce.collections": 200,
}


@dataclass
class Env:
    sb: Sandbox
    summary: SeedSummary
    cfg_path: Path
    rt: Runtime
    workdir: Path


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"syncd-bench-{name}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def seeded(
    people: int, deals: int, *, state_url: str | None = None, extra: str = "", seed_no: int = 1
) -> Iterator[Env]:
    """A started sandbox seeded with ``people``/``deals`` and an open runtime on a fresh store."""
    with workdir("env") as d, Sandbox(d / "sb") as sb:
        summary = seed(sb.hubspot, sb.salesforce, SeedSpec(seed=seed_no, people=people, deals=deals))
        url = state_url or f"sqlite:///{d / 'state.db'}"
        if url.startswith("postgresql"):
            reset_pg(url)
        cfg = sb.write_config(d / "syncd.toml", state_url=url, extra=extra)
        sb.export_env()
        rt = open_runtime(load_config(cfg))
        try:
            yield Env(sb, summary, cfg, rt, d)
        finally:
            rt.close()


def reset_pg(url: str) -> None:
    """Drop every table in the benchmark database (db ``test``) so each run starts empty."""
    import sqlalchemy as sa

    from syncd.store import normalise_url

    eng = sa.create_engine(normalise_url(url))
    with eng.begin() as c:
        c.execute(sa.text("DROP SCHEMA public CASCADE"))
        c.execute(sa.text("CREATE SCHEMA public"))
    eng.dispose()


def pg_available(url: str = PG_URL) -> bool:
    import sqlalchemy as sa

    from syncd.store import normalise_url

    try:
        eng = sa.create_engine(normalise_url(url))
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available" for an optional benchmark
        return False


def reset_counts(sb: Sandbox) -> None:
    sb.hubspot_server.reset_counts()
    sb.salesforce_server.reset_counts()


def floor_calls(records: int, per_call: int) -> int:
    return math.ceil(records / per_call) if records > 0 else 0


def machine() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (+ uncommitted changes)" if dirty else ""),
    }


def ratio(actual: float, floor: float) -> str:
    if floor == 0:
        return "—" if actual == 0 else "∞"
    return f"{actual / floor:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


Recorded = list[tuple[str, str, list[Page]]]  # (system, object, the pages pulled)


def load_recorded(path: Path) -> tuple[Recorded, Any, Any]:
    """The recorded pages, and the default mapping and SLA files (what the recording pulled with)."""
    from syncd.mapping import default_mappings_dir, load_mappings
    from syncd.sla import load_sla

    pages: Recorded = pickle.loads(path.read_bytes())
    d = default_mappings_dir()
    return pages, load_mappings(d), load_sla(d)
