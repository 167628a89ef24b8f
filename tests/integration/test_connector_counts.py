"""Counts, id pages and call arithmetic of both connectors, against the sandboxes through the real
clients: a count is one call (HubSpot search ``total`` with limit 1, SOQL ``COUNT()``), id pages
list every id once, and ``pull_calls`` is the number of requests a pull really makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from conftest_salesforce import SalesforceSandbox

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.hubspot import HubSpotConnector
from syncd.connectors.salesforce import SalesforceConnector
from syncd.sandbox import soql

if TYPE_CHECKING:
    from tests.integration.conftest import HubSpotSandbox

FAST = RetryPolicy(max_attempts=3, base=0.001, cap=0.01, max_retry_after=0.05)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _hubspot(sb: HubSpotSandbox) -> HubSpotConnector:
    return HubSpotConnector(sb.url, sb.token, ca_bundle=sb.ca_path, retry=FAST,
                            properties={"contacts": ["email"], "deals": ["dealname"]})


def _salesforce(sb: SalesforceSandbox) -> SalesforceConnector:
    return SalesforceConnector(sb.url, sb.session_id, ca_bundle=sb.ca_path, retry=FAST,
                               fields={"Lead": ["Email"], "Contact": ["Email"]})


def test_soql_count_parses() -> None:
    q = soql.parse("SELECT COUNT() FROM Lead WHERE SystemModstamp >= 2025-01-01T00:00:00Z")
    assert q.count and q.fields == () and q.sobject == "Lead"
    assert not soql.parse("SELECT Id FROM Lead").count


def test_hubspot_count_ids_and_pull_calls(hubspot_sandbox: HubSpotSandbox) -> None:
    ids = [hubspot_sandbox.app.add("contacts", {"email": f"p{i}@example.com"}, at=T0 + timedelta(minutes=i))
           for i in range(450)]
    c = _hubspot(hubspot_sandbox)
    server = hubspot_sandbox.server
    try:
        server.reset_counts()
        assert c.count("contacts") == 450
        assert c.count("contacts", since=T0 + timedelta(minutes=100)) == 350
        assert c.count("contacts", since=T0 + timedelta(minutes=100), until=T0 + timedelta(minutes=199)) == 100
        assert server.request_count() == 3  # one search (limit 1) each

        server.reset_counts()
        pages = list(c.iter_ids("contacts"))
        assert [i for p in pages for i, _ in p] == sorted(ids, key=int)
        assert pages[0][0][1] == T0  # with the modified time
        assert server.request_count() == len(pages) == 3

        server.reset_counts()
        list(c.iter_changes("contacts", None, overlap=timedelta(0)))
        assert server.request_count() == c.pull_calls("contacts", 450) == 3
    finally:
        c.close()


def test_hubspot_pull_calls_past_the_search_cap(hubspot_sandbox: HubSpotSandbox) -> None:
    for i in range(1100):
        hubspot_sandbox.app.add("contacts", {"email": f"p{i}@example.com"}, at=T0 + timedelta(seconds=i))
    c = _hubspot(hubspot_sandbox)
    c.search_cap = 500  # as the 10,000 cap, scaled down: windows restart from the last timestamp
    hubspot_sandbox.server.reset_counts()
    try:
        list(c.iter_changes("contacts", None, overlap=timedelta(0)))
        assert abs(hubspot_sandbox.server.request_count() - c.pull_calls("contacts", 1100)) <= 1
    finally:
        c.close()


def test_salesforce_count_ids_and_pull_calls(sf_sandbox: SalesforceSandbox) -> None:
    ids = [sf_sandbox.app.insert("Lead", {"LastName": f"L{i}", "Company": "Co"}, at=T0 + timedelta(minutes=i))
           for i in range(2300)]
    c = _salesforce(sf_sandbox)
    server = sf_sandbox.server
    try:
        server.reset_counts()
        assert c.count("Lead") == 2300
        assert c.count("Lead", since=T0 + timedelta(minutes=300)) == 2000
        assert c.count("Lead", until=T0 + timedelta(minutes=9)) == 10
        assert c.count("Contact") == 0
        assert server.request_count() == 4

        server.reset_counts()
        pages = list(c.iter_ids("Lead"))
        assert sorted(i for p in pages for i, _ in p) == sorted(ids)
        assert server.request_count() == len(pages) == 2  # query + one query_more (batches of 2,000)

        server.reset_counts()
        list(c.iter_changes("Lead", None, overlap=timedelta(0)))
        assert server.request_count() == c.pull_calls("Lead", 2300) == 2
    finally:
        c.close()
