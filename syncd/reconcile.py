"""Reconciliation: does the store hold every record the CRMs hold?

Two levels:

- **The count check** (cheap; the service runs it after a cycle, at most every
  ``[reconcile] count_every_s``): per object, the CRM's count of records modified up to the
  stored cursor (one call: HubSpot search ``total``, SOQL ``COUNT()``) against the store's
  records plus its quarantined ones. Every record modified up to the cursor was pulled, so a
  CRM count above the store's is a gap for certain (new records, modified later, cannot cause
  one). A gap is then diffed by id (when the diff fits ``diff_max_calls``) for sample ids.
- **The id diff** (``syncd reconcile``): the CRM's id set, page by page, against the store's.
  Missing ids are in the CRM and not in the store; extra ids are in the store and no longer in
  the CRM (deleted or merged there). ``--repair`` fetches exactly the missing ids and decides
  their people again, holding the cycle leases like a resync; it settles the extra ids too
  (:func:`settle_extras`): each is confirmed by a fetch by id (alive: re-pulled, nothing else),
  then asked about (HubSpot's archive and merge survivors, Salesforce queryAll ``IsDeleted`` /
  ``MasterRecordId``) and goes the deletion feeds' way (:mod:`syncd.deletions`: tombstone with
  source ``reconcile``, unlink, audit, pending writes cancelled or moved to the survivor).
  Nothing is written to them. The service's count check settles the extras its id diff finds
  the same way, when it can hold the group's cycle leases.

A known gap is kept in the store (status shows it, with sample ids), set on the
``syncd_reconcile_missing_records`` metric, and the cycle that found it is reported failed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd import deletions
from syncd.config import Config
from syncd.errors import FatalError, RetriableError, SyncError
from syncd.model import OBJECT_GROUPS, RawRecord, utcnow
from syncd.plan import would_exceed
from syncd.stats import CycleStats, one_line

log = structlog.get_logger()

DIFF_MAX_CALLS = 200  # the service diffs a counted gap by id only when it costs at most this


@dataclass
class ObjectDiff:
    system: str
    object: str
    crm: int = 0  # ids the CRM listed
    store: int = 0  # ids in the store (records + quarantined)
    missing: list[str] = field(default_factory=list)  # in the CRM, not in the store
    extra: list[str] = field(default_factory=list)  # in the store, not in the CRM
    newer: int = 0  # not in the store, but modified after its last pull: the next cycle pulls them
    calls: int = 0

    def gap(self, samples: int, source: str, now: datetime) -> dict[str, Any] | None:
        if not self.missing:
            return None
        return {"source": source, "at": now.isoformat(), "missing": len(self.missing), "extra": len(self.extra),
                "crm": self.crm, "store": self.store, "sample_missing": sorted(self.missing)[:samples],
                "sample_extra": sorted(self.extra)[:samples]}


def targets(group: str | None, systems: Sequence[str]) -> list[tuple[str, str]]:
    """(system, object) pairs of ``group`` (None: every group), in catalogue order."""
    return [(s, o) for g in ([group] if group else list(OBJECT_GROUPS)) for s in systems
            for o in OBJECT_GROUPS[g][s]]


def _store_ids(store: Any, system: str, obj: str) -> set[str]:
    with store.tx(readonly=True) as tx:
        ids = {i for page in tx.iter_record_ids(system, obj) for i in page}
        return ids | tx.quarantined_record_ids(system, obj)


def diff_ids(store: Any, conn: Any, system: str, obj: str) -> ObjectDiff:
    """The CRM's ids of ``obj``, page by page, against the store's (memory: one set of the
    store's ids; each CRM page is checked off it). A record absent from the store but modified
    after the stored cursor is not missing: it is not pulled yet (``newer``)."""
    d = ObjectDiff(system, obj)
    with store.tx(readonly=True) as tx:
        cursor = tx.get_cursor(system, obj)
    held = _store_ids(store, system, obj)
    d.store = len(held)
    before = conn.usage.total
    for page in conn.iter_ids(obj):
        d.crm += len(page)
        for rid, modified_at in page:
            if rid in held:
                held.discard(rid)
            elif cursor is not None and modified_at > cursor.modified_at:
                d.newer += 1
            else:
                d.missing.append(rid)
    d.extra = sorted(held)
    d.calls = conn.usage.total - before
    return d


# -- extras: in the store, no longer in the CRM ---------------------------------------------------

SOURCE = "reconcile"  # the tombstone source of a death reconciliation found


@dataclass
class Settled:
    """What :func:`settle_extras` made of the extra ids."""

    alive: int = 0  # the fetch by id found them after all: re-pulled, nothing else
    deleted: int = 0  # deleted / archived in the CRM, or unknown to it (purged): tombstoned
    merged: int = 0  # merged into another record: tombstoned, links and writes to the survivor
    already: int = 0  # tombstoned meanwhile (by a feed, or a survivor read here)
    ids: dict[str, list[str]] = field(default_factory=dict)  # "system object" -> the ids tombstoned here

    def summary(self) -> dict[str, Any]:
        return {"alive": self.alive, "deleted": self.deleted, "merged": self.merged, "already": self.already,
                "tombstoned_ids": {k: sorted(v) for k, v in sorted(self.ids.items())}}


def settle_extras(engine: Any, diffs: Sequence[ObjectDiff], stats: CycleStats) -> Settled:
    """The extra ids of ``diffs`` (in the store, not in the CRM's listing), confirmed before
    anything is done to them: a fetch by id first (a record it returns is alive: stored again,
    cursors untouched), then the CRM's own word on the rest (``Connector.dead``: HubSpot's
    recycle bin and merge survivors, Salesforce queryAll ``IsDeleted`` / ``MasterRecordId``);
    an id the CRM knows nothing of (purged) counts as deleted. The dead go through
    :func:`syncd.deletions.record_deaths`, as the feeds' do (source ``reconcile``). A merge's
    survivor the store lacks is stored first, so its person takes the links over. Nothing is
    written to any of them; the people concerned are due (the caller decides them)."""
    out = Settled()
    for d in diffs:
        if d.extra:
            _settle_object(engine, d, stats, out)
    if out.deleted or out.merged:
        log.warning("reconcile_extras_settled", **{k: v for k, v in out.summary().items() if k != "tombstoned_ids"})
    return out


def _settle_object(engine: Any, d: ObjectDiff, stats: CycleStats, out: Settled) -> None:
    conn = engine.connectors[d.system]
    read = deletions.read_by_id(conn, d.system, d.object, d.extra, unknown=f"{SOURCE} (not found)")
    alive = read.alive
    answered = {r.id: r for r in read.others}  # a merged-away HubSpot id reads as its survivor
    found = [x if not x.confirmed else replace(x, source=SOURCE) for x in read.dead]
    survivors = sorted({x.merged_into for x in found if x.merged_into})
    with engine.store.tx(readonly=True) as tx:
        held = set(tx.get_records([(d.system, d.object, i) for i in survivors], with_raw=False))
    unheld = [i for i in survivors if (d.system, d.object, i) not in held]
    first: list[RawRecord] = [answered.pop(i) for i in unheld if i in answered]
    if rest := [i for i in unheld if i not in {r.id for r in first}]:
        first += conn.fetch(d.object, rest)
    if first:
        engine.ingest(d.system, d.object, first, stats, advance_cursor=False)
    with engine.store.tx() as tx:
        before = tx.tombstones([x.key for x in found])
        res = deletions.record_deaths(tx, found, now=engine.clock(), mapping_rev=engine.mappings.revision,
                                      rank=engine.ctx.rank, policy=engine.sla.deletions.other_side)
        after = tx.tombstones([x.key for x in found])
    stats.dead += res.deleted + res.merged
    out.deleted += res.deleted
    out.merged += res.merged
    mine = [x.id for x in found if x.key in after and after[x.key].source.startswith(SOURCE)
            and x.key not in before]
    out.already += len(found) - len(mine)
    if mine:
        out.ids.setdefault(f"{d.system} {d.object}", []).extend(mine)
    refresh = alive + list(answered.values())
    if refresh:  # alive after all (a listing that raced an edit): just re-pulled
        engine.ingest(d.system, d.object, refresh, stats, advance_cursor=False)
        out.alive += len(alive)
        with engine.store.tx() as tx:
            tx.set_due_many({e for e in tx.entity_ids([(d.system, d.object, r.id) for r in alive]).values() if e},
                            engine.clock())
    for x in found:
        log.info("reconcile_extra", system=d.system, object=d.object, record_id=x.id,
                 merged_into=x.merged_into, source=x.source)


# -- the count check ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CountGap:
    system: str
    object: str
    crm: int
    store: int

    @property
    def missing(self) -> int:
        return self.crm - self.store


SKEW = timedelta(seconds=1)  # the store side counts this much later (the CRMs' own fields may differ by ms)


def count_check(rt: Any, pairs: Sequence[tuple[str, str]]) -> list[CountGap]:
    """Per (system, object) with a cursor: the CRM's count of records modified up to ``until``
    (the cursor less the overlap window: everything up to it was surely pulled) against the
    store's records modified up to then (plus its quarantined ones). The CRM's count can only
    be lower for other reasons (a record modified since: the store's older copy still counts),
    so a higher one is a gap."""
    gaps = []
    overlap = timedelta(seconds=rt.config.sync.overlap_s)
    for system, obj in pairs:
        with rt.store.tx(readonly=True) as tx:
            cursor = tx.get_cursor(system, obj)
            if cursor is None:
                continue  # never pulled: nothing to compare yet
            until = cursor.modified_at - overlap
            held = tx.count_records_until(system, obj, until + SKEW) + len(tx.quarantined_record_ids(system, obj))
        crm = rt.connectors[system].count(obj, until=until)
        if crm > held:
            gaps.append(CountGap(system, obj, crm, held))
    return gaps


def record_gaps(store: Any, found: dict[tuple[str, str], dict[str, Any] | None]) -> None:
    with store.tx() as tx:
        for (system, obj), gap in found.items():
            tx.set_gap(system, obj, gap)


def gap_line(system: str, obj: str, gap: dict[str, Any]) -> str:
    """One status line: ``hubspot contacts: 3 records missing from the store (e.g. 101, 102) …``."""
    sample = gap.get("sample_missing") or []
    eg = f" (e.g. {', '.join(sample)})" if sample else ""
    extra = f"; {gap['extra']} in the store but not in the CRM" if gap.get("extra") else ""
    return (f"reconcile: {system} {obj}: {gap['missing']} records missing from the store{eg}{extra}; "
            f"found {gap.get('at', '')[:19]} by {gap.get('source', 'count')}; "
            f"`syncd reconcile --repair` fetches them")


def status(tx: Any) -> dict[str, Any]:
    """What ``syncd status`` shows of reconciliation: every known gap and its line."""
    gaps = tx.gaps()
    return {"gaps": [{"system": s, "object": o, **g} for (s, o), g in sorted(gaps.items())],
            "lines": [gap_line(s, o, g) for (s, o), g in sorted(gaps.items())]}


class CountCheck:
    """The service's periodic count check: at most every ``count_every_s`` per group, right
    after a cycle of that group pulled both systems. A gap sets the metric, is recorded with
    sample ids (an id diff, when affordable), and fails the cycle's run."""

    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics
        self.last: dict[str, float] = {}  # group -> monotonic time of its last check

    def due(self, cfg: Config, group: str) -> bool:
        every = cfg.reconcile.count_every_s
        last = self.last.get(group)
        return every > 0 and (last is None or time.monotonic() - last >= every)

    def after_cycle(self, rt: Any, group: str, engine: Any, stats: CycleStats) -> str | None:
        """Run the check when due; the one-line reason when a gap is known, else None."""
        if stats.partial or set(engine.pulled_ok) != set(rt.connectors) or not self.due(rt.config, group):
            return None
        self.last[group] = time.monotonic()
        pairs = targets(group, list(rt.connectors))
        diffs: list[ObjectDiff] = []
        try:
            gaps = count_check(rt, pairs)
            found = self._describe(rt, pairs, gaps, diffs)
            record_gaps(rt.store, found)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run never fails the service
            log.warning("reconcile_count_failed", group=group, error=one_line(exc), next="the next check")
            return None
        if any(d.extra for d in diffs):
            self._settle(rt, group, diffs)
        if self.metrics is not None:
            for (system, obj), gap in found.items():
                self.metrics.set_gap(system, obj, gap["missing"] if gap else 0)
        lines = [gap_line(s, o, g) for (s, o), g in found.items() if g]
        if not lines:
            log.info("reconcile_counts_ok", group=group, objects=len(pairs))
            return None
        reason = "; ".join(lines)
        log.error("reconcile_gap", group=group, reason=reason)
        with rt.store.tx() as tx:
            tx.fail_latest_run(f"cycle:{group}", engine.owner, reason)
        return reason

    def _settle(self, rt: Any, group: str, diffs: Sequence[ObjectDiff]) -> None:
        """The extras the id diff found are settled (:func:`settle_extras`) holding the group's
        cycle leases (this check runs after the cycle let them go); busy or failing: the next
        check (or ``syncd reconcile --repair``) does it."""
        from syncd.resync import LeaseKeeper, cycle_leases, fence_writes, make_engine, new_owner

        keeper = LeaseKeeper(rt.store, new_owner())
        try:
            engine = make_engine(rt, owner=keeper.owner)
            leases = cycle_leases(group)
            with keeper.holding(leases, wait_s=0.0) as got:
                if not got:
                    log.info("reconcile_extras_deferred", group=group, reason="another daemon holds the lease")
                    return
                fence_writes(engine, keeper, leases)
                stats = CycleStats()
                settled = settle_extras(engine, diffs, stats)
                if settled.deleted or settled.merged or settled.alive:
                    engine.link_and_decide(stats)  # the people the deaths touched are due: decided now
                    engine.flush(stats)
        except (RetriableError, FatalError) as exc:
            log.warning("reconcile_extras_failed", group=group, error=one_line(exc), next="the next check")
        finally:
            keeper.close()

    def _describe(self, rt: Any, pairs: Sequence[tuple[str, str]], gaps: Sequence[CountGap],
                  diffs: list[ObjectDiff]) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Per object checked: None (no gap) or the gap, diffed by id for samples if affordable
        (the diffs made are appended to ``diffs``)."""
        now, samples = utcnow(), rt.config.reconcile.sample_ids
        found: dict[tuple[str, str], dict[str, Any] | None] = dict.fromkeys(pairs)
        for g in gaps:
            conn = rt.connectors[g.system]
            cost = conn.pull_calls(g.object, g.crm)
            affordable = cost <= DIFF_MAX_CALLS and not would_exceed(rt.store, rt.config, {g.system: cost})
            if affordable:  # the id diff is exact: it decides (ids changed since the pull are not missing)
                diff = diff_ids(rt.store, conn, g.system, g.object)
                diffs.append(diff)
                found[(g.system, g.object)] = diff.gap(samples, "count check + id diff", now)
            else:
                found[(g.system, g.object)] = {
                    "source": "count check", "at": now.isoformat(), "missing": g.missing, "extra": 0,
                    "crm": g.crm, "store": g.store, "sample_missing": [], "sample_extra": []}
        return found


# -- syncd reconcile ------------------------------------------------------------------------------


def run(rt: Any, *, group: str | None, force: bool = False) -> list[ObjectDiff]:
    """Diff every object of ``group`` by id, within the API budget (a count per object first:
    the diff's cost is checked by :func:`~syncd.plan.would_exceed`, refused unless ``force``)."""
    pairs = targets(group, list(rt.connectors))
    costs: dict[str, int] = {}
    for system, obj in pairs:
        conn = rt.connectors[system]
        costs[system] = costs.get(system, 0) + conn.pull_calls(obj, conn.count(obj))
    refusals = list(would_exceed(rt.store, rt.config, costs).values())
    if refusals and not force:
        raise SyncError("reconcile refused: " + "; ".join(refusals) + " (--force to run anyway)")
    diffs = [diff_ids(rt.store, rt.connectors[s], s, o) for s, o in pairs]
    now, samples = utcnow(), rt.config.reconcile.sample_ids
    record_gaps(rt.store, {(d.system, d.object): d.gap(samples, "syncd reconcile", now) for d in diffs})
    return diffs


def repair(rt: Any, diffs: Sequence[ObjectDiff]) -> dict[str, Any]:
    """Settle the extra ids (:func:`settle_extras`: confirmed by a fetch by id, the dead
    tombstoned), fetch exactly the missing ids and store them, then decide the people/deals
    concerned again (holding the cycle leases, as a resync does). Returns a summary."""
    from syncd.resync import (
        LEASE_WAIT_S,
        LeaseKeeper,
        cycle_leases,
        fence_writes,
        make_engine,
        new_owner,
        resync_fetched,
    )

    todo = [d for d in diffs if d.missing]
    extra = [d for d in diffs if d.extra]
    if not todo and not extra:
        return {"fetched": 0, "extras": Settled().summary()}
    keeper = LeaseKeeper(rt.store, new_owner())
    fetched: list[tuple[str, str, Sequence[RawRecord]]] = []
    try:
        engine = make_engine(rt, owner=keeper.owner)
        leases = cycle_leases(None)
        with keeper.holding(leases, wait_s=LEASE_WAIT_S) as got:
            if not got:
                raise RetriableError(f"reconcile --repair: another daemon kept {', '.join(leases)} busy; try again")
            fence_writes(engine, keeper, leases)
            stats = CycleStats()
            settled = settle_extras(engine, extra, stats)  # first: a merge's survivor may be among the missing
            fetched = [(d.system, d.object, rt.connectors[d.system].fetch(d.object, d.missing)) for d in todo]
            n = resync_fetched(engine, fetched, stats)
            if n == 0 and (settled.deleted or settled.merged or settled.alive):
                engine.pull_stale(stats)  # the people the deaths touched are due: decided now
                engine.link_and_decide(stats)
                engine.flush(stats)
    finally:
        keeper.close()
    with rt.store.tx() as tx:  # what was fetched is no longer missing
        for d in todo:
            got_ids = {r.id for s, o, recs in fetched if (s, o) == (d.system, d.object) for r in recs}
            left = [i for i in d.missing if i not in got_ids]
            gap = d.gap(rt.config.reconcile.sample_ids, "reconcile --repair", utcnow()) if left else None
            if gap is not None:
                gap.update(missing=len(left), sample_missing=sorted(left)[:rt.config.reconcile.sample_ids],
                           extra=0, sample_extra=[])
            tx.set_gap(d.system, d.object, gap)
    log.info("reconcile_repaired", fetched=n, **stats.summary())
    return {"fetched": n, "extras": settled.summary(), **stats.summary()}


def _diff_json(d: ObjectDiff, samples: int) -> dict[str, Any]:
    return {"system": d.system, "object": d.object, "crm": d.crm, "store": d.store, "calls": d.calls,
            "missing": len(d.missing), "extra": len(d.extra), "not_yet_pulled": d.newer,
            "missing_ids": d.missing[:1000], "extra_ids": d.extra[:1000], "sample_missing": sorted(d.missing)[:samples],
            "sample_extra": d.extra[:samples]}


def _print(diffs: Sequence[ObjectDiff], samples: int, repaired: dict[str, Any] | None) -> None:
    from syncd.sheet import Sheet, prose, say, stdout_console, token

    t = Sheet("reconcile: CRM ids vs the store")
    numbers = ("crm", "store", "missing", "extra", "not yet pulled", "calls")
    for col in ("system", "object", *numbers):
        token(t, col, justify="right" if col in numbers else "left")
    for col in ("sample missing", "sample extra"):
        prose(t, col)  # ids, a comma-and-space list: wrapped between ids, never inside one
    for d in diffs:
        t.add_row(d.system, d.object, f"{d.crm:,}", f"{d.store:,}", f"{len(d.missing):,}", f"{len(d.extra):,}",
                  f"{d.newer:,}", str(d.calls), ", ".join(sorted(d.missing)[:samples]), ", ".join(d.extra[:samples]))
    console = stdout_console()
    t.print(console)
    if repaired is not None:
        say(console, f"repaired: fetched {repaired.get('fetched', 0)} missing records and decided them again")
        ex = repaired.get("extras") or {}
        if any(ex.get(k) for k in ("alive", "deleted", "merged", "already")):
            say(console, f"extras: {ex.get('deleted', 0)} deleted and {ex.get('merged', 0)} merged in the CRM "
                         f"(tombstoned, unlinked, nothing written to them; see `syncd tombstones`), "
                         f"{ex.get('alive', 0)} alive (re-pulled), {ex.get('already', 0)} tombstoned already")


def run_cli(cfg: Config, *, group: str | None, do_repair: bool, as_json: bool, force: bool) -> None:
    """``syncd reconcile [--object GROUP] [--repair] [--json] [--force]``. A gap left after it
    (missing or extra ids, not repaired) is a failure (exit 1, one line), so scripts and cron notice."""
    import json

    import click

    from syncd.runtime import open_runtime

    rt = open_runtime(cfg)
    try:
        diffs = run(rt, group=group, force=force)
        repaired = repair(rt, diffs) if do_repair else None
    finally:
        rt.close()
    samples = cfg.reconcile.sample_ids
    if as_json:
        click.echo(json.dumps({"objects": [_diff_json(d, samples) for d in diffs], "repaired": repaired}, indent=2))
    else:
        _print(diffs, samples, repaired)
    if do_repair:
        return
    left = [f"{sum(len(getattr(d, kind)) for d in diffs)} {what} "
            f"({', '.join(f'{d.system} {d.object} {len(getattr(d, kind))}' for d in diffs if getattr(d, kind))})"
            for kind, what in (("missing", "records missing from the store"),
                               ("extra", "records in the store no longer in the CRM"))
            if any(getattr(d, kind) for d in diffs)]
    if left:  # either kind is drift a cron job must notice: syncd would act on a wrong picture
        raise SyncError(f"reconcile: {'; '.join(left)}; `syncd reconcile --repair` fetches the missing ones "
                        "and confirms each extra by id, settling the dead ones")
