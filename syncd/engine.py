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
  their audit rows) after it; a restart resends what was in flight (updates are
  idempotent; a create that may have been sent before looks the record up by
  email first).

Never act on half a picture (:mod:`syncd.freshness`): a system whose pull fails is
recorded (``pull_state``), the others go on pulling, and only entities whose every
object finished a first full pull and is fresh are decided; the rest stay due. Such a
cycle is ``partial``, with one line saying why, and writes go only to systems that
pulled successfully in it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

import structlog

from connectors.base import Connector
from syncd import conflicts as link_conflicts
from syncd import freshness, rules
from syncd.errors import FatalError, RecordError, RetriableError, SyncError
from syncd.linking import LinkStats, link_deals, link_people, person_objects
from syncd.mapping import Mappings
from syncd.model import (
    OBJECT_GROUPS,
    SYSTEMS,
    CanonicalRecord,
    FieldUpdate,
    RawRecord,
    RecordCreate,
    WriteResult,
    utcnow,
)
from syncd.sla import SLA
from syncd.store import OutboxItem, OutboxRow, RecordRow, Store, Tx

log = structlog.get_logger()

CHUNK = 500  # entities decided per transaction


@dataclass
class PlannedWrite:
    """A write the rules want, for --dry-run tables and the demo narrative."""

    system: str
    object: str
    record_id: str | None
    op: str
    who: str
    changes: dict[str, tuple[Any, Any]]
    rule: str
    reason: str


@dataclass
class CycleStats:
    pulled: dict[str, int] = field(default_factory=dict)
    changed: int = 0
    quarantined: int = 0
    unmapped: int = 0
    linked: int = 0
    conflicts: int = 0
    decisions: int = 0
    events: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    planned: list[PlannedWrite] = field(default_factory=list)
    # the half picture: systems whose pull failed in this cycle (the error, for back-off),
    # why decisions were held, and how many due entities were left undecided for it
    pull_failures: dict[str, SyncError] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    undecided: int = 0
    conflicts_resolved: int = 0

    @property
    def partial(self) -> bool:
        return bool(self.pull_failures or self.held)

    def partial_reason(self) -> str | None:
        """One line: which systems failed and why, and what that held back."""
        if not self.partial:
            return None
        parts = [f"{system}: {_one_line(exc)}" for system, exc in sorted(self.pull_failures.items())]
        parts += [h for h in self.held if not any(h.startswith(f"{s} ") for s in self.pull_failures)]
        if self.undecided:
            parts.append(f"{self.undecided} due people/deals wait for a complete picture")
        return "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        out = {"pulled": sum(self.pulled.values()), "changed": self.changed, "quarantined": self.quarantined,
               "unmapped": self.unmapped, "linked": self.linked, "conflicts": self.conflicts,
               "decisions": self.decisions, "events": self.events, "sent": self.sent,
               "skipped": self.skipped, "failed": self.failed}
        if self.partial:
            out["undecided"] = self.undecided
        return out


