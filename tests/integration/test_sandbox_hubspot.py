"""The HubSpot sandbox through the unmodified hubspot-api-client 12 over TLS."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import urllib3
from hubspot import HubSpot
from hubspot.crm.contacts import ApiException as ContactsApiException
from hubspot.crm.contacts.exceptions import UnauthorizedException
from hubspot.crm.deals import ApiException as DealsApiException
from urllib3.util.retry import Retry

if TYPE_CHECKING:  # the fixture's type; pytest provides the object
    from tests.integration.conftest import HubSpotSandbox

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NO_RETRY = Retry(total=0, raise_on_status=False)


def client(sb: HubSpotSandbox, token: str | None = None) -> HubSpot:
    return HubSpot(
        access_token=token or sb.token, host=sb.url, ssl_ca_cert=sb.ca_path, retry=NO_RETRY
    )


def ms(dt: datetime) -> str:
    return str(int(dt.timestamp() * 1000))


def search(hs: HubSpot, obj: str = "contacts", **body: Any) -> Any:
    api = hs.crm.contacts.search_api if obj == "contacts" else hs.crm.deals.search_api
    return api.do_search({"limit": 200, **body})


def error_body(exc: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


# ---------------------------------------------------------------- objects
def test_create_get_update_list_shapes(hubspot_sandbox: HubSpotSandbox) -> None:
    hs = client(hubspot_sandbox)
    created = hs.crm.contacts.basic_api.create(
        {"properties": {"email": "a@example.com", "lifecyclestage": "lead", "hubspotscore": 35}}
    )
    assert created is not None  # a 200 instead of 201 would deserialise to None
    assert created.properties["hs_object_id"] == created.id
    assert created.properties["lastmodifieddate"] is not None
    assert created.created_at.tzinfo is not None
    got = hs.crm.contacts.basic_api.get_by_id(created.id, properties=["hubspotscore", "company"])
    assert got.properties == {"hubspotscore": "35", "company": None}
    updated = hs.crm.contacts.basic_api.update(created.id, {"properties": {"company": "Acme"}})
    assert updated is not None and updated.properties["company"] == "Acme"
    assert updated.updated_at >= created.updated_at
    page = hs.crm.contacts.basic_api.get_page(limit=10, properties=["email"], archived=False)
    assert [o.id for o in page.results] == [created.id] and page.paging is None


def test_list_pages_to_the_end_with_the_client_helper(hubspot_sandbox: HubSpotSandbox) -> None:
    for i in range(250):
        hubspot_sandbox.app.add("contacts", {"email": f"p{i}@example.com"})
    hs = client(hubspot_sandbox)
    everyone = hs.crm.contacts.get_all(properties=["email"])
    assert len(everyone) == 250
    assert hubspot_sandbox.server.request_count("contacts.list") == 3  # pages of 100
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.basic_api.get_page(limit=101)
    assert e.value.status == 400


def test_every_write_moves_the_modified_stamps(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    rid = app.add("deals", {"dealname": "Acme", "dealstage": "qualifiedtobuy"}, at=T0)
    assert app.get("deals", rid)["hs_lastmodifieddate"] == "2025-03-01T12:00:00.000Z"
    app.modify("deals", rid, {"amount": "10"}, at=T0 + timedelta(seconds=5))
    assert app.get("deals", rid)["hs_lastmodifieddate"] == "2025-03-01T12:00:05.000Z"
    deal = client(hubspot_sandbox).crm.deals.basic_api.update(rid, {"properties": {"amount": "20"}})
    assert deal.updated_at > T0 + timedelta(seconds=5)
    assert deal.properties["hs_lastmodifieddate"] == app.get("deals", rid)["hs_lastmodifieddate"]


def test_enumeration_values_are_validated(hubspot_sandbox: HubSpotSandbox) -> None:
    rid = hubspot_sandbox.app.add("contacts", {"email": "a@example.com"})
    hs = client(hubspot_sandbox)
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.basic_api.update(rid, {"properties": {"hs_lead_status": "FOO"}})
    body = error_body(e.value)
    assert e.value.status == 400 and body["category"] == "VALIDATION_ERROR"
    assert "hs_lead_status" in body["message"] and "INVALID_OPTION" in body["message"]
    with pytest.raises(DealsApiException) as e2:
        hs.crm.deals.basic_api.create({"properties": {"dealstage": "nope"}})
    assert e2.value.status == 400 and "dealstage" in error_body(e2.value)["message"]
    with pytest.raises(ValueError, match="syncd_lead_type"):
        hubspot_sandbox.app.add("contacts", {"syncd_lead_type": "other"})
    hubspot_sandbox.app.modify("contacts", rid, {"syncd_lead_type": "maintenance"})


def test_backwards_lifecyclestage_is_silently_ignored_and_clear_then_set_works(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    app = hubspot_sandbox.app
    rid = app.add("contacts", {"email": "a@example.com", "lifecyclestage": "salesqualifiedlead"})
    hs = client(hubspot_sandbox)
    res = hs.crm.contacts.basic_api.update(
        rid, {"properties": {"lifecyclestage": "lead", "hs_lead_status": "BAD_TIMING"}}
    )
    assert res is not None  # accepted: 200
    assert app.get("contacts", rid)["lifecyclestage"] == "salesqualifiedlead"
    assert app.get("contacts", rid)["hs_lead_status"] == "BAD_TIMING"
    hs.crm.contacts.basic_api.update(rid, {"properties": {"lifecyclestage": "customer"}})
    assert app.get("contacts", rid)["lifecyclestage"] == "customer"  # forward moves apply
    hs.crm.contacts.batch_api.update(
        {"inputs": [{"id": rid, "properties": {"lifecyclestage": ""}}]}
    )
    got = hs.crm.contacts.basic_api.get_by_id(rid, properties=["lifecyclestage"])
    assert got.properties["lifecyclestage"] is None
    hs.crm.contacts.batch_api.update(
        {"inputs": [{"id": rid, "properties": {"lifecyclestage": "lead"}}]}
    )
    assert app.get("contacts", rid)["lifecyclestage"] == "lead"
    assert [w["properties"] for w in app.write_log] == [
        {"lifecyclestage": "lead", "hs_lead_status": "BAD_TIMING"},
        {"lifecyclestage": "customer"},
        {"lifecyclestage": ""},
        {"lifecyclestage": "lead"},
    ]
    assert [w["endpoint"] for w in app.write_log][-1] == "contacts.batch_update"


# ---------------------------------------------------------------- search
def test_search_filters_sort_and_paging(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    ids = [
        app.add(
            "contacts",
            {
                "email": f"P{i}@Example.com",
                "hubspotscore": str(i * 10),
                "lifecyclestage": "lead" if i % 2 else "subscriber",
            },
            at=T0 + timedelta(minutes=i),
        )
        for i in range(10)
    ]
    hs = client(hubspot_sandbox)
    mod = "lastmodifieddate"

    def ids_of(filters: list[dict[str, Any]], **kw: Any) -> list[str]:
        return [o.id for o in search(hs, filterGroups=[{"filters": filters}], **kw).results]

    assert (
        ids_of(
            [{"propertyName": mod, "operator": "GTE", "value": ms(T0 + timedelta(minutes=7))}],
            sorts=[{"propertyName": mod, "direction": "ASCENDING"}],
        )
        == ids[7:]
    )
    assert (
        ids_of(
            [
                {
                    "propertyName": mod,
                    "operator": "BETWEEN",
                    "value": ms(T0),
                    "highValue": ms(T0 + timedelta(minutes=2)),
                }
            ]
        )
        == ids[:3]
    )
    assert ids_of([{"propertyName": "hubspotscore", "operator": "GT", "value": "65"}]) == ids[7:]
    assert (
        ids_of(
            [
                {
                    "propertyName": "email",
                    "operator": "IN",
                    "values": ["p3@example.com", "p4@EXAMPLE.com"],
                }
            ]
        )
        == ids[3:5]
    )
    assert (
        ids_of(
            [
                {"propertyName": "lifecyclestage", "operator": "NEQ", "value": "lead"},
                {"propertyName": "hubspotscore", "operator": "LTE", "value": "20"},
            ]
        )
        == ids[0:3:2]
    )
    assert ids_of([{"propertyName": "company", "operator": "NOT_HAS_PROPERTY"}]) == ids
    assert (
        ids_of(
            [{"propertyName": "email", "operator": "HAS_PROPERTY"}],
            sorts=[{"propertyName": "hubspotscore", "direction": "DESCENDING"}],
        )
        == ids[::-1]
    )
    ored = search(
        hs,
        filterGroups=[
            {"filters": [{"propertyName": "hs_object_id", "operator": "EQ", "value": ids[1]}]},
            {
                "filters": [
                    {"propertyName": "hs_object_id", "operator": "NOT_IN", "values": ids[1:]}
                ]
            },
        ],
    )
    assert sorted(o.id for o in ored.results) == [ids[0], ids[1]]
    first = search(hs, limit=4, sorts=[{"propertyName": mod, "direction": "ASCENDING"}])
    assert first.total == 10 and first.paging.next.after == "4"
    last = search(hs, limit=4, after="8", sorts=[{"propertyName": mod, "direction": "ASCENDING"}])
    assert [o.id for o in last.results] == ids[8:] and last.paging is None


def test_search_caps(hubspot_sandbox: HubSpotSandbox) -> None:
    hs = client(hubspot_sandbox)
    with pytest.raises(ContactsApiException) as e:
        search(hs, limit=201)
    assert e.value.status == 400
    with pytest.raises(ContactsApiException) as e:
        search(hs, after="10000")
    assert e.value.status == 400
    assert search(hs, after="9800").results == []


def test_search_responses_carry_no_rate_limit_headers(hubspot_sandbox: HubSpotSandbox) -> None:
    hs = client(hubspot_sandbox)
    _, _, headers = hs.crm.contacts.search_api.do_search_with_http_info(
        {"limit": 1}, _return_http_data_only=False
    )
    assert "X-HubSpot-RateLimit-Max" not in headers
    _, _, headers = hs.crm.contacts.basic_api.get_page_with_http_info(_return_http_data_only=False)
    assert headers["X-HubSpot-RateLimit-Max"] == "190"
    assert headers["X-HubSpot-RateLimit-Daily-Remaining"] == str(1_000_000 - 2)


# ---------------------------------------------------------------- batch
def test_batch_read_update_create(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    ids = [app.add("contacts", {"email": f"p{i}@example.com"}) for i in range(3)]
    hs = client(hubspot_sandbox)
    read = hs.crm.contacts.batch_api.read(
        {
            "inputs": [{"id": ids[0]}, {"id": "999"}],
            "properties": ["email"],
            "propertiesWithHistory": [],
        }
    )
    assert [o.id for o in read.results] == [ids[0]]
    assert read.num_errors == 1 and read.errors[0].category == "OBJECT_NOT_FOUND"
    assert read.errors[0].context == {"ids": ["999"]}
    up = hs.crm.contacts.batch_api.update(
        {"inputs": [{"id": i, "properties": {"hs_lead_status": "OPEN"}} for i in ids]}
    )
    assert up.status == "COMPLETE" and {o.id for o in up.results} == set(ids)
    assert not getattr(up, "errors", None)
    made = hs.crm.deals.batch_api.create(
        {
            "inputs": [
                {"properties": {"dealname": f"d{i}", "dealstage": "closedwon"}, "associations": []}
                for i in range(2)
            ]
        }
    )
    assert made is not None and len(made.results) == 2  # 201 deserialised
    assert all(app.get("deals", o.id)["pipeline"] == "default" for o in made.results)
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.batch_api.update({"inputs": [{"id": ids[0], "properties": {}}] * 101})
    assert e.value.status == 400
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.batch_api.update(
            {
                "inputs": [
                    {"id": ids[0], "properties": {"hs_lead_status": "NEW"}},
                    {"id": ids[1], "properties": {"hs_lead_status": "WRONG"}},
                ]
            }
        )
    assert e.value.status == 400
    assert app.get("contacts", ids[0])["hs_lead_status"] == "OPEN"  # nothing applied


def test_partial_batch_failure(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    ids = [app.add("contacts", {"email": f"p{i}@example.com"}) for i in range(3)]
    hubspot_sandbox.server.inject("partial", endpoint="contacts.batch_update", ids=[ids[1]])
    hs = client(hubspot_sandbox)
    res = hs.crm.contacts.batch_api.update(
        {"inputs": [{"id": i, "properties": {"hs_lead_status": "OPEN"}} for i in ids]}
    )
    assert {o.id for o in res.results} == {ids[0], ids[2]}
    assert res.num_errors == 1 and res.errors[0].context == {"ids": [ids[1]]}
    assert "hs_lead_status" not in app.get("contacts", ids[1])
    assert [w["id"] for w in app.write_log] == [ids[0], ids[2]]


# ---------------------------------------------------------------- associations, metadata
def test_associations_v4_and_deal_modified_bump(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    c = app.add("contacts", {"email": "a@example.com"}, at=T0)
    d = app.add("deals", {"dealname": "Acme"}, at=T0)
    hs = client(hubspot_sandbox)
    made = hs.crm.associations.v4.basic_api.create(
        "contacts",
        c,
        "deals",
        d,
        [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 4}],
    )
    assert made is not None and made.to_object_id == d
    assert app.get("deals", d)["hs_lastmodifieddate"] > "2025-03-01T12:00:00.000Z"
    assert app.get("contacts", c)["lastmodifieddate"] == "2025-03-01T12:00:00.000Z"
    listed = hs.crm.associations.v4.basic_api.get_page("contacts", c, "deals", limit=500)
    assert [r.to_object_id for r in listed.results] == [d]
    assert listed.results[0].association_types[0].type_id == 4
    batch = hs.crm.associations.v4.batch_api.get_page(
        "deals", "contacts", {"inputs": [{"id": d}, {"id": "1"}]}
    )
    assert [(r._from.id, [t.to_object_id for t in r.to]) for r in batch.results] == [(d, [c])]
    assert batch.num_errors == 1


def test_properties_and_pipelines(hubspot_sandbox: HubSpotSandbox) -> None:
    hs = client(hubspot_sandbox)
    props = {p.name: p for p in hs.crm.properties.core_api.get_all("contacts").results}
    for name in (
        "hubspotscore",
        "hs_lead_status",
        "lifecyclestage",
        "email",
        "hs_analytics_source",
        "recent_conversion_event_name",
        "recent_conversion_date",
        "syncd_return_reason",
        "syncd_lead_type",
    ):
        assert name in props
    stages = [
        o.value for o in sorted(props["lifecyclestage"].options, key=lambda o: o.display_order)
    ]
    assert stages.index("marketingqualifiedlead") + 1 == stages.index("salesacceptedlead")
    assert stages.index("salesacceptedlead") + 1 == stages.index("salesqualifiedlead")
    assert props["hubspotscore"].type == "number"
    assert hs.crm.properties.core_api.get_by_name("deals", "dealstage").type == "enumeration"
    pipeline = hs.crm.pipelines.pipelines_api.get_all("deals").results[0]
    assert pipeline.id == "default" and pipeline.label == "Sales Pipeline"
    meta = {s.id: s.metadata for s in pipeline.stages}
    assert meta["closedwon"] == {"isClosed": "true", "probability": "1.0"}
    assert meta["onhold"] == {"isClosed": "false", "probability": "0.0"}
    assert meta["appointmentscheduled"]["probability"] == "0.2"


# ---------------------------------------------------------------- auth, budget, faults
def test_bad_token_gets_invalid_authentication(hubspot_sandbox: HubSpotSandbox) -> None:
    with pytest.raises(UnauthorizedException) as e:
        client(hubspot_sandbox, token="nope").crm.contacts.basic_api.get_page()
    assert error_body(e.value)["category"] == "INVALID_AUTHENTICATION"


def test_expired_session_fault(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.server.inject("expired_session", endpoint="contacts.list")
    with pytest.raises(UnauthorizedException) as e:
        client(hubspot_sandbox).crm.contacts.basic_api.get_page()
    assert error_body(e.value)["category"] == "EXPIRED_AUTHENTICATION"


def test_rate_limit_fault_has_the_real_body_and_retry_after(
    hubspot_sandbox: HubSpotSandbox,
) -> None:
    hubspot_sandbox.server.inject("rate_limit", endpoint="contacts.search", retry_after=2)
    hubspot_sandbox.server.inject("rate_limit", endpoint="contacts.search")
    hs = client(hubspot_sandbox)
    with pytest.raises(ContactsApiException) as e:
        search(hs)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "2"
    body = error_body(e.value)
    assert body["policyName"] == "TEN_SECONDLY_ROLLING" and body["errorType"] == "RATE_LIMIT"
    with pytest.raises(ContactsApiException) as e:
        search(hs)
    assert e.value.status == 429 and "Retry-After" not in e.value.headers
    assert search(hs).total == 0


def test_daily_budget(hubspot_sandbox: HubSpotSandbox) -> None:
    hubspot_sandbox.app.daily_limit = 1
    hs = client(hubspot_sandbox)
    hs.crm.contacts.basic_api.get_page()
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.basic_api.get_page()
    assert e.value.status == 429 and error_body(e.value)["policyName"] == "DAILY"


def test_server_error_delay_and_drop_faults(hubspot_sandbox: HubSpotSandbox) -> None:
    sb = hubspot_sandbox
    hs = client(sb)
    sb.server.inject("server_error", endpoint="contacts.search", status=503)
    with pytest.raises(ContactsApiException) as e:
        search(hs)
    assert e.value.status == 503 and error_body(e.value)["status"] == "error"
    sb.server.inject("delay", endpoint="contacts.search", delay=1.0)
    with pytest.raises(urllib3.exceptions.HTTPError):
        hs.crm.contacts.search_api.do_search({"limit": 1}, _request_timeout=0.3)
    sb.server.inject("drop", endpoint="contacts.search")
    with pytest.raises(urllib3.exceptions.HTTPError):
        search(hs)
    assert search(hs).total == 0
    assert sb.server.request_count("contacts.search") == 4


def test_ground_truth_api_is_not_api_traffic(hubspot_sandbox: HubSpotSandbox) -> None:
    app = hubspot_sandbox.app
    c = app.add("contacts", {"email": "a@example.com"}, record_id="5000")
    d = app.add("deals", {"dealname": "x"})
    app.modify("contacts", c, {"firstname": "Ann"})
    app.associate(c, d)
    assert c == "5000" and app.get("contacts", c)["firstname"] == "Ann"
    assert [r["hs_object_id"] for r in app.all("contacts")] == ["5000"]
    assert app.write_log == [] and app.daily_used == 0
    assert hubspot_sandbox.server.request_count() == 0


def test_archived_records_leave_search_and_list(hubspot_sandbox: HubSpotSandbox) -> None:
    keep = hubspot_sandbox.app.add("contacts", {"email": "a@example.com"})
    gone = hubspot_sandbox.app.add("contacts", {"email": "b@example.com"})
    hs = client(hubspot_sandbox)
    hs.crm.contacts.basic_api.archive(gone)
    assert [o.id for o in search(hs).results] == [keep]
    assert [o.id for o in hs.crm.contacts.basic_api.get_page().results] == [keep]
    archived = hs.crm.contacts.basic_api.get_page(archived=True).results
    assert [o.id for o in archived] == [gone] and archived[0].archived is True
    with pytest.raises(ContactsApiException) as e:
        hs.crm.contacts.basic_api.get_by_id(gone)
    assert e.value.status == 404
