"""Measurement 4: change-to-writeback latency under ``syncd run`` (5 s intervals).

The sandbox runs in this process; the service is a child process. Changes are made one at a
time at a steady pace, alternating direction:
- HubSpot → Salesforce: a HubSpot lead-stage contact with no Salesforce record gets a score
  over the MQL threshold; applied when a Salesforce Lead with its email exists (hand-off).
- Salesforce → HubSpot: an open Salesforce Lead linked to a HubSpot contact gets the status
  "Returned - Not Ready"; applied when the HubSpot contact's hs_lead_status is BAD_TIMING.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench._env import workdir
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

RETURNED = "Returned - Not Ready"
OPEN_STATUSES = ("Open - Not Contacted", "Working - Contacted")


def _config_extra(interval: float) -> str:
    return (
        f"\n[sync]\ncontacts_interval_s = {interval}\ndeals_interval_s = {interval}\njitter_s = 0\n"
        '\n[service]\nmetrics_port = 0\n\n[logging]\nlevel = "warning"\nformat = "json"\n'
    )


def _norm(e: Any) -> str:
    return str(e or "").strip().lower()


def _candidates(sb: Sandbox, n: int) -> list[tuple[str, str, str]]:
    """(direction, record id, email) for n changes, alternating directions."""
    sf_emails = {_norm(r.get("Email")) for o in ("Lead", "Contact") for r in sb.salesforce.all(o)}
    # A converted Lead and its Contact share an email; two open Leads with one email are a
    # duplicate, an identity conflict syncd reports and never resolves by guessing (which of
    # them speaks for the person?), so a change to one of them is not a change to measure.
    open_leads = Counter(_norm(r.get("Email")) for r in sb.salesforce.all("Lead") if not r.get("IsConverted"))
    hs = sb.hubspot.all("contacts")
    hs_by_email = {_norm(c.get("email")): c for c in hs}
    to_sf = [
        ("hs->sf", c["hs_object_id"], _norm(c.get("email")))
        for c in hs
        if c.get("lifecyclestage") == "lead"
        and int(c.get("hubspotscore") or 0) < 40
        and _norm(c.get("email")) not in sf_emails
    ]
    to_hs = []
    for r in sb.salesforce.all("Lead"):
        e = _norm(r.get("Email"))
        c = hs_by_email.get(e)
        if (
            c is not None
            and open_leads[e] == 1
            and not r.get("IsConverted")
            and r.get("Status") in OPEN_STATUSES
            and c.get("hs_lead_status") != "BAD_TIMING"
        ):
            to_hs.append(("sf->hs", r["Id"], e))
    out: list[tuple[str, str, str]] = []
    for a, b in zip(to_sf, to_hs, strict=False):
        out += [a, b]
    return out[:n]


def _applied(sb: Sandbox, direction: str, email: str, hs_id: str | None) -> bool:
    if direction == "hs->sf":
        return any(_norm(r.get("Email")) == email for r in sb.salesforce.all("Lead"))
    return hs_id is not None and sb.hubspot.get("contacts", hs_id).get("hs_lead_status") == "BAD_TIMING"


def run(changes: int = 100, interval: float = 5.0, people: int = 2000, pace: float = 0.5) -> dict[str, Any]:
    with workdir("latency") as d, Sandbox(d / "sb") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=people, deals=people // 5))
        cfg = sb.write_config(d / "syncd.toml", state_url=f"sqlite:///{d / 'state.db'}", extra=_config_extra(interval))
        env = {**os.environ, **sb.env()}
        base = [sys.executable, "-m", "syncd", "--config", str(cfg)]
        subprocess.run([*base, "sync", "--once"], env=env, check=True, capture_output=True)
        subprocess.run([*base, "sync", "--once"], env=env, check=True, capture_output=True)
        plan = _candidates(sb, changes)
        hs_ids = {_norm(c.get("email")): c["hs_object_id"] for c in sb.hubspot.all("contacts")}
        log = open(d / "service.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([*base, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        pending: dict[int, tuple[str, str, float]] = {}
        done: dict[int, float] = {}
        by_dir: dict[str, list[float]] = {"hs->sf": [], "sf->hs": []}
        try:
            time.sleep(interval)  # the service's first cycles
            next_change = time.monotonic()
            i = 0
            deadline: float | None = None
            while True:
                now = time.monotonic()
                if i < len(plan) and now >= next_change:
                    direction, rid, email = plan[i]
                    if direction == "hs->sf":
                        sb.hubspot.modify("contacts", rid, {"hubspotscore": "90"})
                    else:
                        sb.salesforce.modify("Lead", rid, {"Status": RETURNED})
                    pending[i] = (direction, email, time.monotonic())
                    i += 1
                    next_change += pace
                    if i == len(plan):
                        deadline = time.monotonic() + 6 * interval
                for k, (direction, email, t) in list(pending.items()):
                    if _applied(sb, direction, email, hs_ids.get(email)):
                        lat = time.monotonic() - t
                        done[k] = lat
                        by_dir[direction].append(lat)
                        del pending[k]
                if (deadline is not None and (not pending or time.monotonic() > deadline)) or proc.poll() is not None:
                    break
                time.sleep(0.1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    lats = sorted(done.values())

    def pct(xs: list[float], p: float) -> float | None:
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]

    return {
        "changes": len(plan),
        "applied": len(lats),
        "not_applied": len(pending),
        "interval_s": interval,
        "pace_s": pace,
        "p50_s": pct(lats, 50),
        "p95_s": pct(lats, 95),
        "max_s": lats[-1] if lats else None,
        "mean_s": statistics.fmean(lats) if lats else None,
        "by_direction": {k: {"n": len(v), "p50_s": pct(v, 50), "p95_s": pct(v, 95)} for k, v in by_dir.items()},
    }
