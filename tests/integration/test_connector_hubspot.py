"""HubSpotConnector against the HubSpot sandbox, through the real hubspot-api-client over TLS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.hubspot import HubSpotConnector
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RetriableError
from syncd.model import Cursor, FieldUpdate, RawRecord, RecordCreate
from syncd.sandbox._server import Response, SimServer
from syncd.sandbox.hubspot import HubSpotApp

if TYPE_CHECKING:  # the fixture's type; pytest provides the object
    from tests.integration.conftest import HubSpotSandbox

FAST = RetryPolicy(max_attempts=6, base=0.001, cap=0.01, max_retry_after=0.05)
PROPS = {
    "contacts": ["email", "firstname", "lifecyclestage", "hs_lead_status", "hubspotscore"],
    "deals": ["dealname", "dealstage", "amount"],
}
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def connector(
    sb: HubSpotSandbox,
    *,
    token: str | None = None,
    retry: RetryPolicy = FAST,
    timeout: float = 30.0,
) -> HubSpotConnector:
    return HubSpotConnector(
        sb.url,
        token or sb.token,
        ca_bundle=sb.ca_path,
        properties=PROPS,
        retry=retry,
        timeout=timeout,
    )


def pull(
    c: HubSpotConnector, obj: str, since: Cursor | None = None, overlap: timedelta = timedelta(0)
) -> list[RawRecord]:
    return [r for page in c.iter_changes(obj, since, overlap=overlap) for r in page.records]


def seed(
    sb: HubSpotSandbox, n: int, *, at: datetime | None = None, step: timedelta | None = None
) -> list[str]:
    ids = []
    for i in range(n):
        when = at if step is None else T0 + step * i
        ids.append(
            sb.app.add(
                "contacts", {"email": f"p{i}@example.com", "lifecyclestage": "lead"}, at=when or T0
            )
        )
    return ids


def test_full_pull_of_a_few_thousand_records_sees_each_once_in_order(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    ids = seed(hubspot_sandbox, 2500, step=timedelta(seconds=1))
    c = connector(hubspot_sandbox)
    recs = pull(c, "contacts")
    assert [r.id for r in recs] == ids
    assert recs == sorted(recs, key=lambda r: (r.modified_at, int(r.id)))
    assert recs[0].fields["email"] == "p0@example.com"
    assert recs[0].modified_at == T0 and recs[0].modified_at.tzinfo is not None
    assert c.usage.calls == {"contacts.search": 13}


def test_ties_across_page_boundaries_are_all_seen(hubspot_sandbox: HubSpotSandbox) -> None:
    seed(hubspot_sandbox, 50, step=timedelta(seconds=1))
    tied = seed(hubspot_sandbox, 450, at=T0 + timedelta(hours=1))
    c = connector(hubspot_sandbox)
    since = Cursor(T0 + timedelta(hours=1), tied[0])
    recs = pull(c, "contacts", since)
    assert sorted(r.id for r in recs) == sorted(tied)


def test_incremental_pull_sees_modified_records_plus_only_overlap_duplicates(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    ids = seed(hubspot_sandbox, 300, step=timedelta(seconds=1))
    c = connector(hubspot_sandbox)
    first = pull(c, "contacts")
    cursor = first[-1].cursor
    t1 = cursor.modified_at + timedelta(minutes=5)
    changed = ids[10:20]
    for i, rid in enumerate(changed):
        hubspot_sandbox.app.modify(
            "contacts", rid, {"hs_lead_status": "OPEN"}, at=t1 + timedelta(seconds=i)
        )
    recs = pull(c, "contacts", cursor, overlap=timedelta(seconds=3))
    # the overlap re-reads the last 3 s of the first pull (ids[-4:]), nothing else
    assert [r.id for r in recs] == ids[-4:] + changed
    assert all(r.fields["hs_lead_status"] == "OPEN" for r in recs[4:])


def test_no_change_cycle_costs_one_call_per_object(hubspot_sandbox: HubSpotSandbox) -> None:
    seed(hubspot_sandbox, 5, step=timedelta(seconds=1))
    c = connector(hubspot_sandbox)
    since = Cursor(T0 + timedelta(days=1), "0")
    assert pull(c, "contacts", since) == []
    assert pull(c, "deals", since) == []
    assert c.usage.calls == {"contacts.search": 1, "deals.search": 1}
    assert hubspot_sandbox.server.request_count() == 2


def test_crossing_the_10000_search_cap_loses_nothing(hubspot_sandbox: HubSpotSandbox) -> None:
    ids = seed(hubspot_sandbox, 10_500, step=timedelta(milliseconds=7))
    c = connector(hubspot_sandbox)
    recs = pull(c, "contacts")
    assert sorted({r.id for r in recs}, key=int) == ids
    assert len(recs) == len(ids)  # restarts skip what was already yielded


def test_more_than_10000_records_on_one_timestamp_are_walked_by_id(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    before = seed(hubspot_sandbox, 10, step=timedelta(seconds=1))
    tied = seed(hubspot_sandbox, 10_300, at=T0 + timedelta(hours=2))
    after = hubspot_sandbox.app.add(
        "contacts", {"email": "late@example.com"}, at=T0 + timedelta(hours=3)
    )
    c = connector(hubspot_sandbox)
    got = {r.id for r in pull(c, "contacts")}
    assert got == set(before) | set(tied) | {after}


def test_429_burst_and_503_are_ridden_out_and_counted(hubspot_sandbox: HubSpotSandbox) -> None:
    seed(hubspot_sandbox, 450, step=timedelta(seconds=1))
    hubspot_sandbox.server.inject(
        "rate_limit", count=3, endpoint="contacts.search", retry_after=0.01
    )
    hubspot_sandbox.server.inject("server_error", count=1, endpoint="contacts.search", status=503)
    c = connector(hubspot_sandbox)
    assert len(pull(c, "contacts")) == 450
    assert c.usage.calls["contacts.search"] == 3 + 4  # 3 pages + 4 failed attempts
    assert c.usage.rate_limited == {"contacts.search": 3}


def test_retries_give_up_after_the_policy(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("server_error", count=10, endpoint="contacts.search", status=502)
    c = connector(hubspot_sandbox, retry=RetryPolicy(max_attempts=3, base=0.001, cap=0.001))
    with pytest.raises(RetriableError):
        pull(c, "contacts")
    assert c.usage.calls["contacts.search"] == 3


def test_timeout_and_dropped_connection_are_retried(hubspot_sandbox: HubSpotSandbox) -> None:
    seed(hubspot_sandbox, 3)
    hubspot_sandbox.server.inject("delay", count=1, endpoint="contacts.search", delay=1.5)
    hubspot_sandbox.server.inject("drop", count=1, endpoint="contacts.search")
    c = connector(hubspot_sandbox, timeout=0.5)
    assert len(pull(c, "contacts")) == 3
    assert c.usage.calls["contacts.search"] == 3


def test_bad_token_is_an_auth_error_and_not_retried(hubspot_sandbox: HubSpotSandbox) -> None:
    c = connector(hubspot_sandbox, token="wrong")
    with pytest.raises(AuthError, match="INVALID_AUTHENTICATION"):
        pull(c, "contacts")
    assert hubspot_sandbox.server.request_count() == 1


def test_expired_token_is_an_auth_error(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("expired_session", endpoint="contacts.batch_read")
    with pytest.raises(AuthError, match="EXPIRED_AUTHENTICATION"):
        connector(hubspot_sandbox).fetch("contacts", ["1"])


def test_daily_budget_spent_is_budget_exhausted(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.app.daily_limit = 2
    c = connector(hubspot_sandbox)
    # allowed_values makes 3 calls (properties x2, pipelines); the third is refused, not retried
    with pytest.raises(BudgetExhausted, match="DAILY"):
        c.allowed_values()
    assert c.usage.calls == {"properties": 2, "pipelines": 1}
    assert c.usage.rate_limited == {"pipelines": 1}


def test_budget_headers_are_read_into_usage(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.app.daily_limit = 1000
    rid = seed(hubspot_sandbox, 1)[0]
    c = connector(hubspot_sandbox)
    c.fetch("contacts", [rid])
    c.fetch("contacts", [rid])
    assert c.usage.reported_limit == 1000
    assert c.usage.reported_used == 2


def test_fetch_reads_in_batches_and_leaves_out_missing(hubspot_sandbox: HubSpotSandbox) -> None:
    ids = seed(hubspot_sandbox, 150)
    c = connector(hubspot_sandbox)
    recs = c.fetch("contacts", [*ids, "999999"])
    assert sorted(r.id for r in recs) == sorted(ids)
    assert c.usage.calls == {"contacts.batch_read": 2}


def test_find_by_email_is_case_insensitive(hubspot_sandbox: HubSpotSandbox) -> None:
    a = hubspot_sandbox.app.add("contacts", {"email": "Ann.Lee@Example.com"})
    hubspot_sandbox.app.add("contacts", {"email": "bob@example.com"})
    recs = connector(hubspot_sandbox).find_by_email("contacts", ["ann.lee@example.com", "x@y.z"])
    assert [r.id for r in recs] == [a]


def test_deals_carry_their_contact_ids_and_association_changes_are_pulled(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    app = hubspot_sandbox.app
    c1 = app.add("contacts", {"email": "a@example.com"}, at=T0)
    c2 = app.add("contacts", {"email": "b@example.com"}, at=T0)
    d1 = app.add("deals", {"dealname": "Acme", "dealstage": "qualifiedtobuy"}, at=T0)
    d2 = app.add("deals", {"dealname": "Solo", "dealstage": "onhold"}, at=T0)
    app.associate(c1, d1, at=T0)
    c = connector(hubspot_sandbox)
    recs = {r.id: r for r in pull(c, "deals")}
    assert recs[d1].fields["_contact_ids"] == [c1]
    assert recs[d2].fields["_contact_ids"] == []
    app.associate(c2, d1, at=T0 + timedelta(hours=1))
    recs2 = pull(c, "deals", Cursor(T0 + timedelta(minutes=1), d2))
    assert [(r.id, r.fields["_contact_ids"]) for r in recs2] == [(d1, [c1, c2])]


def test_write_updates_and_reports_per_record_failures(hubspot_sandbox: HubSpotSandbox) -> None:
    ids = seed(hubspot_sandbox, 120)
    hubspot_sandbox.server.inject("partial", endpoint="contacts.batch_update", ids=[ids[5]])
    c = connector(hubspot_sandbox)
    ups = [
        FieldUpdate(f"k{i}", rid, {"hs_lead_status": "IN_PROGRESS"}) for i, rid in enumerate(ids)
    ]
    ups.append(FieldUpdate("bad", ids[7], {"hs_lead_status": "NOT_A_STATUS"}))
    ups.append(FieldUpdate("gone", "424242", {"hs_lead_status": "OPEN"}))
    res = c.write("contacts", ups)
    assert [r.key for r in res] == [u.key for u in ups]
    by_key = {r.key: r for r in res}
    assert by_key["k5"].ok is False and by_key["k5"].retriable is True
    assert by_key["bad"].ok is False and "VALIDATION_ERROR" in (by_key["bad"].error or "")
    assert "hs_lead_status" in (by_key["bad"].error or "")
    assert by_key["gone"].ok is False and "OBJECT_NOT_FOUND" in (by_key["gone"].error or "")
    assert by_key["gone"].retriable is False
    assert sum(r.ok for r in res) == 119
    assert hubspot_sandbox.app.get("contacts", ids[0])["hs_lead_status"] == "IN_PROGRESS"
    assert "hs_lead_status" not in hubspot_sandbox.app.get("contacts", ids[5])


def test_write_verification_catches_a_backwards_lifecyclestage(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    rid = hubspot_sandbox.app.add(
        "contacts", {"email": "a@example.com", "lifecyclestage": "salesqualifiedlead"}
    )
    res = connector(hubspot_sandbox).write(
        "contacts",
        [FieldUpdate("k", rid, {"lifecyclestage": "lead", "hs_lead_status": "BAD_TIMING"})],
    )
    assert res[0].ok is False
    assert "LIFECYCLE_NOT_APPLIED" in (res[0].error or "")
    assert hubspot_sandbox.app.get("contacts", rid)["lifecyclestage"] == "salesqualifiedlead"


def test_clear_first_moves_lifecyclestage_backwards(hubspot_sandbox: HubSpotSandbox) -> None:
    rid = hubspot_sandbox.app.add(
        "contacts", {"email": "a@example.com", "lifecyclestage": "salesqualifiedlead"}
    )
    c = connector(hubspot_sandbox)
    res = c.write(
        "contacts",
        [FieldUpdate("k", rid, {"lifecyclestage": "lead"}, clear_first=("lifecyclestage",))],
    )
    assert res[0].ok, res[0].error
    assert hubspot_sandbox.app.get("contacts", rid)["lifecyclestage"] == "lead"
    writes = [w for w in hubspot_sandbox.app.write_log if w["id"] == rid]
    assert [w["properties"] for w in writes] == [{"lifecyclestage": ""}, {"lifecyclestage": "lead"}]
    assert c.usage.calls == {"contacts.batch_update": 2, "contacts.batch_read": 1}


def test_create_correlates_results_by_key(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("partial", endpoint="contacts.batch_create", ids=["c3"])
    creates = [
        RecordCreate(f"c{i}", {"email": f"n{i}@example.com", "lifecyclestage": "lead"})
        for i in range(5)
    ]
    res = connector(hubspot_sandbox).create("contacts", creates)
    assert [r.key for r in res] == [c.key for c in creates]
    assert [r.ok for r in res] == [True, True, True, False, True]
    for c, r in zip(creates, res, strict=True):
        if r.ok:
            assert r.record_id is not None
            assert hubspot_sandbox.app.get("contacts", r.record_id)["email"] == c.fields["email"]


def test_allowed_values_come_from_properties_and_pipelines(hubspot_sandbox: HubSpotSandbox) -> None:
    c = connector(hubspot_sandbox)
    av = c.allowed_values()
    assert av[("contacts", "lifecyclestage")][:5] == [
        "subscriber",
        "lead",
        "marketingqualifiedlead",
        "salesacceptedlead",
        "salesqualifiedlead",
    ]
    assert "ATTEMPTED_TO_CONTACT" in av[("contacts", "hs_lead_status")]
    assert av[("contacts", "syncd_lead_type")] == [
        "new_business",
        "existing_customer",
        "maintenance",
    ]
    assert "onhold" in av[("deals", "dealstage")] and "closedwon" in av[("deals", "dealstage")]
    assert c.usage.calls == {"properties": 2, "pipelines": 1}


def test_other_4xx_is_fatal_and_not_retried(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("server_error", endpoint="contacts.search", status=403,
                                  message="This app hasn't been granted all required scopes")
    c = connector(hubspot_sandbox)
    with pytest.raises(FatalError, match="403") as e:
        pull(c, "contacts")
    assert not isinstance(e.value, AuthError)
    assert c.usage.calls == {"contacts.search": 1}


def test_retries_are_logged_without_the_token(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("rate_limit", endpoint="contacts.search", retry_after=0)
    with capture_logs() as logs:
        pull(connector(hubspot_sandbox), "contacts")
    retries = [e for e in logs if e["event"] == "retrying"]
    assert len(retries) == 1 and retries[0]["log_level"] == "warning"
    assert retries[0]["operation"] == "hubspot.contacts.search" and retries[0]["status"] == 429
    assert hubspot_sandbox.token not in repr(logs)


def test_retry_policy_waits() -> None:
    p = RetryPolicy(base=0.5, cap=30.0, max_retry_after=60.0)
    assert p.wait_for(1, RateLimited("x", retry_after=7)) == 7
    assert p.wait_for(1, RateLimited("x", retry_after=600)) == 60  # capped
    assert all(0 <= p.wait_for(1, RetriableError("x")) <= 0.5 for _ in range(50))
    assert all(0 <= p.wait_for(20, RetriableError("x")) <= 30 for _ in range(50))
    assert max(p.wait_for(20, RetriableError("x")) for _ in range(200)) > 0.5  # it grows


class _SmallCapConnector(HubSpotConnector):
    search_cap = 40  # with a sandbox whose search cap is 40, restarts and id walks happen often


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    per_second=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=7),
    since_at=st.integers(min_value=0, max_value=7),
    overlap=st.integers(min_value=0, max_value=3),
    page_size=st.integers(min_value=1, max_value=12),
)
def test_any_pull_sees_every_record_at_or_after_the_window_start(
        sandbox_tls: tuple[object, str], per_second: list[int], since_at: int, overlap: int,
        page_size: int) -> None:
    offsets = [sec for sec, n in enumerate(per_second) for _ in range(n)]
    ctx, ca_path = sandbox_tls
    app = HubSpotApp(token="t", search_max_offset=40)
    ids = {app.add("contacts", {"email": f"p{i}@example.com"}, at=T0 + timedelta(seconds=o)): o
           for i, o in enumerate(offsets)}
    server = SimServer(app, ssl_context=ctx).start()  # type: ignore[arg-type]
    try:
        c = _SmallCapConnector(server.url, "t", ca_bundle=ca_path, properties=PROPS,
                               retry=FAST, page_size=page_size)
        since = Cursor(T0 + timedelta(seconds=since_at), "0")
        recs = pull(c, "contacts", since, overlap=timedelta(seconds=overlap))
    finally:
        server.stop()
    start = since_at - overlap
    assert {r.id for r in recs} == {rid for rid, o in ids.items() if o >= start}
    assert len(recs) == len({r.id for r in recs})  # restarts add no duplicates
    assert [r.modified_at for r in recs] == sorted(r.modified_at for r in recs)


def test_two_updates_of_one_record_apply_in_order(hubspot_sandbox: HubSpotSandbox) -> None:
    rid = seed(hubspot_sandbox, 1)[0]
    c = connector(hubspot_sandbox)
    res = c.write("contacts", [FieldUpdate("a", rid, {"hs_lead_status": "OPEN"}),
                               FieldUpdate("b", rid, {"hs_lead_status": "CONNECTED"})])
    assert [r.ok for r in res] == [True, True]
    assert hubspot_sandbox.app.get("contacts", rid)["hs_lead_status"] == "CONNECTED"
    assert c.usage.calls == {"contacts.batch_update": 2}  # never two inputs for one id per batch


# -- write-side reads: lifecyclestage verified from the batch-update response ------------------


def lifecycle_contacts(sb: HubSpotSandbox, stages: list[str]) -> list[str]:
    return [sb.app.add("contacts", {"email": f"lc{i}@example.com", "lifecyclestage": s})
            for i, s in enumerate(stages)]


def test_forward_lifecyclestage_write_is_verified_without_a_read(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    ids = lifecycle_contacts(hubspot_sandbox, ["lead"] * 150)
    c = connector(hubspot_sandbox)
    res = c.write("contacts", [FieldUpdate(f"k{i}", rid, {"lifecyclestage": "marketingqualifiedlead"})
                               for i, rid in enumerate(ids)])
    assert all(r.ok for r in res), [r.error for r in res if not r.ok]
    assert c.usage.calls == {"contacts.batch_update": 2}  # 150 writes: 2 batches, no read-back
    assert {hubspot_sandbox.app.get("contacts", rid)["lifecyclestage"] for rid in ids} == {
        "marketingqualifiedlead"}


def test_ignored_backwards_write_is_caught_from_the_response(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    fwd, back, cleared = lifecycle_contacts(
        hubspot_sandbox, ["lead", "salesqualifiedlead", "salesqualifiedlead"])
    c = connector(hubspot_sandbox)
    res = c.write("contacts", [
        FieldUpdate("fwd", fwd, {"lifecyclestage": "marketingqualifiedlead"}),
        FieldUpdate("back", back, {"lifecyclestage": "lead"}),  # no clear_first: ignored
        FieldUpdate("cleared", cleared, {"lifecyclestage": "lead"},
                    clear_first=("lifecyclestage",)),
    ])
    by_key = {r.key: r for r in res}
    assert by_key["fwd"].ok and by_key["cleared"].ok
    assert by_key["back"].ok is False
    assert "LIFECYCLE_NOT_APPLIED" in (by_key["back"].error or "")
    assert "'salesqualifiedlead'" in (by_key["back"].error or "")
    assert hubspot_sandbox.app.get("contacts", back)["lifecyclestage"] == "salesqualifiedlead"
    # clear + set, and one read-back: only for the clear_first write
    assert c.usage.calls == {"contacts.batch_update": 2, "contacts.batch_read": 1}


class _TerseHubSpotApp(HubSpotApp):
    """A HubSpot whose batch-update answers leave lifecyclestage out of the properties."""

    def _h_batch_update(self, *args: object) -> Response:
        resp = super()._h_batch_update(*args)  # type: ignore[arg-type]
        for o in resp.body.get("results") or []:
            o["properties"].pop("lifecyclestage", None)
        return resp


def test_lifecyclestage_is_read_back_when_the_response_does_not_say(
    sandbox_tls: tuple[object, str],
) -> None:
    ctx, ca_path = sandbox_tls
    app = _TerseHubSpotApp(token="t")
    fwd = app.add("contacts", {"email": "f@example.com", "lifecyclestage": "lead"})
    back = app.add("contacts", {"email": "b@example.com", "lifecyclestage": "customer"})
    server = SimServer(app, ssl_context=ctx).start()  # type: ignore[arg-type]
    try:
        c = HubSpotConnector(server.url, "t", ca_bundle=ca_path, properties=PROPS, retry=FAST)
        res = c.write("contacts", [FieldUpdate("fwd", fwd, {"lifecyclestage": "opportunity"}),
                                   FieldUpdate("back", back, {"lifecyclestage": "lead"})])
    finally:
        server.stop()
    assert [r.ok for r in res] == [True, False]
    assert "LIFECYCLE_NOT_APPLIED" in (res[1].error or "")
    assert c.usage.calls == {"contacts.batch_update": 1, "contacts.batch_read": 1}


# -- backfill reads: one association batch read per 1,000 deals ---------------------------------


def test_deal_pages_are_buffered_to_one_association_read_per_1000_deals(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    app = hubspot_sandbox.app
    people = [app.add("contacts", {"email": f"d{i}@example.com"}, at=T0) for i in range(3)]
    deals = [app.add("deals", {"dealname": f"D{i}", "dealstage": "qualifiedtobuy"},
                     at=T0 + timedelta(seconds=i)) for i in range(1150)]
    for i, d in enumerate(deals):
        app.associate(people[i % 3], d, at=T0 + timedelta(seconds=i))
    c = connector(hubspot_sandbox)
    pages = list(c.iter_changes("deals", None, overlap=timedelta(0)))
    assert [len(p.records) for p in pages] == [1000, 150]
    recs = [r for p in pages for r in p.records]
    assert [r.id for r in recs] == deals  # (modified_at, id) order, each deal once
    assert all(r.fields["_contact_ids"] == [people[i % 3]] for i, r in enumerate(recs))
    # 6 search pages of 200, 2 association reads (1,000 + 150 deals)
    assert c.usage.calls == {"deals.search": 6, "associations.batch_read": 2}


def test_a_pull_cut_short_after_a_buffered_page_loses_no_deal(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    app = hubspot_sandbox.app
    deals = [app.add("deals", {"dealname": f"D{i}", "dealstage": "qualifiedtobuy"},
                     at=T0 + timedelta(seconds=i // 3)) for i in range(1300)]  # ties of 3
    c = connector(hubspot_sandbox)
    first = next(iter(c.iter_changes("deals", None, overlap=timedelta(0))))
    assert len(first.records) == 1000
    cursor = max(r.cursor for r in first.records)  # what the engine commits for the page
    assert cursor.id == deals[999]
    rest = pull(c, "deals", cursor)
    assert {r.id for r in first.records} | {r.id for r in rest} == set(deals)


def test_a_dropped_update_is_retried_but_a_dropped_create_is_not(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    rid = seed(hubspot_sandbox, 1)[0]
    c = connector(hubspot_sandbox)
    hubspot_sandbox.server.inject("drop", endpoint="contacts.batch_update")
    assert c.write("contacts", [FieldUpdate("u", rid, {"hs_lead_status": "OPEN"})])[0].ok
    assert c.usage.calls == {"contacts.batch_update": 2}
    # a lost create answer may hide an applied create: report it, never send it twice here
    hubspot_sandbox.server.inject("drop", endpoint="contacts.batch_create")
    (res,) = c.create("contacts", [RecordCreate("c", {"email": "new@example.com"})])
    assert res.ok is False and res.retriable is True
    assert "connection closed before the answer" in (res.error or "")
    assert c.usage.calls["contacts.batch_create"] == 1


def test_a_5xx_answer_to_a_create_is_reported_not_resent_but_a_429_is_waited_out(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    c = connector(hubspot_sandbox)
    # 504: the create may have been applied behind the gateway; sending it again could make a
    # second contact, so it is reported (the outbox resends it later, looking the email up first)
    hubspot_sandbox.server.inject("server_error", count=1, endpoint="contacts.batch_create", status=504)
    (res,) = c.create("contacts", [RecordCreate("c", {"email": "new@example.com"})])
    assert res.ok is False and res.retriable is True and "504" in (res.error or "")
    assert c.usage.calls["contacts.batch_create"] == 1
    # 429: refused, nothing applied: waiting and sending again is safe
    hubspot_sandbox.server.inject("rate_limit", count=1, endpoint="contacts.batch_create")
    (res,) = c.create("contacts", [RecordCreate("d", {"email": "other@example.com"})])
    assert res.ok is True
    assert c.usage.calls["contacts.batch_create"] == 3


def test_updates_of_one_record_to_different_properties_share_one_input(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    ids = lifecycle_contacts(hubspot_sandbox, ["lead"] * 3)
    c = connector(hubspot_sandbox)
    ups = [FieldUpdate(f"{rid}.{n}", rid, fields) for rid in ids for n, fields in enumerate((
        {"hs_lead_status": "BAD_TIMING"}, {"lifecyclestage": "marketingqualifiedlead"},
        {"firstname": "Ada"}))]
    res = c.write("contacts", ups)
    assert [r.key for r in res] == [u.key for u in ups] and all(r.ok for r in res)
    assert c.usage.calls == {"contacts.batch_update": 1}  # not one batch per update
    for rid in ids:
        got = hubspot_sandbox.app.get("contacts", rid)
        assert (got["hs_lead_status"], got["lifecyclestage"], got["firstname"]) == (
            "BAD_TIMING", "marketingqualifiedlead", "Ada")


def test_a_bad_value_in_a_merged_input_fails_only_its_own_update(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    (rid,) = lifecycle_contacts(hubspot_sandbox, ["lead"])
    res = connector(hubspot_sandbox).write("contacts", [
        FieldUpdate("bad", rid, {"hs_lead_status": "NOT_A_STATUS"}),
        FieldUpdate("good", rid, {"firstname": "Ada"}),
    ])
    assert res[0].ok is False and "VALIDATION_ERROR" in (res[0].error or "")
    assert res[1].ok is True
    assert hubspot_sandbox.app.get("contacts", rid)["firstname"] == "Ada"
