"""Errors carry their system; the connectors share one copy of their resend rules.

The sandbox is the network peer (the real clients talk to it over TLS); nothing
here mocks a client library.
"""

from __future__ import annotations

import ast
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest
import structlog

from syncd import errors, logs
from syncd.connectors import _errors
from syncd.connectors._retry import RetryPolicy
from syncd.connectors.hubspot import HubSpotConnector, SearchPaginator
from syncd.connectors.salesforce import QueryLocatorPaginator, SalesforceConnector
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RecordError, RetriableError, SyncError
from syncd.model import RecordCreate
from syncd.sandbox._server import SimServer, make_tls
from syncd.sandbox.hubspot import HubSpotApp
from syncd.sandbox.salesforce import SalesforceApp

CONNECTORS = Path(__file__).resolve().parents[2] / "syncd" / "connectors"
FAST = RetryPolicy(max_attempts=3, base=0.001, cap=0.01, max_retry_after=0.01)
ERROR_CLASSES = {n for n in dir(errors) if isinstance(getattr(errors, n), type)
                 and issubclass(getattr(errors, n), SyncError)}


# ------------------------------------------------------------------------------ the classes

def test_every_error_takes_system_and_defaults_to_none() -> None:
    for name in ERROR_CLASSES - {"RecordError"}:
        cls = getattr(errors, name)
        assert cls("x").system is None
        assert cls("x", system="hubspot").system == "hubspot"
    e = RetriableError("x", status=503, retry_after=2.0, body="b", system="salesforce")
    assert (e.status, e.retry_after, e.body, e.system, str(e)) == (503, 2.0, "b", "salesforce", "x")
    assert RecordError("x").system == ""  # as before: a record's system, "" when not said
    r = RecordError("x", system="hubspot", object="contacts", record_id="1")
    assert (r.system, r.object, r.record_id) == ("hubspot", "contacts", "1")


def test_every_error_the_connectors_construct_names_its_system() -> None:
    """Each construction of a syncd error in connectors/ passes ``system=``."""
    seen, missing = 0, []
    for path in sorted(CONNECTORS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ERROR_CLASSES):
                seen += 1
                if not any(k.arg == "system" for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert seen > 20
    assert not missing


# ------------------------------------------------------------------------------ shared helpers

def test_a_create_that_may_have_been_applied_is_not_retried() -> None:
    calls = []

    def lost() -> None:
        calls.append(1)
        raise _errors.lost_answer(RetriableError("gone", system="hubspot"), idempotent=False)

    with pytest.raises(RetriableError, match="gone") as ei:
        _errors.call(FAST, "t", lost)
    assert len(calls) == 1 and ei.value.system == "hubspot"

    calls.clear()

    def flaky() -> None:
        calls.append(1)
        raise _errors.lost_answer(RetriableError("gone"), idempotent=True)

    with pytest.raises(RetriableError):
        _errors.call(FAST, "t", flaky)
    assert len(calls) == FAST.max_attempts


@pytest.mark.parametrize(("error", "idempotent", "applied"), [
    (RetriableError("x", status=503), False, True),
    (RetriableError("x", status=503), True, False),
    (RateLimited("x", status=429), False, False),
    (RetriableError("x"), False, False),
    (FatalError("x"), False, False),
])
def test_only_a_5xx_to_a_create_may_have_been_applied(error: Exception, idempotent: bool,
                                                       applied: bool) -> None:
    assert _errors.may_be_applied(error, idempotent=idempotent) is applied


# ------------------------------------------------------------------------------ paginators

def test_search_paginator_refuses_a_repeated_or_odd_after_and_stops_at_the_cap() -> None:
    p = SearchPaginator("contacts.search", page_size=10, cap=40)
    p.advance({"paging": {"next": {"after": "10"}}}, True)
    assert (p.after, p.done, p.capped) == (10, False, False)
    with pytest.raises(FatalError, match=r"paging loop \(after '10' repeated\)") as ei:
        p.advance({"paging": {"next": {"after": "10"}}}, True)
    assert ei.value.system == "hubspot"
    with pytest.raises(FatalError, match="non-numeric after 'x'"):
        p.advance({"paging": {"next": {"after": "x"}}}, True)
    p.advance({"paging": {"next": {"after": "35"}}}, True)  # 35 + 10 would pass the cap
    assert (p.done, p.capped) == (True, True)
    last = SearchPaginator("deals.search", 10, 40)
    last.advance({}, True)
    assert (last.done, last.capped) == (True, False)
    empty = SearchPaginator("deals.search", 10, 40)
    empty.advance({"paging": {"next": {"after": "10"}}}, False)
    assert (empty.done, empty.capped) == (True, False)


def test_query_locator_paginator_refuses_a_repeated_locator() -> None:
    p = QueryLocatorPaginator()
    assert p.next_url({"done": True}) is None
    assert p.next_url({"done": False, "nextRecordsUrl": "/q/1-200"}) == "/q/1-200"
    with pytest.raises(FatalError, match="refusing to loop") as ei:
        p.next_url({"done": False, "nextRecordsUrl": "/q/1-200"})
    assert ei.value.system == "salesforce"
    with pytest.raises(FatalError, match="without nextRecordsUrl"):
        p.next_url({"done": False})


# ------------------------------------------------------------------------------ against the sandbox

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str]:
    return make_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def hubspot_server(tls: tuple[object, str]) -> Iterator[tuple[SimServer, str]]:
    server = SimServer(HubSpotApp(token="t"), ssl_context=tls[0]).start()  # type: ignore[arg-type]
    try:
        yield server, tls[1]
    finally:
        server.stop()


