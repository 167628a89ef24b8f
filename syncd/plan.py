"""Plan before spending: what a resync or the first backfill will cost, in API calls per system.

The estimate counts records first (one cheap call per object: HubSpot search ``total`` with
``limit`` 1, SOQL ``SELECT COUNT()``), then turns counts into calls with the connectors' own
arithmetic (:meth:`~syncd.connectors.base.Connector.pull_calls`: HubSpot search pages of 200,
a restart per 10,000-result window, deal association reads of 1,000; Salesforce query batches
of 2,000), plus the quarantined records a resync fetches again and the writes already queued.
Writes that the resync's own decisions make are not known before it runs: the plan says so.

:func:`would_exceed` is the one place the cap is checked: against what is left of syncd's API
share in the shared ledger (every process on the store; :func:`syncd.connectors._pacing.would_exceed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd.config import Config
from syncd.model import OBJECT_GROUPS

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class ObjectCost:
    system: str
    object: str
    since: datetime | None  # None: everything
    records: int
    pull_calls: int
    refetch_calls: int  # quarantined records fetched again
    write_calls: int  # writes already queued in the outbox

    @property
    def calls(self) -> int:
        return self.pull_calls + self.refetch_calls + self.write_calls


@dataclass
class Plan:
    what: str
    objects: list[ObjectCost] = field(default_factory=list)
    count_calls: dict[str, int] = field(default_factory=dict)  # spent on the plan itself
    refusals: dict[str, str] = field(default_factory=dict)  # system -> why it would cross the cap
    # per system, calls a run makes once whatever it pulls (Salesforce: its /limits read)
    per_run: dict[str, int] = field(default_factory=dict)

    def calls(self, system: str) -> int:
        return sum(o.calls for o in self.objects if o.system == system) + self.per_run.get(system, 0)

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(o.system for o in self.objects))

    def as_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "objects": [{"system": o.system, "object": o.object, "since": o.since.isoformat() if o.since else None,
                         "records": o.records, "pull_calls": o.pull_calls, "refetch_calls": o.refetch_calls,
                         "write_calls": o.write_calls, "calls": o.calls} for o in self.objects],
            "calls": {s: self.calls(s) for s in self.systems},
            "count_calls": self.count_calls,
            "would_exceed": self.refusals,
        }


def would_exceed(store: Any, cfg: Config, calls: Mapping[str, int]) -> dict[str, str]:
    """Per system whose ``calls`` would cross what is left of its cap (``daily_share`` of the
    org's limit, ``daily_budget``), counted in the shared ledger by every process on the store:
    the one-line reason. Empty: the plan fits."""
    from syncd.connectors import _pacing

    return _pacing.would_exceed(store, cfg, calls)

def _since(tx: Any, system: str, obj: str, *, full: bool, since: datetime | None,
           overlap: timedelta) -> datetime | None:
    """Where a pull of ``obj`` starts: nothing (full), ``since`` or the stored cursor, less the overlap."""
    if full:
        return None
    start = since
    if start is None:
        cur = tx.get_cursor(system, obj)
        start = cur.modified_at if cur is not None else None
    return start - overlap if start is not None else None


def estimate(rt: Any, *, groups: list[str] | None = None, full: bool = False,
             since: datetime | None = None, what: str = "") -> Plan:
    """The cost of pulling ``groups`` (all by default) from ``since`` / the cursors / everything
    (``full``), for every connector of ``rt`` (a :class:`syncd.runtime.Runtime`)."""
    overlap = timedelta(seconds=rt.config.sync.overlap_s)
    plan = Plan(what or ("full" if full else f"since {since.isoformat()}" if since else "from the cursors"))
    with rt.store.tx(readonly=True) as tx:
        queued = tx.open_writes_by_object()
        starts = {(system, obj): (_since(tx, system, obj, full=full, since=since, overlap=overlap),
                                  len(tx.quarantined_record_ids(system, obj)))
                  for g in groups or list(OBJECT_GROUPS) for system in rt.connectors
                  for obj in OBJECT_GROUPS[g][system]}
    if not full and since is None and all(st is None for st, _ in starts.values()):
        plan.what = "first backfill (nothing pulled yet)"
    for (system, obj), (start, quarantined) in starts.items():
        conn = rt.connectors[system]
        records = conn.count(obj, since=start)
        plan.count_calls[system] = plan.count_calls.get(system, 0) + 1
        # Salesforce's queryAll pull brings the deleted rows along; HubSpot's archive scan is paced
        # apart (15 min) and not counted
        plan.objects.append(ObjectCost(system, obj, start, records, conn.pull_calls(obj, records),
                                       conn.fetch_calls(obj, quarantined),
                                       conn.write_calls(obj, queued.get((system, obj), 0))))
    for system, conn in rt.connectors.items():
        if callable(getattr(conn, "read_limits", None)):
            plan.per_run[system] = 1  # the run's budget reads the org's limits once
    plan.refusals.update(would_exceed(rt.store, rt.config, {s: plan.calls(s) for s in plan.systems}))
    return plan


def print_plan(plan: Plan) -> None:
    from syncd.sheet import Sheet, say, stdout_console, token

    t = Sheet(f"cost plan: {plan.what} (API calls per system)")
    for col in ("system", "object", "from", "records", "pull calls", "refetch", "queued writes", "calls"):
        token(t, col, justify="left" if col in ("system", "object", "from") else "right")
    for o in plan.objects:
        t.add_row(o.system, o.object, o.since.isoformat()[:19] if o.since else "everything", f"{o.records:,}",
                  f"{o.pull_calls:,}", f"{o.refetch_calls:,}", f"{o.write_calls:,}", f"{o.calls:,}")
    for system in plan.systems:
        t.add_row(system, "total", "", f"{sum(o.records for o in plan.objects if o.system == system):,}",
                  "", "", "", f"{plan.calls(system):,}")
    console = stdout_console()
    t.print(console)
    say(console, "plus the writes the resync's own decisions make (known only once it decides); "
                 f"counting cost {sum(plan.count_calls.values())} calls")
    for why in plan.refusals.values():
        say(console, f"over the cap: {why}", style="bold red")


def check_resync(cfg: Config, req: Any, *, show: bool, force: bool) -> None:
    """``syncd resync --plan`` (``show``: print the plan) and the cap check before a resync that
    pulls (``--full`` / ``--since``). Raises SyncError when it would cross the cap, unless ``force``."""
    from syncd.errors import SyncError
    from syncd.runtime import open_runtime

    rt = open_runtime(cfg)
    try:
        plan = estimate(rt, groups=req.groups, full=req.full, since=req.since, what=req.describe())
    except SyncError as exc:  # a CRM that cannot even count: no plan, so no start without --force
        if not force or show:
            hint = "" if show else " (--force starts it anyway)"
            raise SyncError(f"resync: cannot estimate its cost: {exc}{hint}") from exc
        log.warning("resync_plan_failed", error=str(exc), note="--force: starting without a plan")
        return
    finally:
        rt.close()
    log.info("resync_plan", request=req.describe(), calls={s: plan.calls(s) for s in plan.systems},
             would_exceed=sorted(plan.refusals))
    if show:
        print_plan(plan)
    if plan.refusals and not force:
        raise SyncError("resync refused: " + "; ".join(plan.refusals.values()) + " (--force to start anyway)")


def log_first_backfill(rt: Any) -> Plan | None:
    """Before a first backfill (an object with no complete pull yet): estimate and log its cost.
    Never raises: an estimate never stops the backfill itself."""
    try:
        with rt.store.tx(readonly=True) as tx:
            pulled = tx.pull_states()
        fresh = [g for g in OBJECT_GROUPS for s in rt.connectors for o in OBJECT_GROUPS[g][s]
                 if getattr(pulled.get((s, o)), "first_complete_at", None) is None]
        if not fresh:
            return None
        plan = estimate(rt, groups=list(dict.fromkeys(fresh)), what="first backfill")
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("backfill_plan_failed", error=str(exc))
        return None
    log.info("backfill_plan", calls={s: plan.calls(s) for s in plan.systems},
             records={f"{o.system}.{o.object}": o.records for o in plan.objects},
             would_exceed=list(plan.refusals.values()) or None)
    return plan
