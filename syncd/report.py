"""What operators read: `syncd status`, `syncd audit`, and `--dry-run` tables (rich)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from syncd import burn, freshness
from syncd.logs import mask_email
from syncd.model import OBJECT_GROUPS, SYSTEMS
from syncd.store import AuditRow, Store

if TYPE_CHECKING:
    from syncd.engine import PlannedWrite


ALIVE_S = 30.0  # a service beats every 2 s: one unseen for this long has stopped


def _console() -> Console:
    return Console(soft_wrap=False, width=160)


def _ago(now: datetime, t: datetime | None) -> str:
    if t is None:
        return "never"
    s = int((now - t).total_seconds())
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _failing(tx: Any, min_attempts: int) -> dict[str, Any]:
    """Writes still failing after ``min_attempts`` sends (transient: retried until they land)."""
    rows = tx.failing_writes(min_attempts, limit=1)
    oldest = rows[0] if rows else None
    return {"count": tx.count_failing_writes(min_attempts),
            "oldest": {"system": oldest.system, "object": oldest.object, "record_id": oldest.record_id,
                       "attempts": oldest.attempts, "last_error": oldest.last_error} if oldest else None}


def status_data(store: Store, now: datetime,
                bounds: dict[tuple[str, str], Any] | None = None, failing_after: int = 5) -> dict[str, Any]:
    """Everything `syncd status` shows, as plain data (also the --json output). ``bounds``:
    the freshness bound per (system, object) of the config in force (default intervals)."""
    with store.tx() as tx:
        pulls = tx.pull_states()
        pic = freshness.Picture(pulls, bounds or freshness.bounds(), now)
        objects = []
        for system in SYSTEMS:
            for group in OBJECT_GROUPS.values():
                for obj in group[system]:
                    cur = tx.get_cursor(system, obj)
                    ps = pulls.get((system, obj))
                    objects.append({
                        "system": system, "object": obj,
                        "cursor": cur.to_json() if cur else None,
                        # how far behind the CRM the store can be: everything changed before the
                        # last complete pull is in it (the newest record's age is not lag: a quiet
                        # object would look days behind)
                        "lag_s": round((now - ps.last_ok_at).total_seconds(), 1) if ps and ps.last_ok_at else None,
                        "records": tx.count_records(system, obj),
                        "quarantined": sum(1 for q in tx.open_quarantine(system) if q.object == obj),
                        "unmapped": sum(u.count for u in tx.unmapped_values(system) if u.object == obj),
                        "first_complete_pull": _iso(ps.first_complete_at) if ps else None,
                        "last_pull": _iso(ps.last_ok_at) if ps else None,
                        "failing_since": _iso(ps.failing_since) if ps else None,
                        "last_error": ps.last_error if ps else None,
                        "held_because": pic.problem((system, obj)),
                    })
        systems = {}
        for system in SYSTEMS:
            mine = [pulls.get((system, o)) for g in OBJECT_GROUPS.values() for o in g[system]]
            oks = [p.last_ok_at for p in mine if p is not None and p.last_ok_at is not None]
            failing = [p for p in mine if p is not None and p.failing_since is not None]
            first_fail = min(failing, key=lambda p: p.failing_since or now) if failing else None
            systems[system] = {
                # every object of the system pulled to the end at least this recently
                "last_complete_pull": _iso(min(oks)) if len(oks) == len(mine) else None,
                "failing_since": _iso(first_fail.failing_since) if first_fail else None,
                "error": first_fail.last_error if first_fail else None,
            }
        held = list(dict.fromkeys(pic.blockers("person") + pic.blockers("deal")))
        runs = tx.last_runs(limit=20)
        last_ok: dict[str, datetime] = {}
        api: dict[str, Any] = {}
        for r in runs:  # newest first: the latest figure per system
            for system, usage in (r.stats.get("api") or {}).items():
                api.setdefault(system, {**usage, "as_of": (r.finished_at or r.started_at).isoformat()})
        for r in runs:
            if r.status == "ok" and r.finished_at and r.job not in last_ok:
                last_ok[r.job] = r.finished_at
        return {
            "now": now.isoformat(),
            "picture": {"complete": not held, "held": held},
            "systems": systems,
            "objects": objects,
            "outbox": {s: tx.outbox_depth(s) for s in SYSTEMS},
            "quarantine": [{"id": q.id, "system": q.system, "object": q.object, "record_id": q.record_id,
                            "kind": q.kind, "reason": q.reason, "attempts": q.attempts, "at": q.at.isoformat()}
                           for q in tx.open_quarantine()],
            "unmapped_values": [{"system": u.system, "object": u.object, "field": u.field, "value": u.value,
                                 "count": u.count} for u in tx.unmapped_values()[:20]],
            "undecided": len(tx.due_entities(now)) if held else 0,
            "failing_writes": _failing(tx, failing_after),
            "runs": [{"job": r.job, "status": r.status, "started_at": r.started_at.isoformat(),
                      "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                      "stats": r.stats, "error": r.error} for r in runs[:10]],
            "last_success": {job: t.isoformat() for job, t in last_ok.items()},
            "api_usage": api,
            "api_budget": burn.burn(tx, now.timestamp()),  # the ledger: calls, caps, pace, pauses
            "sla_breaches": [{"id": e.id, "entity_id": e.entity_id, "at": e.at.isoformat(), "details": e.details}
                             for e in tx.open_events("sla_breach")],
            "events_open": {k: len(tx.open_events(k)) for k in ("promotion_blocked", "conflict", "returned")},
            "link_conflicts": len(tx.open_link_conflicts()),
            "resync_queue": [{"id": r.id, "state": r.state, "params": r.params,
                              "requested_at": r.requested_at.isoformat()} for r in tx.resync_queue()],
            "services": [{"owner": h.owner, "pid": h.pid, "seen_at": h.seen_at.isoformat(), **h.info,
                          "alive": (now - h.seen_at).total_seconds() <= ALIVE_S}
                         for h in tx.heartbeats()],
        }


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    now = datetime.fromisoformat(data["now"])
    last = data["last_success"]
    t = Table(title="syncd status", title_justify="left")
    for col in ("system", "object", "records", "cursor", "lag", "last pull", "quarantined", "unmapped"):
        t.add_column(col, justify="right" if col in ("records", "quarantined", "unmapped", "lag") else "left")
    for o in data["objects"]:
        cur = o["cursor"]["modified_at"][:19] if o["cursor"] else "—"
        lag = freshness.human_age(timedelta(seconds=o["lag_s"])) if o["lag_s"] is not None else "—"
        last_pull = _ago(now, datetime.fromisoformat(o["last_pull"])) if o.get("last_pull") else "never"
        if o.get("failing_since"):
            last_pull += " (failing)"
        t.add_row(o["system"], o["object"], str(o["records"]), cur, lag, last_pull, str(o["quarantined"]),
                  str(o["unmapped"]))
    console.print(t)
    picture = data.get("picture") or {"complete": True, "held": []}
    if picture["complete"]:
        console.print("picture: complete (every object pulled within its freshness bound)")
    else:
        console.print(f"picture: PARTIAL: {data.get('undecided', 0)} due people/deals are not decided "
                      "until every CRM object they read is pulled:")
        for why in picture["held"]:
            console.print(f"  - {mask_email(why)}")
    for system, st in (data.get("systems") or {}).items():
        pulled = _ago(now, datetime.fromisoformat(st["last_complete_pull"])) if st["last_complete_pull"] else "never"
        line = f"{system}: last complete pull {pulled}"
        if st["failing_since"]:
            since = datetime.fromisoformat(st["failing_since"])
            line += f"; failing since {st['failing_since'][:19]} ({_ago(now, since)}): {mask_email(st['error'] or '')}"
        console.print(line)
    if data["runs"] and data["runs"][0]["status"] in ("partial", "failed", "interrupted"):
        r = data["runs"][0]
        console.print(f"last cycle: {r['status']} ({r['job']}, {r['started_at'][:19]}): "
                      f"{mask_email(r['error'] or '')}")
    console.print("last successful cycle: " + (", ".join(
        f"{job} {_ago(now, datetime.fromisoformat(ts))}" for job, ts in last.items()) or "none yet"))
    console.print("pending outbox: " + ", ".join(f"{s} {n}" for s, n in data["outbox"].items())
                  + f"   open SLA breaches: {len(data['sla_breaches'])}"
                  + f"   link conflicts: {data['link_conflicts']}"
                  + f"   blocked re-hand-offs: {data['events_open'].get('promotion_blocked', 0)}")
    fw = data.get("failing_writes") or {}
    if fw.get("count"):
        o = fw["oldest"]
        console.print(f"writes failing: {fw['count']} (oldest: {o['system']} {o['record_id']}, {o['attempts']} tries, "
                      f"last error: {mask_email(o['last_error'] or '')}); retried until they land")
    if data.get("api_usage"):
        parts = []
        for system, u in sorted(data["api_usage"].items()):
            reported = (f", CRM reports {u['reported_used']}/{u['reported_limit']} today"
                        if u.get("reported_used") is not None and u.get("reported_limit") else "")
            parts.append(f"{system} {u['calls']} calls ({u.get('rate_limited', 0)} rate-limited){reported}")
        console.print("API usage (last run's process): " + "; ".join(parts))
    burn.print_lines(data.get("api_budget") or {}, console)  # API burn and pauses, per system
    if data["unmapped_values"]:
        u = Table(title="unmapped CRM values (never guessed: add them to the mapping files)", title_justify="left")
        for col in ("system", "object", "field", "value", "seen"):
            u.add_column(col)
        for row in data["unmapped_values"]:
            u.add_row(row["system"], row["object"], row["field"], row["value"], str(row["count"]))
        console.print(u)
    if data["quarantine"]:
        q = Table(title="quarantine (a resync retries these)", title_justify="left")
        for col in ("id", "system", "object", "record", "kind", "tries", "reason"):
            q.add_column(col)
        for row in data["quarantine"][:20]:
            q.add_row(str(row["id"]), row["system"], row["object"], str(row["record_id"]), row["kind"],
                      str(row["attempts"]), mask_email(row["reason"])[:80])
        console.print(q)
    if data["sla_breaches"]:
        b = Table(title="open SLA breaches (MQL not followed up in time)", title_justify="left")
        for col in ("entity", "since", "details"):
            b.add_column(col)
        for row in data["sla_breaches"][:20]:
            b.add_row(row["entity_id"][:8], row["at"][:19], mask_email(str(row["details"].get("reason", "")))[:90])
        console.print(b)
    if data["resync_queue"]:
        console.print("queued resyncs: " + ", ".join(f"#{r['id']} {r['state']}" for r in data["resync_queue"]))
    live = [x for x in data["services"] if x.get("alive", True)]
    stopped = len(data["services"]) - len(live)
    if live or stopped:
        console.print("services on this store: " + (", ".join(
            f"{x['owner']} (pid {x['pid']}, seen {_ago(now, datetime.fromisoformat(x['seen_at']))})" for x in live)
            or "none running") + (f"   ({stopped} stopped, not beating)" if stopped else ""))


def print_audit(rows: Sequence[AuditRow], console: Console | None = None, *, show_emails: bool = True) -> None:
    console = console or _console()
    t = Table(title=f"audit ({len(rows)} writes)", title_justify="left")
    for col in ("time", "who", "system", "record", "field", "before → after", "rule", "reason", "mappings"):
        t.add_column(col, overflow="fold")
    for r in rows:
        who = r.email_norm or r.entity_id or ""
        t.add_row(r.at.isoformat()[:19], who if show_emails else mask_email(who), r.system,
                  f"{r.object}/{r.record_id}", r.field, f"{r.before} → {r.after}", r.rule, r.reason,
                  r.mapping_rev if ":" in r.mapping_rev else r.mapping_rev[:12])  # keep "+dirty"
    console.print(t)


def planned_writes_table(planned: Sequence[PlannedWrite], console: Console | None = None) -> None:
    console = console or _console()
    t = Table(title=f"dry run: {len(planned)} planned writes (nothing was changed)", title_justify="left")
    for col in ("who", "system", "record", "what", "rule", "why"):
        t.add_column(col, overflow="fold")
    for p in planned:
        what = ", ".join(f"{k}: {b} → {a}" for k, (b, a) in p.changes.items())
        rec = f"{p.object}/{p.record_id}" if p.record_id else f"{p.object} (new)"
        t.add_row(p.who, p.system, rec, what, p.rule, p.reason)
    console.print(t)