class _DryRunRollback(Exception):
    pass


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
                with self.store.tx() as tx:
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
        try:
            self._cycle(group, stats)
        except BaseException as exc:
            self.store_run_finish(run_id, "failed", stats, _one_line(exc))
            raise
        # A stop request (SIGTERM) ends the cycle after the current page/batch: durable, but not whole.
        status = "interrupted" if self.stop_requested else "partial" if stats.partial else "ok"
        reason = stats.partial_reason()
        self.store_run_finish(run_id, status, stats, reason)
        if reason:
            log.warning("cycle", job=job, status=status, reason=reason, **stats.summary())
        else:
            log.info("cycle", job=job, status=status, **stats.summary())
        return stats

    def store_run_start(self, job: str) -> str:
        with self.store.tx() as tx:
            return tx.start_run(job, now=self.clock(), owner=self.owner)

    def store_run_finish(self, run_id: str, status: str, stats: CycleStats, error: str | None) -> None:
        with self.store.tx() as tx:
            tx.finish_run(run_id, status, {**stats.summary(), "api": self.api_usage()}, error, now=self.clock())

    def api_usage(self) -> dict[str, dict[str, Any]]:
        """Per system: calls this process made (connector lifetime), 429s, and the budget the CRM reports."""
        return {system: {"calls": c.usage.total, "rate_limited": sum(c.usage.rate_limited.values()),
                         "reported_used": c.usage.reported_used, "reported_limit": c.usage.reported_limit}
                for system, c in self.connectors.items()}

    def _cycle(self, group: str | None, stats: CycleStats) -> None:
        groups = [group] if group else list(OBJECT_GROUPS)
        for g in groups:
            for system in SYSTEMS:
                if system in stats.pull_failures:
                    continue  # failed earlier in this cycle: its other objects wait for the next
                if system not in self.connectors:
                    why = self.unavailable.get(system)
                    if why is not None:  # backed off: say so where status and the gate read it
                        with self._tx() as tx:
                            for obj in OBJECT_GROUPS[g][system]:
                                tx.pull_failed(system, obj, why, self.clock())
                    continue
                for obj in OBJECT_GROUPS[g][system]:
                    try:
                        self.pull(system, obj, stats)
                    except (RetriableError, FatalError) as exc:
                        # One CRM down is recorded, not fatal: the other keeps pulling, and the
                        # gate in link_and_decide keeps anyone who needs this side undecided.
                        self._pull_failed(system, obj, exc, stats)
                        break
                    if self.stop_requested:
                        return
        self.link_and_decide(stats)
        if not self.dry_run and not self.stop_requested:
            # Writes go to the systems that answered this cycle; the others' wait in the outbox.
            self.flush(stats, systems=None if not self.require_pulls else self.pulled_ok)

    def _pull_failed(self, system: str, obj: str, exc: SyncError, stats: CycleStats) -> None:
        stats.pull_failures[system] = exc
        with self._tx() as tx:
            tx.pull_failed(system, obj, _one_line(exc), self.clock())
        log.warning("pull_failed", system=system, object=obj, error=_one_line(exc),
                    next="recorded; nothing that needs this side is decided until it pulls again")

    # -- pull + map -----------------------------------------------------------------------------
    def pull(self, system: str, obj: str, stats: CycleStats) -> None:
        """Pull ``system``/``obj`` from its cursor to the end; a pull that reaches the end is
        recorded as complete (the half-picture gate reads it). Connector errors propagate."""
        conn = self.connectors[system]
        with self._tx() as tx:
            cursor = tx.get_cursor(system, obj)
        n = 0
        stopped = False
        for page in conn.iter_changes(obj, cursor, overlap=self.overlap):
            self.ingest(system, obj, page.records, stats)
            n += len(page.records)
            if self.stop_requested:
                stopped = True
                break
        stats.pulled[f"{system}.{obj}"] = stats.pulled.get(f"{system}.{obj}", 0) + n
        if not stopped:
            with self._tx() as tx:
                tx.pull_succeeded(system, obj, self.clock())
            self.pulled_ok.add(system)

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
        with self._tx() as tx:
            changed = tx.upsert_records(rows)
            refs = {row.key: r for row in changed if (r := _refs_of(row)) is not None}
            tx.set_refs_many(refs)
            for raw, reason in bad:
                tx.quarantine_record(system, obj, raw.id, reason, raw=_jsonable(dict(raw.fields)))
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
        if self.require_pulls:
            with self._tx() as tx:
                pic = self.picture(tx)
            if not pic.first_pulls_done():  # recorded, not linked yet (see Picture.first_pulls_done)
                stats.held += [r for k in ("person", "deal") for r in pic.blockers(k) if r not in stats.held]
                with self._tx() as tx:
                    stats.undecided += len(tx.due_entities(now))
                return
        conflict_emails: set[str] = set()  # one conflict per email per cycle, whatever the batching
        while not self.stop_requested:
            with self._tx() as tx:
                dirty = tx.dirty_records(limit=CHUNK * 4, with_raw=False)
                if not dirty:
                    break
                ls = LinkStats(conflict_emails=conflict_emails)
                link_people(tx, dirty, ls)
                link_deals(tx, dirty, ls)  # deal rows: linking people does not change them
                due = set(ls.touched_people) | set(ls.touched_deals)
                # deals and connection attempts touch the people they point at
                due |= _people_of_rows(tx, [r for r in dirty if r.kind in ("deal", "attempt")])
                if ls.touched_deals:  # the other system's record of a touched deal points at people too
                    deal_rows = tx.records_by_entity(sorted(ls.touched_deals), with_raw=False).values()
                    due |= _people_of_rows(tx, [r for rs in deal_rows for r in rs if r.kind == "deal"])
                tx.set_due_many(due, now)
                tx.clear_dirty([r.key for r in dirty])
                stats.linked += ls.linked
                stats.conflicts += ls.conflicts
        if self.stop_requested:
            return
        # Conflicts the CRM data no longer supports resolve themselves (their records merge).
        self._recheck_conflicts(stats, now)
        # What is due: entities touched above, and timers (the follow-up SLA) that fell due even
        # though nothing changed in either CRM. Only kinds whose every object is complete and
        # fresh are decided; the others keep their due marks for a later cycle.
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
                    break
                after = batch[-1][0]
                people = [e for e, k in batch if k == "person"]
                deals = [e for e, k in batch if k == "deal"]
                if held["person"]:
                    stats.undecided += len(people)
                    people = []
                if held["deal"]:
                    stats.undecided += len(deals)
                    deals = []
                self._decide(tx, people, deals, stats, now, conflicts)

    def _recheck_conflicts(self, stats: CycleStats, now: datetime) -> None:
        with self._tx() as tx:
            open_ = tx.open_link_conflicts()
        if not open_:
            return
        reachable = (self.pulled_ok if self.require_pulls else set(self.connectors)) & set(self.connectors)
        try:  # outside any transaction: these are CRM calls
            gone = link_conflicts.gone_candidates(open_, self._live_ids, reachable)
        except (RetriableError, FatalError) as exc:
            log.warning("link_conflict_recheck_failed", error=_one_line(exc), next="the next cycle checks again")
            gone = set()
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
            by_entity = _with_pending(tx.records_by_entity(chunk, with_raw=False), tx.open_writes(chunk))
            memories = tx.get_memory(chunk)
            open_events = tx.open_events_of(chunk)
            closing: list[int] = []
            memories_out: dict[str, tuple[dict[str, Any], datetime | None]] = {}
            refs = _referrers_by_ref(
                tx, [r for e in chunk for r in by_entity.get(e, []) if r.kind == "person"])
            for entity in chunk:
                view = prefetched_person_view(entity, by_entity.get(entity, []), memories.get(entity), refs,
                                              conflicts)
                if view is None:
                    undecided.add(entity)
                    continue
                outcome = rules.decide_person(view, self.ctx, now)
                over, still = _events_over(open_events.get(entity, []), outcome)
                self._apply(tx, entity, outcome.decisions, view_records(view), stats, still_open=still)
                closing += over
                memories_out[entity] = (outcome.memory.to_dict(), _due_at(outcome.memory, self.sla))
            tx.close_events(closing)
            tx.set_memories(memories_out, now=now)  # one executemany per chunk
        for i in range(0, len(deals), CHUNK):
            chunk = deals[i:i + CHUNK]
            by_entity = _with_pending(tx.records_by_entity(chunk, with_raw=False), tx.open_writes(chunk))
            memories = tx.get_memory(chunk)
            deal_memories: dict[str, tuple[dict[str, Any], datetime | None]] = {}
            for entity in chunk:
                dview = self._deal_view(entity, by_entity.get(entity, []), memories.get(entity))
                if dview is None:
                    undecided.add(entity)
                    continue
                outcome_d = rules.decide_deal(dview, self.ctx, now)
                self._apply(tx, entity, outcome_d.decisions,
                            [r for r in (dview.hubspot, dview.salesforce) if r], stats)
                deal_memories[entity] = (outcome_d.memory.to_dict(), None)
            tx.set_memories(deal_memories, now=now)
        if undecided:
            tx.set_due_many(undecided, None)

    def _deal_view(self, entity: str, rows: list[RecordRow],
                   memory: Any = None) -> rules.DealView | None:
        deals = [r for r in rows if r.kind == "deal"]
        if not deals:
            return None
        hs = pick_record(deals, "hubspot", ("deals",))
        sf = pick_record(deals, "salesforce", ("Opportunity",))
        return rules.DealView(entity_id=entity, hubspot=canonical_of(hs) if hs else None,
                              salesforce=canonical_of(sf) if sf else None, memory=_memory(memory))

    def _apply(self, tx: Tx, entity: str, decisions: Iterable[rules.Decision],
               current: Sequence[CanonicalRecord], stats: CycleStats,
               still_open: Mapping[str, bool] | None = None) -> None:
        """Decisions → outbox rows (writes) or events. No-op writes never reach the outbox."""
        raw_now = {(r.system, r.object, r.id): r for r in current}
        items: list[OutboxItem] = []
        for d in decisions:
            stats.decisions += 1
            if d.action == "event":
                stats.events += 1
                # Each event the rules emit is a new occurrence (their memory emits it once): a
                # second breach or return is recorded, never swallowed by the open first one.
                tx.add_event(d.event or d.rule, entity,
                             {"rule": d.rule, "reason": d.reason, **_jsonable(dict(d.changes))}, now=self.clock(),
                             dedupe=False, open=(still_open or {}).get(d.event or d.rule, True))
                if d.event == "sla_breach":
                    log.warning("sla_event", kind=d.event, rule=d.rule, entity_id=entity, reason=d.reason)
                else:
                    log.info("rule_event", kind=d.event, rule=d.rule, entity_id=entity)
                continue
            assert d.system is not None and d.object is not None
            try:
                fields = self.mappings.to_raw(d.system, d.object, d.changes)
            except RecordError as exc:
                # The mappings cannot express this write: never guess; park it where status shows it.
                stats.quarantined += 1
                tx.quarantine_record(d.system, d.object, d.record_id, f"{d.rule}: {exc}",
                                     raw=_jsonable(dict(d.changes)), now=self.clock())
                log.warning("write_unmappable", system=d.system, object=d.object, record_id=d.record_id,
                            rule=d.rule, error=str(exc))
                continue
            target = raw_now.get((d.system, d.object, d.record_id or ""))
            if d.action == "set":
                if not fields:
                    continue
                if target is not None and d.record_id is not None:
                    held = tx.get_records([(d.system, d.object, d.record_id)]).get((d.system, d.object, d.record_id))
                    if held is not None and all(_same(held.raw.get(k), v) for k, v in fields.items()):
                        stats.skipped += 1
                        continue
            clear_first = tuple(self.mappings.clear_first_fields(d.system, d.object, d.changes)) \
                if d.backwards else ()
            key = d.key or _idempotency_key(d, fields, target)
            items.append(OutboxItem(
                key=key, entity_id=entity, system=d.system, object=d.object, record_id=d.record_id,
                op="create" if d.action == "create" else "update", fields=_jsonable(fields),
                clear_first=clear_first, email_norm=_email_of(current, d),
                canonical={k: [_jsonable(d.before.get(k)), _jsonable(v)] for k, v in d.changes.items()},
                rule=d.rule, reason=d.reason, mapping_rev=self.mappings.revision))
            if self.dry_run:  # the table --dry-run prints; a real cycle keeps memory flat instead
                stats.planned.append(PlannedWrite(d.system, d.object, d.record_id, items[-1].op, _who(current),
                                                  {k: (d.before.get(k), v) for k, v in d.changes.items()},
                                                  d.rule, d.reason))
        if items:
            tx.enqueue(items)

    # -- write back -----------------------------------------------------------------------------
    def flush(self, stats: CycleStats, systems: Iterable[str] | None = None) -> None:
        """Send due outbox rows in CRM-sized batches; mark each done, retried or quarantined.
        With ``systems``, only to those (the ones that answered this cycle)."""
        only = set(systems) if systems is not None else None
        for system, conn in self.connectors.items():
            if only is not None and system not in only:
                continue
            while not self.stop_requested:
                with self._tx() as tx:
                    due = tx.due(system, None, self.clock(), self.write_batch)
                    if not due:
                        break
                    tx.mark_sending([r.id for r in due])
                by_obj: dict[tuple[str, str], list[OutboxRow]] = {}
                for r in due:
                    by_obj.setdefault((r.object, r.op), []).append(r)
                for (obj, op), batch in by_obj.items():
                    self._send(conn, system, obj, op, batch, stats)

    def _send(self, conn: Connector, system: str, obj: str, op: str, batch: list[OutboxRow],
              stats: CycleStats) -> None:
        try:
            if op == "create":
                results = self._create_idempotent(conn, system, obj, batch)
            else:
                results = conn.write(obj, [FieldUpdate(key=str(r.id), record_id=str(r.record_id), fields=r.fields,
                                                       clear_first=tuple(r.clear_first)) for r in batch])
        except RetriableError as exc:
            self._fail_all(batch, f"{type(exc).__name__}: {exc}", stats)
            return
        except FatalError:
            raise  # rows stay 'sending'; due() hands them out again after the fix
        by_key = {res.key: res for res in results}
        with self._tx() as tx:
            for r in batch:
                res = by_key.get(str(r.id))
                if res is not None and res.ok:
                    tx.mark_done(r.id, result_id=res.record_id, now=self.clock())
                    stats.sent += 1
                    if self.on_write:
                        self.on_write(r, res.record_id)
                else:
                    err = res.error if res is not None else "no result from the CRM"
                    attempts = r.attempts + 1
                    quarantined = tx.mark_failed(r.id, err or "failed", self._backoff(attempts),
                                                 self.sla.writeback.max_tries, now=self.clock())
                    stats.failed += 1
                    log.warning("write_failed", system=system, object=obj, outbox_id=r.id,
                                record_id=r.record_id, error=err, quarantined=quarantined)

    def _create_idempotent(self, conn: Connector, system: str, obj: str,
                           batch: list[OutboxRow]) -> list[Any]:
        """Creates are keyed: a create that may already have reached the CRM (a resend: the
        row was left ``sending`` by a crash, or an earlier attempt failed, e.g. a timeout
        after the CRM accepted it) first looks its email up, and a record found there is
        taken as the result instead of creating a second one. A first send creates
        directly: nothing of ours can be there yet, and the look-up would cost one read
        per create batch."""
        resends = [r for r in batch if r.resend]
        emails = [e for e in (self.mappings.raw_email(system, obj, r.fields) for r in resends) if e]
        existing = {}
        if emails:
            for rec in conn.find_by_email(obj, emails):
                e = self.mappings.raw_email(system, obj, rec.fields)
                if e:
                    existing[e] = rec.id
        results: list[WriteResult] = []
        to_create: list[OutboxRow] = []
        for r in batch:
            e = self.mappings.raw_email(system, obj, r.fields) if r.resend else None
            if e and e in existing:
                results.append(WriteResult(key=str(r.id), ok=True, record_id=existing[e]))
            else:
                to_create.append(r)
        if to_create:
            results += conn.create(obj, [RecordCreate(key=str(r.id), fields=r.fields) for r in to_create])
        return results

    def _fail_all(self, batch: list[OutboxRow], err: str, stats: CycleStats) -> None:
        with self._tx() as tx:
            for r in batch:
                tx.mark_failed(r.id, err, self._backoff(r.attempts + 1), self.sla.writeback.max_tries,
                               now=self.clock())
                stats.failed += 1
        log.warning("write_batch_failed", size=len(batch), error=err)

    def _backoff(self, attempts: int) -> datetime:
        return self.clock() + timedelta(seconds=min(300.0, 2.0 ** attempts))


