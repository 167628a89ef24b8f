"""`syncd run`: scheduled cycles, the resync queue, signals, metrics and health.

Thin on purpose: APScheduler 3.x jobs call ``Engine.cycle(group)``, the same
function ``syncd sync --once`` calls. What the service adds:

- one job per object group, ``max_instances=1``, ``coalesce=True``, an explicit
  ``misfire_grace_time`` and jitter; all work runs on one worker thread, so
  contacts and deals cycles of this process never overlap either;
- ``cycle:<group>`` leases in the state store (renewed while held), so several
  daemons on one PostgreSQL store never run the same group at once and a dead
  one's lease lapses after :data:`~syncd.resync.LEASE_TTL_S`;
- a heartbeat row every :data:`BEAT_S` (``syncd resync`` queues when it is fresh)
  and a resync poller on the same cadence;
- per-system back-off: bad credentials → that system is skipped for
  :data:`AUTH_BACKOFF_S`, budget spent → :data:`BUDGET_BACKOFF_S`; transient
  errors → the next scheduled run retries (the connectors already retried);
- SIGTERM/SIGINT: stop after the current page/batch and exit 0 within
  ``shutdown_grace_s``; a second signal exits at once (the store commits per
  page, so nothing durable is lost). SIGHUP: reload config + mapping/SLA files,
  validated first; on error the old ones stay in force.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa
import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from syncd import freshness, plan, reconcile, retention
from syncd.auth_check import log_at_start
from syncd.config import Config, load_config
from syncd.connectors import _pacing
from syncd.engine import CycleStats
from syncd.errors import (
    AuthError,
    BudgetExhausted,
    ConfigError,
    RetriableError,
    SyncError,
)
from syncd.metrics import MetricsServer, ServiceMetrics
from syncd.model import SYSTEMS, utcnow
from syncd.progress import LogProgress
from syncd.resync import (
    LeaseKeeper,
    ObservedEngine,
    ResyncRequest,
    finish_queued,
    instance_name,
    interrupt_dead_runs,
    make_engine,
    new_owner,
    resume_interrupted,
    run_cycle,
    run_resync,
)
from syncd.runtime import Runtime, build_connectors, load_rules_files, open_runtime
from syncd.stats import one_line

log = structlog.get_logger()

BEAT_S = 2.0  # heartbeat and resync-poll cadence
AUTH_BACKOFF_S = 300.0  # bad credentials: retry that system every 5 minutes, never a crash loop
BUDGET_BACKOFF_S = 3600.0  # daily budget spent: wait for it to reset
_EXIT_GRACE_MARGIN_S = 1.0  # leave this much of shutdown_grace_s for closing up


def run_service(cfg: Config, *, config_file: Path) -> int:
    """Run the service until SIGTERM/SIGINT. Returns the exit code (0 after a clean stop)."""
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # its INFO/WARN lines duplicate ours
    svc = Service(cfg, config_file=config_file)
    return svc.run()


def intervals(cfg: Config) -> dict[str, float]:
    return {"contacts": cfg.sync.contacts_interval_s, "deals": cfg.sync.deals_interval_s}


class Service:
    def __init__(self, cfg: Config, *, config_file: Path) -> None:
        self.config_file = config_file
        self.rt: Runtime = open_runtime(cfg)  # validates config, mapping + SLA files, credentials
        self._pending: Runtime | None = None
        self.owner = new_owner(instance_name(cfg, config_file))
        self.metrics = ServiceMetrics(
            intervals(cfg),
            daily_budgets={s: b for s, b in (("hubspot", cfg.hubspot.daily_budget),
                                             ("salesforce", cfg.salesforce.daily_budget)) if b},
        )
        self.metrics.failing_after = self.rt.sla.writeback.max_tries
        self.counts = reconcile.CountCheck(self.metrics)
        self.keeper = LeaseKeeper(self.rt.store, self.owner, cfg.service.lease_ttl_s, takeover=True)
        self.backoff: dict[str, tuple[datetime, str]] = {}  # system -> (retry at, why)
        self.stopping = threading.Event()
        self._reload = threading.Event()
        self._signals = 0
        self._work_lock = threading.Lock()  # held by the worker for the length of a job
        self._current: ObservedEngine | None = None
        self.server: MetricsServer | None = None
        self.scheduler = BackgroundScheduler(
            executors={"work": ThreadPoolExecutor(1), "control": ThreadPoolExecutor(1),
                       "housekeeping": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=UTC,
        )

    @property
    def cfg(self) -> Config:
        return self.rt.config

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        port = self.cfg.service.metrics_port
        if port:
            host = self.cfg.service.metrics_host
            try:
                self.server = MetricsServer(self.metrics, port, host=host).start()
            except OSError as exc:
                self.close()
                raise ConfigError(f"service.metrics_port: cannot listen on {host}:{port}: {exc.strerror}") from None
        self._install_signals()
        self._beat()
        self._clean_up_after_the_dead()
        log_at_start(self.cfg, self.rt.mappings, self.rt.connectors)  # `syncd auth check`, logged
        self._schedule()
        self.scheduler.start()
        log.info(
            "service_started",
            owner=self.owner,
            pid=os.getpid(),
            mapping_revision=self.rt.mappings.revision,
            config=str(self.config_file),
            intervals=intervals(self.cfg),
            metrics_port=self.server.port if self.server else None,
        )
        while not self.stopping.wait(0.2):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
        return self._shutdown()

    def _schedule(self) -> None:
        now = datetime.now(UTC)
        for group, every in intervals(self.cfg).items():
            self.scheduler.add_job(
                self._cycle_job,
                "interval",
                args=[group],
                id=f"cycle:{group}",
                name=f"cycle {group}",
                seconds=every,
                jitter=self.cfg.sync.jitter_s or None,
                executor="work",
                misfire_grace_time=max(1, int(every)),
                next_run_time=now,
                replace_existing=True,
            )
        self.scheduler.add_job(
            self._resync_job,
            "interval",
            id="resync-poll",
            seconds=BEAT_S,
            executor="work",
            misfire_grace_time=int(BEAT_S) * 5,
            next_run_time=now + timedelta(seconds=BEAT_S / 2),
        )
        # the first backfill's cost, logged as it starts (off the worker: it never delays a cycle)
        self.scheduler.add_job(plan.log_first_backfill, args=[self.rt], id="backfill-plan",
                               executor="housekeeping", next_run_time=now)
        self.scheduler.add_job(  # off the cycle's worker: small batches, each its own transaction
            lambda: retention.run_job(self.rt.store, self.cfg, should_stop=self.stopping.is_set),
            "interval",
            id="prune",
            seconds=self.cfg.retention.every_s,
            executor="housekeeping",
            misfire_grace_time=max(1, int(self.cfg.retention.every_s)),
            next_run_time=now + timedelta(seconds=min(60.0, self.cfg.retention.every_s)),
        )
        self.scheduler.add_job(
            self._beat,
            "interval",
            id="heartbeat",
            seconds=BEAT_S,
            executor="control",
            misfire_grace_time=int(BEAT_S) * 5,
        )

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning(
                "service_exit_now",
                signal=signal.Signals(signum).name,
                note="second signal: exiting at once; the store is consistent per page",
            )
            _flush_std()
            os._exit(1)
        log.info(
            "service_stopping",
            signal=signal.Signals(signum).name,
            grace_s=self.cfg.service.shutdown_grace_s,
        )
        self.stopping.set()
        engine = self._current
        if engine is not None:
            engine.stop_requested = True

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload.set()

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.cfg.service.shutdown_grace_s - _EXIT_GRACE_MARGIN_S
        self.scheduler.shutdown(wait=False)
        finished = self._work_lock.acquire(timeout=max(0.1, deadline - time.monotonic()))
        if not finished:
            # The worker is stuck in a CRM call. Everything committed stays committed; rows
            # marked ``sending`` are resent by the next run (updates are idempotent).
            log.warning(
                "service_stop_timeout",
                grace_s=self.cfg.service.shutdown_grace_s,
                note="the running batch did not finish in time; the next run resends it",
            )
            self._close_quietly()
            _flush_std()
            os._exit(0)
        self._work_lock.release()
        self.close()
        log.info("service_stopped", owner=self.owner)
        return 0

    def _close_quietly(self) -> None:
        try:
            self.keeper.close()
            with self.rt.store.tx() as tx:
                tx.remove_heartbeat(self.owner)
        except Exception as exc:  # noqa: BLE001 - closing up; the heartbeat just goes stale
            log.warning("service_close_failed", error=one_line(exc))

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._close_quietly()
        if self._pending is not None:
            for c in self._pending.connectors.values():
                c.close()
        self.rt.close()

    # ------------------------------------------------------------------ reload
    def reload(self) -> bool:
        """Validate config + mapping/SLA files; swap them in at the next job. False on error."""
        try:
            new_cfg = load_config(self.config_file)
            if new_cfg.state_url() != self.cfg.state_url():
                raise ConfigError(f"{self.config_file}: state.url changed; restart the service to switch state stores")
            mappings, sla = load_rules_files(new_cfg)
            connectors = build_connectors(new_cfg, mappings)
        except Exception as exc:  # noqa: BLE001 - a bad reload never takes the service down
            log.error(
                "reload_failed",
                error=" | ".join(str(exc).splitlines()),
                kept_mapping_revision=self.rt.mappings.revision,
            )
            return False
        old = self._pending
        self._pending = Runtime(new_cfg, self.rt.store, mappings, sla, connectors)
        if old is not None:
            for c in old.connectors.values():
                c.close()
        for group, every in intervals(new_cfg).items():
            if every != intervals(self.cfg)[group]:
                self.scheduler.reschedule_job(
                    f"cycle:{group}",
                    trigger="interval",
                    seconds=every,
                    jitter=new_cfg.sync.jitter_s or None,
                )
        self.metrics.intervals = intervals(new_cfg)
        # A reload is how an operator says "fixed": credentials or quota back-offs end now, and
        # the next cycle tries every system again (a failing one simply backs off again).
        for system in list(self.backoff):
            self.backoff.pop(system, None)
            self.metrics.set_blocked(system, None)
            log.info("system_backoff_cleared", system=system, reason="reload")
        log.info("reloaded", mapping_revision=mappings.revision, config=str(self.config_file))
        return True

    def _swap_runtime(self) -> None:
        """On the worker thread, between jobs: put a reloaded runtime in force."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self.rt
        self._observe_usage(old)
        self.rt = pending
        for c in old.connectors.values():
            c.close()

    # ------------------------------------------------------------------ jobs
    def _beat(self) -> None:
        try:
            with self.rt.store.tx() as tx:
                tx.beat(
                    self.owner,
                    {
                        "config": str(self.config_file),
                        "mapping_revision": self.rt.mappings.revision,
                        "intervals": intervals(self.cfg),
                        # systems this service does not call for now, why and until when (status)
                        "paused": {system: {"until": until.isoformat(), "why": why}
                                   for system, (until, why) in list(self.backoff.items())},
                    },
                    pid=os.getpid(),
                )
        except Exception as exc:  # noqa: BLE001 - the store may be briefly away; beat again soon
            log.warning("heartbeat_failed", error=one_line(exc))

    def _clean_up_after_the_dead(self) -> None:
        """At start: runs left ``running`` by a crashed process are marked interrupted, and
        services that stopped beating long ago are forgotten (status lists the live ones)."""
        fresh_s = self._alive_window_s()
        try:
            interrupt_dead_runs(self.rt.store, self.owner, fresh_s=fresh_s)
            resume_interrupted(self.rt.store)
            with self.rt.store.tx() as tx:
                gone = tx.prune_heartbeats(utcnow() - timedelta(seconds=fresh_s))
            if gone:
                log.info("services_forgotten", count=gone, note="stopped beating; dead")
        except Exception as exc:  # noqa: BLE001 - housekeeping never stops the start
            log.warning("startup_cleanup_failed", error=one_line(exc))

    def _alive_window_s(self) -> float:
        return max(3 * min(intervals(self.cfg).values()), 10 * BEAT_S)

    def _cycle_job(self, group: str) -> None:
        with self._work_lock:
            if self.stopping.is_set():
                return
            try:
                self._swap_runtime()
                systems = self._available_systems()
                with structlog.contextvars.bound_contextvars(job=f"cycle:{group}"):
                    self._run_cycle(group, systems)
            except Exception as exc:  # noqa: BLE001 - nothing escapes a job into APScheduler's log
                self._handle_failure(f"cycle:{group}", exc, [])

    def _run_cycle(self, group: str, systems: list[str]) -> None:
        # Backed-off systems are not pulled, but the cycle still runs: the other side is
        # recorded, and nothing that needs the missing side is decided (syncd.freshness).
        unavailable = {s: why for s, (_, why) in self.backoff.items() if s not in systems}
        engine = make_engine(self.rt, systems=systems, unavailable=unavailable, on_write=self._on_write,
                             owner=self.owner)
        self._current = engine
        if self.stopping.is_set():
            engine.stop_requested = True
        started = time.monotonic()
        stats: CycleStats | None = CycleStats()
        error = None
        engine.progress = LogProgress(what=f"cycle:{group}")  # a long cycle (a first backfill) says how far it got
        try:
            stats = run_cycle(engine, group, self.keeper)
        except Exception as exc:  # noqa: BLE001 - the service never dies because a CRM or the store is down
            error = type(exc).__name__
            self._handle_failure(f"cycle:{group}", exc, systems)
        finally:
            engine.progress.close()
            self._current = None
        if stats is None:
            log.debug("cycle_skipped", group=group, reason="another daemon holds the lease")
            return
        for system, failure in stats.pull_failures.items():
            if isinstance(failure, AuthError | BudgetExhausted):  # the engine logged the others (pull_failed)
                self._handle_failure(f"cycle:{group}", failure, [system])
        if error is None and engine.stop_requested:
            error = "stopped"
        if error is None:
            self._recovered(sorted(engine.pulled_ok))
        ok = error is None and not stats.partial and len(systems) == len(self.rt.connectors)
        if ok and self.counts.after_cycle(self.rt, group, engine, stats) is not None:
            ok, error = False, "reconcile_gap"  # a known gap: this cycle is not a success
        self.metrics.observe_cycle(
            group,
            stats,
            time.monotonic() - started,
            ok=ok,
            mapped=engine.mapped,
            error=error or "partial",
        )
        self._observe_usage(self.rt)
        self._observe_store()
        self._observe_pulls()

    def _observe_pulls(self) -> None:
        """What /healthz says about the picture: every system whose pulls are incomplete or
        older than the freshness bound, with the one-line reason."""
        try:
            with self.rt.store.tx(readonly=True) as tx:
                states = tx.pull_states()
        except Exception as exc:  # noqa: BLE001 - metrics must not break the service
            log.warning("metrics_store_read_failed", error=one_line(exc))
            return
        sync = self.cfg.sync
        pic = freshness.Picture(states, freshness.bounds(sync.intervals(), sync.freshness_intervals), utcnow())
        self.metrics.set_picture(pic.by_system(),
                                 grace_s=sync.freshness_intervals * max(sync.intervals().values()))

    def _resync_job(self) -> None:
        with self._work_lock:
            if self.stopping.is_set():
                return
            try:
                with self.rt.store.tx() as tx:
                    self._fail_orphaned_resyncs(tx)
                    row = tx.claim_resync(self.owner)
            except Exception as exc:  # noqa: BLE001 - store briefly away: poll again
                log.warning("resync_poll_failed", error=one_line(exc))
                return
            if row is None:
                return
            self._swap_runtime()
            req = ResyncRequest.from_params(row.params)
            log.info("resync_started", id=row.id, request=req.describe())
            systems = self._available_systems()
            unavailable = {s: why for s, (_, why) in self.backoff.items() if s not in systems}
            engine = make_engine(self.rt, systems=systems, unavailable=unavailable, on_write=self._on_write,
                                 owner=self.owner)
            self._current = engine
            try:
                req.validate()
                with structlog.contextvars.bound_contextvars(job=f"resync#{row.id}"):
                    result = run_resync(self.rt, req, engine, self.keeper, should_stop=self.stopping.is_set)
                state: str = "done"  # a stop part way: finish_queued records it interrupted (resumed)
                self._recovered(systems)
            except Exception as exc:  # noqa: BLE001 - a failed resync is reported, never fatal
                state, result = "failed", {"error": one_line(exc)}
                self._handle_failure(f"resync #{row.id}", exc, systems)
            finally:
                self._current = None
            state = finish_queued(self.rt.store, row.id, state, result,
                                  stopped=engine.stop_requested or self.stopping.is_set(), before=row.result)
            log.info("resync_finished", id=row.id, state=state)
            self._observe_usage(self.rt)
            self._observe_store()

    def _fail_orphaned_resyncs(self, tx: Any) -> None:
        """Resyncs left ``running`` by a service that stopped beating are marked failed
        (with how to retry), so they never look in progress for ever."""
        running = [r for r in tx.resync_queue() if r.state == "running" and r.picked_by != self.owner]
        if not running:
            return
        window = max(3 * min(intervals(self.cfg).values()), 10 * BEAT_S)
        alive = {b.owner for b in tx.heartbeats(seen_since=utcnow() - timedelta(seconds=window))}
        for r in running:
            if r.picked_by not in alive:
                why = f"the service running it ({r.picked_by}) stopped; run the resync again"
                tx.finish_resync(r.id, "failed", {"error": why})
                log.warning("resync_orphaned", id=r.id, picked_by=r.picked_by)

    # ------------------------------------------------------------------ failures and back-off
    def _available_systems(self) -> list[str]:
        now = utcnow()
        out = []
        for system in self.rt.connectors:
            until = self.backoff.get(system)
            if until is not None and until[0] > now:
                continue
            paused = _pacing.paused(self.rt.connectors[system])  # the ledger's caps, shared on the store
            if paused is not None and paused.until is not None:
                resume = datetime.fromtimestamp(paused.until, UTC)
                self.backoff[system] = (resume, str(paused))
                self.metrics.set_blocked(system, str(paused))
                log.error("system_backed_off", system=system, error=str(paused),
                          retry_in_s=round((resume - now).total_seconds()))
                continue
            out.append(system)
        return out

    def _handle_failure(self, job: str, exc: Exception, systems: list[str]) -> None:
        if isinstance(exc, AuthError | BudgetExhausted):
            delay = AUTH_BACKOFF_S if isinstance(exc, AuthError) else _pacing.backoff_s(exc, BUDGET_BACKOFF_S)
            what = "authentication failed" if isinstance(exc, AuthError) else "API budget exhausted"
            failing = system_of(exc)
            for system in [failing] if failing in systems else systems:
                why = f"{what}: {exc}"
                self.backoff[system] = (utcnow() + timedelta(seconds=delay), why)
                self.metrics.set_blocked(system, why, auth=isinstance(exc, AuthError))  # syncd_auth_failing
                log.error("system_backed_off", job=job, system=system, error=why, retry_in_s=delay)
        elif isinstance(exc, sa.exc.SQLAlchemyError):  # the store away or failing: the next run retries
            error = one_line(exc).replace("state store", f"state store {self.rt.store.where}", 1)
            log.warning("cycle_failed", job=job, error=error, next="the next scheduled run retries")
        elif isinstance(exc, RetriableError | OSError):
            log.warning(
                "cycle_failed",
                job=job,
                error=one_line(exc),
                next="the next scheduled run retries",
            )
        elif isinstance(exc, SyncError):
            log.error("cycle_failed", job=job, error=one_line(exc))
        else:
            log.error(
                "cycle_crashed",
                job=job,
                error=one_line(exc),
                traceback="".join(traceback.format_exception(exc)[-3:]),
            )

    def _recovered(self, systems: list[str]) -> None:
        for system in systems:
            if self.backoff.pop(system, None) is not None:
                self.metrics.set_blocked(system, None)
                log.info("system_recovered", system=system)

    # ------------------------------------------------------------------ metrics
    def _on_write(self, row: Any, _result_id: str | None) -> None:
        self.metrics.observe_write(row.system, row.object)

    def _observe_usage(self, rt: Runtime) -> None:
        for system, conn in rt.connectors.items():
            self.metrics.observe_usage(system, conn.usage)
            self.metrics.observe_grants(system, getattr(conn, "auth", None))  # syncd_auth_grants_total

    def _observe_store(self) -> None:
        try:
            self.metrics.observe_store(self.rt.store)
            self.metrics.observe_budget(self.rt.store)
        except Exception as exc:  # noqa: BLE001 - metrics must not break the service
            log.warning("metrics_store_read_failed", error=one_line(exc))


def system_of(exc: BaseException) -> str | None:
    """Which CRM an error came from: the connectors set ``system`` on every error they raise."""
    system = getattr(exc, "system", None)
    return str(system) if system in SYSTEMS else None


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
