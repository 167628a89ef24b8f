"""What operators read: `syncd status` (and `--explain`), `syncd audit`, and `--dry-run` tables (rich).

Its tables are :class:`syncd.sheet.Sheet` s: tokens never split, free text wrapped between words,
cards on a narrow terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from syncd import burn, freshness
from syncd.logs import mask_email
from syncd.model import OBJECT_GROUPS, SYSTEMS
from syncd.reconcile import status as reconcile_status
from syncd.sheet import Sheet, prose, say, stdout_console, token
from syncd.store import AuditRow, Store

if TYPE_CHECKING:
    from syncd.engine import PlannedWrite


ALIVE_S = 30.0  # a service beats every 2 s: one unseen for this long has stopped
CYCLES_SHOWN = 5
RESYNCS_SHOWN = 5


# -- times and durations, for people ------------------------------------------------------------

def _ago(now: datetime, t: datetime | None) -> str:
    if t is None:
        return "never"
    return f"{freshness.human_age(now - t)} ago"


def _when(now: datetime, t: datetime | str | None) -> str:
    """``11:49 UTC (2m ago)``; a date as well when it is not today; ``in 4m`` for the future."""
    if t is None:
        return "never"
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    clock = t.strftime("%H:%M UTC") if t.date() == now.date() else t.strftime("%Y-%m-%d %H:%M UTC")
    rel = f"in {freshness.human_age(t - now)}" if t > now else _ago(now, t)
    return f"{clock} ({rel})"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


# -- the data -------------------------------------------------------------------------------------

def _failing(tx: Any, min_attempts: int) -> dict[str, Any]:
    """Writes still failing after ``min_attempts`` sends (transient: retried until they land)."""
    rows = tx.failing_writes(min_attempts, limit=1)
    oldest = rows[0] if rows else None
    return {"count": tx.count_failing_writes(min_attempts),
            "oldest": {"system": oldest.system, "object": oldest.object, "record_id": oldest.record_id,
                       "attempts": oldest.attempts, "last_error": oldest.last_error} if oldest else None}


def _object_row(tx: Any, system: str, obj: str, ps: Any, pic: freshness.Picture, now: datetime,
                quarantine: Sequence[Any], unmapped: Sequence[Any]) -> dict[str, Any]:
    cur = tx.get_cursor(system, obj)
    return {
        "system": system, "object": obj,
        "cursor": cur.to_json() if cur else None,
        # the newest CRM change the store holds (after a complete pull: the CRM's newest then)
        "newest_change": _iso(cur.modified_at) if cur else None,
        # how far behind the CRM the store can be: everything changed before the last complete
        # pull is in it, anything after is not yet (the newest record's age is not lag: a quiet
        # object would look days behind)
        "lag_s": round((now - ps.last_ok_at).total_seconds(), 1) if ps and ps.last_ok_at else None,
        "records": tx.count_records(system, obj),
        "quarantined": sum(1 for q in quarantine if q.system == system and q.object == obj),
        "unmapped": sum(u.count for u in unmapped if u.system == system and u.object == obj),
        "first_complete_pull": _iso(ps.first_complete_at) if ps else None,
        "last_pull": _iso(ps.last_ok_at) if ps else None,
        "failing_since": _iso(ps.failing_since) if ps else None,
        "last_error": ps.last_error if ps else None,
        "last_error_at": _iso(ps.last_error_at) if ps else None,
        "held_because": pic.problem((system, obj)),
    }


def pause_kind(why: str) -> str:
    """auth | budget | outage, from a back-off's or a failed pull's one-line reason."""
    low = why.lower()
    if "authentication" in low or "autherror" in low:
        return "auth"
    if "budget" in low or "budgetexhausted" in low:
        return "budget"
    return "outage"


def _system_row(system: str, pulls: Mapping[Any, Any], services: Sequence[Mapping[str, Any]],
                now: datetime) -> dict[str, Any]:
    mine = [pulls.get((system, o)) for g in OBJECT_GROUPS.values() for o in g[system]]
    oks = [p.last_ok_at for p in mine if p is not None and p.last_ok_at is not None]
    failing = [p for p in mine if p is not None and p.failing_since is not None]
    first_fail = min(failing, key=lambda p: p.failing_since or now) if failing else None
    errored = [p for p in mine if p is not None and p.last_error_at is not None]
    last_err = max(errored, key=lambda p: p.last_error_at or now) if errored else None
    paused = None
    for svc in services:  # a live service that backed off this system says why and until when
        p = (svc.get("paused") or {}).get(system)
        if svc.get("alive") and p and datetime.fromisoformat(p["until"]) > now:
            paused = {"kind": pause_kind(p["why"]), "why": p["why"], "until": p["until"], "by": svc["owner"]}
            break
    return {
        # every object of the system pulled to the end at least this recently
        "last_complete_pull": _iso(min(oks)) if len(oks) == len(mine) else None,
        "failing_since": _iso(first_fail.failing_since) if first_fail else None,
        "error": first_fail.last_error if first_fail else None,
        # auth | budget | outage: what kind of failure (a failing system without a back-off is
        # tried again by every cycle)
        "failure_kind": pause_kind(first_fail.last_error or "") if first_fail else None,
        "last_error": last_err.last_error if last_err else None,
        "last_error_at": _iso(last_err.last_error_at) if last_err else None,
        "paused": paused,
    }


def _run_row(r: Any) -> dict[str, Any]:
    return {"job": r.job, "status": r.status, "started_at": r.started_at.isoformat(),
            "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            "stats": r.stats, "error": r.error}


def _resync_row(r: Any) -> dict[str, Any]:
    result = r.result if isinstance(r.result, dict) else {}
    outcome = r.state
    if r.state == "failed" and str(result.get("error", "")).startswith(("interrupted", "the service running it")):
        outcome = "interrupted"
    return {"id": r.id, "state": r.state, "outcome": outcome, "params": r.params,
            "inline": bool((r.params or {}).get("inline")), "requested_at": r.requested_at.isoformat(),
            "done_at": _iso(r.done_at), "picked_by": r.picked_by,
            "error": result.get("error"), "counts": {k: v for k, v in result.items() if isinstance(v, int)}}


def _services(tx: Any, now: datetime) -> list[dict[str, Any]]:
    return [{"owner": h.owner, "pid": h.pid, "seen_at": h.seen_at.isoformat(), **h.info,
             "alive": (now - h.seen_at).total_seconds() <= ALIVE_S} for h in tx.heartbeats()]


def _last_success(runs: Sequence[Any]) -> dict[str, datetime]:
    last_ok: dict[str, datetime] = {}
    for r in runs:
        if r.status == "ok" and r.finished_at and r.job not in last_ok:
            last_ok[r.job] = r.finished_at
    return last_ok


def _api_usage(runs: Sequence[Any]) -> dict[str, Any]:
    api: dict[str, Any] = {}
    for r in runs:  # newest first: the latest figure per system
        for system, usage in (r.stats.get("api") or {}).items():
            api.setdefault(system, {**usage, "as_of": (r.finished_at or r.started_at).isoformat()})
    return api


def status_data(store: Store, now: datetime,
                bounds: dict[tuple[str, str], Any] | None = None, failing_after: int = 5) -> dict[str, Any]:
    """Everything `syncd status` shows, as plain data (also the --json output). ``bounds``:
    the freshness bound per (system, object) of the config in force (default intervals)."""
    with store.tx() as tx:
        pulls = tx.pull_states()
        pic = freshness.Picture(pulls, bounds or freshness.bounds(), now)
        quarantine, unmapped = tx.open_quarantine(), tx.unmapped_values()
        objects = [_object_row(tx, system, obj, pulls.get((system, obj)), pic, now, quarantine, unmapped)
                   for system in SYSTEMS for group in OBJECT_GROUPS.values() for obj in group[system]]
        services = _services(tx, now)
        held = list(dict.fromkeys(pic.blockers("person") + pic.blockers("deal")))
        runs = tx.last_runs(limit=20)
        return {
            "now": now.isoformat(),
            "picture": {"complete": not held, "held": held},
            "systems": {system: _system_row(system, pulls, services, now) for system in SYSTEMS},
            "objects": objects,
            "outbox": {s: tx.outbox_depth(s) for s in SYSTEMS},
            "quarantine": [{"id": q.id, "system": q.system, "object": q.object, "record_id": q.record_id,
                            "kind": q.kind, "reason": q.reason, "attempts": q.attempts, "at": q.at.isoformat()}
                           for q in quarantine],
            "unmapped_values": [{"system": u.system, "object": u.object, "field": u.field, "value": u.value,
                                 "count": u.count} for u in unmapped[:20]],
            "undecided": len(tx.due_entities(now)) if held else 0,
            "failing_writes": _failing(tx, failing_after),
            "runs": [_run_row(r) for r in runs[:10]],
            "last_success": {job: t.isoformat() for job, t in _last_success(runs).items()},
            "api_usage": _api_usage(runs),
            "api_budget": burn.burn(tx, now.timestamp()),  # the ledger: calls, caps, pace, pauses
            "sla_breaches": [{"id": e.id, "entity_id": e.entity_id, "at": e.at.isoformat(), "details": e.details}
                             for e in tx.open_events("sla_breach")],
            "events_open": {k: len(tx.open_events(k)) for k in ("promotion_blocked", "conflict", "returned")},
            "link_conflicts": len(tx.open_link_conflicts()),
            "tombstones": {"count": tx.count_tombstones(), "recent": [
                {"system": t.system, "object": t.object, "record_id": t.record_id, "kind": t.kind,
                 "merged_into": t.merged_into, "source": t.source, "detected_at": t.detected_at.isoformat()}
                for t in tx.list_tombstones(limit=10)]},
            "reconcile": reconcile_status(tx),
            "resync_queue": [{"id": r.id, "state": r.state, "params": r.params,
                              "requested_at": r.requested_at.isoformat()} for r in tx.resync_queue()],
            "resync_history": [_resync_row(r) for r in tx.resync_history(10)],
            "services": services,
        }


# -- printing -------------------------------------------------------------------------------------

def _objects_table(data: dict[str, Any], now: datetime, console: Console) -> None:
    t = Sheet("syncd status: what the store holds of each CRM object")
    for col in ("system", "object"):
        token(t, col)
    token(t, "records", justify="right")
    token(t, "newest change held")
    token(t, "last complete pull")
    token(t, "lag", justify="right")
    token(t, "quarantined", justify="right")
    token(t, "unmapped", justify="right")
    for o in data["objects"]:
        newest = _ago(now, datetime.fromisoformat(o["newest_change"])) if o.get("newest_change") else "—"
        lag = (f"≤ {freshness.human_age(timedelta(seconds=o['lag_s']))}" if o["lag_s"] is not None
               else "first pull not done")
        last_pull = _ago(now, datetime.fromisoformat(o["last_pull"])) if o.get("last_pull") else "never"
        if o.get("failing_since"):
            last_pull += " (failing)"
        t.add_row(o["system"], o["object"], str(o["records"]), newest, last_pull, lag, str(o["quarantined"]),
                  str(o["unmapped"]))
    t.print(console)
    say(console, "lag: how far behind the CRM the store can be — changes made after the last "
        "complete pull are not in it yet.", "dim")


def _picture_lines(data: dict[str, Any], console: Console) -> None:
    picture = data.get("picture") or {"complete": True, "held": []}
    if picture["complete"]:
        say(console, "picture: complete (every object pulled within its freshness bound)")
        return
    say(console, f"picture: PARTIAL: {data.get('undecided', 0)} due people/deals are not decided "
                  "until every CRM object they read is pulled:")
    for why in picture["held"]:
        say(console, f"  - {mask_email(why)}")


def _system_lines(data: dict[str, Any], now: datetime, console: Console) -> None:
    for system, st in (data.get("systems") or {}).items():
        pulled = _ago(now, datetime.fromisoformat(st["last_complete_pull"])) if st["last_complete_pull"] else "never"
        line = f"{system}: last complete pull {pulled}"
        if st["failing_since"]:
            kind = f" ({st['failure_kind']})" if st.get("failure_kind") else ""
            line += f"; failing since {_when(now, st['failing_since'])}{kind}: {mask_email(st['error'] or '')}"
        elif st.get("last_error"):
            line += f"; last error {_when(now, st['last_error_at'])}: {mask_email(st['last_error'])}"
        say(console, line)
        p = st.get("paused")
        if p:
            say(console, f"  PAUSED ({p['kind']}) by the service until {_when(now, p['until'])}, then tried "
                          f"again: {mask_email(p['why'])}")
        elif st["failing_since"]:
            say(console, "  not paused: every cycle tries it again")


def _cycles_table(data: dict[str, Any], now: datetime, console: Console) -> None:
    runs = data["runs"][:CYCLES_SHOWN]
    if not runs:
        say(console, "cycles: none yet")
        return
    r = runs[0]
    if r["status"] in ("partial", "failed", "interrupted"):
        why = mask_email(r["error"]) if r["error"] else (
            "stopped before it finished (a shutdown or a restart); the next cycle picks up where it left off"
            if r["status"] == "interrupted" else "no reason recorded")
        say(console, f"last cycle: {r['status']} ({r['job']}, {_when(now, r['started_at'])}): {why}")
    t = Sheet(f"last {len(runs)} cycle{'s' if len(runs) != 1 else ''} "
              "(ok | partial: decisions held | failed | interrupted)")
    token(t, "started")
    token(t, "job")
    token(t, "outcome")
    token(t, "pulled", justify="right")
    token(t, "sent", justify="right")
    prose(t, "reason")
    for r in runs:
        stats = r.get("stats") or {}
        t.add_row(_when(now, r["started_at"]), r["job"], r["status"], str(stats.get("pulled", "—")),
                  str(stats.get("sent", "—")), mask_email(r["error"] or ""))
    t.print(console)


def _resync_table(data: dict[str, Any], now: datetime, console: Console) -> None:
    rows = data.get("resync_history") or []
    if not rows:
        return
    t = Sheet(f"resyncs (last {min(len(rows), RESYNCS_SHOWN)}, newest first)")
    token(t, "#", justify="right")
    token(t, "requested")
    token(t, "what")
    token(t, "outcome")
    prose(t, "counts or error")
    for r in rows[:RESYNCS_SHOWN]:
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v)
        detail = mask_email(r["error"]) if r.get("error") else (counts or "nothing to do")
        t.add_row(str(r["id"]), _when(now, r["requested_at"]), _describe(r["params"]) + (" (inline)" if r["inline"]
                  else ""), r["outcome"], detail)
    t.print(console)


def _describe(params: Mapping[str, Any]) -> str:
    what = ("full" if params.get("full") else f"since {str(params['since'])[:16]}" if params.get("since")
            else "one person" if params.get("email") else f"record {params['record']}" if params.get("record")
            else "cycle + quarantine")
    return f"{params.get('group') or 'all objects'}, {what}"


def _counts_lines(data: dict[str, Any], now: datetime, console: Console) -> None:
    last = data["last_success"]
    say(console, "last successful cycle: " + (", ".join(
        f"{job} {_ago(now, datetime.fromisoformat(ts))}" for job, ts in last.items()) or "none yet"))
    blocked = data["events_open"].get("promotion_blocked", 0)
    say(console, "pending outbox: " + ", ".join(f"{s} {n}" for s, n in data["outbox"].items())
                  + f"   open SLA breaches: {len(data['sla_breaches'])}"
                  + f"   link conflicts: {data['link_conflicts']}"
                  + f"   blocked re-hand-offs: {blocked}")
    if data["link_conflicts"]:
        say(console, f"  {data['link_conflicts']} link conflicts: one email on several records of one CRM; syncd "
                      "links none of them until a person picks one (`syncd conflicts`).")
    if blocked:
        say(console, f"  {blocked} people qualified again after sales returned them, but without new evidence "
                      "(a bottom-of-funnel conversion or a large score rise): syncd keeps them with marketing "
                      "rather than hand them back to sales (`syncd blocked` lists them; `release` hands one off).")
    fw = data.get("failing_writes") or {}
    if fw.get("count"):
        o = fw["oldest"]
        say(console, f"writes failing: {fw['count']} (oldest: {o['system']} {o['record_id']}, {o['attempts']} tries, "
                      f"last error: {mask_email(o['last_error'] or '')}); retried until they land")
    if data.get("api_usage"):
        parts = []
        for system, u in sorted(data["api_usage"].items()):
            reported = (f", CRM reports {u['reported_used']}/{u['reported_limit']} today"
                        if u.get("reported_used") is not None and u.get("reported_limit") else "")
            parts.append(f"{system} {u['calls']} calls ({u.get('rate_limited', 0)} rate-limited){reported}")
        say(console, "API usage (last run's process): " + "; ".join(parts))
    burn.print_lines(data.get("api_budget") or {}, console)  # API burn and pauses, per system


def _held_tables(data: dict[str, Any], console: Console) -> None:
    if data["unmapped_values"]:
        u = Sheet("unmapped CRM values (never guessed: add them to the mapping files)")
        for col in ("system", "object", "field", "value"):
            token(u, col)
        token(u, "seen", justify="right")
        for row in data["unmapped_values"]:
            u.add_row(row["system"], row["object"], row["field"], row["value"], str(row["count"]))
        u.print(console)
    if data["quarantine"]:
        q = Sheet("quarantine (a resync retries these)")
        for col in ("id", "system", "object", "record", "kind", "tries"):
            token(q, col)
        prose(q, "reason")
        for row in data["quarantine"][:20]:
            q.add_row(str(row["id"]), row["system"], row["object"], str(row["record_id"]), row["kind"],
                      str(row["attempts"]), mask_email(row["reason"]))
        q.print(console)
    if data["sla_breaches"]:
        b = Sheet("open SLA breaches (MQL not followed up in time)")
        token(b, "entity")
        token(b, "since")
        prose(b, "details")
        for row in data["sla_breaches"][:20]:
            b.add_row(row["entity_id"], row["at"][:16].replace("T", " "),
                      mask_email(str(row["details"].get("reason", ""))))
        b.print(console)


def _dead_records(data: dict[str, Any], console: Console) -> None:
    """Known gaps (reconcile) and the records the CRMs deleted or merged away."""
    for line in (data.get("reconcile") or {}).get("lines", []):
        say(console, mask_email(line), "bold red")
    if data["tombstones"]["count"]:
        d = Sheet(f"deleted or merged records: {data['tombstones']['count']} (nothing is written to them; "
                  "latest first)")
        for col in ("system", "object", "record", "kind", "seen by", "detected"):
            token(d, col)
        for row in data["tombstones"]["recent"]:
            kind = row["kind"] + (f" into {row['merged_into']}" if row["merged_into"] else "")
            d.add_row(row["system"], row["object"], row["record_id"], kind, row["source"],
                      row["detected_at"][:16].replace("T", " "))
        d.print(console)


def _service_lines(data: dict[str, Any], now: datetime, console: Console) -> None:
    if data["resync_queue"]:
        say(console, "queued resyncs: " + ", ".join(f"#{r['id']} {r['state']}" for r in data["resync_queue"]))
    live = [x for x in data["services"] if x.get("alive", True)]
    stopped = len(data["services"]) - len(live)
    if live or stopped:
        say(console, "services on this store: " + (", ".join(
            f"{x['owner']} (pid {x['pid']}, seen {_ago(now, datetime.fromisoformat(x['seen_at']))})" for x in live)
            or "none running") + (f"   ({stopped} stopped, not beating)" if stopped else ""))


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or stdout_console()
    now = datetime.fromisoformat(data["now"])
    _objects_table(data, now, console)
    _picture_lines(data, console)
    _system_lines(data, now, console)
    _cycles_table(data, now, console)
    _resync_table(data, now, console)
    _counts_lines(data, now, console)
    _held_tables(data, console)
    _dead_records(data, console)
    _service_lines(data, now, console)
    say(console, "what each word means: syncd status --explain", "dim")


#: every noun `syncd status` shows, in the glossary's words (`syncd status --explain`)
EXPLAIN: tuple[tuple[str, str], ...] = (
    ("records", "CRM records of that object the state store holds (its copy, as last pulled)."),
    ("newest change held", "the newest modification time among the records the store holds (the pull "
     "cursor). Right after a complete pull it is the CRM's newest change."),
    ("last complete pull", "when a pull of that object last read every change to the end. A failing "
     "pull keeps the previous one and says (failing)."),
    ("lag", "how far behind the CRM's newest change the store can be: anything changed after the last "
     "complete pull is not in the store yet. A quiet object has a small lag however old its newest change."),
    ("quarantined", "records syncd could not read (bad data) and writes a CRM refused for good; held "
     "for a person, retried by `syncd resync`."),
    ("unmapped", "CRM values no mapping file names (e.g. a new picklist value). syncd never guesses: the "
     "field is left alone until a mapping names the value."),
    ("picture", "complete when every CRM object a decision reads was pulled within its freshness bound; "
     "PARTIAL means decisions that need the missing side are held (nothing is decided on half a picture)."),
    ("freshness bound", "how old a successful pull may be before decisions that read it are held "
     "([sync] freshness_intervals × the object's interval)."),
    ("paused", "syncd is not calling that CRM for now: auth (the credentials were refused; fixed by new "
     "credentials and a reload), budget (the daily API budget is spent; until it resets), outage (the CRM "
     "did not answer; every cycle tries again)."),
    ("cycle", "one round of pull → map → link → decide → write back. ok: all done; partial: one side "
     "could not be pulled or was not fresh, so decisions that need it were held; failed: stopped on an "
     "error (shown); interrupted: stopped by a signal or a crash, the next cycle goes on."),
    ("resync", "a manual re-read (`syncd resync`): queued for a running service or run inline. Outcome: "
     "done (with counts), failed (with the reason), interrupted (run it again to finish)."),
    ("deleted or merged records", "tombstones: records a CRM deleted, archived or merged into another. "
     "Nothing is written to them, and a hand-off never re-creates the person there ([deletions] "
     "other_side in sla.toml); a restore brings the record back and links it again."),
    ("known gap", "reconcile found records the CRM has and the store does not (or the reverse); "
     "`syncd reconcile --repair` fetches exactly the missing ones."),
    ("pending outbox", "writes decided but not yet confirmed by the CRM (sent in batches, resent until "
     "they land)."),
    ("writes failing", "writes the CRM refused for a transient reason at least max_tries times; they are "
     "still retried, but someone should look."),
    ("open SLA breaches", "MQLs handed to sales and not followed up within the SLA window "
     "(mappings/sla.toml)."),
    ("link conflicts", "one email on several records of one CRM: syncd will not pick one; they stay "
     "unlinked until a person merges or corrects them."),
    ("blocked re-hand-offs", "people sales returned to marketing who qualified again without new evidence "
     "(a bottom-of-funnel conversion, or a score rise over the re-hand-off margin): syncd keeps them with "
     "marketing instead of handing them back to sales."),
    ("services on this store", "`syncd run` processes that beat in the last 30 s (their heartbeat); "
     "stopped ones are only counted."),
    ("API usage", "calls the last run's process made per CRM, rate-limited answers, and the CRM's own "
     "count against its daily limit."),
)


def print_explain(console: Console | None = None) -> None:
    console = console or stdout_console()
    t = Sheet("syncd status: what each word means")
    token(t, "word")
    prose(t, "meaning", min_width=30)
    for word, meaning in EXPLAIN:
        t.add_row(word, meaning)
    t.print(console)


# -- audit and dry run ----------------------------------------------------------------------------

def deal_labels(tx: Any, rows: Sequence[AuditRow]) -> dict[str, str]:
    """entity id → ``deal "NAME"`` for the deals among ``rows`` (their "who" is no UUID)."""
    ids = sorted({r.entity_id for r in rows if r.entity_id and not r.email_norm})
    if not ids:
        return {}
    out: dict[str, str] = {}
    for entity, recs in tx.records_by_entity(ids, with_raw=False).items():
        deals = [r for r in recs if r.kind == "deal"]
        names = [str(n) for r in deals if (n := (r.canonical.get("values") or {}).get("name"))]
        if deals:
            out[entity] = f'deal "{names[0]}"' if names else f"deal {deals[0].system}:{deals[0].id}"
    return out


def print_audit(rows: Sequence[AuditRow], console: Console | None = None, *, show_emails: bool = True,
                labels: Mapping[str, str] | None = None) -> None:
    """``labels``: entity id → how to name it (deals by name, :func:`deal_labels`)."""
    console = console or stdout_console()
    labels = labels or {}
    t = Sheet(f"audit ({len(rows)} writes)")
    for col in ("time", "who", "system", "record", "field", "before → after", "rule"):
        token(t, col)
    prose(t, "reason")
    token(t, "mappings")
    for r in rows:
        who = r.email_norm or labels.get(r.entity_id or "") or r.entity_id or ""
        t.add_row(r.at.strftime("%Y-%m-%d %H:%M:%S"), who if show_emails else mask_email(who), r.system,
                  f"{r.object}/{r.record_id}", r.field, f"{_shown(r.before)} → {_shown(r.after)}", r.rule, r.reason,
                  r.mapping_rev if ":" in r.mapping_rev else r.mapping_rev[:12])  # keep "+dirty"
    t.print(console)


def _shown(v: Any) -> str:
    return "(empty)" if v is None or v == "" else str(v)


def planned_writes_table(planned: Sequence[PlannedWrite], console: Console | None = None) -> None:
    console = console or stdout_console()
    t = Sheet(f"dry run: {len(planned)} planned writes (nothing was changed)")
    for col in ("who", "system", "record"):
        token(t, col)
    prose(t, "what")
    token(t, "rule")
    prose(t, "why")
    for p in planned:
        what = ", ".join(f"{k}: {_shown(b)} → {_shown(a)}" for k, (b, a) in p.changes.items())
        rec = f"{p.object}/{p.record_id}" if p.record_id else f"{p.object} (new)"
        t.add_row(p.who, p.system, rec, what, p.rule, p.reason)
    t.print(console)


# -- mappings check -------------------------------------------------------------------------------

def mappings_summary(directory: Path) -> str:
    """``ok: 4 files, N terms, M values``: what a clean `mappings check` read."""
    import tomllib

    files = sorted(directory.glob("*.toml"))
    terms = values = 0
    for f in files:
        try:
            doc = tomllib.loads(f.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if f.name == "terms.toml":
            terms += sum(len(v) for v in doc.values() if isinstance(v, list))
        values += _count_values(doc)
    return f"ok: {len(files)} files, {terms} terms, {values} values"


def _count_values(node: Any) -> int:
    """Raw values named in value tables (``values = { term = ["raw", ...] }``), anywhere in a file."""
    if not isinstance(node, dict):
        return 0
    n = 0
    for key, v in node.items():
        if key == "values" and isinstance(v, dict):
            n += sum(len(x) if isinstance(x, list) else 1 for x in v.values())
        else:
            n += _count_values(v)
    return n
