"""One sync cycle: pull → map → link → decide → write back → commit.

Every step leaves the state store consistent on its own, so a crash (kill -9)
anywhere is followed by a restart that finishes the work:
- a pulled page, the dirty marks it produces and the cursor advance commit in
  one transaction (nothing pulled is lost, nothing is decided twice);
- linking a batch of changed records marks the entities it touched as due in
  the same transaction that clears the records' dirty marks;
- decisions become outbox rows in the same transaction that saves the entity's
  memory and moves or clears its due mark (each due entity is decided once);
- outbox rows are marked ``sending`` before the CRM call and ``done`` (with
  their audit rows) after it (:mod:`syncd.writeback`).

The stages: :meth:`Engine.pull` and :meth:`Engine.ingest` (pull + map), then
:meth:`Engine.link_and_decide` (linking, then the rules on the views of
:mod:`syncd.views`), then the write-back (:class:`syncd.writeback.WriteBack`).

Never act on half a picture (:mod:`syncd.freshness`): a system whose pull fails is
recorded (``pull_state``), the others go on pulling, and only entities whose every
object finished a first full pull and is fresh are decided; the rest stay due. Such a
cycle is ``partial``, with one line saying why, and writes go only to systems that
pulled successfully in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd import catalogue, deletions, freshness, rules
from syncd import conflicts as link_conflicts
from syncd._json import jsonable
from syncd.connectors import _pacing
from syncd.connectors.base import Connector
from syncd.errors import FatalError, RecordError, RetriableError, SyncError
from syncd.linking import LinkStats, link_deals, link_people
from syncd.mapping import Mappings
from syncd.model import OBJECT_GROUPS, SYSTEMS, CanonicalRecord, Cursor, Deletion, RawRecord, utcnow
from syncd.sla import SLA
from syncd.stats import CycleStats, PlannedWrite, one_line
from syncd.store import OutboxRow, RecordRow, Store, Tx
from syncd.views import (
    canonical_of,
    conflicted_emails,
    deal_view,
    people_of_rows,
    person_view,
    pick_record,
    prefetched_person_view,
    referrers_by_ref,
    refs_of,
    rule_context,
    view_records,
    with_pending,
)
from syncd.writeback import WriteBack

__all__ = ["CHUNK", "CycleStats", "Engine", "PlannedWrite", "canonical_of", "person_view", "pick_record",
           "prefetched_person_view", "record_row", "rule_context"]

log = structlog.get_logger()

CHUNK = 500  # entities decided per transaction
CONFLICT_LOOKUP_S = 3600.0  # how often link conflicts' candidates are looked up in the CRMs


class _DryRunRollback(Exception):
    pass


def pull_overlap(overlap: timedelta, cursor: Cursor, read_at: datetime) -> timedelta:
    """How far before ``cursor`` a pull re-reads. The overlap is there for records that became
    visible to the CRM's search or query after a pull had passed their modification time (index
    lag; a Salesforce transaction committing after later ones). A cursor that was already more
    than twice the overlap old when its record was last read (``read_at``, syncd's clock; the
    margin covers a clock skew up to the overlap) had every earlier record visible then: the
    pull resumes at the cursor itself. A backfill stopped part-way (a cap, a stop, an error) so
    goes on where it stopped instead of re-reading a window it may never get through (a bulk
    import of more records in two minutes than a ``run_cap`` lets through), and an object with
    nothing new re-reads only its cursor's record once its overlap has been read again late."""
    return timedelta(0) if read_at - cursor.modified_at > 2 * overlap else overlap


