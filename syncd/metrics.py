"""Prometheus metrics and the health endpoint of `syncd run`, on 127.0.0.1 only.

Everything lives in the service's own :class:`CollectorRegistry` (never the
global one), so several services in one process (tests) do not collide. The
numbers come from three places, refreshed after every cycle:
:class:`~syncd.engine.CycleStats`, each connector's :class:`~syncd.model.ApiUsage`
and a few state-store queries (:meth:`ServiceMetrics.observe_store`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from syncd.connectors.auth import GRANT_OUTCOMES
from syncd.model import SYSTEMS, ApiUsage

log = structlog.get_logger()

HEALTH_INTERVALS = 3  # /healthz fails when no cycle succeeded within this many intervals
_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServiceMetrics:
    """The service's metrics, and the state /healthz judges from."""

    def __init__(
        self,
        intervals: Mapping[str, float],
        *,
        now: datetime | None = None,
        daily_budgets: Mapping[str, int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.intervals = dict(intervals)
        self.started_at = now or datetime.now(UTC)
        self.last_success: dict[str, datetime] = {}
        self.blocked: dict[str, str] = {}  # system -> why it is backed off
        self.picture: dict[str, list[str]] = {}  # system -> why its copy is incomplete or stale
        self.picture_grace_s = 0.0
        self._lock = threading.Lock()
        self._usage_seen: dict[tuple[str, int], ApiUsage] = {}  # (system, id(usage)) -> snapshot
        self._day = self.started_at.date()
        self._today: dict[str, int] = {}
        r = self.registry
        self.pulled = Counter(
            "syncd_records_pulled", "Records pulled from a CRM.", ["system", "object"], registry=r
        )
        self.mapped = Counter(
            "syncd_records_mapped",
            "Pulled records mapped to canonical terms.",
            ["system", "object"],
            registry=r,
        )
        self.written = Counter(
            "syncd_records_written", "Writes the CRM confirmed.", ["system", "object"], registry=r
        )
        self.write_failures = Counter(
            "syncd_write_failures",
            "Writes that failed (retried or quarantined).",
            ["group"],
            registry=r,
        )
        self.api_calls = Counter(
            "syncd_api_calls", "API calls made by this process.", ["system", "endpoint"], registry=r
        )
        self.api_429 = Counter(
            "syncd_api_rate_limited",
            "API calls answered with a rate-limit error.",
            ["system", "endpoint"],
            registry=r,
        )
        self.api_reported_used = Gauge(
            "syncd_api_reported_used",
            "API usage the CRM reports (its own daily counter).",
            ["system"],
            registry=r,
        )
        self.api_reported_limit = Gauge(
            "syncd_api_reported_limit", "API limit the CRM reports.", ["system"], registry=r
        )
        self.api_calls_today = Gauge(
            "syncd_api_calls_today",
            "API calls this process made today (UTC), vs daily_budget.",
            ["system"],
            registry=r,
        )
        self.api_daily_budget = Gauge(
            "syncd_api_daily_budget", "The configured daily_budget.", ["system"], registry=r
        )
        self.cycle_duration = Histogram(
            "syncd_cycle_duration_seconds",
            "Duration of a sync cycle.",
            ["group", "outcome"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.cycle_failures = Counter(
            "syncd_cycle_failures",
            "Cycles that failed, by error class.",
            ["group", "error"],
            registry=r,
        )
        self.last_success_ts = Gauge(
            "syncd_last_success_timestamp_seconds",
            "Unix time of the last successful cycle.",
            ["group"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "syncd_outbox_depth",
            "Writes waiting in the outbox (pending + sending).",
            ["system"],
            registry=r,
        )
        self.quarantine_size = Gauge(
            "syncd_quarantine_size", "Open quarantine entries.", ["system", "kind"], registry=r
        )
        self.unmapped_values = Gauge(
            "syncd_unmapped_values", "Distinct CRM values no mapping names.", ["system"], registry=r
        )
        self.failing_after = 5  # sends: a write failing this often is alerted on (the service sets max_tries)
        self.failing_writes = Gauge(
            "syncd_outbox_failing_writes",
            "Writes that failed transiently at least max_tries sends and are still retried (alert on > 0).",
            ["system"],
            registry=r,
        )
        self.sla_breaches = Gauge("syncd_sla_breaches_open", "Open SLA breach events.", registry=r)
        self.tombstones = Gauge(
            "syncd_tombstones", "Records found deleted or merged away (nothing is written to them).",
            ["system"], registry=r,
        )
        self.picture_held = Gauge(
            "syncd_picture_incomplete",
            "1 while decisions that need this system are held: its pulls are incomplete or stale.",
            ["system"],
            registry=r,
        )
        self.system_blocked = Gauge(
            "syncd_system_backed_off",
            "1 while a system is backed off (auth failure, budget spent).",
            ["system"],
            registry=r,
        )
        self.auth_failing = Gauge(
            "syncd_auth_failing",
            "1 while a system is backed off because authentication failed (a refused re-login, or a fixed "
            "token the CRM refused); 0 once a login works or a reload clears the back-off.",
            ["system"],
            registry=r,
        )
        self.auth_grants = Counter(
            "syncd_auth_grants",
            "OAuth token grants asked by this process, by outcome: ok, refused (the CRM said no: "
            "wrong key, revoked refresh token, ...), error (no usable answer: network, TLS, 5xx).",
            ["system", "outcome"],
            registry=r,
        )
        self._grants_seen: dict[tuple[str, int], dict[str, int]] = {}  # (system, id(provider)) -> counts
        for crm in SYSTEMS:  # exported from the start: an alert sees 0, not an absent series
            self.auth_failing.labels(crm).set(0)
            for outcome in GRANT_OUTCOMES:
                self.auth_grants.labels(crm, outcome)
        self.reconcile_missing = Gauge(
            "syncd_reconcile_missing_records",
            "Records a CRM holds that the store lacks, per the last reconciliation (an error: alert on > 0).",
            ["system", "object"],
            registry=r,
        )
        for system, budget in (daily_budgets or {}).items():
            self.api_daily_budget.labels(system).set(budget)
            self.api_calls_today.labels(system).set(0)
            self.system_blocked.labels(system).set(0)

    # ------------------------------------------------------------------ observations
    def observe_cycle(
        self,
        group: str,
        stats: Any,
        duration_s: float,
        *,
        ok: bool,
        mapped: Mapping[str, int] | None = None,
        error: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """After a cycle: counts from its CycleStats (``pulled`` keyed "system.object"), the
        mapped counts (same keys), duration, and (when ``ok``) the success time."""
        for key, n in (getattr(stats, "pulled", None) or {}).items():
            system, _, obj = key.partition(".")
            self.pulled.labels(system, obj).inc(n)
        for key, n in (mapped or {}).items():
            system, _, obj = key.partition(".")
            self.mapped.labels(system, obj).inc(n)
        if getattr(stats, "failed", 0):
            self.write_failures.labels(group).inc(stats.failed)
        self.cycle_duration.labels(group, "ok" if ok else "failed").observe(max(0.0, duration_s))
        if ok:
            at = now or datetime.now(UTC)
            with self._lock:
                self.last_success[group] = at
            self.last_success_ts.labels(group).set(at.timestamp())
        else:
            self.cycle_failures.labels(group, error or "unknown").inc()

    def observe_write(self, system: str, obj: str) -> None:
        self.written.labels(system, obj).inc()

    def observe_usage(self, system: str, usage: ApiUsage, *, now: datetime | None = None) -> None:
        """Add the calls made since the last observation of this ``usage`` object."""
        now = now or datetime.now(UTC)
        with self._lock:
            if now.date() != self._day:
                self._day, self._today = now.date(), {}
            key = (system, id(usage))
            seen = self._usage_seen.get(key, ApiUsage())
            new_calls = 0
            for endpoint, n in list(usage.calls.items()):
                d = n - seen.calls.get(endpoint, 0)
                if d > 0:
                    self.api_calls.labels(system, endpoint).inc(d)
                    new_calls += d
            for endpoint, n in list(usage.rate_limited.items()):
                d = n - seen.rate_limited.get(endpoint, 0)
                if d > 0:
                    self.api_429.labels(system, endpoint).inc(d)
            self._usage_seen[key] = ApiUsage(
                calls=dict(usage.calls), rate_limited=dict(usage.rate_limited)
            )
            self._today[system] = self._today.get(system, 0) + new_calls
            self.api_calls_today.labels(system).set(self._today[system])
        if usage.reported_used is not None:
            self.api_reported_used.labels(system).set(usage.reported_used)
        if usage.reported_limit is not None:
            self.api_reported_limit.labels(system).set(usage.reported_limit)

    def observe_grants(self, system: str, provider: Any) -> None:
        """Add the grants ``provider`` (a :class:`~syncd.connectors.auth.TokenProvider`) asked
        for since it was last observed (a provider replaced on reload starts its own count)."""
        counts = getattr(provider, "grants", None)
        if not isinstance(counts, Mapping):
            return
        with self._lock:
            key = (system, id(provider))
            seen = self._grants_seen.get(key, {})
            for outcome, n in counts.items():
                d = n - seen.get(outcome, 0)
                if d > 0:
                    self.auth_grants.labels(system, outcome).inc(d)
            self._grants_seen[key] = dict(counts)

    def calls_today(self, system: str, now: datetime | None = None) -> int:
        """Calls this process made on ``now``'s UTC day (0 once the day has turned)."""
        day = (now or datetime.now(UTC)).date()
        with self._lock:
            return self._today.get(system, 0) if day == self._day else 0

    def observe_store(self, store: Any) -> None:
        """Outbox depth, quarantine size, unmapped values, open SLA breaches (one short read)."""
        from syncd.model import SYSTEMS

        with store.tx() as tx:
            depth = {s: tx.outbox_depth(s) for s in SYSTEMS}
            failing = {s: tx.count_failing_writes(self.failing_after, s) for s in SYSTEMS}
            quarantine = tx.open_quarantine()
            unmapped = tx.unmapped_values()
            breaches = len(tx.open_events("sla_breach"))
            dead = {s: tx.count_tombstones(s) for s in SYSTEMS}
        for name, n in depth.items():
            self.outbox_depth.labels(name).set(n)
        for name, n in failing.items():
            self.failing_writes.labels(name).set(n)
        q: dict[tuple[str, str], int] = {(s, k): 0 for s in SYSTEMS for k in ("record", "write")}
        for row in quarantine:
            q[(row.system, row.kind)] = q.get((row.system, row.kind), 0) + 1
        for (sys_name, kind), n in q.items():
            self.quarantine_size.labels(sys_name, kind).set(n)
        u: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
        for row in unmapped:
            u[row.system] = u.get(row.system, 0) + 1
        for sys_name, n in u.items():
            self.unmapped_values.labels(sys_name).set(n)
        self.sla_breaches.set(breaches)
        for name, n in dead.items():
            self.tombstones.labels(name).set(n)

    def set_gap(self, system: str, obj: str, missing: int) -> None:
        """The records of ``system``/``obj`` the last reconciliation found missing from the store."""
        self.reconcile_missing.labels(system, obj).set(missing)

    def observe_budget(self, store: Any, now: datetime | None = None) -> None:
        """The API burn per system from the ledger (:mod:`syncd.burn`): calls today and in the
        rolling window, the cap and what is left, pace, projection, share of the org's use, pause."""
        from syncd import burn

        at = (now or datetime.now(UTC)).timestamp()
        with store.tx(readonly=True) as tx:
            data = burn.burn(tx, at)
        g = self._budget_gauges()
        for system, b in data.items():
            g["calls"].labels(system, "today").set(b["today"])
            g["calls"].labels(system, "rolling").set(b["rolling"])
            g["cap"].labels(system).set(b["cap"])
            g["remaining"].labels(system).set(b["remaining"])
            g["projected"].labels(system).set(b["projected"])
            g["paused"].labels(system).set(1 if b["paused"] else 0)
            if b["org_share"] is not None:
                g["org_share"].labels(system).set(b["org_share"])
            for klass, rate in b["pace_per_s"].items():
                g["pace"].labels(system, klass).set(rate)

    def _budget_gauges(self) -> dict[str, Gauge]:
        with self._lock:
            gauges: dict[str, Gauge] | None = getattr(self, "_budget", None)
            if gauges is None:
                r = self.registry
                gauges = self._budget = {
                    "calls": Gauge("syncd_api_ledger_calls", "API calls of every syncd process on the store "
                                   "(the ledger), today (UTC) and in the rolling window.", ["system", "window"],
                                   registry=r),
                    "cap": Gauge("syncd_api_cap", "syncd's cap per window (daily_share x the org's limit, "
                                 "daily_budget).", ["system"], registry=r),
                    "remaining": Gauge("syncd_api_remaining", "Calls left under the cap in this window.",
                                       ["system"], registry=r),
                    "projected": Gauge("syncd_api_projected", "Calls by the end of the window at the last "
                                       "hour's rate.", ["system"], registry=r),
                    "org_share": Gauge("syncd_api_org_share", "syncd's calls / the org's total use the CRM "
                                       "reports (0-1).", ["system"], registry=r),
                    "pace": Gauge("syncd_api_pace_per_second", "The pace in use per endpoint class "
                                  "(calls per second, all processes).", ["system", "klass"], registry=r),
                    "paused": Gauge("syncd_api_paused", "1 while a cap or the org's limit pauses the system.",
                                    ["system"], registry=r),
                }
            return gauges

    def set_blocked(self, system: str, why: str | None, *, auth: bool = False) -> None:
        """``system`` backed off for ``why`` (None: no longer); ``auth``: because authentication
        failed (``syncd_auth_failing``; any other back-off, or none, sets it to 0)."""
        with self._lock:
            if why is None:
                self.blocked.pop(system, None)
            else:
                self.blocked[system] = why
        self.system_blocked.labels(system).set(0 if why is None else 1)
        self.auth_failing.labels(system).set(1 if why is not None and auth else 0)

    def set_picture(self, problems: Mapping[str, Sequence[str]], *, grace_s: float) -> None:
        """Per system, why decisions that need it are held (incomplete first pull, or no
        successful pull within the freshness bound); ``grace_s`` after the start before a
        first pull still running counts against health."""
        with self._lock:
            self.picture = {s: list(p) for s, p in problems.items() if p}
            self.picture_grace_s = grace_s
        for system in SYSTEMS:
            self.picture_held.labels(system).set(1 if self.picture.get(system) else 0)

    # ------------------------------------------------------------------ health
    def health(self, now: datetime | None = None) -> tuple[bool, str]:
        """(healthy, one-line reason). Unhealthy when a group has had no successful cycle
        within HEALTH_INTERVALS of its interval (from the service start before the first),
        or when a system's pulls are incomplete or older than the freshness bound (decisions
        that need it are held: a partial picture), once the start-up grace is over."""
        now = now or datetime.now(UTC)
        problems: list[str] = []
        with self._lock:
            if self.picture and (now - self.started_at).total_seconds() > self.picture_grace_s:
                for system, why in sorted(self.picture.items()):
                    problems.append(f"{system}: decisions held: {why[0]}"
                                    + (f" (+{len(why) - 1} more)" if len(why) > 1 else ""))
            for group, interval in sorted(self.intervals.items()):
                limit = HEALTH_INTERVALS * interval
                last = self.last_success.get(group)
                age = (now - (last or self.started_at)).total_seconds()
                if age > limit:
                    what = (
                        f"last success {age:.0f}s ago"
                        if last
                        else f"no successful cycle in {age:.0f}s"
                    )
                    problems.append(f"{group}: {what} (limit {limit:.0f}s)")
            blocked = dict(self.blocked)
        if problems:
            extra = "; ".join(f"{s} backed off: {why}" for s, why in sorted(blocked.items()))
            return False, "; ".join(problems + ([extra] if extra else []))
        if not self.last_success:
            return True, "starting: no cycle finished yet"
        return True, "ok"

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on 127.0.0.1:``port`` (0 = an ephemeral port)."""

    def __init__(
        self, metrics: ServiceMetrics, port: int, *, clock: Callable[[], datetime] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.metrics = metrics
        self.host = host
        self._clock = clock or (lambda: datetime.now(UTC))
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            name="syncd-metrics",
            daemon=True,
            kwargs={"poll_interval": 0.2},
        )
        self._thread.start()
        log.info("metrics_listening", address=f"{self.host}:{self.port}", paths="/metrics /healthz")
        if not is_loopback(self.host):
            log.warning("metrics_not_loopback", address=f"{self.host}:{self.port}",
                        note="/metrics and /healthz answer anyone who can reach this address (no auth): "
                             "firewall it to the scraper")
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def is_loopback(host: str) -> bool:
    """Is ``host`` (an address or ``localhost``) reachable only from this machine?"""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, server.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, reason = server.metrics.health(server._clock())
                self._send(
                    200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8"
                )
            else:
                self._send(
                    404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8"
                )

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
