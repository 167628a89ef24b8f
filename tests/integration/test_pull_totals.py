"""Each page of a pull says how many records the whole pull reads (the progress display's total):
HubSpot's search ``total``, Salesforce's ``totalSize``, from the first answer, at no extra call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from syncd.connectors._retry import RetryPolicy
from syncd.connectors.hubspot import HubSpotConnector
from syncd.connectors.salesforce import SalesforceConnector
from syncd.model import Cursor

if TYPE_CHECKING:  # the fixtures' types; pytest provides the objects
    from tests.integration.conftest import HubSpotSandbox
    from tests.integration.conftest_salesforce import SalesforceSandbox

FAST = RetryPolicy(max_attempts=6, base=0.001, cap=0.01, max_retry_after=0.05)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _hubspot_with_contacts(sb: HubSpotSandbox, n: int) -> HubSpotConnector:
    """``n`` contacts modified a second apart from T0, and a connector to them."""
    for i in range(n):
        sb.app.add("contacts", {"email": f"t{i}@example.com", "lifecyclestage": "lead"}, at=T0 + timedelta(seconds=i))
    return HubSpotConnector(sb.url, sb.token, ca_bundle=sb.ca_path,
                            properties={"contacts": ["email", "lifecyclestage"], "deals": ["dealname"]}, retry=FAST)


def _salesforce_with_leads(sb: SalesforceSandbox, n: int) -> SalesforceConnector:
    """``n`` Leads modified a second apart from T0, and a connector to them."""
    for i in range(n):
        sb.app.insert("Lead", {"LastName": f"L{i}", "Company": "Co", "Email": f"p{i}@example.com"},
                      at=T0 + timedelta(seconds=i))
    return SalesforceConnector(sb.url, sb.session_id, ca_bundle=sb.ca_path,
                               fields={"Lead": ["Email", "Status"], "Contact": ["Email"], "Opportunity": ["Name"],
                                       "Task": ["WhoId"]}, retry=FAST)


def test_hubspot_pages_carry_the_search_total(hubspot_sandbox: HubSpotSandbox) -> None:
    c = _hubspot_with_contacts(hubspot_sandbox, 250)
    try:
        pages = list(c.iter_changes("contacts", None, overlap=timedelta(0)))
        assert len(pages) > 1 and {p.total for p in pages} == {250}
        calls = c.usage.total
        since = Cursor(T0 + timedelta(seconds=200), "")
        later = list(c.iter_changes("contacts", since, overlap=timedelta(0)))
        assert {p.total for p in later} == {sum(len(p.records) for p in later)} == {50}
        assert c.usage.total - calls == len(later)  # the total costs no extra call
    finally:
        c.close()


def test_two_interleaved_hubspot_pulls_on_one_connector_each_report_their_own_total(
        hubspot_sandbox: HubSpotSandbox) -> None:
    """A cycle's pull and a reconcile share the connector: each pull's pages say its own size."""
    c = _hubspot_with_contacts(hubspot_sandbox, 250)
    try:
        whole = c.iter_changes("contacts", None, overlap=timedelta(0))
        recent = c.iter_changes("contacts", Cursor(T0 + timedelta(seconds=200), ""), overlap=timedelta(0))
        first = [next(whole), next(recent)]  # both pulls have asked HubSpot once
        rest_whole, rest_recent = list(whole), list(recent)
        assert {p.total for p in [first[0], *rest_whole]} == {250}
        assert {p.total for p in [first[1], *rest_recent]} == {50}
        assert sum(len(p.records) for p in [first[0], *rest_whole]) == 250
    finally:
        c.close()


def test_salesforce_pages_carry_the_query_total_size(sf_sandbox: SalesforceSandbox) -> None:
    c = _salesforce_with_leads(sf_sandbox, 2100)
    try:
        pages = list(c.iter_changes("Lead", None, overlap=timedelta(0)))
        assert [len(p.records) for p in pages] == [2000, 100] and {p.total for p in pages} == {2100}
        assert c.usage.calls == {"queryAll": 1, "query_more": 1}
    finally:
        c.close()


def test_two_interleaved_salesforce_pulls_on_one_connector_each_report_their_own_total(
        sf_sandbox: SalesforceSandbox) -> None:
    """A service cycle's pull and a reconcile (or another thread) share the connector: each pull's
    pages say the size of that pull, whichever pull asked Salesforce last."""
    c = _salesforce_with_leads(sf_sandbox, 2100)
    try:
        whole = c.iter_changes("Lead", None, overlap=timedelta(0))
        recent = c.iter_changes("Lead", Cursor(T0 + timedelta(seconds=50), ""), overlap=timedelta(0))
        w1 = next(whole)    # the whole table's first query: 2100
        r1 = next(recent)   # the second pull asks afterwards: 2050
        c.fetch("Lead", [str(w1.records[0].id)])  # a lookup in between has a size of its own (1)
        w2 = next(whole)
        r2 = next(recent)
        assert [len(p.records) for p in (w1, w2)] == [2000, 100] and {w1.total, w2.total} == {2100}
        assert [len(p.records) for p in (r1, r2)] == [2000, 50] and {r1.total, r2.total} == {2050}
        assert next(whole, None) is None and next(recent, None) is None
    finally:
        c.close()
