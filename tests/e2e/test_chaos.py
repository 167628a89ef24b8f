"""Exactly-once effects under real faults (issue 14, "How we will know"): ``syncd run`` itself,
a subprocess with the real clients, against the sandbox CRMs served by this test process.

Faults are the sandbox's (:mod:`syncd.sandbox._server`): ``hold_answer`` (the CRM applied the
write, the answer is held while the test kills the daemon), ``late_apply`` (answered 504 at once,
applied seconds later), ``server_error`` (an outage of the write endpoints only). Time is
compressed: 1 s intervals, a 3 s lease TTL, half-second write back-off, a 15 s outage for the
issue's two minutes. Every wait is a generous deadline on observable state (the CRMs, the
store, the daemon's own log), never a timed assertion; the one figure asserted (a restart
resumes in under 2 s) is read from the daemon's own timestamps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_service import SYNCD, ServiceProc, wait_until

from syncd.sandbox import Sandbox
from syncd.store import Store, schema

pytestmark = pytest.mark.slow

WARM = Path(__file__).with_name("_warm_syncd.py")
CONFIG = """
[sync]
contacts_interval_s = 1
deals_interval_s = 2
jitter_s = 0.1
retry_max_attempts = 1
retry_cap_s = 0.5
write_retry_base_s = 0.5
write_retry_cap_s = 1
write_batch = {write_batch}

