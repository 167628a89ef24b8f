"""Manual resyncs: queued for a running service on the same state store, or run inline.

A resync always retries what is quarantined (writes go back to the outbox, bad
records are fetched and mapped again), then:
- ``--full``: forget the group's cursors and run a cycle (everything is re-read);
- ``--since DATE``: move the cursors back to DATE and run a cycle;
- ``--email X`` / ``--id SYSTEM:ID``: fetch just those records, map, link,
  re-decide their people/deals and flush the outbox (cursors untouched);
- nothing of these: one ordinary cycle.

Cycles of one group never run twice at once: the resync holds the same
``cycle:<group>`` leases in the store as the scheduled jobs of ``syncd run``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd import catalogue, freshness
from syncd.config import Config
from syncd.engine import CycleStats, Engine
from syncd.errors import ConfigError, RetriableError, SyncError
from syncd.model import OBJECT_GROUPS, SYSTEMS, Cursor, RawRecord, normalise_email, utcnow
from syncd.progress import Progress, progress_for
from syncd.stats import one_line
from syncd.store import Store

log = structlog.get_logger()

LEASE_TTL_S = 30.0  # a dead holder's lease lapses after this; holders renew every TTL/3
LEASE_WAIT_S = 120.0  # how long a resync waits for a group's running cycle to finish
LEASE_MARGIN_S = 5.0  # a CRM call is sent only while the lease lasts its timeout plus this


# -- the request ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    group: str | None = None  # "contacts" | "deals" | None (both)
    since: datetime | None = None
    full: bool = False
    email: str | None = None
    record: str | None = None  # "system:id"
    # a queued request interrupted by a shutdown, run again: the cursors are not reset (it
    # goes on from where it stopped)
    resume: bool = False

    def validate(self) -> None:
        """Every problem at once, as ConfigError (exit 2)."""
        problems: list[str] = []
        if self.group is not None and self.group not in OBJECT_GROUPS:
            problems.append(
                f"--object must be one of {', '.join(OBJECT_GROUPS)}, not {self.group!r}"
            )
        if self.full and self.since is not None:
            problems.append("--full and --since exclude each other (--full re-reads everything)")
        if self.email is not None and self.record is not None:
            problems.append("give --email or --id, not both")
        if (self.email is not None or self.record is not None) and (self.full or self.since):
            problems.append(
                "--email/--id resync one record; they do not combine with --full/--since"
            )
        if self.email is not None and "@" not in (normalise_email(self.email) or ""):
            problems.append("--email must be an email address")
        if self.record is not None:
            system, _, rid = self.record.partition(":")
            if system not in SYSTEMS or not rid.strip():
                problems.append(
                    f"--id must be SYSTEM:ID with SYSTEM one of {', '.join(SYSTEMS)} "
                    "(e.g. salesforce:00Q5e00000AbCdEEAV, hubspot:101)"
                )
        if self.since is not None:
            if self.since.tzinfo is None:
                problems.append("--since must carry a time zone (the CLI reads it as UTC)")
            elif self.since > utcnow():
                problems.append("--since is in the future")
        if problems:
            raise ConfigError("resync: " + "; ".join(problems))

    @property
    def groups(self) -> list[str]:
        return [self.group] if self.group else list(OBJECT_GROUPS)

    def to_params(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "since": self.since.isoformat() if self.since else None,
            "full": self.full,
            "email": self.email,
            "record": self.record,
            **({"resume": True} if self.resume else {}),
        }

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> ResyncRequest:
        since = p.get("since")
        return cls(
            group=p.get("group"),
            since=datetime.fromisoformat(since) if since else None,
            full=bool(p.get("full")),
            email=p.get("email"),
            record=p.get("record"),
            resume=bool(p.get("resume")),
        )

    def describe(self) -> str:
        what = (
            "full"
            if self.full
            else f"since {self.since.isoformat()}"
            if self.since
            else "one person"
            if self.email
            else f"record {self.record}"
            if self.record
            else "cycle + quarantine"
        )
        return f"{self.group or 'all objects'}, {what}"


# -- leases ---------------------------------------------------------------------------------------


def new_owner(instance: str | None = None) -> str:
    """A unique name for this process in leases and heartbeats: ``INSTANCE:PID:RANDOM``, where
    INSTANCE is this host's name, followed by a stable instance name for a service
    (:func:`instance_name`)."""
    where = socket.gethostname() + (f"/{instance}" if instance else "")
    return f"{where}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def instance_name(cfg: Config, config_file: Any) -> str:
    """The service's stable name on this host: ``[service] instance_id``, else its config path."""
    from pathlib import Path

    return cfg.service.instance_id or str(Path(config_file).resolve())


