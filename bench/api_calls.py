"""Measurements 1 and 2: API calls per 1,000 changed records against the batching floor,
and calls per object in a cycle with no changes. Counts come from the simulators (SimServer)."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from bench._env import FLOOR, Env, floor_calls, reset_counts, seeded
from syncd.connectors.base import Connector
from syncd.engine import CycleStats
from syncd.model import FieldUpdate, RawRecord, RecordCreate, WriteResult


class CountingConnector:
    """Delegates to a real connector; counts the records handed to write/create (calls are
    counted by the simulators)."""

    def __init__(self, inner: Connector, requests: Callable[[], int]) -> None:
        self.inner = inner
        self.requests = requests  # the simulator's request count for this system
        self.records: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, obj: str, updates: Sequence[FieldUpdate]) -> list[WriteResult]:
        self.records["update"] += len(updates)
        self.records[f"update.{obj}"] += len(updates)
        self.records["clear_first"] += sum(1 for u in updates if u.clear_first)
        return self.inner.write(obj, updates)

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        """The look-up before a create (idempotent creates): write-side reads, not pulls."""
        before = self.requests()
        try:
            return self.inner.find_by_email(obj, emails)
        finally:
            self.records["find_calls"] += self.requests() - before

    def create(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        self.records["create"] += len(creates)
        self.records[f"create.{obj}"] += len(creates)
        return self.inner.create(obj, creates)


def _install(env: Env) -> dict[str, CountingConnector]:
    servers = {"hubspot": env.sb.hubspot_server, "salesforce": env.sb.salesforce_server}
    wrapped = {k: CountingConnector(v, servers[k].request_count) for k, v in env.rt.connectors.items()}
    # same Protocol, by delegation
    env.rt.connectors = cast(dict[str, Connector], wrapped)
    return wrapped


def _cycle(env: Env, conns: dict[str, CountingConnector]) -> tuple[CycleStats, dict[str, int], float]:
    reset_counts(env.sb)
    for c in conns.values():
        c.records.clear()
    t0 = time.perf_counter()
    st = env.rt.engine().cycle()
    return st, env.sb.request_counts(), time.perf_counter() - t0


def _directions(st: CycleStats, counts: dict[str, int], conns: dict[str, CountingConnector]) -> list[dict[str, Any]]:
    """Per system and direction: calls made, records moved, and the batching floor."""
    pulled = st.pulled
    hs_c, hs_d = pulled.get("hubspot.contacts", 0), pulled.get("hubspot.deals", 0)
    sf_objs = {k.split(".", 1)[1]: v for k, v in pulled.items() if k.startswith("salesforce.")}
    rows: list[dict[str, Any]] = []
    # HubSpot read: search pages per object, plus the deal → contact association lookups.
    hs_read = sum(v for k, v in counts.items() if k.startswith("hubspot.") and k.endswith(".search"))
    hs_read += counts.get("hubspot.associations.batch_read", 0)
    hs_read -= conns["hubspot"].records["find_calls"]  # searches by email before creates
    hs_read_floor = (
        max(1, floor_calls(hs_c, FLOOR["hubspot.search"]))
        + max(1, floor_calls(hs_d, FLOOR["hubspot.search"]))
        + floor_calls(hs_d, FLOOR["hubspot.associations"])
    )
    rows.append(
        {
            "system": "hubspot",
            "direction": "read",
            "records": hs_c + hs_d,
            "calls": hs_read,
            "floor": hs_read_floor,
        }
    )
    sf_read = counts.get("salesforce.query", 0) + counts.get("salesforce.query_more", 0)
    sf_read -= conns["salesforce"].records["find_calls"]  # queries by email before creates
    sf_read_floor = sum(max(1, floor_calls(n, FLOOR["salesforce.query"])) for n in sf_objs.values())
    rows.append(
        {
            "system": "salesforce",
            "direction": "read",
            "records": sum(sf_objs.values()),
            "calls": sf_read,
            "floor": sf_read_floor,
        }
    )
    for system, per_call in (
        ("hubspot", FLOOR["hubspot.batch_update"]),
        ("salesforce", FLOOR["salesforce.collections"]),
    ):
        rec = conns[system].records
        writes = sum(
            v
            for k, v in counts.items()
            if k.startswith(f"{system}.")
            and any(w in k for w in ("batch_update", "batch_create", "collections.", "sobject."))
        )
        # everything else a write needed: lifecycle verification reads, find-by-email before creates
        extra = (
            sum(v for k, v in counts.items() if k.startswith(f"{system}."))
            - writes
            - (hs_read if system == "hubspot" else sf_read)
            - _overhead(counts, system)
        )
        objs_u = {k.split(".", 1)[1] for k in rec if k.startswith("update.")}
        objs_c = {k.split(".", 1)[1] for k in rec if k.startswith("create.")}
        floor = (
            sum(floor_calls(rec[f"update.{o}"], per_call) for o in objs_u)
            + sum(floor_calls(rec[f"create.{o}"], per_call) for o in objs_c)
            + floor_calls(rec["clear_first"], per_call)
        )
        rows.append(
            {
                "system": system,
                "direction": "write",
                "records": rec["update"] + rec["create"],
                "calls": writes,
                "floor": floor,
                "extra_calls": extra,
            }
        )
    for system in ("hubspot", "salesforce"):  # neither reads nor writes records: no batching floor
        rows.append({"system": system, "direction": "feeds + limits", "records": 0,
                     "calls": _overhead(counts, system), "floor": 0})
    return rows


def _overhead(counts: dict[str, int], system: str) -> int:
    """Calls that move no record: HubSpot's archive scans (its deletion feed, ``*.list`` with
    ``archived=true``, every ``archive_scan_s``) and Salesforce's ``/limits`` read (once per run,
    for the API budget). Salesforce's deaths come with its queryAll pull, at no call of their own."""
    if system == "hubspot":
        return sum(v for k, v in counts.items() if k.startswith("hubspot.") and k.endswith(".list"))
    return counts.get("salesforce.limits", 0)