[service]
metrics_port = 0
shutdown_grace_s = 5
lease_ttl_s = 3
"""


@dataclass
class Chaos:
    sb: Sandbox
    tmp: Path
    config: Path
    env: dict[str, str]
    state_url: str
    started: list[ServiceProc]

    def start(self, config: Path | None = None, *, warm: bool = False) -> ServiceProc:
        """``syncd run`` on ``config``. ``warm``: imported, waiting for :meth:`go` (see
        _warm_syncd.py), so that a restart is not mostly Python imports on busy cores."""
        n = len(self.started)
        err = self.tmp / f"run{n}.stderr"
        args = ["--config", str(config or self.config), "--log-format", "json", "run"]
        cmd = [sys.executable, str(WARM), *args] if warm else [SYNCD, *args]
        with err.open("wb") as e:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.PIPE if warm else None,
                                    stdout=subprocess.DEVNULL, stderr=e)
        svc = ServiceProc(proc, err, 0)
        self.started.append(svc)
        return svc

    @staticmethod
    def go(svc: ServiceProc) -> ServiceProc:
        assert svc.proc.stdin is not None
        svc.proc.stdin.write(b"go\n")
        svc.proc.stdin.close()
        return svc

    def store(self) -> Store:
        return Store.open(self.state_url)

    def outbox_open(self) -> int:
        with self.store() as store, store.tx() as tx:
            return tx.outbox_depth()


def _chaos(tmp: Path, state_url: str, *, write_batch: int = 1000) -> Iterator[Chaos]:
    with Sandbox(tmp / "sandbox") as sb:
        text = sb.config_text(state_url=state_url, extra=CONFIG.format(write_batch=write_batch))
        config = tmp / "syncd.toml"
        config.write_text(text.replace("timeout_s = 10", "timeout_s = 3"))
        ch = Chaos(sb, tmp, config, {**os.environ, **sb.env()}, state_url, [])
        try:
            yield ch
        finally:
            for svc in ch.started:
                if svc.proc.poll() is None:
                    svc.proc.send_signal(signal.SIGCONT)
                    svc.proc.kill()
                    svc.proc.wait(timeout=30)


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[Chaos]:
    yield from _chaos(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")


# -- people ---------------------------------------------------------------------------------------


def linked_person(sb: Sandbox, email: str, score: int = 20) -> tuple[str, str]:
    """A lead in HubSpot and in Salesforce, under the threshold: linked, nothing to do."""
    hid = sb.hubspot.add("contacts", {"email": email, "firstname": "Pat", "lastname": email.split("@")[0],
                                      "lifecyclestage": "lead", "hubspotscore": str(score)})
    lid = sb.salesforce.insert("Lead", {"Email": email, "FirstName": "Pat", "LastName": email.split("@")[0],
                                        "Company": "Chaos", "Status": "Open - Not Contacted",
                                        "Lifecycle_Stage__c": "Lead", "Lead_Score__c": score})
    return hid, lid


def handoff(sb: Sandbox, email: str) -> str:
    """A HubSpot lead over the threshold with no Salesforce record: syncd creates the Lead."""
    return sb.hubspot.add("contacts", {"email": email, "firstname": "Hal", "lastname": email.split("@")[0],
                                       "company": "Chaos", "lifecyclestage": "lead", "hubspotscore": "70"})


def returned(sb: Sandbox, email: str) -> str:
    """A returned Salesforce Lead with no HubSpot contact: syncd creates the contact."""
    return sb.salesforce.insert("Lead", {"Email": email, "FirstName": "Ret", "LastName": email.split("@")[0],
                                         "Company": "Chaos", "Status": "Returned - Not Ready",
                                         "Lead_Score__c": 60, "Return_Reason__c": "no budget",
                                         "Lifecycle_Stage__c": "MQL"})


def leads(sb: Sandbox, email: str) -> list[dict[str, Any]]:
    return [r for r in sb.salesforce.all("Lead") if str(r.get("Email") or "").lower() == email]


def contacts(sb: Sandbox, email: str) -> list[dict[str, Any]]:
    return [r for r in sb.hubspot.all("contacts") if str(r.get("email") or "").lower() == email]


def duplicates(sb: Sandbox) -> list[str]:
    """Emails with more than one record of a kind in a CRM."""
    hs = Counter(str(r.get("email") or "").lower() for r in sb.hubspot.all("contacts"))
    sf = Counter(str(r.get("Email") or "").lower() for r in sb.salesforce.all("Lead"))
    return sorted({f"hubspot:{e}" for e, n in hs.items() if n > 1}
                  | {f"salesforce:{e}" for e, n in sf.items() if n > 1})


def repeated_updates(sb: Sandbox) -> list[str]:
    """Updates the CRMs applied more than once (same record, same fields, same values)."""
    seen: Counter[str] = Counter()
    for w in sb.hubspot.write_log:
        if "update" in w["endpoint"]:
            seen[json.dumps(["hubspot", w["id"], sorted(w["properties"].items())])] += 1
    for w in sb.salesforce.write_log:
        if "update" in w["endpoint"]:
            seen[json.dumps(["salesforce", w["id"], sorted(w["fields"].items())], default=str)] += 1
    return [k for k, n in seen.items() if n > 1]


def ok_cycles(svc: ServiceProc) -> int:
    return len([e for e in svc.events("cycle") if e.get("status") == "ok"])


def wait_cycles(svc: ServiceProc, n: int) -> None:
    """``n`` more successful cycles of this daemon (a deadline, not a timing)."""
    target = ok_cycles(svc) + n
    wait_until(lambda: svc.alive() and ok_cycles(svc) >= target, lambda: f"{n} more ok cycles; log: {svc.tail()}")


def audit_once(ch: Chaos) -> list[Any]:
    """Outbox rows done or superseded whose audit rows are missing or repeated."""
    with ch.store() as store, store.tx() as tx:
        rows = tx.query_audit(limit=1_000_000)
        outbox = {m["id"]: m for m in tx.conn.execute(sa.select(schema.outbox)).mappings()}
    per = Counter((a.outbox_id, a.field) for a in rows)
    bad = [k for k, n in per.items() if n > 1]
    for oid, m in outbox.items():
        if m["state"] in ("done", "superseded"):
            bad += [(oid, f) for f in m["canonical"] if per[(oid, f)] != 1]
    return bad


def ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


# -- (a) the stale-resend race --------------------------------------------------------------------


def test_a_resend_after_kill_9_never_overwrites_the_newer_human_change(chaos: Chaos) -> None:
    sb = chaos.sb
    email = "rae.race@example.com"
    hid, lid = linked_person(sb, email)
    svc = chaos.start()
    wait_cycles(svc, 2)  # linked; under the threshold, nothing to write

    sb.salesforce_server.inject("hold_answer", endpoint="collections.update", delay=30.0)
    sb.hubspot.modify("contacts", hid, {"hubspotscore": "70"})
    wait_until(lambda: svc.alive() and sb.salesforce.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL",
               "Salesforce to apply Lifecycle MQL (its answer held)")
    svc.proc.kill()  # kill -9 while the answer is held: the row stays `sending`
    svc.proc.wait(timeout=30)
    sb.salesforce.modify("Lead", lid, {"Lifecycle_Stage__c": "SQL"})  # sales moves on meanwhile

    again = chaos.start()

    def superseded() -> list[Any]:
        again.alive()
        with chaos.store() as store, store.tx() as tx:
            return tx.query_audit(rule="superseded")

    (row,) = wait_until(superseded, "the resend to be found superseded")
    assert (row.system, row.record_id, row.field) == ("salesforce", lid, "lifecycle")
    wait_cycles(again, 3)
    assert sb.salesforce.get("Lead", lid)["Lifecycle_Stage__c"] == "SQL"
    assert len(superseded()) == 1
    mql = [w for w in sb.salesforce.write_log if w["id"] == lid and w["fields"].get("Lifecycle_Stage__c") == "MQL"]
    assert len(mql) == 1  # the one applied before the kill; never resent
    assert again.events("write_superseded")
    assert again.stop() == 0


# -- (b) a create answered 504 that lands 3 s late ------------------------------------------------


def test_a_create_answered_504_and_applied_3_s_late_makes_one_record(chaos: Chaos) -> None:
    sb = chaos.sb
    svc = chaos.start()
    wait_cycles(svc, 1)
    sb.hubspot_server.inject("late_apply", endpoint="contacts.batch_create", status=504, delay=3.0)
    sb.salesforce_server.inject("late_apply", endpoint="collections.upsert", status=504, delay=3.0)
    returned(sb, "ida.late@example.com")  # syncd creates the HubSpot contact
    handoff(sb, "hal.late@example.com")  # syncd creates the Salesforce Lead

    def landed() -> bool:
        svc.alive()
        return bool(contacts(sb, "ida.late@example.com") and leads(sb, "hal.late@example.com"))

    wait_until(landed, "both creates")
    wait_until(lambda: svc.alive() and len(svc.events("write_failed")) >= 2, "both 504s seen by syncd")
    wait_until(lambda: svc.alive() and chaos.outbox_open() == 0, "the resends done")
    time.sleep(4.0)  # the late copies land (3 s after their 504s): give them the time to
    wait_cycles(svc, 2)
    assert len(contacts(sb, "ida.late@example.com")) == 1  # the late original got HubSpot's 409
    (lead,) = leads(sb, "hal.late@example.com")
    upserts = [w for w in sb.salesforce.write_log if w["fields"].get("Email") == "hal.late@example.com"]
    # the resend and the late original both landed, on one Lead: the upsert on Syncd_Key__c
    assert [(w["endpoint"], w["id"]) for w in upserts] == [("collections.upsert", lead["Id"])] * 2
    assert duplicates(sb) == []
    assert audit_once(chaos) == []
    assert svc.stop() == 0


# -- (c) two daemons on PostgreSQL, one frozen past its lease mid-batch ---------------------------


@pytest.fixture
def pg_chaos(tmp_path: Path, store_url: str) -> Iterator[Chaos]:
    yield from _chaos(tmp_path, store_url, write_batch=5)


@pytest.mark.postgres
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_a_daemon_frozen_past_its_lease_mid_batch_sends_nothing_twice(pg_chaos: Chaos) -> None:
    ch, sb = pg_chaos, pg_chaos.sb
    handoffs = [f"hand{i}@example.com" for i in range(16)]
    returns = [f"ret{i}@example.com" for i in range(10)]
    for e in handoffs:
        handoff(sb, e)
    for e in returns:
        returned(sb, e)
    # slow write batches (applied after 0.3 s): a batch is in flight when the daemon freezes
    for server, endpoint in ((sb.salesforce_server, "collections.*"), (sb.hubspot_server, "contacts.batch_create"),
                             (sb.hubspot_server, "contacts.batch_update")):
        server.inject("delay", endpoint=endpoint, count=1_000, delay=0.3)
    other = ch.tmp / "other.toml"  # a second daemon: another instance, the same store
    other.write_text(ch.config.read_text())

    a = ch.start()
    writes = sb.salesforce_server.request_count("collections.*") + sb.hubspot_server.request_count("contacts.batch_*")
    wait_until(lambda: a.alive() and sb.salesforce_server.request_count("collections.*")
               + sb.hubspot_server.request_count("contacts.batch_*") > writes + 1, "daemon A's first write batches")
    a.proc.send_signal(signal.SIGSTOP)  # frozen mid-batch, holding its in-memory batch
    b = ch.start(other)

    def finished() -> bool:
        b.alive()
        return all(leads(sb, e) for e in handoffs) and all(contacts(sb, e) for e in returns) \
            and ch.outbox_open() == 0

    wait_until(finished, "daemon B to take over and finish every write", timeout=120)
    a.proc.send_signal(signal.SIGCONT)  # A wakes up past its lease, its batch still in hand
    wait_until(lambda: a.alive() and (a.events("lease_lost") or a.events("writes_fenced")),
               "A to see it lost the lease")
    wait_cycles(b, 2)
    wait_cycles(a, 1)
    assert duplicates(sb) == []
    assert all(len(leads(sb, e)) == 1 for e in handoffs)
    assert all(len(contacts(sb, e)) == 1 for e in returns)
    assert repeated_updates(sb) == []
    assert audit_once(ch) == []
    assert a.stop() == 0 and b.stop() == 0


# -- (d) a write-only outage ----------------------------------------------------------------------

OUTAGE_S = 15.0  # the two minutes, time-compressed (back-off capped at 1 s: ~15 sends each)


def test_every_write_lands_after_a_write_only_outage(chaos: Chaos) -> None:
    sb = chaos.sb
    people = [linked_person(sb, f"out{i}@example.com") for i in range(8)]
    svc = chaos.start()
    wait_cycles(svc, 2)
    sb.hubspot_server.inject("server_error", endpoint="contacts.batch_update", count=1_000_000, status=503)
    sb.salesforce_server.inject("server_error", endpoint="collections.update", count=1_000_000, status=503)
    for hid, _ in people:
        sb.hubspot.modify("contacts", hid, {"hubspotscore": "70"})
    ends = time.monotonic() + OUTAGE_S
    wait_until(lambda: svc.alive() and svc.events("write_failing"), "writes alerted on as failing")
    time.sleep(max(0.0, ends - time.monotonic()))
    assert svc.alive()
    assert all(sb.salesforce.get("Lead", lid)["Lifecycle_Stage__c"] == "Lead" for _, lid in people)
    with chaos.store() as store, store.tx() as tx:
        assert tx.open_quarantine() == []
        assert tx.count_failing_writes(1) >= 2 * len(people)
    sb.hubspot_server.faults.clear()
    sb.salesforce_server.faults.clear()

    def landed() -> bool:
        svc.alive()
        return all(sb.salesforce.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL"
                   and sb.hubspot.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
                   for hid, lid in people) and chaos.outbox_open() == 0

    wait_until(landed, "every write after the outage")
    assert audit_once(chaos) == []
    with chaos.store() as store, store.tx() as tx:
        assert tx.open_quarantine() == []
    assert svc.stop() == 0


# -- (e) kill -9 at random points -----------------------------------------------------------------

KILLS = 25
WRITE_ENDPOINTS = (("hubspot", "contacts.batch_update"), ("hubspot", "contacts.batch_create"),
                   ("salesforce", "collections.update"), ("salesforce", "collections.upsert"))


def _kill_somewhere(ch: Chaos, svc: ServiceProc, rng: random.Random) -> bool:
    """Let ``svc`` (warm) go and kill -9 it: mid-flush (a write applied, its answer held) or
    after a random short while. Returns whether a write was in flight."""
    sb = ch.sb
    mid_flush = rng.random() < 0.5
    if mid_flush:
        system, endpoint = rng.choice(WRITE_ENDPOINTS)
        server = sb.hubspot_server if system == "hubspot" else sb.salesforce_server
        before = server.request_count(endpoint)
        server.inject("hold_answer", endpoint=endpoint, delay=5.0)
    ch.go(svc)
    wait_until(lambda: svc.alive() and svc.events("service_started"), "the daemon to start")
    in_flight = False
    if mid_flush:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not in_flight:
            in_flight = server.request_count(endpoint) > before
            time.sleep(0.02)
    else:
        time.sleep(rng.uniform(0.0, 1.0))
    svc.proc.kill()
    svc.proc.wait(timeout=30)
    sb.hubspot_server.faults.clear()
    sb.salesforce_server.faults.clear()
    return in_flight


def _resumed_after_s(ch: Chaos, svc: ServiceProc) -> float | None:
    """From the daemon's ``service_started`` to the start of its first cycle (its own clock)."""
    started = svc.events("service_started")[0]
    with ch.store() as store, store.tx() as tx:
        runs = [r for r in tx.last_runs(limit=100_000) if r.owner == started["owner"]]
    if not runs:
        return None
    return (min(r.started_at for r in runs) - ts(started)).total_seconds()