class Engine:
    def __init__(self, store: Store, mappings: Mappings, sla: SLA, connectors: Mapping[str, Connector], *,
                 overlap: timedelta = timedelta(seconds=120), clock: Callable[[], datetime] = utcnow,
                 dry_run: bool = False, write_batch: int = 1000,
                 on_write: Callable[[OutboxRow, str | None], None] | None = None,
                 bounds: Mapping[tuple[str, str], timedelta] | None = None,
                 unavailable: Mapping[str, str] | None = None,
                 require_pulls: bool = True, owner: str | None = None) -> None:
        """``bounds``: the freshness bound per (system, object) (:func:`syncd.freshness.bounds`).
        ``unavailable``: systems not to pull this cycle (backed off), with why. Offline engines
        fed by :meth:`ingest` (benchmarks, replays) pass ``require_pulls=False``: they decide
        whatever is due, whatever the pull state."""
        self.store = store
        self.mappings = mappings
        self.sla = sla
        self.connectors = connectors
        self.overlap = overlap
        self.clock = clock
        self.dry_run = dry_run
        self.write_batch = write_batch
        self.on_write = on_write
        self.ctx = rule_context(mappings, sla)
        self._shared_tx: Tx | None = None
        self.stop_requested = False
        self.bounds = dict(bounds) if bounds is not None else freshness.bounds()
        self.unavailable = dict(unavailable or {})
        self.require_pulls = require_pulls
        self.owner = owner
        self.pulled_ok: set[str] = set()  # systems with at least one successful pull this cycle
        self.writeback = WriteBack(self._tx, mappings, sla, connectors, clock=clock, dry_run=dry_run,
                                   write_batch=write_batch, on_write=on_write,
                                   should_stop=lambda: self.stop_requested)
        # How often each system's deletion feed is read (overrides the connector's
        # ``deletion_scan_s``): HubSpot's archive is a whole list scan ([hubspot] archive_scan_s).
        # Salesforce has no feed of its own: its queryAll pull brings the deaths (Page.deleted).
        self.feed_interval_s: dict[str, float] = {}
        self.writeback.on_dead = self.bury
        self.writeback.on_permanent = self.repull

    # -- transactions ---------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        if self._shared_tx is not None:
            yield self._shared_tx
        else:
            with self.store.tx() as tx:
                yield tx

    # -- the cycle ------------------------------------------------------------------------------
    def cycle(self, group: str | None = None) -> CycleStats:
        """Run one cycle over ``group`` ("contacts", "deals" or both). Dry-run rolls everything back."""
        stats = CycleStats()
        if self.dry_run:
            try:
                with _pacing.deferred(self.connectors), self.store.tx() as tx:  # ledger after the tx
                    self._shared_tx = tx
                    self._cycle(group, stats)
                    raise _DryRunRollback
            except _DryRunRollback:
                pass
            finally:
                self._shared_tx = None
            return stats
        job = f"cycle:{group or 'all'}"
        run_id = self.store_run_start(job)
        with structlog.contextvars.bound_contextvars(run_id=run_id, job=job):  # every line of the cycle
            self._run_and_record(run_id, job, group, stats)
        return stats

    def _run_and_record(self, run_id: str, job: str, group: str | None, stats: CycleStats) -> None:
        try:
            self._cycle(group, stats)
        except BaseException as exc:
            self.store_run_finish(run_id, "failed", stats, one_line(exc))
            raise
        # A stop request (SIGTERM) ends the cycle after the current page/batch: durable, but not whole.
        status = "interrupted" if self.stop_requested else "partial" if stats.partial else "ok"
        reason = stats.partial_reason()
        self.store_run_finish(run_id, status, stats, reason)
        if reason:
            log.warning("cycle", job=job, status=status, reason=reason, **stats.summary())
        else:
            log.info("cycle", job=job, status=status, **stats.summary())

    def store_run_start(self, job: str) -> str:
        with self.store.tx() as tx:
            return tx.start_run(job, now=self.clock(), owner=self.owner)

    def store_run_finish(self, run_id: str, status: str, stats: CycleStats, error: str | None) -> None:
        _pacing.settle(self.connectors)  # the run's API calls into the ledger, unused claims back
        with self.store.tx() as tx:
            tx.finish_run(run_id, status, {**stats.summary(), "api": self.api_usage()}, error, now=self.clock())

    def api_usage(self) -> dict[str, dict[str, Any]]:
        """Per system: calls this process made (connector lifetime), 429s, and the budget the CRM reports."""
        return {system: {"calls": c.usage.total, "rate_limited": sum(c.usage.rate_limited.values()),
                         "reported_used": c.usage.reported_used, "reported_limit": c.usage.reported_limit}
                for system, c in self.connectors.items()}

    def _cycle(self, group: str | None, stats: CycleStats) -> None:
        for g in [group] if group else list(OBJECT_GROUPS):
            for system in SYSTEMS:
                self._pull_group(g, system, stats)
                if self.stop_requested:
                    return
        self.link_and_decide(stats)
        if not self.dry_run and not self.stop_requested:
            # Writes go to the systems that answered this cycle; the others' wait in the outbox.
            self.flush(stats, systems=None if not self.require_pulls else self.pulled_ok)

    def _pull_group(self, group: str, system: str, stats: CycleStats) -> None:
        """Pull ``system``'s objects of ``group``. One CRM down is recorded, not fatal: the other
        keeps pulling, and the gate in link_and_decide keeps anyone who needs this side undecided."""
        if system in stats.pull_failures:
            return  # failed earlier in this cycle: its other objects wait for the next
        if system not in self.connectors:
            why = self.unavailable.get(system)
            if why is not None:  # backed off: say so where status and the gate read it
                with self._tx() as tx:
                    for obj in OBJECT_GROUPS[group][system]:
                        tx.pull_failed(system, obj, why, self.clock())
            return
        for obj in OBJECT_GROUPS[group][system]:
            try:
                self.pull(system, obj, stats)
                if not self.stop_requested:
                    self.pull_deletions(system, obj, stats)
            except (RetriableError, FatalError) as exc:
                self._pull_failed(system, obj, exc, stats)
                return
            if self.stop_requested:
                return

    def _pull_failed(self, system: str, obj: str, exc: SyncError, stats: CycleStats) -> None:
        stats.pull_failures[system] = exc
        with self._tx() as tx:
            tx.pull_failed(system, obj, one_line(exc), self.clock())
        log.warning("pull_failed", system=system, object=obj, error=one_line(exc),
                    next="recorded; nothing that needs this side is decided until it pulls again")

    # -- pull + map -----------------------------------------------------------------------------
    def pull(self, system: str, obj: str, stats: CycleStats) -> None:
        """Pull ``system``/``obj`` from its cursor to the end; a pull that reaches the end is
        recorded as complete (the half-picture gate reads it). Connector errors propagate."""
        conn = self.connectors[system]
        with self._tx() as tx:
            held = tx.get_cursor_read_at(system, obj)
        cursor = held[0] if held else None
        overlap = pull_overlap(self.overlap, *held) if held else self.overlap
        n = 0
        stopped = False
        with structlog.contextvars.bound_contextvars(system=system, object=obj):
            self.pull_started(system, obj)
            for page in conn.iter_changes(obj, cursor, overlap=overlap):
                if page.deleted:  # first: the page's records move the cursor past these deaths
                    with self._tx() as tx:
                        self._bury(tx, page.deleted, stats)
                self.ingest(system, obj, page.records, stats)
                n += len(page.records)
                self.page_pulled(system, obj, len(page.records), page.total)
                if self.stop_requested:
                    stopped = True
                    break
        stats.pulled[f"{system}.{obj}"] = stats.pulled.get(f"{system}.{obj}", 0) + n
        if not stopped:
            with self._tx() as tx:
                tx.pull_succeeded(system, obj, self.clock())
            self.pulled_ok.add(system)

    # -- deletions, merges, restores (syncd.deletions) ----------------------------------------------
    def pull_deletions(self, system: str, obj: str, stats: CycleStats) -> None:
        """Read ``system``/``obj``'s deletion feed from its watermark (less the overlap) and
        tombstone what died; HubSpot's archive at most every ``feed_interval_s``."""
        conn = self.connectors[system]
        feed = getattr(conn, "deleted", None)
        if feed is None:
            return
        now = self.clock()
        with self._tx() as tx:
            mark, scanned = tx.deletion_watermark(system, obj)
        every = self.feed_interval_s.get(system, getattr(conn, "deletion_scan_s", 0.0))
        if scanned is not None and (now - scanned).total_seconds() < every:
            return
        found, latest = feed(obj, mark - self.overlap if mark is not None else None)
        with self._tx() as tx:
            self._bury(tx, found, stats)
            tx.set_deletion_watermark(system, obj, latest if latest is not None else mark, now)

    def _bury(self, tx: Tx, found: Sequence[Deletion], stats: CycleStats) -> None:
        res = deletions.record_deaths(tx, found, now=self.clock(), mapping_rev=self.mappings.revision,
                                      rank=self.ctx.rank, policy=self.sla.deletions.other_side)
        stats.dead += res.deleted + res.merged

    def bury(self, found: Sequence[Deletion], stats: CycleStats) -> None:
        """Dead records learnt outside a feed (a write answered by a merge survivor): the
        survivors are read again first (so their person takes the links over), then tombstoned."""
        survivors: dict[tuple[str, str], list[str]] = {}
        for d in found:
            if d.merged_into:
                survivors.setdefault((d.system, d.object), []).append(d.merged_into)
        for (system, obj), ids in survivors.items():
            try:
                self.ingest(system, obj, self.connectors[system].fetch(obj, ids), stats, advance_cursor=False)
            except (RetriableError, FatalError) as exc:  # the next pull reads them: it is only sooner
                log.warning("survivor_read_failed", system=system, object=obj, error=one_line(exc))
        with self._tx() as tx:
            self._bury(tx, found, stats)

    def repull(self, system: str, obj: str, ids: Sequence[str], stats: CycleStats) -> None:
        """After permanent write errors: read these records again. Live ones are stored as they
        are now (their person is due: decided again); gone ones are asked about (deleted or
        merged: ``Connector.dead``) and tombstoned; ids the CRM knows nothing of are deleted."""
        try:
            read = deletions.read_by_id(self.connectors[system], system, obj, ids, unknown="re-pull (not found)")
            self.ingest(system, obj, read.alive + read.others, stats, advance_cursor=False)
        except (RetriableError, FatalError) as exc:
            log.warning("repull_failed", system=system, object=obj, error=one_line(exc),
                        next="the quarantined writes wait; the next pull reads the records")
            return
        with self._tx() as tx:
            self._bury(tx, read.dead, stats)

    def _person_views(self, tx: Tx, chunk: Sequence[str], by_entity: Mapping[str, list[RecordRow]],
                      memories: Mapping[str, Any], refs: Mapping[tuple[str, str], list[RecordRow]],
                      conflicts: frozenset[str], undecided: set[str]) -> dict[str, rules.PersonView]:
        """The views of these people (those with none go to ``undecided``); a person whose record
        was deleted carries the systems no hand-off may re-create them in."""
        views: dict[str, rules.PersonView] = {}
        for entity in chunk:
            view = prefetched_person_view(entity, by_entity.get(entity, []), memories.get(entity), refs, conflicts)
            if view is None:
                undecided.add(entity)
            else:
                views[entity] = view
        if not views:
            return views
        score = self.sla.terms.score_stage
        for e, ts in tx.tombstones_of_entities(views).items():
            blocked = deletions.blocked_creates(ts, views[e].memory.handed_off_at is not None, self.ctx.rank, score)
            if blocked:
                views[e] = replace(views[e], no_create_in=blocked)
        return views
    def pull_started(self, system: str, obj: str) -> None:
        """Hook: a pull of ``system``/``obj`` starts (progress displays)."""

    def page_pulled(self, system: str, obj: str, n: int, total: int | None) -> None:
        """Hook: a page of ``n`` records was stored; ``total``: the pull's size, when the CRM says."""

    def pull_stale(self, stats: CycleStats) -> None:
        """Pull every object whose copy in the store is incomplete or not fresh (a targeted
        resync, so that it too decides on a complete picture)."""
        with self._tx() as tx:
            pic = self.picture(tx)
        for system, obj in freshness.objects_read_by("person"):
            if system not in self.connectors or system in stats.pull_failures or not pic.problem((system, obj)):
                continue
            try:
                self.pull(system, obj, stats)
            except (RetriableError, FatalError) as exc:
                self._pull_failed(system, obj, exc, stats)

    def picture(self, tx: Tx) -> freshness.Picture:
        """The store's pull state now, against this engine's freshness bounds."""
        return freshness.Picture(tx.pull_states(), self.bounds, self.clock())

    def ingest(self, system: str, obj: str, records: Sequence[RawRecord], stats: CycleStats,
               *, advance_cursor: bool = True) -> None:
        """Map and store one page, mark what changed, advance the cursor: one transaction."""
        rows: list[RecordRow] = []
        bad: list[tuple[RawRecord, str]] = []
        unmapped: dict[tuple[str, str, str, str], int] = {}
        for raw in records:
            try:
                canon = self.mappings.to_canonical(raw)
            except RecordError as exc:
                bad.append((raw, str(exc)))
                continue
            for f, v in canon.unmapped:
                k = (system, obj, f, v)
                unmapped[k] = unmapped.get(k, 0) + 1
            rows.append(record_row(raw, canon))
        merges_in = getattr(self.connectors.get(system), "merges_in", None)
        merged = merges_in(records) if merges_in is not None else []
        with self._tx() as tx:
            changed = tx.upsert_records(rows)
            stats.restored += deletions.restore_pulled(tx, changed, now=self.clock(),
                                                       mapping_rev=self.mappings.revision)
            if merged:  # survivors name the ids merged into them: those are dead
                self._bury(tx, merged, stats)
            refs = {row.key: r for row in changed if (r := refs_of(row)) is not None}
            tx.set_refs_many(refs)
            for raw, reason in bad:
                tx.quarantine_record(system, obj, raw.id, reason, raw=jsonable(dict(raw.fields)))
            if unmapped:
                tx.count_unmapped([k for k, c in unmapped.items() for _ in range(c)])
            if advance_cursor and records:
                tx.set_cursor(system, obj, max(r.cursor for r in records))
        stats.changed += len(changed)
        stats.quarantined += len(bad)
        stats.unmapped += sum(unmapped.values())
        for raw, reason in bad:
            log.warning("record_quarantined", system=system, object=obj, record_id=raw.id, reason=reason)

    # -- link + decide --------------------------------------------------------------------------
    def link_and_decide(self, stats: CycleStats) -> None:
        """Link every changed record, then decide every entity that is due, each once.

        Two steps, each in batches that commit on their own. Linking a batch marks the entities
        it touched as due *now* in the same transaction that clears the records' dirty marks;
        deciding a chunk saves the memories (which set or clear each timer) in the transaction
        that enqueues its writes. A crash between the two leaves the due marks: the next cycle
        decides them. Deciding after all linking means a person whose records arrive in
        different batches (a backfill) is decided once, on the whole picture.
        """
        now = self.clock()
        self._link(stats, now)
        if self.stop_requested:
            return
        # Conflicts the CRM data no longer supports resolve themselves (their records merge).
        self._recheck_conflicts(stats, now)
        self._decide_due(stats, now)

    def _link(self, stats: CycleStats, now: datetime) -> None:
        """Link the changed records in batches; each batch marks the entities it touched due."""
        kinds: list[str] | None = None  # every kind
        if self.require_pulls:
            with self._tx() as tx:
                kinds = self.picture(tx).linkable_kinds()  # the rest is recorded, linked later
        conflict_emails: set[str] = set()  # one conflict per email per cycle, whatever the batching
        while not self.stop_requested and kinds != []:
            with self._tx() as tx:
                dirty = tx.dirty_records(limit=CHUNK * 4, with_raw=False, kinds=kinds)
                if not dirty:
                    return
                ls = LinkStats(conflict_emails=conflict_emails)
                link_people(tx, dirty, ls)
                link_deals(tx, dirty, ls)  # deal rows: linking people does not change them
                due = set(ls.touched_people) | set(ls.touched_deals)
                # deals and connection attempts touch the people they point at
                due |= people_of_rows(tx, [r for r in dirty if r.kind in catalogue.REFERRING_KINDS])
                if ls.touched_deals:  # the other system's record of a touched deal points at people too
                    deal_rows = tx.records_by_entity(sorted(ls.touched_deals), with_raw=False).values()
                    due |= people_of_rows(tx, [r for rs in deal_rows for r in rs if r.kind == "deal"])
                tx.set_due_many(due, now)
                tx.clear_dirty([r.key for r in dirty])
                stats.linked += ls.linked
                stats.conflicts += ls.conflicts

    def _decide_due(self, stats: CycleStats, now: datetime) -> None:
        """Decide what is due: entities touched by linking, and timers (the follow-up SLA) that
        fell due though nothing changed. Only kinds whose every object is complete and fresh are
        decided; the others keep their due marks for a later cycle."""
        with self._tx() as tx:
            conflicts = conflicted_emails(tx)
            held = {k: self.picture(tx).blockers(k) for k in ("person", "deal")} if self.require_pulls \
                else {"person": [], "deal": []}
        for reasons in held.values():
            stats.held += [r for r in reasons if r not in stats.held]
        if held["person"] and held["deal"]:
            with self._tx() as tx:
                stats.undecided += len(tx.due_entities(now))
            return
        after = ""
        while not self.stop_requested:
            with self._tx() as tx:
                batch = tx.due_batch(now, after=after, limit=CHUNK)
                if not batch:
                    return
                after = batch[-1][0]
                people = [] if held["person"] else [e for e, k in batch if k == "person"]
                deals = [] if held["deal"] else [e for e, k in batch if k == "deal"]
                stats.undecided += len(batch) - len(people) - len(deals)
                self._decide(tx, people, deals, stats, now, conflicts)

    def flush(self, stats: CycleStats, systems: Iterable[str] | None = None) -> None:
        """Send due outbox rows (see :meth:`syncd.writeback.WriteBack.flush`)."""
        self.writeback.flush(stats, systems)

    def _recheck_conflicts(self, stats: CycleStats, now: datetime) -> None:
        """Every cycle, open conflicts are judged again on the stored records (an email
        corrected is pulled like any change); at most every :data:`CONFLICT_LOOKUP_S` their
        candidates are also looked up in the CRMs (a duplicate deleted or merged away), a
        few batched reads for the whole store rather than some every cycle."""
        with self._tx() as tx:
            open_ = tx.open_link_conflicts()
            last = tx.conflicts_looked_up_at()
            if last is None:  # conflicts just found were just pulled: nothing to look up yet
                tx.set_conflicts_looked_up(now)
        if not open_:
            return
        gone: set[tuple[str, str, str]] = set()
        if last is not None and (now - last).total_seconds() >= CONFLICT_LOOKUP_S:
            reachable = (self.pulled_ok if self.require_pulls else set(self.connectors)) & set(self.connectors)
            try:  # outside any transaction: these are CRM calls
                gone = link_conflicts.gone_candidates(open_, self._live_ids, reachable)
                with self._tx() as tx:
                    tx.set_conflicts_looked_up(now)
            except (RetriableError, FatalError) as exc:
                log.warning("link_conflict_lookup_failed", error=one_line(exc), next="the next cycle looks again")
        with self._tx() as tx:
            stats.conflicts_resolved += link_conflicts.resolve_stale(tx, open_, gone, now)

    def _live_ids(self, system: str, obj: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` still exist in the CRM (a fetch by id)."""
        return {r.id for r in self.connectors[system].fetch(obj, list(ids))}

    def _decide(self, tx: Tx, people: Sequence[str], deals: Sequence[str], stats: CycleStats,
                now: datetime, conflicts: frozenset[str]) -> None:
        """Decide these entities: writes to the outbox, memories and timers saved, in ``tx``.
        An entity with nothing to decide on (no records left) has its timer cleared."""
        undecided: set[str] = set()
        for i in range(0, len(people), CHUNK):
            chunk = people[i:i + CHUNK]
            overtaken: list[tuple[OutboxRow, dict[str, Any]]] = []
            by_entity = with_pending(tx.records_by_entity(chunk, with_raw=False), tx.open_writes(chunk), overtaken)
            self.writeback.supersede(tx, overtaken, stats)
            memories = tx.get_memory(chunk)
            open_events = tx.open_events_of(chunk)
            closing: list[int] = []
            memories_out: dict[str, tuple[dict[str, Any], datetime | None]] = {}
            refs = referrers_by_ref(
                tx, [r for e in chunk for r in by_entity.get(e, []) if r.kind == "person"])
            decided = [(entity, rules.decide_person(view, self.ctx, now), view_records(view))
                       for entity, view in self._person_views(tx, chunk, by_entity, memories, refs, conflicts,
                                                              undecided).items()]
            held = self.writeback.held_values(tx, [d for _, o, _ in decided for d in o.decisions])
            for entity, outcome, current in decided:
                over, still = _events_over(open_events.get(entity, []), outcome)
                self.writeback.plan(tx, entity, outcome.decisions, current, stats, still_open=still, held=held)
                closing += over
                memories_out[entity] = (outcome.memory.to_dict(), _due_at(outcome.memory, self.sla))
            tx.close_events(closing)
            tx.set_memories(memories_out, now=now)  # one executemany per chunk
        for i in range(0, len(deals), CHUNK):
            chunk = deals[i:i + CHUNK]
            overtaken_d: list[tuple[OutboxRow, dict[str, Any]]] = []
            by_entity = with_pending(tx.records_by_entity(chunk, with_raw=False), tx.open_writes(chunk), overtaken_d)
            self.writeback.supersede(tx, overtaken_d, stats)
            memories = tx.get_memory(chunk)
            deal_memories: dict[str, tuple[dict[str, Any], datetime | None]] = {}
            decided_deals: list[tuple[str, rules.Outcome, list[CanonicalRecord]]] = []
            for entity in chunk:
                dview = deal_view(entity, by_entity.get(entity, []), memories.get(entity))
                if dview is None:
                    undecided.add(entity)
                    continue
                decided_deals.append((entity, rules.decide_deal(dview, self.ctx, now),
                                      [r for r in (dview.hubspot, dview.salesforce) if r]))
            held = self.writeback.held_values(tx, [d for _, o, _ in decided_deals for d in o.decisions])
            for entity, outcome_d, current in decided_deals:
                self.writeback.plan(tx, entity, outcome_d.decisions, current, stats, held=held)
                deal_memories[entity] = (outcome_d.memory.to_dict(), None)
            tx.set_memories(deal_memories, now=now)
        if undecided:
            tx.set_due_many(undecided, None)


    # -- write back -----------------------------------------------------------------------------


# -- helpers --------------------------------------------------------------------------------------



def record_row(raw: RawRecord, canon: CanonicalRecord) -> RecordRow:
    return RecordRow(system=raw.system, object=raw.object, id=raw.id, kind=canon.kind,
                     modified_at=raw.modified_at, raw=jsonable(dict(raw.fields)),
                     canonical={"terms": dict(canon.terms), "values": jsonable(dict(canon.values)),
                                "unmapped": [list(u) for u in canon.unmapped]},
                     email_norm=canon.email)


def _events_over(open_events: Sequence[Any], outcome: rules.Outcome) -> tuple[list[int], dict[str, bool]]:
    """Ids of this person's open events that are over after this decision: superseded by a new
    event of the same kind, or no longer true of the person (a breach followed up or returned,
    a return or a blocked re-hand-off whose guard was lifted); and, per kind, whether an event
    of it is still true now (a breach recorded when a late attempt came is history at once)."""
    mem = outcome.memory
    new_kinds = {d.event for d in outcome.decisions if d.action == "event"}
    breach_open = (mem.sla_breach_at is not None and mem.first_attempt_at is None
                   and not (mem.returned_at is not None and mem.handed_off_at is not None
                            and mem.returned_at >= mem.handed_off_at))
    still = {"sla_breach": breach_open, "returned": mem.guarded,
             "promotion_blocked": mem.guarded and mem.blocked_promotion_at is not None}
    return [e.id for e in open_events if e.kind in new_kinds or not still.get(e.kind, True)], still


def _due_at(mem: rules.Memory, sla: SLA) -> datetime | None:
    """When this person must be looked at again even if nothing changes (the follow-up timer)."""
    if mem.handed_off_at is not None and mem.first_attempt_at is None and mem.sla_breach_at is None:
        return mem.handed_off_at + timedelta(hours=sla.followup.window_hours)
    return None


