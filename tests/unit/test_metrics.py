"""The service metrics and /healthz, served on 127.0.0.1 (no sleeping: time is passed in)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from syncd.engine import CycleStats
from syncd.metrics import MetricsServer, ServiceMetrics
from syncd.model import ApiUsage
from syncd.store import OutboxItem, Store

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
INTERVALS = {"contacts": 30.0, "deals": 60.0}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def metrics() -> ServiceMetrics:
    return ServiceMetrics(
        INTERVALS, now=T0, daily_budgets={"hubspot": 250_000, "salesforce": 15_000}
    )


@pytest.fixture
def server(metrics: ServiceMetrics, clock: Clock) -> Iterator[MetricsServer]:
    srv = MetricsServer(metrics, 0, clock=clock).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_cycle_counts_and_duration_reach_the_metrics_endpoint(
    metrics: ServiceMetrics, server: MetricsServer
) -> None:
    stats = CycleStats(pulled={"hubspot.contacts": 7, "salesforce.Lead": 3}, failed=2)
    metrics.observe_cycle(
        "contacts",
        stats,
        1.5,
        ok=True,
        mapped={"hubspot.contacts": 6, "salesforce.Lead": 3},
        now=T0,
    )
    metrics.observe_cycle(
        "contacts", CycleStats(pulled={"hubspot.contacts": 1}), 0.2, ok=True, now=T0
    )
    metrics.observe_write("salesforce", "Lead")

    status, ctype, text = get(server.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert value(text, "syncd_records_pulled_total", system="hubspot", object="contacts") == 8
    assert value(text, "syncd_records_pulled_total", system="salesforce", object="Lead") == 3
    assert value(text, "syncd_records_mapped_total", system="hubspot", object="contacts") == 6
    assert value(text, "syncd_records_written_total", system="salesforce", object="Lead") == 1
    assert value(text, "syncd_write_failures_total", group="contacts") == 2
    assert value(text, "syncd_cycle_duration_seconds_count", group="contacts", outcome="ok") == 2
    assert value(
        text, "syncd_cycle_duration_seconds_sum", group="contacts", outcome="ok"
    ) == pytest.approx(1.7)
    assert value(text, "syncd_last_success_timestamp_seconds", group="contacts") == T0.timestamp()


def test_failed_cycle_is_counted_by_error_and_does_not_count_as_success(
    metrics: ServiceMetrics,
) -> None:
    metrics.observe_cycle("deals", CycleStats(), 3.0, ok=False, error="RetriableError", now=T0)
    text = metrics.render().decode()
    assert value(text, "syncd_cycle_failures_total", group="deals", error="RetriableError") == 1
    assert value(text, "syncd_cycle_duration_seconds_count", group="deals", outcome="failed") == 1
    assert ("syncd_last_success_timestamp_seconds", (("group", "deals"),)) not in samples(text)


def test_api_usage_is_added_as_deltas_and_survives_a_connector_swap(
    metrics: ServiceMetrics,
) -> None:
    usage = ApiUsage(reported_used=18, reported_limit=15_000)
    for _ in range(3):
        usage.count("query")
    usage.rate_limited["query"] = 1
    metrics.observe_usage("salesforce", usage, now=T0)
    usage.count("query")
    metrics.observe_usage("salesforce", usage, now=T0)
    metrics.observe_usage("salesforce", usage, now=T0)  # nothing new: nothing added
    reloaded = ApiUsage()  # SIGHUP builds new connectors with fresh counters
    reloaded.count("composite/sobjects")
    metrics.observe_usage("salesforce", reloaded, now=T0)

    text = metrics.render().decode()
    assert value(text, "syncd_api_calls_total", system="salesforce", endpoint="query") == 4
    assert (
        value(text, "syncd_api_calls_total", system="salesforce", endpoint="composite/sobjects")
        == 1
    )
    assert value(text, "syncd_api_rate_limited_total", system="salesforce", endpoint="query") == 1
    assert value(text, "syncd_api_reported_used", system="salesforce") == 18
    assert value(text, "syncd_api_reported_limit", system="salesforce") == 15_000
    assert value(text, "syncd_api_calls_today", system="salesforce") == 5
    assert value(text, "syncd_api_daily_budget", system="salesforce") == 15_000


def test_daily_call_count_starts_over_on_a_new_utc_day(metrics: ServiceMetrics) -> None:
    usage = ApiUsage()
    usage.count("contacts.search")
    metrics.observe_usage("hubspot", usage, now=T0)
    usage.count("contacts.search")
    metrics.observe_usage("hubspot", usage, now=T0 + timedelta(days=1))
    assert metrics.calls_today("hubspot", T0 + timedelta(days=1)) == 1
    assert (
        metrics.calls_today("hubspot", T0 + timedelta(days=2)) == 0
    )  # nothing called yet that day
    text = metrics.render().decode()
    assert value(text, "syncd_api_calls_total", system="hubspot", endpoint="contacts.search") == 2


def test_healthz_is_200_until_three_intervals_pass_without_a_successful_cycle(
    metrics: ServiceMetrics, server: MetricsServer, clock: Clock
) -> None:
    status, _, body = get(server.port, "/healthz")
    assert (status, body.strip()) == (200, "starting: no cycle finished yet")

    clock.at = T0 + timedelta(seconds=91)  # contacts: 3 × 30 s
    status, _, body = get(server.port, "/healthz")
    assert status == 503
    assert body.count("\n") == 1 and body.startswith(
        "contacts: no successful cycle in 91s (limit 90s)"
    )

    metrics.observe_cycle("contacts", CycleStats(), 1.0, ok=True, now=clock.at)
    status, _, body = get(server.port, "/healthz")
    assert (status, body.strip()) == (200, "ok")

    clock.at += timedelta(seconds=100)  # contacts stale again, deals (3 × 60 s) too by now
    metrics.set_blocked("hubspot", "authentication failed: INVALID_AUTHENTICATION")
    status, _, body = get(server.port, "/healthz")
    assert status == 503
    assert "contacts: last success 100s ago (limit 90s)" in body
    assert "deals: no successful cycle in 191s (limit 180s)" in body
    assert "hubspot backed off: authentication failed" in body


def test_a_partial_cycle_does_not_keep_the_service_healthy(metrics: ServiceMetrics) -> None:
    metrics.observe_cycle("contacts", CycleStats(), 1.0, ok=True, now=T0)
    metrics.observe_cycle("deals", CycleStats(), 1.0, ok=True, now=T0)
    later = T0 + timedelta(seconds=95)
    metrics.observe_cycle("contacts", CycleStats(), 1.0, ok=False, error="partial", now=later)
    ok, reason = metrics.health(later)
    assert not ok and reason.startswith("contacts: last success 95s ago")


def test_store_gauges_outbox_quarantine_unmapped_and_sla_breaches(
    metrics: ServiceMetrics, store: Store
) -> None:
    with store.tx() as tx:
        tx.enqueue(
            [
                OutboxItem(
                    key=f"k{i}",
                    system="salesforce",
                    object="Lead",
                    op="update",
                    fields={"Status": "Working - Contacted"},
                    rule="r",
                    reason="why",
                    mapping_rev="rev",
                    record_id=f"00Q{i}",
                )
                for i in range(3)
            ]
        )
        tx.quarantine_record("hubspot", "contacts", "101", "lifecyclestage 'weird' is not mapped")
        tx.count_unmapped(
            [
                ("hubspot", "contacts", "lifecyclestage", "weird"),
                ("hubspot", "contacts", "lifecyclestage", "weird"),
                ("salesforce", "Lead", "Status", "Nurture"),
            ]
        )
        tx.add_event("sla_breach", "e1", {"rule": "sla.mql_follow_up"})
        tx.add_event("sla_breach", "e2", {"rule": "sla.mql_follow_up"})
        tx.add_event("returned", "e3", {})
    metrics.observe_store(store)
    text = metrics.render().decode()
    assert value(text, "syncd_outbox_depth", system="salesforce") == 3
    assert value(text, "syncd_outbox_depth", system="hubspot") == 0
    assert value(text, "syncd_quarantine_size", system="hubspot", kind="record") == 1
    assert value(text, "syncd_quarantine_size", system="salesforce", kind="write") == 0
    assert value(text, "syncd_unmapped_values", system="hubspot") == 1
    assert value(text, "syncd_unmapped_values", system="salesforce") == 1
    assert value(text, "syncd_sla_breaches_open") == 2


def test_backed_off_system_gauge(metrics: ServiceMetrics) -> None:
    metrics.set_blocked("salesforce", "API budget exhausted")
    assert value(metrics.render().decode(), "syncd_system_backed_off", system="salesforce") == 1
    metrics.set_blocked("salesforce", None)
    assert value(metrics.render().decode(), "syncd_system_backed_off", system="salesforce") == 0
    assert metrics.health(T0)[0]


def test_auth_failing_is_1_only_for_an_auth_back_off_and_0_once_it_ends(metrics: ServiceMetrics) -> None:
    def failing(system: str) -> float:
        return value(metrics.render().decode(), "syncd_auth_failing", system=system)

    assert failing("salesforce") == failing("hubspot") == 0  # exported from the start: alerts see 0, not absent
    metrics.set_blocked("salesforce", "authentication failed: salesforce: JWT grant refused: invalid_grant",
                        auth=True)
    metrics.set_blocked("hubspot", "API budget exhausted")
    assert (failing("salesforce"), failing("hubspot")) == (1, 0)
    metrics.set_blocked("salesforce", "API budget exhausted")  # still backed off, no longer for auth
    assert failing("salesforce") == 0
    metrics.set_blocked("salesforce", "authentication failed: ...", auth=True)
    metrics.set_blocked("salesforce", None)  # recovered, or a reload cleared it
    assert failing("salesforce") == 0


def test_token_grants_are_added_by_outcome_as_deltas_and_survive_a_provider_swap(metrics: ServiceMetrics) -> None:
    class Provider:  # what observe_grants reads of a TokenProvider (its grants by outcome)
        def __init__(self) -> None:
            self.grants = {"ok": 0, "refused": 0, "error": 0}

    def grants(outcome: str) -> float:
        return value(metrics.render().decode(), "syncd_auth_grants_total", system="salesforce", outcome=outcome)

    assert (grants("ok"), grants("refused"), grants("error")) == (0, 0, 0)
    old = Provider()
    old.grants.update(ok=2, refused=1)
    metrics.observe_grants("salesforce", old)
    old.grants["ok"] = 3
    metrics.observe_grants("salesforce", old)
    metrics.observe_grants("salesforce", old)  # nothing new: nothing added
    reloaded = Provider()  # SIGHUP builds new connectors, with new providers
    reloaded.grants.update(ok=1, error=1)
    metrics.observe_grants("salesforce", reloaded)
    metrics.observe_grants("salesforce", None)  # a connector without a provider: nothing
    assert (grants("ok"), grants("refused"), grants("error")) == (4, 1, 1)


def test_own_registry_and_loopback_only(metrics: ServiceMetrics, server: MetricsServer) -> None:
    assert REGISTRY.get_sample_value("syncd_sla_breaches_open") is None  # never the global registry
    ServiceMetrics(INTERVALS)  # a second service in one process does not collide
    assert server._httpd.server_address[0] == "127.0.0.1"
    status, _, body = get(server.port, "/nope")
    assert status == 404 and "/metrics" in body