def _change(env: Env, n: int, rng: random.Random) -> int:
    """``n`` changes, half in each CRM, each one the rules act on (so both write directions
    are exercised): HubSpot lead-stage contacts unknown to Salesforce get a score over the
    MQL threshold (hand-off: Salesforce Lead creates); open Salesforce Leads move between
    Open and Working (HubSpot lead status updates)."""

    def norm(e: Any) -> str:
        return str(e or "").strip().lower()

    sf_emails = {norm(r.get("Email")) for o in ("Lead", "Contact") for r in env.sb.salesforce.all(o)}
    hs = [
        c
        for c in env.sb.hubspot.all("contacts")
        if c.get("lifecyclestage") == "lead"
        and int(c.get("hubspotscore") or 0) < 45
        and norm(c.get("email")) not in sf_emails
    ]
    sf = [r for r in env.sb.salesforce.all("Lead") if not r.get("IsConverted")]
    made = 0
    for c in rng.sample(hs, min(n // 2, len(hs))):
        env.sb.hubspot.modify("contacts", c["hs_object_id"], {"hubspotscore": "90"})
        made += 1
    statuses = ("Open - Not Contacted", "Working - Contacted")
    for r in rng.sample(sf, min(n - made, len(sf))):
        new = statuses[1] if r.get("Status") == statuses[0] else statuses[0]
        env.sb.salesforce.modify("Lead", r["Id"], {"Status": new})
        made += 1
    return made


def run(people: int, deals: int, changes: int = 1000, no_change_sizes: Sequence[int] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"people": people, "deals": deals}
    with seeded(people, deals) as env:
        conns = _install(env)
        st, counts, secs = _cycle(env, conns)
        out["backfill"] = {
            "stats": st.summary(),
            "pulled": dict(st.pulled),
            "counts": counts,
            "seconds": secs,
            "rows": _directions(st, counts, conns),
        }
        # settle: the backfill's own writes come back once as echoes
        _cycle(env, conns)
        _cycle(env, conns)
        time.sleep(0.01)
        st, counts, secs = _cycle(env, conns)
        out["no_change"] = {people: {"counts": counts, "stats": st.summary()}}
        made = _change(env, changes, random.Random(7))
        st, counts, secs = _cycle(env, conns)
        out["incremental"] = {
            "changes": made,
            "stats": st.summary(),
            "pulled": dict(st.pulled),
            "counts": counts,
            "seconds": secs,
            "rows": _directions(st, counts, conns),
        }
    for n in no_change_sizes:
        if n == people:
            continue
        with seeded(n, n // 5) as env:
            conns = _install(env)
            for _ in range(3):
                _cycle(env, conns)
            st, counts, _ = _cycle(env, conns)
            out["no_change"][n] = {"counts": counts, "stats": st.summary()}
    return out


def no_change_per_object(counts: dict[str, int]) -> dict[str, float]:
    """Calls per pulled object per system (HubSpot: contacts, deals; Salesforce: 4 objects)."""
    from syncd.runtime import PULL_OBJECTS

    hs = sum(v for k, v in counts.items() if k.startswith("hubspot."))
    sf = sum(v for k, v in counts.items() if k.startswith("salesforce."))
    return {
        "hubspot": hs / len(PULL_OBJECTS["hubspot"]),
        "salesforce": sf / len(PULL_OBJECTS["salesforce"]),
    }