def test_kill_9_at_25_random_points_loses_nothing_and_duplicates_nothing(chaos: Chaos) -> None:
    sb, rng = chaos.sb, random.Random(14)
    people = [linked_person(sb, f"k{i}@example.com") for i in range(KILLS)]
    handoffs: list[str] = []
    returns: list[str] = []
    killed: list[ServiceProc] = []
    mid_flush = 0
    warm = chaos.start(warm=True)
    for i in range(KILLS):
        sb.hubspot.modify("contacts", people[i][0], {"hubspotscore": "70"})
        handoffs.append(f"hk{i}@example.com")
        handoff(sb, handoffs[-1])
        returns.append(f"rk{i}@example.com")
        returned(sb, returns[-1])
        svc, warm = warm, chaos.start(warm=True)  # the next one imports while this one runs
        mid_flush += _kill_somewhere(chaos, svc, rng)
        killed.append(svc)
    final = chaos.go(warm)

    def converged() -> bool:
        final.alive()
        return all(sb.salesforce.get("Lead", lid)["Lifecycle_Stage__c"] == "MQL" for _, lid in people) \
            and all(leads(sb, e) for e in handoffs) and all(contacts(sb, e) for e in returns) \
            and chaos.outbox_open() == 0

    wait_until(converged, "every change after the kills", timeout=120)
    wait_cycles(final, 1)
    assert duplicates(sb) == []
    assert audit_once(chaos) == []
    with chaos.store() as store, store.tx() as tx:
        assert tx.open_quarantine() == []
    resumed = [s for s in (_resumed_after_s(chaos, svc) for svc in [*killed[1:], final]) if s is not None]
    print(f"{KILLS} kills, {mid_flush} mid-flush (a write applied, its answer held); restarts resumed after "
          f"(s): max {max(resumed):.2f}, {sorted(round(s, 2) for s in resumed)}")
    assert mid_flush >= 3
    assert len(resumed) >= KILLS // 2
    assert max(resumed) < 2.0
    assert final.stop() == 0