# -- helpers --------------------------------------------------------------------------------------

_DATETIME_VALUES = ("bofu_conversion_at", "at")


def rule_context(mappings: Mappings, sla: SLA) -> rules.RuleContext:
    closed = frozenset(t for t in mappings.deal_stages if mappings.deal_stage_closed(t))
    won = frozenset(t for t in mappings.deal_stages if mappings.deal_stage_won(t))
    return rules.RuleContext(sla=sla, stages=mappings.stages, closed_won_terms=won, closed_terms=closed,
                             writable=mappings.writable_fields())


def record_row(raw: RawRecord, canon: CanonicalRecord) -> RecordRow:
    return RecordRow(system=raw.system, object=raw.object, id=raw.id, kind=canon.kind,
                     modified_at=raw.modified_at, raw=_jsonable(dict(raw.fields)),
                     canonical={"terms": dict(canon.terms), "values": _jsonable(dict(canon.values)),
                                "unmapped": [list(u) for u in canon.unmapped]},
                     email_norm=canon.email)


def canonical_of(row: RecordRow) -> CanonicalRecord:
    values = dict(row.canonical.get("values", {}))
    for k in _DATETIME_VALUES:
        v = values.get(k)
        if isinstance(v, str):
            values[k] = datetime.fromisoformat(v)
    return CanonicalRecord(system=row.system, object=row.object, id=row.id, kind=row.kind,  # type: ignore[arg-type]
                           modified_at=row.modified_at, terms=dict(row.canonical.get("terms", {})),
                           values=values, unmapped=tuple(tuple(u) for u in row.canonical.get("unmapped", [])))