def dead_predecessor(holder: str, me: str) -> bool:
    """Was ``holder`` an earlier process of this very instance on this host, now gone? (Its
    owner name has our INSTANCE part, and no process with its PID runs here any more.)"""
    theirs, mine = holder.rsplit(":", 2), me.rsplit(":", 2)
    if len(theirs) != 3 or len(mine) != 3 or theirs[0] != mine[0] or holder == me:
        return False
    try:
        pid = int(theirs[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class LeaseKeeper:
    """Holds named leases in the store and renews them from a background thread.

    A holder that dies stops renewing; its leases lapse after ``ttl_s`` and
    another daemon takes the work over.
    """

    def __init__(self, store: Store, owner: str, ttl_s: float = LEASE_TTL_S, *, takeover: bool = False) -> None:
        """``takeover``: take a lease held by a dead earlier process of this same instance at
        once (see :func:`dead_predecessor`) rather than waiting ``ttl_s`` for it to lapse."""
        self.store = store
        self.owner = owner
        self.ttl_s = ttl_s
        self.takeover = takeover
        self._held: set[str] = set()
        self._tokens: dict[str, int] = {}  # lease -> the fencing token of our acquisition
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="syncd-leases", daemon=True)
        self._thread.start()

    def try_acquire(self, name: str) -> bool:
        with self.store.tx() as tx:
            token = tx.acquire_lease_token(name, self.owner, self.ttl_s, utcnow())
            if token is None and self.takeover:
                holder = tx.lease_holder(name, utcnow())
                if holder is not None and dead_predecessor(holder, self.owner):
                    token = tx.take_over_lease(name, holder, self.owner, self.ttl_s, utcnow())
                    if token is not None:
                        log.info("lease_taken_over", lease=name, previous=holder,
                                 note="our own predecessor died holding it: no need to wait for it to lapse")
        if token is not None:
            with self._lock:
                self._held.add(name)
                self._tokens[name] = token
        return token is not None

    def fence(self, name: str) -> tuple[str, str, int] | None:
        """(lease, owner, token) of our acquisition of ``name``, for guarded store writes."""
        with self._lock:
            token = self._tokens.get(name) if name in self._held else None
        return (name, self.owner, token) if token is not None else None

    def confirm(self, names: Sequence[str], for_s: float) -> bool:
        """Right before a CRM call: do we still hold every one of ``names`` (this acquisition,
        unexpired)? Each is extended to last ``for_s`` more (the call's timeout). False: the
        lease was lost (we stalled past its TTL and another process took it): stop sending."""
        with self._lock:
            mine = {n: self._tokens.get(n) for n in names if n in self._held}
        if len(mine) != len(names) or any(t is None for t in mine.values()):
            return False
        try:
            with self.store.tx() as tx:
                now = utcnow()
                ok = all(tx.confirm_lease(n, self.owner, int(t or 0), now, for_s) for n, t in mine.items())
        except Exception as exc:  # noqa: BLE001 - the store away: we cannot prove we hold it, so we do not send
            log.warning("lease_confirm_failed", error=one_line(exc))
            return False
        if not ok:
            log.error("lease_lost", leases=list(names), note="stopped sending; the new holder resends, looking first")
        return ok

    def release(self, name: str) -> None:
        with self._lock:
            self._held.discard(name)
        with self.store.tx() as tx:
            tx.release_lease(name, self.owner)

    @contextmanager
    def holding(
        self,
        names: Sequence[str],
        *,
        wait_s: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[bool]:
        """Take all ``names`` (waiting up to ``wait_s``); yields False if they could not be had."""
        deadline = time.monotonic() + wait_s
        got: list[str] = []
        try:
            for name in names:
                while not self.try_acquire(name):
                    if time.monotonic() >= deadline or should_stop():
                        yield False
                        return
                    time.sleep(0.5)
                got.append(name)
            yield True
        finally:
            for name in got:
                self.release(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            held, self._held = list(self._held), set()
        for name in held:
            try:
                with self.store.tx() as tx:
                    tx.release_lease(name, self.owner)
            except Exception as exc:  # noqa: BLE001 - best effort: the lease lapses anyway
                log.warning("lease_release_failed", lease=name, error=one_line(exc))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self._held)
            for name in held:
                try:
                    with self.store.tx() as tx:
                        ok = tx.renew_lease(name, self.owner, self.ttl_s, utcnow(), self._tokens.get(name))
                    if not ok:
                        log.warning("lease_lost", lease=name)
                except Exception as exc:  # noqa: BLE001 - the store may be briefly away; retry next tick
                    log.warning("lease_renew_failed", lease=name, error=one_line(exc))


# -- an engine that reports progress --------------------------------------------------------------


class ObservedEngine(Engine):
    """The engine, counting mapped records per system.object and reporting each page."""

    def __init__(
        self, *args: Any, on_page: Callable[[str, str, int], None] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.on_page = on_page
        self.mapped: dict[str, int] = {}
        self.progress: Progress = Progress()  # a display (syncd.progress) sees the stages
        told = self.writeback.on_write

        def on_write(row: Any, result_id: str | None) -> None:
            if told is not None:
                told(row, result_id)
            self.progress.written(row.system)

        self.writeback.on_write = on_write

    def pull_started(self, system: str, obj: str) -> None:
        self.progress.pull(system, obj)

    def page_pulled(self, system: str, obj: str, n: int, total: int | None) -> None:
        self.progress.page(system, obj, n, total)

    def link_and_decide(self, stats: CycleStats) -> None:
        self.progress.stage("decide")
        super().link_and_decide(stats)
        self.progress.done("decide", f"{stats.linked:,} linked, {stats.decisions:,} decisions")

    def flush(self, stats: CycleStats, systems: Any = None) -> None:
        due = None
        if type(self.progress) is not Progress:  # someone watches: say how many writes are due
            with self.store.tx() as tx:
                due = sum(tx.outbox_depth(s) for s in (systems if systems is not None else self.connectors))
        self.progress.stage("write", due)
        super().flush(stats, systems)
        self.progress.done("write", f"{stats.sent:,} sent, {stats.failed:,} failed")

    def ingest(
        self,
        system: str,
        obj: str,
        records: Sequence[RawRecord],
        stats: CycleStats,
        *,
        advance_cursor: bool = True,
    ) -> None:
        before = stats.quarantined
        super().ingest(system, obj, records, stats, advance_cursor=advance_cursor)
        key = f"{system}.{obj}"
        self.mapped[key] = self.mapped.get(key, 0) + len(records) - (stats.quarantined - before)
        if self.on_page is not None:
            self.on_page(system, obj, len(records))


def make_engine(
    rt: Any,
    *,
    systems: Sequence[str] | None = None,
    unavailable: Mapping[str, str] | None = None,
    on_page: Callable[[str, str, int], None] | None = None,
    on_write: Callable[[Any, str | None], None] | None = None,
    owner: str | None = None,
    dry_run: bool = False,
) -> ObservedEngine:
    """An engine over ``rt`` (a :class:`syncd.runtime.Runtime`), limited to ``systems``;
    ``unavailable`` names the systems left out on purpose (backed off) and why."""
    conns = {s: c for s, c in rt.connectors.items() if systems is None or s in systems}
    sync = rt.config.sync
    engine = ObservedEngine(
        rt.store,
        rt.mappings,
        rt.sla,
        conns,
        overlap=timedelta(seconds=sync.overlap_s),
        write_batch=sync.write_batch,
        on_write=on_write,
        on_page=on_page,
        bounds=freshness.bounds(sync.intervals(), sync.freshness_intervals),
        unavailable=unavailable,
        owner=owner,
        dry_run=dry_run,
    )
    engine.writeback.call_timeout_s = max(rt.config.hubspot.timeout_s, rt.config.salesforce.timeout_s)
    engine.writeback.retry_base_s = sync.write_retry_base_s
    engine.writeback.retry_cap_s = sync.write_retry_cap_s
    return engine


def cycle_leases(group: str | None) -> list[str]:
    """The leases a cycle of ``group`` (None: every group) holds, in the order they are taken."""
    return [f"cycle:{g}" for g in ([group] if group else list(OBJECT_GROUPS))] + [DECIDE_LEASE]


def run_cycle(
    engine: Engine,
    group: str | None,
    keeper: LeaseKeeper,
    *,
    wait_s: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> CycleStats | None:
    """The one way a cycle runs (the service's jobs and ``syncd sync --once``): holding the
    group's ``cycle:<group>`` lease and the decide lease, so nothing decides beside another
    daemon. None when the leases could not be had within ``wait_s``."""
    leases = cycle_leases(group)
    with keeper.holding(leases, wait_s=wait_s, should_stop=should_stop) as got:
        if not got:
            return None
        fence_writes(engine, keeper, leases)
        return engine.cycle(group)


def fence_writes(engine: Engine, keeper: LeaseKeeper, leases: Sequence[str]) -> None:
    """Fencing: the engine's writer confirms, right before each CRM call, that this process
    still holds ``leases`` for the call's timeout, and marks writes done only under its token."""
    wb = engine.writeback
    wb.may_send = lambda: keeper.confirm(leases, wb.call_timeout_s + LEASE_MARGIN_S)
    wb.fence = keeper.fence(DECIDE_LEASE)


def interrupt_dead_runs(store: Store, owner: str, *, fresh_s: float) -> int:
    """Mark runs left ``running`` by processes that are gone as interrupted (at start).

    Alive: this process, services that beat within ``fresh_s``, and lease holders."""
    now = utcnow()
    with store.tx() as tx:
        alive = {owner} | {o for o in tx.lease_owners(now) | {b.owner for b in tx.heartbeats(
            seen_since=now - timedelta(seconds=fresh_s))} if not dead_predecessor(o, owner)}
        n = tx.interrupt_running(now=now, alive=alive)
    if n:
        log.info("runs_interrupted", count=n, note="left running by a process that stopped")
    return n


# Linking, deciding and flushing the outbox work on everything pending, whatever group a cycle
# pulled: two daemons doing that at once would decide the same records twice (and race on each
# person's memory). Every cycle and resync therefore also holds this lease.
DECIDE_LEASE = "cycle:decide"


# -- running a resync -----------------------------------------------------------------------------


def run_resync(
    rt: Any,
    req: ResyncRequest,
    engine: ObservedEngine,
    keeper: LeaseKeeper,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run ``req`` with ``engine`` while holding the groups' cycle leases. Returns a summary."""
    leases = [f"cycle:{g}" for g in req.groups] + [DECIDE_LEASE]
    with keeper.holding(leases, wait_s=LEASE_WAIT_S, should_stop=should_stop) as got:
        if not got:
            raise RetriableError(
                f"resync: another daemon kept {', '.join(leases)} busy "
                f"for {LEASE_WAIT_S:.0f}s; try again"
            )
        fence_writes(engine, keeper, leases)
        return _run(rt, req, engine)


def _run(rt: Any, req: ResyncRequest, engine: ObservedEngine) -> dict[str, Any]:
    store: Store = rt.store
    with store.tx() as tx:
        requeued = tx.requeue_quarantined()
    stats = CycleStats()
    retried = _retry_quarantined_records(engine, req.groups, stats)
    if req.email is not None or req.record is not None:
        found = _resync_records(engine, req, stats)
        if not found:
            raise SyncError(
                f"resync: no record found for {req.email and 'that email' or req.record}"
            )
    else:
        if (req.full or req.since is not None) and not req.resume:
            to = Cursor(req.since, "") if req.since is not None else None
            with store.tx() as tx:
                for g in req.groups:
                    for system in engine.connectors:
                        for obj in OBJECT_GROUPS[g][system]:
                            tx.reset_cursor(system, obj, to)
        cycle = engine.cycle(req.group)
        _merge(stats, cycle)
    result = {"requeued_writes": requeued, "retried_records": retried, **stats.summary()}
    if stats.partial:
        # One side could not be pulled: what could be recorded is, nothing was decided on half
        # a picture, and the resync says so instead of reporting success.
        raise SyncError(f"resync partial: {stats.partial_reason()}")
    log.info("resync_done", request=req.describe(), **result)
    return result


def _retry_quarantined_records(
    engine: ObservedEngine, groups: Sequence[str], stats: CycleStats
) -> int:
    """Fetch quarantined records again; those that map now are resolved, the rest stay."""
    with engine.store.tx() as tx:
        rows = [q for q in tx.open_quarantine() if q.kind == "record" and q.record_id]
    n = 0
    for system, conn in engine.connectors.items():
        objs = {o for g in groups for o in OBJECT_GROUPS[g][system]}
        for obj in sorted(objs):
            mine = [q for q in rows if q.system == system and q.object == obj]
            if not mine:
                continue
            fetched = conn.fetch(obj, [str(q.record_id) for q in mine])
            ok_ids = set()
            for raw in fetched:
                try:
                    engine.mappings.to_canonical(raw)
                    ok_ids.add(raw.id)
                except SyncError:
                    pass
            engine.ingest(system, obj, fetched, stats, advance_cursor=False)
            with engine.store.tx() as tx:
                tx.resolve_quarantine([q.id for q in mine if q.record_id in ok_ids])
            n += len(fetched)
    return n


def _resync_records(engine: ObservedEngine, req: ResyncRequest, stats: CycleStats) -> int:
    return resync_fetched(engine, _fetch_targets(engine, req), stats)


def resync_fetched(engine: Engine, fetched: Sequence[tuple[str, str, Sequence[RawRecord]]],
                   stats: CycleStats) -> int:
    """Store records fetched by id ((system, object, records) batches; cursors untouched), then
    re-decide their people/deals and flush the outbox. Returns how many records were stored."""
    keys: list[tuple[str, str, str]] = []
    for system, obj, records in fetched:
        engine.ingest(system, obj, records, stats, advance_cursor=False)
        keys += [(system, obj, r.id) for r in records]
    if not keys:
        return 0
    # Records that did not change are not dirty: mark their entities due so that they are
    # decided too, once, with the changed ones (linking marks those).
    with engine.store.tx() as tx:
        tx.set_due_many({e for e in tx.entity_ids(keys).values() if e}, engine.clock())
    engine.pull_stale(stats)  # never decide on half a picture, here either
    engine.link_and_decide(stats)
    engine.flush(stats)
    return len(keys)


def _fetch_targets(
    engine: ObservedEngine, req: ResyncRequest
) -> list[tuple[str, str, list[RawRecord]]]:
    out: list[tuple[str, str, list[RawRecord]]] = []
    if req.email is not None:
        email = normalise_email(req.email) or ""
        for system, conn in engine.connectors.items():
            for obj in catalogue.names(system, kind="person"):
                found = conn.find_by_email(obj, [email])
                if found:
                    out.append((system, obj, found))
        return out
    assert req.record is not None
    system, _, rid = req.record.partition(":")
    target = engine.connectors.get(system)
    if target is None:
        return out
    named = catalogue.by_id(system, rid)  # a Salesforce id names its object by its prefix
    objs = [named.name] if named is not None else [o for g in req.groups for o in OBJECT_GROUPS[g][system]]
    for obj in objs:
        found = target.fetch(obj, [rid])
        if found:
            out.append((system, obj, found))
            break
    return out


def _merge(into: CycleStats, other: CycleStats) -> None:
    for k, v in other.pulled.items():
        into.pulled[k] = into.pulled.get(k, 0) + v
    into.pull_failures.update(other.pull_failures)
    into.held += [h for h in other.held if h not in into.held]
    for name in (
        "changed",
        "quarantined",
        "unmapped",
        "linked",
        "conflicts",
        "decisions",
        "events",
        "sent",
        "skipped",
        "failed",
        "undecided",
        "conflicts_resolved",
    ):
        setattr(into, name, getattr(into, name) + getattr(other, name))


# -- the CLI entry point --------------------------------------------------------------------------


def running_service(store: Store, cfg: Config, now: datetime | None = None) -> Any:
    """The freshest heartbeat of a service on this store (< 3 × the shortest interval), or None."""
    now = now or utcnow()
    fresh = timedelta(seconds=3 * min(cfg.sync.contacts_interval_s, cfg.sync.deals_interval_s))
    with store.tx() as tx:
        beats = tx.heartbeats(seen_since=now - fresh)
    return beats[0] if beats else None


def request_resync(cfg: Config, req: ResyncRequest, *, inline: bool) -> str:
    """Queue ``req`` for a running service on the same store, or run it here (``inline`` forces)."""
    out = resync_outcome(cfg, req, inline=inline)
    if out["queued"]:
        return f"queued resync #{out['queue_id']}; a running service (pid {out['service_pid']}) will pick it up"
    summary = " ".join(f"{k}={v}" for k, v in out["result"].items())
    return f"resync done ({req.describe()}): {summary}"


def resync_outcome(cfg: Config, req: ResyncRequest, *, inline: bool) -> dict[str, Any]:
    """:func:`request_resync`, as data (``resync --json``, docs/json.md)."""
    req.validate()
    out: dict[str, Any] = {"request": req.describe(), "queued": False, "queue_id": None, "service_pid": None,
                           "result": None}
    if not inline:
        store = Store.open(cfg.state_url())
        try:
            beat = running_service(store, cfg)
            if beat is not None:
                with store.tx() as tx:
                    n = tx.queue_resync(req.to_params())
                log.info("resync_queued", id=n, request=req.describe(), service=beat.owner)
                return {**out, "queued": True, "queue_id": n, "service_pid": beat.pid}
        finally:
            store.close()
    return {**out, "result": _run_inline(cfg, req)}


def finish_queued(store: Store, row_id: int, state: str, result: Mapping[str, Any], *, stopped: bool,
                  before: Any = None) -> str:
    """Record how a queued resync ended. Stopped part-way (the service shutting down) it is
    ``interrupted``, with what it did, and the next service start resumes it
    (:func:`resume_interrupted`); ``before``: what an earlier, interrupted run of it did."""
    out = dict(result)
    if stopped:  # done as far as it got, or failed because of the stop (its leases given up)
        state = "interrupted"
        out["note"] = "stopped by a shutdown before it finished; the next service start resumes it"
    if before:
        out["before_resume"] = before
    with store.tx() as tx:
        tx.finish_resync(row_id, state, out)
    return state


def resume_interrupted(store: Store) -> int:
    """At a service start: queued resyncs a shutdown interrupted are queued again, to go on."""
    with store.tx() as tx:
        rows = tx.requeue_interrupted_resyncs()
    for r in rows:
        log.info("resync_resumed", id=r.id, done_before=r.result, note="interrupted by a shutdown; queued again")
    return len(rows)


def _run_inline(cfg: Config, req: ResyncRequest) -> dict[str, Any]:
    from syncd.runtime import open_runtime

    rt = open_runtime(cfg)
    keeper = LeaseKeeper(rt.store, new_owner())
    engine = make_engine(rt, owner=keeper.owner)
    started, state, result = utcnow(), "failed", {}
    try:
        interrupt_dead_runs(rt.store, keeper.owner, fresh_s=3 * min(cfg.sync.intervals().values()))
        with _stopped_by_signals(engine) as stopped, progress_for(f"resync {req.describe()}") as shown, \
                structlog.contextvars.bound_contextvars(job="resync"):
            engine.progress = shown
            try:
                result = run_resync(rt, req, engine, keeper, should_stop=lambda: bool(stopped))
                state = "interrupted" if stopped else "done"
            except Exception as exc:
                result = {"error": one_line(exc)}
                raise
    finally:
        keeper.close()  # leases released at once, not left to lapse
        _record_inline(rt.store, req, state, result, keeper.owner, started)
        rt.close()
    summary = " ".join(f"{k}={v}" for k, v in result.items())
    if stopped:
        # What was done is durable (pages, cursors, outbox commit together); the run is recorded
        # interrupted, and running the resync again picks up from the stored cursors.
        raise SyncError(f"resync interrupted by {stopped[0]} ({req.describe()}): {summary}; "
                        "run it again to finish")
    return result


@contextmanager
def _stopped_by_signals(engine: Engine) -> Iterator[list[str]]:
    """SIGTERM/SIGINT during an inline resync: finish the current page or batch and stop, as the
    service does. Yields a list that holds the signal's name once one came."""
    got: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        engine.stop_requested = True

    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _record_inline(store: Store, req: ResyncRequest, state: str, result: Mapping[str, Any], owner: str,
                   started: datetime) -> None:
    """An inline resync goes into the resync history as well (status shows its outcome)."""
    try:
        with store.tx() as tx:
            tx.record_resync(req.to_params(), state, dict(result), owner=owner, started_at=started)
    except Exception as exc:  # noqa: BLE001 - the history is for reading; the resync's own outcome stands
        log.warning("resync_history_failed", error=one_line(exc))
