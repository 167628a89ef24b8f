"""One API budget, shared and paced (issue 17), against the sandbox with small quotas.

Windows are compressed (``window_s`` a few seconds instead of a day) where the test must see
one pass; every wait is a deadline on observable state, never an assertion on a duration.
The one lower bound asserted (a Retry-After of 2 s is waited out) only grows under load.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from syncd import report
from syncd.config import load_config
from syncd.connectors._pacing import CapReached
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import Store

pytestmark = pytest.mark.slow

SYNCD = str(Path(sys.executable).with_name("syncd"))
DEADLINE_S = 240.0  # a hang guard on observable state; a 4 s window x a 7-call cap is slow under load
PAUSE = re.compile(r"^(hubspot|salesforce): daily API share (\d+)/(\d+) used — paused until "
                   r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? UTC$", re.M)


def _runtime(sb: Sandbox, tmp: Path, name: str, **kw: Any) -> Runtime:
    sb.export_env()
    (tmp / name).mkdir(exist_ok=True)  # syncd creates the store's file, never its directory
    cfg = sb.write_config(tmp / f"{name}.toml", state_url=f"sqlite:///{tmp / name / 'state.db'}", **kw)
    return open_runtime(load_config(cfg))


def _crm_state(sb: Sandbox) -> dict[str, Any]:
    """What syncd is for, as the CRMs hold it: lifecycle and lead status by email, deal stages."""
    def by_email(rows: list[dict[str, Any]], key: str, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return sorted(((r.get(key) or "").strip().lower(), *(str(r.get(f)) for f in fields)) for r in rows)

    return {
        "contacts": by_email(sb.hubspot.all("contacts"), "email", ("lifecyclestage", "hs_lead_status")),
        "deals": sorted((str(d.get("dealname")), str(d.get("dealstage"))) for d in sb.hubspot.all("deals")),
        "leads": by_email(sb.salesforce.all("Lead"), "Email", ("Status", "IsConverted")),
        "contacts_sf": by_email(sb.salesforce.all("Contact"), "Email", ()),
        "opportunities": sorted((str(o.get("Name")), str(o.get("StageName")))
                                for o in sb.salesforce.all("Opportunity")),
    }


def _settled(rt: Runtime, stats: Any) -> bool:
    with rt.store.tx() as tx:
        depth = tx.outbox_depth()
    return not stats.partial and stats.sent == 0 and stats.failed == 0 and depth == 0


def _converge(rt: Runtime) -> list[str]:
    """Cycles until nothing is left to do; returns the pause lines met on the way."""
    pauses: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            stats = rt.engine().cycle()
        except CapReached as exc:  # a cap during the write-back: the rows wait in the outbox
            pauses.append(str(exc))
            data = report.status_data(rt.store, datetime.now(UTC))
            pauses += [line for line in _status_lines(data) if PAUSE.match(line)]
            _wait_out(exc)
            continue
        held = [e for e in stats.pull_failures.values() if isinstance(e, CapReached)]
        for exc in held:  # the system is paused: as the service does, come back when it resumes
            pauses.append(str(exc))
            _wait_out(exc)
        if held:
            continue
        if _settled(rt, stats):
            return pauses
    raise AssertionError(f"did not converge within {DEADLINE_S}s; pauses: {pauses[-3:]}")


def _status_lines(data: dict[str, Any]) -> list[str]:
    from syncd.burn import status_lines

    return status_lines(data.get("api_budget") or {})


def _wait_out(exc: CapReached) -> None:
    if exc.until is not None:
        time.sleep(max(0.0, exc.until - time.time()) + 0.05)


def test_a_cap_pauses_cleanly_says_so_resumes_after_the_window_and_loses_nothing(tmp_path: Path) -> None:
    spec = SeedSpec(seed=3, people=30, deals=6)
    with Sandbox(tmp_path / "ref") as ref:
        seed(ref.hubspot, ref.salesforce, spec)
        rt = _runtime(ref, tmp_path, "ref")
        try:
            assert _converge(rt) == []
        finally:
            rt.close()
        expected = _crm_state(ref)
    with Sandbox(tmp_path / "capped", hubspot_options={"day_s": 4}, salesforce_options={"window_s": 4}) as sb:
        seed(sb.hubspot, sb.salesforce, spec)
        caps = {"hubspot": {"daily_budget": 7, "window_s": 4}, "salesforce": {"daily_budget": 20, "window_s": 4}}
        rt = _runtime(sb, tmp_path, "capped", keys=caps)
        try:
            pauses = _converge(rt)
            with rt.store.tx() as tx:
                assert tx.open_quarantine() == []
            data = report.status_data(rt.store, datetime.now(UTC))
        finally:
            rt.close()
        assert _crm_state(sb) == expected  # the same end state as without a cap: nothing lost
        assert any(PAUSE.match(p) for p in pauses), pauses[:5]
        assert all(int(m.group(2)) >= int(m.group(3)) == {"hubspot": 7, "salesforce": 20}[m.group(1)]
                   for p in pauses if (m := PAUSE.match(p)))
        assert set(data["api_budget"]) == {"hubspot", "salesforce"}
        assert sb.hubspot_server.statuses[429] == 0 and sb.salesforce_server.statuses[403] == 0


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Sandbox, Path, dict[str, str]]]:
    with Sandbox(tmp_path / "sandbox") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=30, deals=6))
        extra = ("\n[sync]\ncontacts_interval_s = 1\ndeals_interval_s = 1\njitter_s = 0.1\n"
                 "\n[service]\nmetrics_port = 0\nshutdown_grace_s = 10\n")
        keys = {"hubspot": {"daily_budget": 25}, "salesforce": {"daily_budget": 20}}
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                              extra=extra, keys=keys)
        yield sb, cfg, {**os.environ, **sb.env()}


def test_a_service_and_two_sync_once_on_one_store_never_pass_the_shared_cap(
    shared: tuple[Sandbox, Path, dict[str, str]], tmp_path: Path,
) -> None:
    sb, cfg, env = shared
    err = (tmp_path / "service.stderr").open("wb")
    service = subprocess.Popen([SYNCD, "--config", str(cfg), "--log-format", "json", "run"], env=env,
                               stdout=subprocess.DEVNULL, stderr=err)
    try:
        onces = [subprocess.Popen([SYNCD, "--config", str(cfg), "sync", "--once"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not _both_spent(cfg):
            for i, p in enumerate(onces):  # keep two `sync --once` going beside the service
                if p.poll() is not None:
                    onces[i] = subprocess.Popen([SYNCD, "--config", str(cfg), "sync", "--once"], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.2)
        assert _both_spent(cfg), "the cap was never reached"
        for p in onces:
            p.wait(timeout=DEADLINE_S)
    finally:
        service.terminate()
        assert service.wait(timeout=60) == 0
        err.close()
    hs, sf = sb.hubspot_server.request_count(), sb.salesforce_server.request_count()
    assert hs <= 25 and sf <= 20  # counted by the CRMs themselves, all processes together (auth check too)
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}") as store, store.tx() as tx:
        # exact: every request any process sent is in the ledger, and nothing else
        assert sum(tx.api_calls_since("hubspot", 0).values()) == hs
        assert sum(tx.api_calls_since("salesforce", 0).values()) == sf
    status = subprocess.run([SYNCD, "--config", str(cfg), "status"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert re.search(r"^hubspot: daily API share \d+/25 used — paused until \d{4}-\d\d-\d\d 00:00 UTC$",
                     status.stdout, re.M), status.stdout
    assert re.search(r"^salesforce: daily API share \d+/20 used — paused until", status.stdout, re.M)
    assert "hubspot API:" in status.stdout and "in the rolling window" in status.stdout
    assert sb.hubspot_server.statuses[429] == 0 and sb.salesforce_server.statuses[403] == 0


def _both_spent(cfg: Path) -> bool:
    url = load_config(cfg).state_url()
    if not Path(url.removeprefix("sqlite:///")).exists():
        return False
    try:
        with Store.open(url) as store, store.tx(readonly=True) as tx:
            return (sum(tx.api_calls_since("hubspot", 0).values()) >= 25
                    and sum(tx.api_calls_since("salesforce", 0).values()) >= 20)
    except Exception:  # noqa: BLE001 - the store being created by the processes under test
        return False


def test_a_backfill_at_the_default_pace_stays_under_the_lowest_tier_with_no_429(tmp_path: Path) -> None:
    lowest = {"enforce_burst": True, "burst_limit": 100, "search_per_s": 5}
    with Sandbox(tmp_path / "sb", hubspot_options=lowest) as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=1, people=1500, deals=300))
        rt = _runtime(sb, tmp_path, "paced", paced=True)
        try:
            assert _converge(rt) == []
        finally:
            rt.close()
        hs = sb.hubspot_server
        assert hs.statuses[429] == 0
        assert hs.request_count("contacts.search") > 5  # enough searches to meet the search limit
        assert hs.max_in_window(1.0, "contacts.search") <= 4  # 3/s default: at most 4 in any second
        assert hs.max_in_window(10.0) <= 100


def test_the_burst_pace_follows_hubspots_headers_and_never_gets_a_429(tmp_path: Path) -> None:
    """A compressed burst window (20 calls per 2 s, said in the headers): syncd paces under it."""
    tight = {"enforce_burst": True, "burst_limit": 20, "burst_window_s": 2.0}
    with Sandbox(tmp_path / "sb", hubspot_options=tight) as sb:
        ids = [sb.hubspot.add("contacts", {"email": f"p{i}@example.com"}) for i in range(5)]
        rt = _runtime(sb, tmp_path, "burst", paced=True)
        try:
            hubspot = rt.connectors["hubspot"]
            for _ in range(50):  # batch reads: the burst class, no search
                assert len(hubspot.fetch("contacts", ids)) == 5
        finally:
            rt.close()
        server = sb.hubspot_server
        assert server.statuses[429] == 0
        assert server.max_in_window(2.0) <= 20


def test_a_429_storm_is_ridden_out_and_retry_after_holds_the_whole_class(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sb") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=30, deals=6))
        rt = _runtime(sb, tmp_path, "storm")
        try:
            sb.hubspot_server.inject("rate_limit", count=3, endpoint="contacts*", retry_after=2)
            stats = rt.engine().cycle()
            assert not stats.pull_failures
            limited = rt.connectors["hubspot"].usage.rate_limited
            with rt.store.tx() as tx:
                holds = tx.api_holds("hubspot")
        finally:
            rt.close()
        assert sum(limited.values()) == 3
        assert holds[("hubspot", "burst")].factor < 1.0  # slowed down; recovers gradually
        hs = sb.hubspot_server
        faulted = hs.request_times("contacts*")[:3]
        every = hs.request_times()
        for t in faulted:  # after each 429, nothing of the class went out before its Retry-After
            later = [u for u in every if u > t]
            assert later and min(later) - t >= 2.0 - 0.05


def test_the_service_pauses_a_system_at_its_cap_logs_it_and_resumes_by_itself(tmp_path: Path) -> None:
    import json

    with Sandbox(tmp_path / "sb", hubspot_options={"day_s": 6}) as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=30, deals=6))
        extra = ("\n[sync]\ncontacts_interval_s = 1\ndeals_interval_s = 1\njitter_s = 0.1\n"
                 "\n[service]\nmetrics_port = 0\nshutdown_grace_s = 10\n")
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                              extra=extra, keys={"hubspot": {"daily_budget": 6, "window_s": 6}})
        err_path = tmp_path / "service.stderr"
        with err_path.open("wb") as err:
            service = subprocess.Popen([SYNCD, "--config", str(cfg), "--log-format", "json", "run"],
                                       env={**os.environ, **sb.env()}, stdout=subprocess.DEVNULL, stderr=err)

        def events(name: str) -> list[dict[str, Any]]:
            out = []
            for line in err_path.read_text(errors="replace").splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") == name:
                    out.append(e)
            return out

        try:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline and not (
                    [e for e in events("system_backed_off") if e.get("system") == "hubspot"]
                    and events("system_recovered")):
                assert service.poll() is None, err_path.read_text()[-2000:]
                time.sleep(0.2)
            paused = [e for e in events("system_backed_off") if e.get("system") == "hubspot"]
            assert paused and events("system_recovered"), err_path.read_text()[-3000:]
            assert PAUSE.match(paused[0]["error"]) or "paused until" in paused[0]["error"]
            assert [e for e in events("api_paused") if PAUSE.match(e.get("status", ""))]
        finally:
            service.terminate()
            assert service.wait(timeout=60) == 0
        assert sb.hubspot_server.statuses[429] == 0


def _sync_once(sb: Sandbox, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNCD, "--config", str(cfg), "sync", "--once"], env={**os.environ, **sb.env()},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_run_cap_no_cycle_fits_in_is_a_config_error_and_one_at_the_floor_completes(tmp_path: Path) -> None:
    """A per-cycle cap below what one cycle needs when nothing changed (a pull per object, HubSpot's
    archive scans, Salesforce's /limits read) left every cycle partial, for ever: the Salesforce
    side never completed, so nobody was decided. It is refused before any call, naming the file
    and the key; a cap exactly at the floor lets a cycle complete over the real clients."""
    from syncd.connectors._pacing import cycle_floor

    with Sandbox(tmp_path / "sb") as sb:
        (tmp_path / "s").mkdir()
        url = f"sqlite:///{tmp_path / 's' / 'state.db'}"
        rt = _runtime(sb, tmp_path, "probe")
        try:
            floor = {s: n for s, (n, _) in cycle_floor(rt.connectors).items()}
        finally:
            rt.close()
        # HubSpot: 2 searches and 2 archive scans; Salesforce: 4 queryAll pulls (deaths included), /limits
        assert floor == {"hubspot": 4, "salesforce": 5}
        low = sb.write_config(tmp_path / "low.toml", state_url=url,
                              keys={"salesforce": {"run_cap": floor["salesforce"] - 1}})
        r = _sync_once(sb, low)
        assert r.returncode == 2, (r.returncode, r.stderr)
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"syncd: error: {low}: [salesforce] run_cap = 4 is below the 5 calls one cycle "
                               "needs at the least (a pull for each of Lead, Contact, Task, Opportunity, and the "
                               "/limits read)"), line
        assert sum(sb.request_counts().values()) == 0  # refused before any call
        assert not (tmp_path / "s" / "state.db").exists()

        at = sb.write_config(tmp_path / "at.toml", state_url=url,
                             keys={s: {"run_cap": n} for s, n in floor.items()})
        r = _sync_once(sb, at)
        assert r.returncode == 0, r.stderr[-2000:]
    store = Store.open(url)
    try:
        with store.tx(readonly=True) as tx:
            runs = tx.last_runs(1)
    finally:
        store.close()
    assert [r.status for r in runs] == ["ok"], runs


def test_a_backfill_stopped_by_the_run_cap_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """A bulk import: 3,000 contacts modified within one minute, a day ago, and a per-cycle cap of
    6 HubSpot calls (the search pages 200 at a time: 15 pages). Each cycle stops at the cap; the
    next resumes at the stored cursor, not two minutes before it: before, every cycle re-read the
    same first pages of the burst (they all sit inside the overlap window) and the backfill never
    finished. Every page is read about once."""
    from datetime import timedelta

    with Sandbox(tmp_path / "sb") as sb:
        start = datetime.now(UTC) - timedelta(days=1)
        for i in range(3000):
            sb.hubspot.add("contacts", {"email": f"bulk{i:04d}@example.com", "lifecyclestage": "subscriber"},
                           at=start + timedelta(milliseconds=20 * i))
        rt = _runtime(sb, tmp_path, "capped", keys={"hubspot": {"run_cap": 6}})
        try:
            cycles = 0
            held = 0
            while held < 3000 and cycles < 12:
                cycles += 1
                rt.engine().cycle()
                with rt.store.tx(readonly=True) as tx:
                    held = sum(len(p) for p in tx.iter_record_ids("hubspot", "contacts"))
        finally:
            rt.close()
        assert held == 3000, f"{held} of 3,000 contacts after {cycles} cycles"
        searches = sb.hubspot_server.request_count("contacts.search")
        assert searches <= 15 + cycles, searches  # each page once, plus one boundary re-read per cycle