def _with_pending(by_entity: dict[str, list[RecordRow]],
                  pending: Mapping[str, Sequence[OutboxRow]]) -> dict[str, list[RecordRow]]:
    """The records as they will be once syncd's own pending writes land.

    The rules must not read a value that an outbox entry of ours is about to change (a
    write killed before it was sent, or backing off after a failure) as news from the CRM:
    that would re-decide settled things (a returned person read as promoted again, or a
    second copy of a write whose first copy is still pending).
    """
    if not pending:
        return by_entity
    out = dict(by_entity)
    for entity, writes in pending.items():
        rows = out.get(entity)
        if not rows:
            continue
        by_key = {r.key: r for r in rows}
        for w in writes:
            target = by_key.get((w.system, w.object, str(w.record_id)))
            if target is None:
                continue
            canonical = {"terms": dict(target.canonical.get("terms", {})),
                         "values": dict(target.canonical.get("values", {})),
                         "unmapped": target.canonical.get("unmapped", [])}
            for fld, (_before, after) in w.canonical.items():
                canonical["terms" if fld in rules.TERM_FIELDS else "values"][fld] = after
            by_key[target.key] = replace(target, canonical=canonical)
        out[entity] = [by_key[r.key] for r in rows]
    return out


def person_view(entity: str, rows: Sequence[RecordRow], memory: Any,
                referrers: Callable[[str, list[str]], Iterable[RecordRow]],
                to_canonical: Callable[[RecordRow], CanonicalRecord | None],
                conflicts: frozenset[str] = frozenset()) -> rules.PersonView | None:
    """What the rules see of one person: the record chosen per system (a Contact over the Lead
    it was converted from), the deals and connection attempts pointing at any of the person's
    records, the memory, and whether an identity conflict is open on the email.

    ``to_canonical`` may refuse a record (None): a person record refused makes no view at all,
    a refused deal or attempt is left out (the daemon quarantines such records).
    """
    persons = [r for r in rows if r.kind == "person"]
    if not persons:
        return None
    chosen: dict[str, CanonicalRecord | None] = {}
    for system, row in (("hubspot", pick_record(persons, "hubspot", ("contacts",))),
                        ("salesforce", pick_record(persons, "salesforce", ("Contact", "Lead"), prefer_converted=True))):
        chosen[system] = to_canonical(row) if row is not None else None
        if row is not None and chosen[system] is None:
            return None
    deals: list[CanonicalRecord] = []
    attempts: list[CanonicalRecord] = []
    for system in SYSTEMS:
        ids = [r.id for r in persons if r.system == system]
        for ref in referrers(system, ids) if ids else ():
            c = to_canonical(ref)
            if c is not None and ref.kind in ("deal", "attempt"):
                (deals if ref.kind == "deal" else attempts).append(c)
    return rules.PersonView(
        entity_id=entity, hubspot=chosen["hubspot"], salesforce=chosen["salesforce"],
        deals=tuple(deals), attempts=tuple(attempts), memory=_memory(memory),
        link_conflict=any(r.email_norm in conflicts for r in persons if r.email_norm),
    )