@pytest.fixture
def salesforce_server(tls: tuple[object, str]) -> Iterator[tuple[SimServer, str]]:
    server = SimServer(SalesforceApp(session_ids=("s",)), ssl_context=tls[0]).start()  # type: ignore[arg-type]
    try:
        yield server, tls[1]
    finally:
        server.stop()


def _hubspot(server: SimServer, ca: str, token: str = "t") -> HubSpotConnector:
    return HubSpotConnector(server.url, token, ca_bundle=ca, properties={"contacts": ["email"]},
                            retry=FAST, timeout=5)


def _salesforce(server: SimServer, ca: str, session: str = "s") -> SalesforceConnector:
    return SalesforceConnector(server.url, session, ca_bundle=ca, fields={"Lead": ["Email"]},
                               retry=FAST, timeout=5)


def test_hubspot_errors_say_hubspot(hubspot_server: tuple[SimServer, str]) -> None:
    server, ca = hubspot_server
    with pytest.raises(AuthError) as auth:
        _hubspot(server, ca, token="wrong").fetch("contacts", ["1"])
    server.inject("rate_limit", count=5, endpoint="contacts.batch_read")
    with pytest.raises(RateLimited) as limited:
        _hubspot(server, ca).fetch("contacts", ["1"])
    server.inject("server_error", count=1, endpoint="contacts.batch_create")
    results = _hubspot(server, ca).create("contacts", [RecordCreate("k1", {"email": "a@example.com"})])
    assert results[0].retriable and not results[0].ok
    with pytest.raises(FatalError) as unconfigured:
        _hubspot(server, ca).fetch("deals", ["1"])
    assert [e.value.system for e in (auth, limited, unconfigured)] == ["hubspot"] * 3


def test_salesforce_errors_say_salesforce(salesforce_server: tuple[SimServer, str]) -> None:
    server, ca = salesforce_server
    with pytest.raises(AuthError) as auth:
        _salesforce(server, ca, session="wrong").fetch("Lead", ["00Q1"])
    server.inject("rate_limit", count=1, endpoint="query")
    with pytest.raises(BudgetExhausted) as spent:
        _salesforce(server, ca).fetch("Lead", ["00Q1"])
    with pytest.raises(FatalError) as unconfigured:
        _salesforce(server, ca).fetch("Task", ["00T1"])
    conn = _salesforce(server, ca)
    server.stop()
    with pytest.raises(RetriableError) as transport:
        conn.fetch("Lead", ["00Q1"])
    assert [e.value.system for e in (auth, spent, unconfigured, transport)] == ["salesforce"] * 4


