"""Measurements 5 and 6: a full backfill by ``syncd sync --once`` as a child process against
the seeded sandbox in this process. The child's peak RSS (wait4 rusage, plus /proc VmRSS
samples to show the curve), its wall and CPU time, and this process's CPU time over the same
span: the simulators' share (nothing else runs here while the child works)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bench._env import workdir
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

LOGGING = '\n[logging]\nlevel = "warning"\nformat = "json"\n'


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(people: int, deals: int | None = None) -> dict[str, Any]:
    deals = people // 5 if deals is None else deals
    with workdir("backfill") as d, Sandbox(d / "sb") as sb:
        summary = seed(sb.hubspot, sb.salesforce, SeedSpec(seed=1, people=people, deals=deals))
        cfg = sb.write_config(d / "syncd.toml", state_url=f"sqlite:///{d / 'state.db'}", extra=LOGGING)
        env = {**os.environ, **sb.env()}
        log = open(d / "child.log", "wb")  # noqa: SIM115 - closed below, after the child
        cmd = [sys.executable, "-m", "syncd", "--config", str(cfg), "sync", "--once"]
        c0, t0 = time.process_time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        samples: list[tuple[float, int]] = []
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            samples.append((time.perf_counter() - t0, _rss_kb(proc.pid)))
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        sim_cpu = time.process_time() - c0
        log.close()
        tail = (d / "child.log").read_text(errors="replace")[-2000:]
        code = os.waitstatus_to_exitcode(status)
        pulled = sum(v for k, v in summary.counts.items() if k in ("hubspot.contacts", "hubspot.deals"))
    half = [kb for t, kb in samples if t <= wall / 2]
    return {
        "people": people,
        "deals": deals,
        "exit": code,
        "wall_s": wall,
        "child_cpu_s": ru.ru_utime + ru.ru_stime,
        "sim_cpu_s": sim_cpu,
        "peak_rss_mb": ru.ru_maxrss / 1024,
        "rss_first_half_max_mb": (max(half) / 1024) if half else None,
        "rss_samples_mb": [(round(t, 1), round(kb / 1024, 1)) for t, kb in samples[:: max(1, len(samples) // 12)]],
        "seeded": dict(summary.counts),
        "hubspot_records": pulled,
        "log_tail": tail if code != 0 else "",
    }
