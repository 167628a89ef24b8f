"""[service] metrics_host: where /metrics listens (loopback by default; a warning otherwise)."""

from __future__ import annotations

from http.client import HTTPConnection
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from syncd.config import load_config
from syncd.errors import ConfigError
from syncd.metrics import MetricsServer, ServiceMetrics, is_loopback


def _cfg(tmp_path: Path, service: str) -> Path:
    p = tmp_path / "syncd.toml"
    p.write_text('[hubspot]\nbase_url = "https://api.hubapi.com"\n[salesforce]\n'
                 f'instance_url = "https://x.my.salesforce.com"\n[service]\n{service}\n')
    return p


def test_metrics_host_defaults_to_loopback_and_names_a_bad_address(tmp_path: Path) -> None:
    assert load_config(_cfg(tmp_path, ""), credentials=False).service.metrics_host == "127.0.0.1"
    assert load_config(_cfg(tmp_path, 'metrics_host = "0.0.0.0"'), credentials=False).service.metrics_host == "0.0.0.0"
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, 'metrics_host = "not an address"'), credentials=False)
    assert "metrics_host" in str(e.value) and "IP address" in str(e.value)


def test_loopback_is_told_apart() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_the_server_listens_there_and_warns_off_loopback(host: str, warned: bool) -> None:
    with capture_logs() as logs:
        srv = MetricsServer(ServiceMetrics({"contacts": 60}), 0, host=host).start()
    try:
        conn = HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        srv.stop()
    assert any(e["event"] == "metrics_not_loopback" for e in logs) is warned