# ------------------------------------------------------------------------------ transport failures

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_peer_address_is_host_and_port_with_the_schemes_default() -> None:
    assert _errors.Peer("hubspot", "https://api.hubapi.com", None, 5).address == "api.hubapi.com:443"
    assert _errors.Peer("hubspot", "http://127.0.0.1/x", None, 5).address == "127.0.0.1:80"
    assert _errors.Peer("salesforce", "https://[::1]:8443", None, 5).address == "[::1]:8443"


def test_a_salesforce_transport_failure_names_host_and_cause_never_the_query_or_its_emails() -> None:
    """A closed port under a query that carries emails (find_by_email: the SOQL is in the URL)."""
    port = _closed_port()
    conn = SalesforceConnector(f"https://127.0.0.1:{port}", "s", ca_bundle=None, fields={"Lead": ["Email"]},
                               retry=FAST, timeout=5)
    out = io.StringIO()
    saved = structlog.get_config()
    logs.configure(level="warning", fmt="json", stream=out)
    try:
        with pytest.raises(RetriableError) as ei:
            conn.find_by_email("Lead", ["jane.doe@example.com", "o'brien+x@example.org"])
    finally:
        structlog.configure(**saved)
    msg = str(ei.value)
    assert msg == f"salesforce query: 127.0.0.1:{port}: connection refused (nothing listens there)"  # a look-up
    retries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in retries] == ["retrying", "retrying"]
    assert all(r["error"] == msg for r in retries)
    for text in (msg, out.getvalue()):
        for leak in ("SELECT", "jane", "%40", "ConnectionError", "HTTPSConnectionPool", "RetriableError"):
            assert leak not in text


def test_a_hubspot_transport_failure_names_host_and_cause() -> None:
    port = _closed_port()
    conn = HubSpotConnector(f"https://127.0.0.1:{port}", "t", ca_bundle=None, properties={"contacts": ["email"]},
                            retry=FAST, timeout=5)
    with pytest.raises(RetriableError) as ei:
        conn.find_by_email("contacts", ["jane.doe@example.com"])
    assert str(ei.value) == f"hubspot contacts.search: 127.0.0.1:{port}: connection refused (nothing listens there)"


def test_a_create_whose_connection_was_refused_is_raised_unretried_with_the_same_words() -> None:
    port = _closed_port()
    conn = SalesforceConnector(f"https://127.0.0.1:{port}", "s", ca_bundle=None, fields={"Lead": ["Email"]},
                               retry=FAST, timeout=5)
    with pytest.raises(RetriableError, match=rf"salesforce collections.create: 127.0.0.1:{port}: connection refused"):
        conn.create("Lead", [RecordCreate("k1", {"Email": "a@example.com"})])
    assert conn.usage.calls["collections.create"] == 1  # not sent again: it may have been applied


def test_a_certificate_the_ca_bundle_did_not_sign_is_fatal_and_names_the_bundle(
        hubspot_server: tuple[SimServer, str], salesforce_server: tuple[SimServer, str]) -> None:
    other = certifi.where()
    hs, _ = hubspot_server
    with pytest.raises(FatalError) as h:
        _hubspot(hs, other).fetch("contacts", ["1"])
    sf, _ = salesforce_server
    with pytest.raises(FatalError) as s:
        _salesforce(sf, other).fetch("Lead", ["00Q1"])
    for e, system in ((h, "hubspot"), (s, "salesforce")):
        assert str(e.value).startswith(f"{system} ")
        assert "TLS certificate verify failed" in str(e.value) and f"CA bundle {other}" in str(e.value)
        assert "127.0.0.1:" in str(e.value) and e.value.system == system
