"""Credentials that last (issue 15): the real clients against the sandbox's OAuth endpoints,
with access tokens that live 2 seconds.

The daemon keeps syncing across many expiries with no failed cycle, and logs in once per
expiry: never twice for one dead token, even when many calls find it dead at the same time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox

LIFETIME_S = 2.0


@pytest.fixture
def sb(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(tmp_path / "sandbox") as s:
        s.set_token_lifetime(LIFETIME_S)
        yield s


def _runtime(sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, salesforce_auth: str,
             hubspot_auth: str = "oauth") -> Runtime:
    for k, v in sb.env().items():
        monkeypatch.setenv(k, v)
    cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                          salesforce_auth=salesforce_auth, hubspot_auth=hubspot_auth)
    return open_runtime(load_config(cfg))


def _seed(sb: Sandbox, i: int) -> tuple[str, str]:
    lead = sb.salesforce.insert("Lead", {"LastName": f"L{i}", "Company": "Acme", "Email": f"l{i}@example.com"})
    contact = sb.hubspot.add("contacts", {"email": f"c{i}@example.com", "firstname": f"C{i}"})
    return lead, contact


def _assert_once_per_expiry(history: list[tuple[float, float]], *, min_gap: float) -> None:
    """Each token was replaced only when it was (about to be) dead: never two logins for one token."""
    assert len(history) >= 2
    for (issued, _), (next_issued, _) in zip(history, history[1:], strict=False):
        assert next_issued - issued >= min_gap, history


@pytest.mark.parametrize("salesforce_auth", ["jwt", "client_credentials", "refresh_token"])
def test_cycles_keep_syncing_across_many_expiries_with_one_login_per_expiry(
    sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, salesforce_auth: str
) -> None:
    if salesforce_auth == "refresh_token":
        sb.sf_oauth.rotate_refresh_tokens = True  # the hardest case: every refresh rotates
    rt = _runtime(sb, tmp_path, monkeypatch, salesforce_auth)
    lead, contact = _seed(sb, 0)
    sf, hs = rt.connectors["salesforce"], rt.connectors["hubspot"]
    stop = threading.Event()
    calls = {"ok": 0}
    errors: list[BaseException] = []

    def hammer() -> None:  # concurrent calls beside the cycles, as resyncs and look-ups would make
        while not stop.is_set():
            try:
                assert sf.fetch("Lead", [lead]) and hs.fetch("contacts", [contact])
                calls["ok"] += 1
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    cycles = []
    try:
        # jwt, the recommended method, for 10 lifetimes (what 30-minute tokens see in 5 hours); the others 4
        deadline = time.monotonic() + (10 if salesforce_auth == "jwt" else 4) * LIFETIME_S
        i = 1
        while time.monotonic() < deadline or len(sb.sf_oauth.issue_history()) < 4:
            _seed(sb, i)
            i += 1
            cycles.append(rt.engine().cycle())
            assert time.monotonic() < deadline + 120, "tokens stopped being renewed"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        rt.close()
    assert not errors, errors
    assert calls["ok"] > 0
    failed = [(n, c.partial_reason()) for n, c in enumerate(cycles) if c.pull_failures or c.failed]
    assert failed == []
    assert all(sum(c.pulled.values()) > 0 for c in cycles)  # every cycle pulled what changed

    sf_history, hs_history = sb.sf_oauth.issue_history(), sb.hs_oauth.issue_history()
    # Salesforce says nothing about expiry: a token is replaced only once it was refused (dead).
    _assert_once_per_expiry(sf_history, min_gap=LIFETIME_S)
    # HubSpot's expires_in lets syncd renew just before the end (a tenth of the life ahead).
    _assert_once_per_expiry(hs_history, min_gap=LIFETIME_S * 0.85)
    grants = {"jwt": "urn:ietf:params:oauth:grant-type:jwt-bearer"}.get(salesforce_auth, salesforce_auth)
    assert sum(sb.sf_oauth.requests.values()) == sb.sf_oauth.requests[grants] == len(sf_history)
    assert sf.auth.logins == len(sf_history)  # type: ignore[attr-defined]
    assert sb.hs_oauth.requests["refresh_token"] == len(hs_history) == hs.auth.logins  # type: ignore[attr-defined]


@pytest.mark.parametrize("system", ["salesforce", "hubspot"])
def test_calls_that_find_the_token_dead_together_wait_for_one_login(
    sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, system: str
) -> None:
    sb.set_token_lifetime(3600)
    rt = _runtime(sb, tmp_path, monkeypatch, "jwt")
    lead, contact = _seed(sb, 0)
    conn = rt.connectors[system]
    oauth = sb.sf_oauth if system == "salesforce" else sb.hs_oauth
    obj, rid = ("Lead", lead) if system == "salesforce" else ("contacts", contact)
    try:
        assert conn.fetch(obj, [rid])
        before = len(oauth.issue_history())
        oauth.expire_tokens()
        n = 16
        barrier = threading.Barrier(n)

        def call(_: int) -> int:
            barrier.wait(timeout=60)
            return len(conn.fetch(obj, [rid]))

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(call, range(n)))
    finally:
        rt.close()
    assert results == [1] * n
    assert len(oauth.issue_history()) == before + 1  # one login for sixteen refused calls