def prefetched_person_view(entity: str, rows: Sequence[RecordRow], memory: Any,
                           refs: Mapping[tuple[str, str], list[RecordRow]],
                           conflicts: frozenset[str] = frozenset()) -> rules.PersonView | None:
    """:func:`person_view` over referrers read once for a whole chunk (:func:`_referrers_by_ref`)."""
    def referrers(system: str, ids: list[str]) -> Iterable[RecordRow]:
        found = {ref.key: ref for rid in ids for ref in refs.get((system, rid), ())}
        return [found[k] for k in sorted(found)]  # each once, in key order, as Tx.referrers gives them

    return person_view(entity, rows, memory, referrers, canonical_of, conflicts)


def conflicted_emails(tx: Tx) -> frozenset[str]:
    """Emails with an open identity conflict (see syncd.linking)."""
    return frozenset(c.email_norm for c in tx.open_link_conflicts())


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an error, for run rows, log lines and status."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:limit]


def _memory(stored: Any) -> rules.Memory:
    return rules.Memory.from_dict(stored)


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


def _first_email(records: Sequence[CanonicalRecord]) -> str | None:
    return next((r.email for r in records if r.email), None)


def _email_of(current: Sequence[CanonicalRecord], d: rules.Decision) -> str | None:
    e = _first_email(current) or d.changes.get("email")
    return e if isinstance(e, str) else None

