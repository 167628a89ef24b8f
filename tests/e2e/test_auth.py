"""Credentials that last (issue 15), as an operator meets them: `syncd auth check`, refused grants,
a rotated refresh token across a restart, the back-off and SIGHUP, and no secret in any log line.

The sandbox in this process plays both CRMs' OAuth servers (syncd/sandbox/oauth.py); syncd runs
as a subprocess (the CLI) or in-process (the service's cycle job), with the real clients.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _docs_json import documented
from _waiting import http_get, wait_until
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import load_config
from syncd.metrics import MetricsServer
from syncd.runtime import open_runtime
from syncd.sandbox import HUBSPOT_TOKEN, SALESFORCE_SESSION, Sandbox, _throwaway_key_and_certificate
from syncd.sandbox.oauth import SF_REFRESH_TOKEN
from syncd.service import Service

DEADLINE_S = 90.0


@pytest.fixture
def sb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    with Sandbox(tmp_path / "sandbox") as s:
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)
        s.salesforce.insert("Lead", {"LastName": "Lee", "Company": "Acme", "Email": "lee@example.com"})
        s.hubspot.add("contacts", {"email": "kim@example.com", "firstname": "Kim"})
        yield s


def write_config(sb: Sandbox, tmp_path: Path, salesforce_auth: str = "jwt", hubspot_auth: str = "oauth",
                 extra: str = "") -> Path:
    return sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                           salesforce_auth=salesforce_auth, hubspot_auth=hubspot_auth, extra=extra)


def syncd(sb: Sandbox, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", "--config", str(config), *args],
                          env={**os.environ, **sb.env()}, capture_output=True, text=True, timeout=DEADLINE_S)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("syncd: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]




# -- syncd auth check -------------------------------------------------------------------------------

@pytest.mark.parametrize(("salesforce_auth", "hubspot_auth"),
                         [("jwt", "oauth"), ("session", "private_app"), ("client_credentials", "oauth")])
def test_auth_check_says_who_syncd_is_and_exits_0_when_nothing_is_missing(
        sb: Sandbox, tmp_path: Path, salesforce_auth: str, hubspot_auth: str) -> None:
    cfg = write_config(sb, tmp_path, salesforce_auth, hubspot_auth)
    proc = syncd(sb, cfg, "auth", "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"hubspot: auth {hubspot_auth} · portal_id 62515 · app ")
    assert lines[1].startswith(f"salesforce: auth {salesforce_auth} · org_id 00D5g000004SYNCD · user ")
    assert "token expires: " in lines[0] and "token expires: " in lines[1]
    assert lines[-1] == "ok: syncd can do its whole job"


def test_auth_check_names_each_missing_field_permission_and_scope(sb: Sandbox, tmp_path: Path) -> None:
    cfg = write_config(sb, tmp_path)
    sb.salesforce.deny_field("Lead", "Lifecycle_Stage__c")
    sb.hs_oauth.remove_scope("crm.objects.deals.write")

    proc = syncd(sb, cfg, "auth", "check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert "salesforce: `Lead.Lifecycle_Stage__c` is not updateable for this user" in out
    assert "hubspot: the app lacks the scope crm.objects.deals.write" in out
    assert out[-1] == "2 missing: syncd cannot do its whole job"

    as_json = syncd(sb, cfg, "auth", "check", "--json")
    assert as_json.returncode == 1
    doc = documented("auth check", as_json.stdout)
    assert doc["ok"] is False
    assert doc["systems"]["salesforce"]["missing"] == [
        "salesforce: `Lead.Lifecycle_Stage__c` is not updateable for this user"]
    assert doc["systems"]["salesforce"]["identity"]["org_id"] == "00D5g000004SYNCD"
    assert doc["systems"]["hubspot"]["method"] == "oauth"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("salesforce_auth", "hubspot_auth", "sf_call", "hs_call"),
                         [("session", "private_app", "userinfo", "account-info"),
                          ("jwt", "oauth", "JWT grant", "OAuth refresh")])
def test_auth_check_against_a_closed_port_is_one_line_per_system_naming_host_and_cause(
        sb: Sandbox, tmp_path: Path, salesforce_auth: str, hubspot_auth: str, sf_call: str, hs_call: str) -> None:
    """The connectors' words for a call with no answer (connectors/_errors.py Peer), from the token grant
    or the first API call alike: never an exception class name nor a URL."""
    cfg = write_config(sb, tmp_path, salesforce_auth, hubspot_auth)
    ports = {"hubspot": _closed_port(), "salesforce": _closed_port()}
    text = cfg.read_text()
    for system, server in (("hubspot", sb.hubspot_server), ("salesforce", sb.salesforce_server)):
        text = text.replace(f"127.0.0.1:{server.port}", f"127.0.0.1:{ports[system]}")
    cfg.write_text(text)

    proc = syncd(sb, cfg, "auth", "check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    refused = "connection refused (nothing listens there)"
    assert proc.stdout.splitlines()[-3:] == [f"hubspot {hs_call}: 127.0.0.1:{ports['hubspot']}: {refused}",
                                             f"salesforce {sf_call}: 127.0.0.1:{ports['salesforce']}: {refused}",
                                             "2 missing: syncd cannot do its whole job"]
    for leak in ("Error", "https://", "Traceback"):
        assert leak not in proc.stdout + proc.stderr


# -- refused grants ---------------------------------------------------------------------------------

def _wrong_key(sb: Sandbox, tmp_path: Path) -> None:
    sb.jwt_key().write_bytes(_throwaway_key_and_certificate()[0])  # not the certificate's key


def _not_approved(sb: Sandbox, tmp_path: Path) -> None:
    sb.sf_oauth.approved = False


def _revoked_sf(sb: Sandbox, tmp_path: Path) -> None:
    sb.sf_oauth.revoke_refresh_tokens()


def _revoked_hs(sb: Sandbox, tmp_path: Path) -> None:
    sb.hs_oauth.revoke_refresh_tokens()


REFUSALS = [
    ("jwt", _wrong_key, "salesforce: JWT grant refused: invalid_grant (invalid assertion)"),
    ("jwt", _not_approved, "salesforce: JWT grant refused: invalid_grant (user hasn't approved this consumer)"),
    ("refresh_token", _revoked_sf,
     "salesforce: refresh-token grant refused: invalid_grant (expired access/refresh token)"),
    ("client_credentials", _revoked_hs,
     "hubspot: OAuth refresh refused: invalid_grant (refresh token is invalid, expired or revoked)"),
]


@pytest.mark.parametrize(("salesforce_auth", "break_it", "reason"), REFUSALS,
                         ids=["wrong-key", "not-approved", "revoked-sf-refresh", "revoked-hs-refresh"])
def test_a_refused_grant_is_one_line_naming_the_reason_and_exit_1(
        sb: Sandbox, tmp_path: Path, salesforce_auth: str, break_it: Callable[[Sandbox, Path], None],
        reason: str) -> None:
    cfg = write_config(sb, tmp_path, salesforce_auth)
    break_it(sb, tmp_path)
    proc = syncd(sb, cfg, "sync", "--once")
    assert proc.returncode == 1, proc.stderr
    assert reason in error_line(proc)
    check = syncd(sb, cfg, "auth", "check")
    assert check.returncode == 1
    assert reason in check.stdout.splitlines()


def test_a_refused_relogin_backs_the_system_off_and_a_reload_with_a_good_key_clears_it(
        sb: Sandbox, tmp_path: Path) -> None:
    cfg_path = write_config(sb, tmp_path, "jwt", "private_app")
    key = sb.jwt_key()
    good = key.read_bytes()
    _wrong_key(sb, tmp_path)
    svc = Service(load_config(cfg_path), config_file=cfg_path)
    try:
        svc._cycle_job("contacts")
        assert set(svc.backoff) == {"salesforce"}
        why = svc.backoff["salesforce"][1]
        assert why == ("authentication failed: salesforce: JWT grant refused: invalid_grant (invalid assertion)")
        key.write_bytes(good)  # the operator puts the right key in place, then sends SIGHUP
        assert svc.reload()
        assert svc.backoff == {}
        svc._cycle_job("contacts")
        assert svc.backoff == {}
        assert sb.sf_oauth.requests["urn:ietf:params:oauth:grant-type:jwt-bearer"] == 2
    finally:
        svc.close()


def _scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(server.port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_refused_relogin_shows_on_metrics_as_auth_failing_and_a_refused_grant_until_a_reload_fixes_it(
        sb: Sandbox, tmp_path: Path) -> None:
    """What SyncdAuthFailing (deploy/prometheus-alerts.yml) reads: the JWT user loses its approval after
    a first good login, the token dies, and the re-login is refused."""
    cfg_path = write_config(sb, tmp_path, "jwt", "private_app")
    svc = Service(load_config(cfg_path), config_file=cfg_path)
    server = MetricsServer(svc.metrics, 0).start()

    def auth(system: str) -> tuple[float, float, float, float]:
        got = _scrape(server)
        return (got[("syncd_auth_failing", (("system", system),))],
                *(got[("syncd_auth_grants_total", (("outcome", o), ("system", system)))]
                  for o in ("ok", "refused", "error")))

    try:
        svc._cycle_job("contacts")
        assert svc.backoff == {}
        assert auth("salesforce") == (0, 1, 0, 0)  # one JWT grant, accepted
        sb.sf_oauth.approved = False  # the admin removed the integration user from the connected app
        sb.sf_oauth.expire_tokens()
        svc._cycle_job("contacts")
        assert svc.backoff["salesforce"][1].endswith("JWT grant refused: invalid_grant "
                                                     "(user hasn't approved this consumer)")
        assert auth("salesforce") == (1, 1, 1, 0)
        assert auth("hubspot") == (0, 0, 0, 0)  # a private-app token: no grant, not failing
        assert _scrape(server)[("syncd_system_backed_off", (("system", "salesforce"),))] == 1

        sb.sf_oauth.approved = True  # fixed; the operator sends SIGHUP
        assert svc.reload()
        assert auth("salesforce")[0] == 0
        svc._cycle_job("contacts")
        assert svc.backoff == {} and auth("salesforce") == (0, 2, 1, 0)
    finally:
        server.stop()
        svc.close()


# -- rotation -----------------------------------------------------------------------------------------

def test_a_rotated_refresh_token_is_persisted_0600_and_survives_a_restart(sb: Sandbox, tmp_path: Path) -> None:
    sb.sf_oauth.rotate_refresh_tokens = True
    cfg_path = write_config(sb, tmp_path, "refresh_token", "private_app")
    token_file = sb.refresh_token_file("salesforce")
    rt = open_runtime(load_config(cfg_path))
    try:
        for _ in range(3):  # three logins, three rotations
            assert not rt.engine().cycle().pull_failures
            sb.sf_oauth.expire_tokens()
    finally:
        rt.close()
    current = token_file.read_text().strip()
    assert sb.sf_oauth.refresh_tokens == {current} and current != SF_REFRESH_TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [p.name for p in token_file.parent.iterdir() if p.name.startswith(f".{token_file.name}")] == []

    proc = syncd(sb, cfg_path, "sync", "--once")  # the restart: a new process reads the file
    assert proc.returncode == 0, proc.stderr
    assert sb.sf_oauth.refresh_tokens == {token_file.read_text().strip()}


# -- no secret in any log line ------------------------------------------------------------------------

def test_no_token_key_assertion_or_refresh_token_appears_in_the_logs_of_a_whole_run(
        sb: Sandbox, tmp_path: Path) -> None:
    sb.set_token_lifetime(1.0)
    sb.sf_oauth.rotate_refresh_tokens = True
    extra = "\n[sync]\ncontacts_interval_s = 0.5\ndeals_interval_s = 1\njitter_s = 0\n\n[service]\nmetrics_port = 0\n"
    cfg = write_config(sb, tmp_path, "jwt", "oauth", extra=extra)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "syncd", "--config", str(cfg), "--debug",
                                 "--log-format", "json", "run"], env={**os.environ, **sb.env()},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(sb.sf_oauth.issue_history()) >= 4 and len(sb.hs_oauth.issue_history()) >= 4,
                   "several expiries of both tokens")
        # a second pass with the refresh-token method: rotated refresh tokens in the same logs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    cfg2 = write_config(sb, tmp_path, "refresh_token", "oauth")
    with log_path.open("ab") as out:
        subprocess.run([sys.executable, "-m", "syncd", "--config", str(cfg2), "--debug", "--log-format", "json",
                        "sync", "--once"], env={**os.environ, **sb.env()}, stdout=out, stderr=subprocess.STDOUT,
                       timeout=DEADLINE_S, check=True)
    text = log_path.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    # the run kept syncing across the expiries: no failed cycle, no back-off, a login per expiry
    assert [e for e in events if e.get("event") in ("cycle_failed", "pull_failed", "system_backed_off")] == []
    assert sum(1 for e in events if e.get("event") == "auth.login" and e.get("reason") == "refused") >= 3
    assert '"auth.login"' in text and '"auth_check"' in text and '"auth.rotated"' in text
    key_lines = [line for line in sb.jwt_key().read_text().splitlines() if line and not line.startswith("-----")]
    secrets = [*sb.sf_oauth.secrets(), *sb.hs_oauth.secrets(), HUBSPOT_TOKEN, SALESFORCE_SESSION, *key_lines]
    assert len([s for s in sb.sf_oauth.secrets() if s.count(".") == 2]) >= 4  # the JWT assertions are in the list
    leaked = [s[:12] + "…" for s in secrets if s and s in text]
    assert leaked == []


# -- sandbox serve's snippets -------------------------------------------------------------------------

def test_every_config_snippet_the_sandbox_prints_logs_in_and_passes_auth_check(
        sb: Sandbox, tmp_path: Path) -> None:
    from syncd.auth_check import run_check

    snippets = sb.auth_snippets()
    assert set(snippets) == {"salesforce/session", "salesforce/jwt", "salesforce/client_credentials",
                             "salesforce/refresh_token", "hubspot/private_app", "hubspot/oauth"}
    pairs = [(f"salesforce/{m}", "hubspot/oauth") for m in ("session", "jwt", "client_credentials", "refresh_token")]
    pairs.append(("salesforce/jwt", "hubspot/private_app"))
    for sf, hs in pairs:
        cfg = tmp_path / "pasted.toml"
        cfg.write_text(f"{snippets[hs]}\n\n{snippets[sf]}\n\n[state]\nurl = \"sqlite:///{tmp_path / 's.db'}\"\n")
        reports = run_check(load_config(cfg))
        assert [r.missing for r in reports] == [[], []], (sf, hs)
        assert [r.method for r in reports] == [hs.split("/")[1], sf.split("/")[1]]
