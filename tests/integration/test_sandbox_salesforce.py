"""The Salesforce simulator, driven by the real simple-salesforce over HTTPS on 127.0.0.1."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests
from conftest_salesforce import SalesforceSandbox
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def _lead(i: int, **kw: object) -> dict[str, object]:
    return {"LastName": f"Last{i}", "Company": f"Co{i}", "Email": f"p{i}@example.com", **kw}


def _code(exc: pytest.ExceptionInfo[Exception]) -> str:
    content = exc.value.content  # type: ignore[attr-defined]
    return str(content[0]["errorCode"])


def test_query_pages_through_locators_to_the_end(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    ids = [
        sf_sandbox.app.insert("Lead", _lead(i), at=T0 + timedelta(seconds=i)) for i in range(4500)
    ]
    first = sf.query("SELECT Id FROM Lead ORDER BY SystemModstamp, Id")
    assert first["totalSize"] == 4500
    assert first["done"] is False
    assert len(first["records"]) == 2000
    assert first["nextRecordsUrl"].startswith("/services/data/v59.0/query/01g")
    assert first["nextRecordsUrl"].endswith("-2000")
    everything = sf.query_all("SELECT Id FROM Lead ORDER BY SystemModstamp, Id")
    assert [r["Id"] for r in everything["records"]] == ids
    assert sf_sandbox.server.request_count("query_more") == 2
    more = sf.query_more(first["nextRecordsUrl"], identifier_is_url=True)
    assert [r["Id"] for r in more["records"]] == ids[2000:4000]


def test_batch_size_header_is_honoured_within_200_to_2000(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    for i in range(450):
        sf_sandbox.app.insert("Lead", _lead(i))
    page = sf.query("SELECT Id FROM Lead", headers={"Sforce-Query-Options": "batchSize=200"})
    assert len(page["records"]) == 200
    page = sf.query("SELECT Id FROM Lead", headers={"Sforce-Query-Options": "batchSize=50"})
    assert len(page["records"]) == 200  # clamped to the documented minimum


def test_query_all_uses_query_all_path(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    sf_sandbox.app.insert("Lead", _lead(1))
    assert sf.query_all("SELECT Id FROM Lead", include_deleted=True)["totalSize"] == 1


def test_where_clauses_filter_like_salesforce(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    app = sf_sandbox.app
    a = app.insert("Lead", _lead(1, Email="Ann@Example.com", Lead_Score__c=40), at=T0)
    b = app.insert("Lead", _lead(2, LeadSource="Web", Lead_Score__c=70), at=T0 + timedelta(hours=1))
    c = app.insert("Lead", _lead(3, Status="Working - Contacted"), at=T0 + timedelta(hours=2))

    def ids(where: str, order: str = " ORDER BY SystemModstamp, Id") -> list[str]:
        return [
            r["Id"] for r in sf.query_all(f"SELECT Id FROM Lead WHERE {where}{order}")["records"]
        ]

    assert ids("Email = 'ann@example.com'") == [a]  # = is case-insensitive on strings
    assert ids("Email IN ('ANN@EXAMPLE.COM', 'p3@example.com')") == [a, c]
    assert ids("SystemModstamp >= 2024-01-02T04:04:05Z") == [b, c]
    assert ids("SystemModstamp > 2024-01-02T05:04:05+02:00") == [b, c]  # 03:04:05 UTC, strict
    assert ids("LastModifiedDate < 2024-01-02T04:04:05.000+0000") == [a]
    assert ids("Lead_Score__c >= 50 OR (Status = 'Working - Contacted' AND LeadSource = NULL)") == [
        b,
        c,
    ]
    assert ids("NOT Lead_Score__c = 40 AND Lead_Score__c != NULL") == [b]
    assert ids(f"Id IN ('{c}', '{a}')") == [a, c]
    assert ids("Company LIKE 'co_'") == [a, b, c]
    assert ids("Id != NULL", " ORDER BY Lead_Score__c DESC, Id LIMIT 2") == [b, a]
    assert ids("IsConverted = false", " ORDER BY CreatedDate DESC") == [c, b, a]


def test_many_rows_can_share_one_system_modstamp(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    for i in range(30):
        sf_sandbox.app.insert("Lead", _lead(i), at=T0)
    rows = sf.query_all("SELECT Id, SystemModstamp FROM Lead")["records"]
    assert {r["SystemModstamp"] for r in rows} == {"2024-01-02T03:04:05.000+0000"}


@pytest.mark.parametrize(
    ("soql", "code"),
    [
        ("SELECT Id FROM Lead WHERE", "MALFORMED_QUERY"),
        ("SELECT Id FROM Lead GROUP BY Email", "MALFORMED_QUERY"),
        ("SELECT Nope FROM Lead", "INVALID_FIELD"),
        ("SELECT Id FROM Lead WHERE Nope__c = 1", "INVALID_FIELD"),
        ("SELECT Id FROM Lead ORDER BY Nope", "INVALID_FIELD"),
        ("SELECT Id FROM Lead WHERE SystemModstamp > '2024-01-01'", "INVALID_FIELD"),
        ("SELECT Id FROM Widget__c", "INVALID_TYPE"),
    ],
)
def test_bad_queries_get_salesforce_errors(sf: Salesforce, soql: str, code: str) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query(soql)
    assert _code(exc) == code


def test_stale_query_locator_is_invalid(sf: Salesforce) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query_more("/services/data/v59.0/query/01gXXXXXXXXXXXXXXX-2000", identifier_is_url=True)
    assert _code(exc) == "INVALID_QUERY_LOCATOR"


def test_get_update_create_single_records(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    created = sf.Lead.create(_lead(1, Lifecycle_Stage__c="MQL"))
    assert created["success"] is True
    lead_id = created["id"]
    assert len(lead_id) == 18 and lead_id.startswith("00Q")
    got = sf.Lead.get(lead_id)
    assert got["Status"] == "Open - Not Contacted"  # the default status
    assert got["IsConverted"] is False
    assert got["attributes"]["type"] == "Lead"
    assert (
        sf.Lead.update(lead_id, {"Status": "Returned - Not Ready", "Return_Reason__c": "no budget"})
        == 204
    )
    after = sf_sandbox.app.get("Lead", lead_id)
    assert (after["Status"], after["Return_Reason__c"]) == ("Returned - Not Ready", "no budget")
    assert after["SystemModstamp"] >= got["SystemModstamp"]
    assert [(w["endpoint"], w["id"]) for w in sf_sandbox.app.write_log] == [
        ("sobject.create", lead_id),
        ("sobject.update", lead_id),
    ]
    with pytest.raises(SalesforceResourceNotFound):
        sf.Lead.get("00Q5e0000000000ZZZ")


def test_update_of_a_converted_lead_is_refused(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    app = sf_sandbox.app
    lead_id = app.insert("Lead", _lead(1, Lifecycle_Stage__c="SQL", Lead_Score__c=80))
    conv = app.convert_lead(lead_id)
    lead = app.get("Lead", lead_id)
    assert lead["IsConverted"] is True
    assert lead["Status"] == "Closed - Converted"
    assert lead["ConvertedContactId"] == conv["contact_id"]
    assert lead["ConvertedOpportunityId"] == conv["opportunity_id"]
    contact = app.get("Contact", str(conv["contact_id"]))
    assert (contact["Email"], contact["Lifecycle_Stage__c"], contact["Lead_Score__c"]) == (
        "p1@example.com",
        "SQL",
        80.0,
    )
    opp = app.get("Opportunity", str(conv["opportunity_id"]))
    assert opp["ContactId"] == conv["contact_id"]
    assert (opp["IsClosed"], opp["IsWon"]) == (False, False)
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Lead.update(lead_id, {"Status": "Working - Contacted"})
    assert _code(exc) == "CANNOT_UPDATE_CONVERTED_LEAD"
    assert app.get("Lead", lead_id)["Status"] == "Closed - Converted"


def test_validation_errors(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    lead_id = sf_sandbox.app.insert("Lead", _lead(1))
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Lead.update(lead_id, {"Status": "Maybe Later"})
    assert _code(exc) == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert exc.value.content[0]["fields"] == ["Status"]  # type: ignore[attr-defined]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Lead.create({"LastName": "x"})
    assert _code(exc) == "REQUIRED_FIELD_MISSING"
    assert exc.value.content[0]["fields"] == ["Company"]  # type: ignore[attr-defined]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Lead.update(lead_id, {"IsConverted": True})
    assert _code(exc) == "INVALID_FIELD_FOR_INSERT_UPDATE"
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Lead.update(lead_id, {"Nope__c": 1})
    assert _code(exc) == "INVALID_FIELD"
    assert sf_sandbox.app.get("Lead", lead_id)["Status"] == "Open - Not Contacted"


def test_opportunity_flags_follow_the_stage(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    opp = sf.Opportunity.create(
        {"Name": "Deal", "StageName": "On Hold", "CloseDate": "2024-03-31", "Amount": 1500}
    )["id"]
    assert sf_sandbox.app.get("Opportunity", opp)["IsClosed"] is False
    sf.Opportunity.update(opp, {"StageName": "Closed Won"})
    row = sf.Opportunity.get(opp)
    assert (row["IsClosed"], row["IsWon"], row["Probability"], row["Amount"]) == (
        True,
        True,
        100.0,
        1500.0,
    )


def _records(ids: list[str], **fields: object) -> list[dict[str, object]]:
    return [{"attributes": {"type": "Lead"}, "id": i, **fields} for i in ids]


def test_collections_update_partial_success_in_input_order(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    app = sf_sandbox.app
    ids = [app.insert("Lead", _lead(i)) for i in range(3)]
    records = _records(ids, Status="Working - Contacted")
    records[1]["Status"] = "Bogus"
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"allOrNone": False, "records": records}
    )
    assert [r["success"] for r in res] == [True, False, True]
    assert res[0]["id"] == ids[0]
    assert res[1]["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert [app.get("Lead", i)["Status"] for i in ids] == [
        "Working - Contacted",
        "Open - Not Contacted",
        "Working - Contacted",
    ]


def test_collections_all_or_none_rolls_everything_back(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    app = sf_sandbox.app
    ids = [app.insert("Lead", _lead(i)) for i in range(3)]
    records = _records(ids, Status="Working - Contacted")
    records[2]["id"] = "00QBAD"
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"allOrNone": True, "records": records}
    )
    assert [r["errors"][0]["statusCode"] for r in res] == [
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "MALFORMED_ID",
    ]
    assert {app.get("Lead", i)["Status"] for i in ids} == {"Open - Not Contacted"}
    records[2]["id"] = ids[2]
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"allOrNone": True, "records": records}
    )
    assert all(r["success"] for r in res)
    assert {app.get("Lead", i)["Status"] for i in ids} == {"Working - Contacted"}


def test_collections_limit_is_200_records(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    ids = [sf_sandbox.app.insert("Lead", _lead(i), at=T0) for i in range(201)]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.restful(
            "composite/sobjects", method="PATCH", json={"records": _records(ids, Lead_Score__c=5)}
        )
    assert _code(exc) == "EXCEEDED_ID_LIMIT"
    assert {r["Lead_Score__c"] for r in sf_sandbox.app.all("Lead")} == {None}
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"records": _records(ids[:200], Lead_Score__c=5)}
    )
    assert len(res) == 200 and all(r["success"] for r in res)


def test_collections_create(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    res = sf.restful(
        "composite/sobjects",
        method="POST",
        json={
            "allOrNone": False,
            "records": [
                {"attributes": {"type": "Lead"}, **_lead(1)},
                {"attributes": {"type": "Lead"}, "LastName": "no company"},
                {"attributes": {"type": "Contact"}, "LastName": "C", "Email": "c@example.com"},
            ],
        },
    )
    assert [r["success"] for r in res] == [True, False, True]
    assert res[1]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert sf_sandbox.app.get("Contact", res[2]["id"])["Email"] == "c@example.com"
    assert len(sf_sandbox.app.all("Lead")) == 1


def test_partial_fault_fails_only_the_named_ids(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    ids = [sf_sandbox.app.insert("Lead", _lead(i)) for i in range(3)]
    sf_sandbox.server.inject("partial", endpoint="collections.update", ids=[ids[1]])
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"records": _records(ids, Lead_Score__c=9)}
    )
    assert [r["success"] for r in res] == [True, False, True]
    assert res[1]["errors"][0]["statusCode"] == "UNABLE_TO_LOCK_ROW"
    res = sf.restful(
        "composite/sobjects", method="PATCH", json={"records": _records(ids, Lead_Score__c=9)}
    )
    assert all(r["success"] for r in res)  # the fault was used up


def test_describe_picklists(sf: Salesforce) -> None:
    fields = {f["name"]: f for f in sf.Lead.describe()["fields"]}
    status = fields["Status"]["picklistValues"]
    assert [p["value"] for p in status] == [
        "Open - Not Contacted",
        "Working - Contacted",
        "Closed - Converted",
        "Closed - Not Converted",
        "Returned - Not Ready",
    ]
    assert [p["value"] for p in status if p["defaultValue"]] == ["Open - Not Contacted"]
    assert [p["value"] for p in fields["Lifecycle_Stage__c"]["picklistValues"]] == [
        "Subscriber",
        "Lead",
        "MQL",
        "SAL",
        "SQL",
        "Opportunity",
        "Customer",
    ]
    assert [p["value"] for p in fields["Lead_Type__c"]["picklistValues"]] == [
        "New Business",
        "Existing Customer",
        "Maintenance",
    ]
    stages = [
        p["value"]
        for p in {f["name"]: f for f in sf.Opportunity.describe()["fields"]}["StageName"][
            "picklistValues"
        ]
    ]
    assert "On Hold" in stages and stages[-2:] == ["Closed Won", "Closed Lost"]
    task = {f["name"]: f for f in sf.restful("sobjects/Task/describe")["fields"]}
    assert [p["value"] for p in task["Type"]["picklistValues"]] == [
        "Call",
        "Email",
        "Meeting",
        "Other",
    ]


def test_stage_and_status_catalogues_are_queryable(sf: Salesforce) -> None:
    won = sf.query(
        "SELECT MasterLabel, IsWon, DefaultProbability FROM OpportunityStage WHERE IsClosed = true"
    )["records"]
    assert [(r["MasterLabel"], r["IsWon"]) for r in won] == [
        ("Closed Won", True),
        ("Closed Lost", False),
    ]
    conv = sf.query("SELECT MasterLabel FROM LeadStatus WHERE IsConverted = true")["records"]
    assert [r["MasterLabel"] for r in conv] == ["Closed - Converted"]
    default = sf.query("SELECT MasterLabel FROM LeadStatus WHERE IsDefault = true")["records"]
    assert [r["MasterLabel"] for r in default] == ["Open - Not Contacted"]


def test_usage_header_and_daily_budget(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    sf_sandbox.app.daily_budget = 3
    sf.query("SELECT Id FROM Lead")
    assert sf.api_usage["api-usage"].used == 1
    assert sf.api_usage["api-usage"].total == 3
    sf.query("SELECT Id FROM Lead")
    assert sf.limits()["DailyApiRequests"]["Remaining"] == 0
    assert sf.api_usage["api-usage"].used == 3
    with pytest.raises(SalesforceRefusedRequest) as exc:
        sf.query("SELECT Id FROM Lead")
    assert _code(exc) == "REQUEST_LIMIT_EXCEEDED"


def test_bad_session_is_401(sf_sandbox: SalesforceSandbox, sf: Salesforce) -> None:
    sf.query("SELECT Id FROM Lead")
    sf_sandbox.app.expire_sessions()
    with pytest.raises(SalesforceExpiredSession):
        sf.query("SELECT Id FROM Lead")


def test_injected_faults_answer_like_salesforce(
    sf_sandbox: SalesforceSandbox, sf: Salesforce
) -> None:
    server = sf_sandbox.server
    server.inject("rate_limit", endpoint="query")
    with pytest.raises(SalesforceRefusedRequest) as exc:
        sf.query("SELECT Id FROM Lead")
    assert _code(exc) == "REQUEST_LIMIT_EXCEEDED"
    server.inject("server_error", endpoint="query")
    with pytest.raises(SalesforceGeneralError) as gen:
        sf.query("SELECT Id FROM Lead")
    assert gen.value.status == 503
    assert gen.value.content[0]["errorCode"] == "SERVER_UNAVAILABLE"
    server.inject("expired_session", endpoint="query")
    with pytest.raises(SalesforceExpiredSession):
        sf.query("SELECT Id FROM Lead")
    server.inject("delay", endpoint="query", delay=1.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        sf.query("SELECT Id FROM Lead", timeout=0.2)
    server.inject("drop", endpoint="query")
    with pytest.raises(requests.exceptions.ConnectionError):
        sf.query("SELECT Id FROM Lead")
    assert sf.query("SELECT Id FROM Lead")["totalSize"] == 0  # faults used up, back to normal


def test_concurrent_clients_and_direct_writes_stay_consistent(
    sf_sandbox: SalesforceSandbox,
) -> None:
    import threading

    app = sf_sandbox.app
    ids = [app.insert("Lead", _lead(i)) for i in range(40)]
    errors: list[BaseException] = []

    def api_writer(part: list[str]) -> None:
        try:
            sf = sf_sandbox.client()
            for rid in part:
                sf.Lead.update(rid, {"Lead_Score__c": 1})
                sf.query("SELECT Id FROM Lead WHERE Lead_Score__c = 1")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def direct_writer() -> None:
        for i in range(200):
            app.insert("Task", {"WhoId": ids[i % 40], "Type": "Call", "Status": "Completed"})

    threads = [threading.Thread(target=api_writer, args=(ids[k::4],)) for k in range(4)]
    threads.append(threading.Thread(target=direct_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r["Lead_Score__c"] for r in app.all("Lead")} == {1.0}
    assert len(app.all("Task")) == 200
    assert len(app.write_log) == 40
    stamps = [(r["SystemModstamp"], r["Id"]) for r in app.all("Lead")]
    assert stamps == sorted(stamps)
