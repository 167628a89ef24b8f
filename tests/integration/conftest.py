"""Integration fixtures: the sandbox CRMs served on 127.0.0.1 over TLS.

HubSpot fixtures live here; Salesforce fixtures live in conftest_salesforce.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncd.sandbox._server import SimServer, make_tls
from syncd.sandbox.hubspot import HubSpotApp

HUBSPOT_TOKEN = "test-hubspot-token"


@dataclass
class HubSpotSandbox:
    app: HubSpotApp
    server: SimServer
    ca_path: str
    token: str = HUBSPOT_TOKEN

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def sandbox_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str]:
    d: Path = tmp_path_factory.mktemp("tls")
    return make_tls(str(d))


@pytest.fixture
def hubspot_sandbox(sandbox_tls: tuple[object, str]) -> Iterator[HubSpotSandbox]:
    ctx, ca_path = sandbox_tls
    app = HubSpotApp(token=HUBSPOT_TOKEN)
    server = SimServer(app, ssl_context=ctx).start()  # type: ignore[arg-type]
    try:
        yield HubSpotSandbox(app, server, ca_path)
    finally:
        server.stop()

# Salesforce fixtures (owned by the Salesforce side); imported so pytest registers them here.
from conftest_salesforce import SalesforceSandbox, sf, sf_sandbox  # noqa: E402, F401