def _refs_of(row: RecordRow) -> list[str] | None:
    v = row.canonical.get("values", {})
    if row.kind == "deal":
        return [str(x) for x in (v.get("contact_ids") or [])]
    if row.kind == "attempt":
        return [str(v["who_id"])] if v.get("who_id") else []
    return None


def _people_of_rows(tx: Tx, rows: Sequence[RecordRow]) -> set[str]:
    """Entities of the people these deal/attempt rows point at: one store lookup for all rows."""
    keys: set[tuple[str, str, str]] = set()
    for row in rows:
        keys.update((row.system, obj, str(cid)) for cid in (_refs_of(row) or []) for obj in person_objects(row.system))
    if not keys:
        return set()
    return {e for e in tx.entity_ids(keys).values() if e}


def _referrers_by_ref(tx: Tx,
                      persons: Sequence[RecordRow]) -> dict[tuple[str, str], list[RecordRow]]:
    """``Tx.referrers`` for many person records at once, keyed by (system, person id)."""
    out: dict[tuple[str, str], list[RecordRow]] = {}
    for system in SYSTEMS:
        ids = {r.id for r in persons if r.system == system}
        if not ids:
            continue
        for ref in tx.referrers(system, ids, with_raw=False):
            for rid in set(_refs_of(ref) or ()):
                if rid in ids:
                    out.setdefault((system, rid), []).append(ref)
    return out


