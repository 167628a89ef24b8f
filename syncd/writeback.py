"""Write-back: decisions become outbox rows (planning), and outbox rows are sent to the CRMs
in batches and marked done, retried or quarantined (flushing).

Outbox rows are marked ``sending`` before the CRM call and ``done`` (with their audit rows)
after it; a restart resends what was in flight (updates are idempotent; a create that may
have been sent before looks the record up by email first). A write whose target already
holds the value never reaches the outbox.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd import rules
from syncd._json import jsonable
from syncd.connectors.base import Connector
from syncd.deletions import DELETE_OP
from syncd.errors import FatalError, RecordError, RetriableError
from syncd.mapping import Mappings
from syncd.model import CanonicalRecord, Deletion, FieldUpdate, RecordCreate, WriteResult
from syncd.sla import SLA
from syncd.stats import CycleStats, PlannedWrite
from syncd.store import OutboxItem, OutboxRow, RecordKey, RecordRow, Tx
from syncd.views import first_email

log = structlog.get_logger()


# Conditional resends (one CRM call per record) after a crash or takeover, at most this many per
# batch; beyond, the batch is resent as one call after its look-first read (one call, not atomic).
CONDITIONAL_RESENDS_MAX = 50


class WriteBack:
    """Plans and sends one engine's writes. ``tx`` opens the engine's unit of work (one shared,
    rolled-back transaction in a dry run); ``should_stop`` is checked between batches."""

    def __init__(self, tx: Callable[[], AbstractContextManager[Tx]], mappings: Mappings, sla: SLA,
                 connectors: Mapping[str, Connector], *, clock: Callable[[], datetime], dry_run: bool,
                 write_batch: int, on_write: Callable[[OutboxRow, str | None], None] | None,
                 should_stop: Callable[[], bool]) -> None:
        self._tx = tx
        self.mappings = mappings
        self.sla = sla
        self.connectors = connectors
        self.clock = clock
        self.dry_run = dry_run
        self.write_batch = write_batch
        self.on_write = on_write
        self.should_stop = should_stop
        # How long a transiently failing write waits before its next send: doubling from
        # ``retry_base_s`` up to ``retry_cap_s``, jittered (make_engine sets them from config).
        self.retry_base_s = 2.0
        self.retry_cap_s = 300.0
        # Fencing (set by syncd.resync where the leases are held): ``may_send`` is asked right
        # before each CRM call; False (the lease was lost) stops this flush at once, dropping
        # the batch in hand (its rows stay ``sending``: the new holder looks first and finishes
        # them). ``fence`` (lease, owner, token) guards marking rows done.
        self.may_send: Callable[[], bool] = lambda: True
        self.fence: tuple[str, str, int] | None = None
        self.call_timeout_s = 30.0
        self.fenced = False
        # Dead records (syncd.deletions), set by the engine: ``on_dead`` gets writes answered by a
        # merge survivor (the id written to was merged away); ``on_permanent`` gets the records
        # of writes quarantined at once (a permanent error), to be read again.
        self.on_dead: Callable[[Sequence[Deletion], CycleStats], None] | None = None
        self.on_permanent: Callable[[str, str, Sequence[str], CycleStats], None] | None = None

    def _record_event(self, tx: Tx, entity: str, d: rules.Decision, still_open: bool) -> None:
        # Each event the rules emit is a new occurrence (their memory emits it once): a second
        # breach or return is recorded, never swallowed by the open first one.
        tx.add_event(d.event or d.rule, entity, {"rule": d.rule, "reason": d.reason, **jsonable(dict(d.changes))},
                     now=self.clock(), dedupe=False, open=still_open)
        if d.event == "sla_breach":
            log.warning("sla_event", kind=d.event, rule=d.rule, entity_id=entity, reason=d.reason)
        else:
            log.info("rule_event", kind=d.event, rule=d.rule, entity_id=entity)

    def held_values(self, tx: Tx, decisions: Iterable[rules.Decision]) -> dict[RecordKey, RecordRow]:
        """The stored raw records that ``decisions`` would set fields of: one read for a chunk."""
        keys = {(d.system, d.object, d.record_id) for d in decisions
                if d.action == "set" and d.system and d.object and d.record_id}
        return tx.get_records(sorted(keys)) if keys else {}  # type: ignore[arg-type]

    def plan(self, tx: Tx, entity: str, decisions: Iterable[rules.Decision],
             current: Sequence[CanonicalRecord], stats: CycleStats,
             still_open: Mapping[str, bool] | None = None,
             held: Mapping[RecordKey, RecordRow] | None = None) -> None:
        """Decisions → outbox rows (writes) or events. No-op writes never reach the outbox: a set
        whose target already holds the values is skipped (``held``: the stored raw records,
        prefetched for a chunk by :meth:`held_values`; read here when not given)."""
        raw_now = {(r.system, r.object, r.id): r for r in current}
        items: list[OutboxItem] = []
        for d in decisions:
            stats.decisions += 1
            if d.action == "event":
                stats.events += 1
                self._record_event(tx, entity, d, (still_open or {}).get(d.event or d.rule, True))
                continue
            assert d.system is not None and d.object is not None
            try:
                fields = self.mappings.to_raw(d.system, d.object, d.changes)
            except RecordError as exc:
                # The mappings cannot express this write: never guess; park it where status shows it.
                stats.quarantined += 1
                tx.quarantine_record(d.system, d.object, d.record_id, f"{d.rule}: {exc}",
                                     raw=jsonable(dict(d.changes)), now=self.clock())
                log.warning("write_unmappable", system=d.system, object=d.object, record_id=d.record_id,
                            rule=d.rule, error=str(exc))
                continue
            target = raw_now.get((d.system, d.object, d.record_id or ""))
            basis: dict[str, Any] | None = None
            if d.action == "set":
                if not fields:
                    continue
                noop, basis = self._basis(tx, d, fields, target, held)
                if noop:
                    stats.skipped += 1
                    continue
            clear_first = tuple(self.mappings.clear_first_fields(d.system, d.object, d.changes)) \
                if d.backwards else ()
            key = d.key or _idempotency_key(d, fields, target)
            items.append(OutboxItem(
                key=key, entity_id=entity, system=d.system, object=d.object, record_id=d.record_id,
                op="create" if d.action == "create" else "update", fields=jsonable(fields),
                clear_first=clear_first, email_norm=email_of(current, d),
                canonical={k: [jsonable(d.before.get(k)), jsonable(v)] for k, v in d.changes.items()},
                rule=d.rule, reason=d.reason, mapping_rev=self.mappings.revision, basis=basis))
            if self.dry_run:  # the table --dry-run prints; a real cycle keeps memory flat instead
                stats.planned.append(PlannedWrite(d.system, d.object, d.record_id, items[-1].op, who(current),
                                                  {k: (d.before.get(k), v) for k, v in d.changes.items()},
                                                  d.rule, d.reason))
        if items:
            tx.enqueue(items)

    def _basis(self, tx: Tx, d: rules.Decision, fields: Mapping[str, Any], target: CanonicalRecord | None,
               held: Mapping[RecordKey, RecordRow] | None) -> tuple[bool, dict[str, Any] | None]:
        """(the target already holds every value: a no-op, the held raw values of ``fields``:
        what a resend compares the CRM with first; None when the store has no copy)."""
        if target is None or d.record_id is None or d.system is None or d.object is None:
            return False, None
        rk = (d.system, d.object, d.record_id)
        row = held.get(rk) if held is not None else tx.get_records([rk]).get(rk)
        if row is None:
            return False, None
        if all(_same(row.raw.get(k), v) for k, v in fields.items()):
            return True, None
        return False, jsonable({k: row.raw.get(k) for k in fields})

    def flush(self, stats: CycleStats, systems: Iterable[str] | None = None) -> None:
        """Send due outbox rows in CRM-sized batches; mark each done, retried or quarantined.
        With ``systems``, only to those (the ones that answered this cycle)."""
        only = set(systems) if systems is not None else None
        for system, conn in self.connectors.items():
            if only is not None and system not in only:
                continue
            tried: set[int] = set()  # each row is sent at most once per flush, however short its backoff
            while not self.should_stop():
                if not self._may_send():  # outside the transaction: the check is a store write of its own
                    return
                with self._tx() as tx:
                    due = [r for r in tx.due(system, None, self.clock(), self.write_batch) if r.id not in tried]
                    if not due:
                        break
                    tx.mark_sending([r.id for r in due], fence=self.fence[2] if self.fence else None)
                tried.update(r.id for r in due)
                by_obj: dict[tuple[str, str], list[OutboxRow]] = {}
                for r in due:
                    by_obj.setdefault((r.object, r.op), []).append(r)
                for (obj, op), batch in by_obj.items():
                    if not self._may_send():
                        return
                    self._send(conn, system, obj, op, batch, stats)

    def _may_send(self) -> bool:
        if self.fenced or not self.may_send():
            self.fenced = True
            log.error("writes_fenced", note="the lease is lost: nothing more is sent by this process")
            return False
        return True

    def _send(self, conn: Connector, system: str, obj: str, op: str, batch: list[OutboxRow],
              stats: CycleStats) -> None:
        batch = self._drop_dead(system, obj, batch, stats)
        if not batch:
            return
        try:
            if op == "update" and any(r.state == "sending" for r in batch):
                batch = self._look_first(conn, system, obj, batch, stats)
                if not batch or not self._may_send():
                    return
            if op == "create":
                results = self._create_idempotent(conn, system, obj, batch)
            elif op == DELETE_OP:
                results = conn.delete(obj, [(str(r.id), str(r.record_id)) for r in batch])  # type: ignore[attr-defined]
            else:
                results = conn.write(obj, [FieldUpdate(key=str(r.id), record_id=str(r.record_id), fields=r.fields,
                                                       clear_first=tuple(r.clear_first)) for r in batch])
        except RetriableError as exc:
            self._fail_all(batch, f"{type(exc).__name__}: {exc}", stats)
            return
        except FatalError:
            raise  # rows stay 'sending'; due() hands them out again after the fix
        with self._tx() as tx:
            merged, permanent = self._settle(tx, batch, results, stats)
        if merged and self.on_dead is not None:
            self.on_dead(merged, stats)
        if permanent and self.on_permanent is not None:
            self.on_permanent(system, obj, permanent, stats)

    def _settle(self, tx: Tx, batch: list[OutboxRow], results: Sequence[WriteResult],
                stats: CycleStats) -> tuple[list[Deletion], list[str]]:
        """Mark each row done or failed. Returns the records found merged away (an update
        answered with another id: the survivor's) and those of writes quarantined at once."""
        by_key = {res.key: res for res in results}
        merged: list[Deletion] = []
        permanent: list[str] = []
        ok = {r.id: res.record_id for r in batch if (res := by_key.get(str(r.id))) is not None and res.ok}
        marked = tx.mark_done_many(list(ok.items()), now=self.clock(), fence=self.fence) if ok else set()
        for r in batch:
            res = by_key.get(str(r.id))
            if res is not None and res.ok:
                if r.id not in marked:
                    log.warning("write_done_fenced", outbox_id=r.id, note="another process holds the lease now")
                    continue
                stats.sent += 1
                if self.on_write:
                    self.on_write(r, res.record_id)
                if r.op == "update" and r.record_id and res.record_id and res.record_id != r.record_id:
                    merged.append(Deletion(r.system, r.object, str(r.record_id), None, res.record_id,
                                           "write answer"))
                continue
            err = (res.error if res is not None else None) or "UNKNOWN: no result from the CRM"
            retriable = res.retriable if res is not None else True
            self._failed(tx, r, err, retriable, stats)
            if not retriable and r.record_id:
                permanent.append(str(r.record_id))
        return merged, sorted(set(permanent))

    def _drop_dead(self, system: str, obj: str, batch: list[OutboxRow], stats: CycleStats) -> list[OutboxRow]:
        """Nothing is ever written to a deleted record: rows whose target has a tombstone are
        superseded here (audited; their person is decided again), whatever queued them."""
        keys = [(system, obj, str(r.record_id)) for r in batch if r.record_id]
        if not keys:
            return batch
        with self._tx() as tx:
            dead = tx.tombstones(keys)
            if not dead:
                return batch
            for r in batch:
                tomb = dead.get((system, obj, str(r.record_id)))
                if tomb is not None and tx.mark_superseded(
                        r.id, f"not sent: {system} {obj} {r.record_id} is {tomb.kind} ({tomb.source})",
                        now=self.clock()):
                    stats.skipped += 1
        log.info("writes_to_dead_records_dropped", system=system, object=obj, count=len(dead))
        return [r for r in batch if (system, obj, str(r.record_id)) not in dead]

    def _failed(self, tx: Tx, r: OutboxRow, err: str, retriable: bool, stats: CycleStats) -> None:
        """One write failed: a transient failure is sent again later, however often it failed
        (alerted on once it failed ``max_tries`` sends); a permanent one is quarantined now."""
        attempts = r.attempts + 1  # ``r`` as due() read it; mark_sending counted this send
        quarantined = tx.mark_failed(r.id, err, self._backoff(attempts), retriable=retriable, now=self.clock())
        stats.failed += 1
        if quarantined:
            log.warning("write_quarantined", system=r.system, object=r.object, outbox_id=r.id,
                        record_id=r.record_id, error=err, next="the person is decided again")
        elif attempts >= self.sla.writeback.max_tries:
            log.error("write_failing", system=r.system, object=r.object, outbox_id=r.id,
                      record_id=r.record_id, attempts=attempts, error=err,
                      next="retried until the CRM takes it (transient failure)")
        else:
            log.warning("write_failed", system=r.system, object=r.object, outbox_id=r.id,
                        record_id=r.record_id, attempts=attempts, error=err, next="retried")

    def _look_first(self, conn: Connector, system: str, obj: str, batch: list[OutboxRow],
                    stats: CycleStats) -> list[OutboxRow]:
        """Updates found ``sending`` (a crash or a lease takeover after they were handed out)
        are never resent blindly: the targets are read again (one fetch for the batch) and each
        compared with the basis its decision was made on. The CRM already holds the intended
        values → done; it changed since the basis (someone edited the record after the
        decision) → superseded (audited, the person decided again); else → resent.
        Returns the rows still to send."""
        stale = [r for r in batch if r.state == "sending" and r.record_id]
        ids = list(dict.fromkeys(str(r.record_id) for r in stale))
        fetched = conn.fetch(obj, ids) if ids else []
        held = {rec.id: rec.fields for rec in fetched}
        stale_ids = {r.id for r in stale}
        resend = [r for r in batch if r.id not in stale_ids]
        unknown: list[OutboxRow] = []
        with self._tx() as tx:
            for r in stale:
                now = held.get(str(r.record_id))
                verdict = _compare(r, now)
                if verdict == "applied":
                    if tx.mark_done(r.id, result_id=r.record_id, now=self.clock(), fence=self.fence):
                        stats.sent += 1
                        if self.on_write:
                            self.on_write(r, r.record_id)
                    log.info("resend_found_applied", system=system, object=obj, outbox_id=r.id,
                             record_id=r.record_id)
                elif verdict == "changed":
                    assert now is not None
                    changed = {k: [(r.basis or {}).get(k), now.get(k)] for k in r.fields
                               if not _same((r.basis or {}).get(k), now.get(k))}
                    why = (f"not resent: {system} changed "
                           + ", ".join(f"{k} {b!r} -> {a!r}" for k, (b, a) in sorted(changed.items()))
                           + " since the decision; decided again on what is there now")
                    tx.mark_superseded(r.id, why, now=self.clock())
                    stats.skipped += 1
                    log.warning("write_superseded", system=system, object=obj, outbox_id=r.id,
                                record_id=r.record_id, rule=r.rule, fields=sorted(changed))
                else:
                    unknown.append(r)
        conditional = getattr(conn, "write_unless_modified", None)
        if conditional is None or not unknown or len(unknown) > CONDITIONAL_RESENDS_MAX:
            return sorted(resend + unknown, key=lambda r: r.id)
        read_at = {rec.id: rec.modified_at for rec in fetched}
        self._resend_unless_modified(conditional, system, obj, [r for r in unknown if str(r.record_id) in read_at],
                                     read_at, stats)
        # a target the read did not find is resent as it is (the CRM's answer says what became of it)
        return sorted(resend + [r for r in unknown if str(r.record_id) not in read_at], key=lambda r: r.id)

    def _resend_unless_modified(self, conditional: Callable[..., list[WriteResult]], system: str, obj: str,
                                rows: list[OutboxRow], read_at: Mapping[str, datetime], stats: CycleStats) -> None:
        """Resends the look-first could not settle, where the CRM can make it atomic (Salesforce:
        If-Unmodified-Since on a single-record PATCH): applied only if the record is as it was
        read; modified since (412) → superseded, the person decided again."""
        todo = list(rows)
        if not todo or not self._may_send():
            return
        try:
            results = {res.key: res for res in conditional(obj, [
                (FieldUpdate(key=str(r.id), record_id=str(r.record_id), fields=r.fields,
                             clear_first=tuple(r.clear_first)), read_at[str(r.record_id)]) for r in todo])}
        except RetriableError as exc:
            self._fail_all(todo, f"{type(exc).__name__}: {exc}", stats)
            return
        rest: list[OutboxRow] = []
        with self._tx() as tx:
            for r in todo:
                res = results.get(str(r.id))
                if res is None or res.ok or not (res.error or "").startswith("PRECONDITION_FAILED"):
                    rest.append(r)
                    continue
                tx.mark_superseded(r.id, f"not resent: {system} {obj} {r.record_id} was modified after "
                                         "the look-first read; decided again on what is there now", now=self.clock())
                stats.skipped += 1
                log.warning("write_superseded", system=system, object=obj, outbox_id=r.id,
                            record_id=r.record_id, rule=r.rule, found="If-Unmodified-Since")
            merged, permanent = self._settle(tx, rest, list(results.values()), stats)  # done or failed, as sent
        if merged and self.on_dead is not None:
            self.on_dead(merged, stats)
        if permanent and self.on_permanent is not None:
            self.on_permanent(system, obj, permanent, stats)

    def supersede(self, tx: Tx, rows: Iterable[tuple[OutboxRow, Mapping[str, Any]]], stats: CycleStats) -> None:
        """Writes not yet done whose target changed since their decision (found when deciding:
        :func:`syncd.views.with_pending`, with field -> [decided on, now]): cancelled and
        audited as superseded, never sent; the person is decided on the newer CRM value."""
        for r, changed in rows:
            why = (f"not sent: {r.system} changed "
                   + ", ".join(f"{k} {b!r} -> {a!r}" for k, (b, a) in sorted(changed.items()))
                   + " since the decision; decided again on what is there now")
            if tx.mark_superseded(r.id, why, now=self.clock()):
                stats.skipped += 1
                log.warning("write_superseded", system=r.system, object=r.object, outbox_id=r.id,
                            record_id=r.record_id, rule=r.rule, fields=sorted(changed), found="deciding")

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
            results += conn.create(obj, [self._record_create(system, obj, r) for r in to_create])
        return results

    def _record_create(self, system: str, obj: str, r: OutboxRow) -> RecordCreate:
        """The create as sent: keyed on the External ID syncd owns when the mappings declare one
        (the value derives from the outbox key: every send of this row carries the same one)."""
        field = self.mappings.external_id(system, obj)
        if field is None:
            return RecordCreate(key=str(r.id), fields=r.fields)
        return RecordCreate(key=str(r.id), fields={**r.fields, field: create_key(r.key)}, upsert_on=field)

    def _fail_all(self, batch: list[OutboxRow], err: str, stats: CycleStats) -> None:
        """The whole batch failed transiently (5xx, timeout, connection): all retried later."""
        with self._tx() as tx:
            for r in batch:
                self._failed(tx, r, err, True, stats)
        log.warning("write_batch_failed", size=len(batch), error=err)

    def _backoff(self, attempts: int) -> datetime:
        ceiling = min(self.retry_cap_s, self.retry_base_s * 2.0 ** (min(attempts, 40) - 1))
        return self.clock() + timedelta(seconds=random.uniform(ceiling / 2, ceiling))  # jitter: no lockstep


# -- helpers --------------------------------------------------------------------------------------

def email_of(current: Sequence[CanonicalRecord], d: rules.Decision) -> str | None:
    e = first_email(current) or d.changes.get("email")
    return e if isinstance(e, str) else None


def who(records: Sequence[CanonicalRecord]) -> str:
    """A person by email; a deal by its name and id (``deal "Acme renewal" (9001)``), never a UUID."""
    email = first_email(records)
    if email or not records:
        return email or "?"
    name = next((r.values.get("name") for r in records if r.values.get("name")), None)
    return f'deal "{name}" ({records[0].id})' if name else records[0].id


def create_key(outbox_key: str) -> str:
    """The External ID value of a create: stable per outbox row, 40 characters."""
    return "syncd-" + hashlib.sha256(outbox_key.encode()).hexdigest()[:34]


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, int | float) or isinstance(b, int | float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _compare(r: OutboxRow, now: Mapping[str, Any] | None) -> str:
    """A resent update against what the CRM holds ``now``: ``applied`` (every written field
    holds its value), ``changed`` (a field differs from the decision's basis: someone else
    wrote it since), or ``unknown`` (resend: nothing says it was overtaken). A field cleared
    on purpose first (``clear_first``) may be found cleared: that is our own half-done write."""
    if now is None or any(k not in now for k in r.fields):
        return "unknown"
    if all(_same(now.get(k), v) for k, v in r.fields.items()):
        return "applied"
    if r.basis is None:
        return "unknown"
    for k in r.fields:
        held = now.get(k)
        if k in r.clear_first and held in (None, ""):
            continue
        if k in r.basis and not _same(held, r.basis.get(k)) and not _same(held, r.fields[k]):
            return "changed"
    return "unknown"


def _idempotency_key(d: rules.Decision, fields: Mapping[str, Any], target: CanonicalRecord | None) -> str:
    gen = target.modified_at.isoformat() if target is not None else ""
    blob = json.dumps([d.system, d.object, d.record_id, sorted((k, str(v)) for k, v in fields.items()), gen])
    return f"{d.rule}:{d.system}:{d.record_id}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
