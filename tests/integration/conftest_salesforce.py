"""Salesforce sandbox fixtures: SalesforceApp over HTTPS + the real simple-salesforce client.

Registered from tests/integration/conftest.py; ``sandbox_tls`` (the throwaway CA) is defined there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from simple_salesforce import Salesforce

from syncd.sandbox._server import SimServer
from syncd.sandbox.salesforce import SalesforceApp

SF_SESSION = "sandbox-session"


@dataclass
class SalesforceSandbox:
    app: SalesforceApp
    server: SimServer
    ca_path: str
    session_id: str = SF_SESSION

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> Salesforce:
        """The real simple-salesforce client, trusting only the sandbox CA."""
        s = requests.Session()
        s.verify = self.ca_path
        s.trust_env = False
        return Salesforce(instance_url=self.url, session_id=self.session_id, session=s)


@pytest.fixture
def sf_sandbox(sandbox_tls: tuple[object, str]) -> Iterator[SalesforceSandbox]:
    ctx, ca_path = sandbox_tls
    app = SalesforceApp(session_ids=(SF_SESSION,))
    server = SimServer(app, ssl_context=ctx).start()  # type: ignore[arg-type]
    try:
        yield SalesforceSandbox(app, server, ca_path)
    finally:
        server.stop()


@pytest.fixture
def sf(sf_sandbox: SalesforceSandbox) -> Salesforce:
    return sf_sandbox.client()
