"""SalesforceConnector against the Salesforce sandbox, through the real simple-salesforce."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest_salesforce import SalesforceSandbox

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.salesforce import SalesforceConnector
from syncd.errors import AuthError, BudgetExhausted, FatalError, RetriableError
from syncd.model import Cursor, FieldUpdate, RawRecord, RecordCreate
from syncd.sandbox._server import SimServer
from syncd.sandbox.salesforce import SalesforceApp

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
FIELDS = {
    "Lead": [
        "Email",
        "Status",
        "Lifecycle_Stage__c",
        "Lead_Score__c",
        "IsConverted",
        "ConvertedContactId",
    ],
    "Contact": ["Email", "Lifecycle_Stage__c", "Lead_Type__c"],
    "Opportunity": ["Name", "StageName", "Amount", "ContactId"],
    "Task": ["WhoId", "Type", "Status"],
}
FAST = RetryPolicy(max_attempts=6, base=0.01, cap=0.05, max_retry_after=0.1)


def _connector(sb: SalesforceSandbox, timeout: float = 10.0) -> SalesforceConnector:
    return SalesforceConnector(
        sb.url, sb.session_id, ca_bundle=sb.ca_path, fields=FIELDS, retry=FAST, timeout=timeout
    )


@pytest.fixture
def conn(sf_sandbox: SalesforceSandbox) -> Iterator[SalesforceConnector]:
    c = _connector(sf_sandbox)
    yield c
    c.close()


def _seed(app: SalesforceApp, n: int, *, same_stamp: bool = False) -> list[str]:
    return [
        app.insert(
            "Lead",
            {"LastName": f"L{i}", "Company": "Co", "Email": f"p{i}@example.com"},
            at=T0 if same_stamp else T0 + timedelta(seconds=i),
        )
        for i in range(n)
    ]


def _pull(conn: SalesforceConnector, obj: str, since: Cursor | None) -> list[RawRecord]:
    return [r for page in conn.iter_changes(obj, since, overlap=timedelta(0)) for r in page.records]


def test_full_pull_pages_every_lead_in_cursor_order(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    ids = _seed(sf_sandbox.app, 4100)
    pages = list(conn.iter_changes("Lead", None, overlap=timedelta(0)))
    assert [len(p.records) for p in pages] == [2000, 2000, 100]
    records = [r for p in pages for r in p.records]
    assert [r.id for r in records] == ids
    assert [r.cursor for r in records] == sorted(r.cursor for r in records)
    first = records[0]
    assert first.modified_at == T0 and first.modified_at.tzinfo is not None
    assert first.system == "salesforce" and first.object == "Lead"
    assert "attributes" not in first.fields
    assert first.fields["Email"] == "p0@example.com"
    assert first.fields["Status"] == "Open - Not Contacted"
    assert conn.usage.calls == {"queryAll": 1, "query_more": 2}  # queryAll: the deleted rows come along
    assert conn.usage.reported_used == 3
    assert conn.usage.reported_limit == 15_000


def test_2500_rows_sharing_one_system_modstamp_are_all_seen(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    ids = _seed(sf_sandbox.app, 2500, same_stamp=True)
    since = Cursor(T0, sorted(ids)[1234])  # a cursor in the middle of the tie run
    seen = _pull(conn, "Lead", since)
    assert sorted(r.id for r in seen) == sorted(ids)
    assert len(seen) == 2500


def test_incremental_pull_after_ten_changes_sees_those_ten(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    app = sf_sandbox.app
    ids = _seed(app, 500)
    cursor = max(r.cursor for r in _pull(conn, "Lead", None))
    changed = ids[100:110]
    for i in changed:
        app.modify("Lead", i, {"Status": "Working - Contacted"}, at=T0 + timedelta(hours=1))
    again = _pull(conn, "Lead", cursor)
    # >= on the cursor's timestamp: the cursor's own record comes back too (harmless duplicate)
    assert {r.id for r in again} == set(changed) | {cursor.id}
    assert {r.fields["Status"] for r in again if r.id in changed} == {"Working - Contacted"}


def test_overlap_widens_the_window(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    ids = _seed(sf_sandbox.app, 10)
    since = Cursor(T0 + timedelta(seconds=9), ids[9])
    assert [r.id for r in _pull(conn, "Lead", since)] == ids[9:]
    late = list(conn.iter_changes("Lead", since, overlap=timedelta(seconds=3)))
    assert [r.id for p in late for r in p.records] == ids[6:]


def test_a_no_change_cycle_costs_one_query_per_object(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    app = sf_sandbox.app
    lead = _seed(app, 3)[0]
    app.convert_lead(lead, at=T0 + timedelta(minutes=1))
    app.log_task(lead, at=T0 + timedelta(minutes=2))
    cursors = {obj: max(r.cursor for r in _pull(conn, obj, None)) for obj in conn.objects()}
    before = sf_sandbox.server.request_count()
    calls_before = conn.usage.total
    for obj in conn.objects():
        records = _pull(conn, obj, cursors[obj])
        assert {r.id for r in records} == {cursors[obj].id}
    assert sf_sandbox.server.request_count() - before == len(FIELDS) == 4
    assert conn.usage.total - calls_before == 4


def test_a_503_is_ridden_out(sf_sandbox: SalesforceSandbox, conn: SalesforceConnector) -> None:
    ids = _seed(sf_sandbox.app, 5)
    sf_sandbox.server.inject("server_error", count=2, endpoint="query")
    assert [r.id for r in _pull(conn, "Lead", None)] == ids
    assert conn.usage.calls["queryAll"] == 3


def test_a_burst_of_faults_mid_pull_loses_and_repeats_nothing(
    sf_sandbox: SalesforceSandbox,
) -> None:
    ids = _seed(sf_sandbox.app, 4500)
    server = sf_sandbox.server
    server.inject("delay", endpoint="query", delay=1.5)  # past the client timeout
    server.inject("drop", endpoint="query_more")
    server.inject("server_error", count=2, endpoint="query_more", status=500)
    server.inject("server_error", count=1, endpoint="query_more", status=503)
    conn = _connector(sf_sandbox, timeout=0.5)
    try:
        records = _pull(conn, "Lead", None)
    finally:
        conn.close()
    assert [r.id for r in records] == ids
    assert conn.usage.calls == {"queryAll": 2, "query_more": 6}


def test_expired_session_is_an_auth_error(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    sf_sandbox.app.expire_sessions()
    with pytest.raises(AuthError, match="INVALID_SESSION_ID"):
        _pull(conn, "Lead", None)
    assert sf_sandbox.server.request_count("query") == 1  # never retried


def test_spent_budget_is_budget_exhausted_with_a_clear_message(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    _seed(sf_sandbox.app, 3)
    sf_sandbox.app.daily_budget = 1
    _pull(conn, "Lead", None)
    with pytest.raises(BudgetExhausted) as exc:
        _pull(conn, "Lead", None)
    message = str(exc.value)
    assert "REQUEST_LIMIT_EXCEEDED" in message
    assert "1/1" in message  # the last usage Salesforce reported
    assert "no Retry-After" in message
    assert sf_sandbox.server.request_count("query") == 2  # not hammered with retries
    assert conn.usage.rate_limited == {"queryAll": 1}


def test_fetch_and_find_by_email(sf_sandbox: SalesforceSandbox, conn: SalesforceConnector) -> None:
    app = sf_sandbox.app
    ids = _seed(app, 450)
    app.modify("Lead", ids[7], {"Email": "Mixed.Case@Example.COM"})
    got = conn.fetch("Lead", [ids[7], ids[3], "00Q5e0000000000ZZZ", *ids[200:430]])
    assert {r.id for r in got} == {ids[7], ids[3], *ids[200:430]}
    assert conn.usage.calls["query"] == 2  # 232 ids in chunks of 200
    found = conn.find_by_email(
        "Lead", ["mixed.case@example.com", "p9@example.com", "nobody@example.com"]
    )
    assert {r.id for r in found} == {ids[7], ids[9]}


def test_write_reports_per_record_results(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    app = sf_sandbox.app
    ids = _seed(app, 4)
    sf_sandbox.server.inject("partial", endpoint="collections.update", ids=[ids[2]])
    results = conn.write(
        "Lead",
        [
            FieldUpdate(
                "k0", ids[0], {"Status": "Returned - Not Ready", "Return_Reason__c": "not ready"}
            ),
            FieldUpdate("k1", ids[1], {"Status": "Maybe"}),
            FieldUpdate("k2", ids[2], {"Lifecycle_Stage__c": "MQL"}),
            FieldUpdate(
                "k3", ids[3], {"Lifecycle_Stage__c": "SQL"}, clear_first=("Lifecycle_Stage__c",)
            ),
        ],
    )
    assert [(r.key, r.ok, r.record_id) for r in results] == [
        ("k0", True, ids[0]),
        ("k1", False, ids[1]),
        ("k2", False, ids[2]),
        ("k3", True, ids[3]),
    ]
    assert results[1].error is not None
    assert results[1].error.startswith("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST")
    assert not results[1].retriable
    assert results[2].error is not None and results[2].error.startswith("UNABLE_TO_LOCK_ROW")
    assert results[2].retriable
    assert app.get("Lead", ids[0])["Status"] == "Returned - Not Ready"
    assert app.get("Lead", ids[3])["Lifecycle_Stage__c"] == "SQL"
    assert conn.usage.calls == {"collections.update": 1}


def test_write_sends_200_per_call(sf_sandbox: SalesforceSandbox, conn: SalesforceConnector) -> None:
    ids = _seed(sf_sandbox.app, 450)
    results = conn.write(
        "Lead", [FieldUpdate(f"k{i}", rid, {"Lead_Score__c": 42}) for i, rid in enumerate(ids)]
    )
    assert len(results) == 450 and all(r.ok for r in results)
    assert [r.key for r in results] == [f"k{i}" for i in range(450)]
    assert conn.usage.calls == {"collections.update": 3}
    assert {r["Lead_Score__c"] for r in sf_sandbox.app.all("Lead")} == {42.0}


def test_create_returns_new_ids(sf_sandbox: SalesforceSandbox, conn: SalesforceConnector) -> None:
    results = conn.create(
        "Lead",
        [
            RecordCreate(
                "h1",
                {
                    "LastName": "New",
                    "Company": "Co",
                    "Email": "new@example.com",
                    "Lifecycle_Stage__c": "MQL",
                },
            ),
            RecordCreate("h2", {"LastName": "No company"}),
        ],
    )
    assert [(r.key, r.ok) for r in results] == [("h1", True), ("h2", False)]
    assert results[0].record_id is not None
    assert sf_sandbox.app.get("Lead", results[0].record_id)["Email"] == "new@example.com"
    assert results[1].error is not None and "REQUIRED_FIELD_MISSING" in results[1].error


def test_allowed_values_come_from_describe(conn: SalesforceConnector) -> None:
    allowed = conn.allowed_values()
    assert "Returned - Not Ready" in allowed[("Lead", "Status")]
    assert allowed[("Contact", "Lead_Type__c")] == [
        "New Business",
        "Existing Customer",
        "Maintenance",
    ]
    assert "On Hold" in allowed[("Opportunity", "StageName")]
    assert allowed[("Task", "Type")] == ["Call", "Email", "Meeting", "Other"]
    assert ("Lead", "Email") not in allowed  # not a picklist
    assert conn.usage.calls == {"describe": 4}


class _LoopingApp(SalesforceApp):
    """A broken peer whose query locator never advances."""

    def _query_more(self, token: str) -> dict[str, Any]:
        page = super()._query_more(token)
        page["done"] = False
        page["nextRecordsUrl"] = f"/services/data/v59.0/query/{token}"
        return page


def test_a_repeated_query_locator_is_refused(sf_sandbox: SalesforceSandbox) -> None:
    app = _LoopingApp()
    _seed(app, 2500)
    ctx = sf_sandbox.server._ssl
    server = SimServer(app, ssl_context=ctx).start()
    conn = SalesforceConnector(
        server.url, "sandbox-session", ca_bundle=sf_sandbox.ca_path, fields=FIELDS, retry=FAST
    )
    try:
        with pytest.raises(FatalError, match="repeated"):
            _pull(conn, "Lead", None)
    finally:
        conn.close()
        server.stop()


def test_a_dropped_update_is_retried_but_a_dropped_create_is_not(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    ids = _seed(sf_sandbox.app, 2)
    sf_sandbox.server.inject("drop", endpoint="collections.update")
    results = conn.write("Lead", [FieldUpdate("k", ids[0], {"Lead_Score__c": 7})])
    assert results[0].ok
    assert sf_sandbox.app.get("Lead", ids[0])["Lead_Score__c"] == 7.0
    assert conn.usage.calls == {"collections.update": 2}
    # a lost create answer may hide an applied create: surface it, never silently duplicate
    sf_sandbox.server.inject("drop", endpoint="collections.create")
    with pytest.raises(RetriableError):
        conn.create("Lead", [RecordCreate("h", {"LastName": "N", "Company": "C"})])
    assert conn.usage.calls["collections.create"] == 1


def test_a_5xx_answer_to_a_create_is_surfaced_not_resent_but_an_update_is_retried(
    sf_sandbox: SalesforceSandbox, conn: SalesforceConnector
) -> None:
    ids = _seed(sf_sandbox.app, 1)
    sf_sandbox.server.inject("server_error", count=1, endpoint="collections.update", status=500)
    assert conn.write("Lead", [FieldUpdate("k", ids[0], {"Lead_Score__c": 9})])[0].ok
    assert conn.usage.calls == {"collections.update": 2}  # an update is idempotent: sent again
    # a 500 does not say whether the create was applied: sending it again could duplicate the Lead
    sf_sandbox.server.inject("server_error", count=1, endpoint="collections.create", status=500)
    with pytest.raises(RetriableError, match="500"):
        conn.create("Lead", [RecordCreate("h", {"LastName": "N", "Company": "C"})])
    assert conn.usage.calls["collections.create"] == 1