def pick_record(rows: list[RecordRow], system: str, objects: tuple[str, ...], *,
                prefer_converted: bool = False) -> RecordRow | None:
    """The record that speaks for a person/deal in ``system`` (a Contact over the Lead it
    was converted from, then the most recently modified)."""
    cands = [r for r in rows if r.system == system and r.object in objects]
    if not cands:
        return None
    # Prefer the first listed object type (Contact over a converted Lead), then the latest.
    cands.sort(key=lambda r: (objects.index(r.object), -r.modified_at.timestamp()))
    if prefer_converted:
        leads = [r for r in cands if r.object == "Lead" and not r.canonical.get("values", {}).get("is_converted")]
        contacts = [r for r in cands if r.object == "Contact"]
        if contacts:
            return contacts[0]
        if leads:
            return leads[0]
    return cands[0]


def view_records(view: rules.PersonView) -> list[CanonicalRecord]:
    return [r for r in (view.hubspot, view.salesforce) if r is not None]


def _who(records: Sequence[CanonicalRecord]) -> str:
    return _first_email(records) or (records[0].id if records else "?")


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, int | float) or isinstance(b, int | float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _idempotency_key(d: rules.Decision, fields: Mapping[str, Any], target: CanonicalRecord | None) -> str:
    gen = target.modified_at.isoformat() if target is not None else ""
    blob = json.dumps([d.system, d.object, d.record_id, sorted((k, str(v)) for k, v in fields.items()), gen])
    return f"{d.rule}:{d.system}:{d.record_id}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


_PLAIN = (str, int, float, bool, type(None))


def _jsonable(v: Any) -> Any:
    if type(v) in _PLAIN:  # the common case first: most values are strings
        return v
    if isinstance(v, date):  # datetimes too
        return v.isoformat()
    if isinstance(v, dict):
        return {k if type(k) is str else str(k): x if type(x) in _PLAIN else _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [_jsonable(x) for x in v]
    return v
