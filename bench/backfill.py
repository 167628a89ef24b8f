"""Measurements 5 and 6: a full backfill by ``syncd sync --once`` as a child process against
the seeded sandbox in this process. The child's peak RSS (its own VmHWM, plus /proc VmRSS
samples to show the curve), its wall and CPU time, and this process's CPU time over the same
span: the simulators' share (nothing else runs here while the child works).

Not ``ru_maxrss``: Linux carries the high-water mark of the address space a process execs
from into its ``ru_maxrss`` (``exec_mmap`` keeps the old mm's peak), and the child is
forked from this process, whose seeded simulators hold hundreds of MB (~215 MB at 50k people,
~700 MB at 200k). ``ru_maxrss`` therefore reported this process's peak, not syncd's. VmHWM
belongs to the address space made by exec: syncd's alone. The child runs ``python -m syncd``
through a two-line wrapper that writes its VmHWM at exit; the VmHWM samples taken meanwhile
are the fallback should it die before."""

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

# ``python -m syncd`` that writes its own peak RSS (VmHWM, kB) to $SYNCD_BENCH_PEAK at exit.
CHILD = (
    "import atexit, os, runpy\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f, open(os.environ['SYNCD_BENCH_PEAK'], 'w') as out:\n"
    "        out.write(next(ln.split()[1] for ln in f if ln.startswith('VmHWM:')))\n"
    "atexit.register(_peak)\n"
    "runpy.run_module('syncd', run_name='__main__', alter_sys=True)\n"
)


def _status_kb(pid: int | str, *fields: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status in kB (0 when the process is gone)."""
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in out:
                    out[name] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")["VmRSS"]


def run(people: int, deals: int | None = None) -> dict[str, Any]:
    deals = people // 5 if deals is None else deals
    with workdir("backfill") as d, Sandbox(d / "sb") as sb:
        summary = seed(sb.hubspot, sb.salesforce, SeedSpec(seed=1, people=people, deals=deals))
        cfg = sb.write_config(d / "syncd.toml", state_url=f"sqlite:///{d / 'state.db'}", extra=LOGGING)
        peak_file = d / "peak_kb"
        env = {**os.environ, **sb.env(), "SYNCD_BENCH_PEAK": str(peak_file)}
        log = open(d / "child.log", "wb")  # noqa: SIM115 - closed below, after the child
        cmd = [sys.executable, "-c", CHILD, "--config", str(cfg), "sync", "--once"]
        c0, t0 = time.process_time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        samples: list[tuple[float, int]] = []
        hwm_kb = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            st = _status_kb(proc.pid, "VmRSS", "VmHWM")
            samples.append((time.perf_counter() - t0, st["VmRSS"]))
            hwm_kb = max(hwm_kb, st["VmHWM"])
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        sim_cpu = time.process_time() - c0
        log.close()
        tail = (d / "child.log").read_text(errors="replace")[-2000:]
        code = os.waitstatus_to_exitcode(status)
        peak_at_exit = peak_file.read_text().strip() if peak_file.exists() else ""
        peak_kb = max(hwm_kb, int(peak_at_exit) if peak_at_exit.isdigit() else 0)
        pulled = sum(v for k, v in summary.counts.items() if k in ("hubspot.contacts", "hubspot.deals"))
    half = [kb for t, kb in samples if t <= wall / 2]
    return {
        "people": people,
        "deals": deals,
        "exit": code,
        "wall_s": wall,
        "child_cpu_s": ru.ru_utime + ru.ru_stime,
        "sim_cpu_s": sim_cpu,
        "peak_rss_mb": peak_kb / 1024,
        "peak_rss_source": "VmHWM at exit" if peak_at_exit else "VmHWM samples",
        "ru_maxrss_mb": ru.ru_maxrss / 1024,  # includes this process's peak (see the docstring)
        "rss_first_half_max_mb": (max(half) / 1024) if half else None,
        "rss_samples_mb": [(round(t, 1), round(kb / 1024, 1)) for t, kb in samples[:: max(1, len(samples) // 12)]],
        "seeded": dict(summary.counts),
        "hubspot_records": pulled,
        "log_tail": tail if code != 0 else "",
    }
