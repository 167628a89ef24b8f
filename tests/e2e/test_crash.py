"""kill -9 at random points, then restart: every intended write applied exactly once.

The sandbox CRMs run in THIS process (SimServer threads, ports fixed for the
run); ``syncd sync --once`` runs as a CHILD process that is SIGKILLed after a
random delay (fixed seed), at least KILLS times, then restarted until cycles
complete cleanly and converge. A second sandbox, seeded identically, is
synced without any crash: the reference.

Work is fed in waves (one-sided changes on disjoint people), one before each
killed run, so every kill lands in a cycle with real writes to send. Half the
kills come after a random delay (anywhere: pull, map, link, decide, write-back),
half right after the CRM accepted the n-th write and before the outbox commit
marked it done (the child reports each accepted write).

At the end:
- the final CRM state equals the reference (ids and timestamps aside);
- the audit holds each change exactly once: one row per (outbox entry, field),
  every done entry fully audited, the same multiset of (system, object, rule,
  field, before, after) as the reference, no open outbox entries, unique keys;
- no Lead/contact created twice (normalised email) by syncd;
- nothing missing: the store holds every CRM record, a last cycle changes nothing.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncd.model import FieldUpdate, RecordCreate
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import Store, schema

pytestmark = pytest.mark.slow

SEED = 20261123
KILLS = 24  # the issue asks for at least 20
WAVES = KILLS  # every killed run has fresh work to be killed in
PER_KIND = 10  # people per change kind per wave
KINDS = ("score", "ahead", "return", "reverse")
BASE_PEOPLE = 300
CHILD = str(Path(__file__).with_name("_crash_child.py"))
START = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)  # same for both sandboxes

# fields that differ between two identically seeded sandboxes by nature (ids, clocks)
VOLATILE = frozenset(
    {
        "Id",
        "hs_object_id",
        "createdate",
        "lastmodifieddate",
        "hs_lastmodifieddate",
        "CreatedDate",
        "LastModifiedDate",
        "SystemModstamp",
        "Syncd_Key__c",  # syncd's create key: derived from the outbox row, which differs per store
    }
)
HS_OBJECTS = ("contacts", "deals")
SF_OBJECTS = ("Lead", "Contact", "Opportunity", "Task", "Account")


# -- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    sb: Sandbox
    config: Path
    state_url: str
    env: dict[str, str]
    logs: Path
    waves: list[list[tuple[str, str]]]
    runs: int = 0

    def child(self, *args: str) -> subprocess.Popen[str]:
        self.runs += 1
        err = open(self.logs / f"run{self.runs:03d}.err", "wb")  # noqa: SIM115 - the child owns it
        p = subprocess.Popen(
            [sys.executable, CHILD, str(self.config), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        err.close()
        return p

    def stderr(self) -> str:
        return (self.logs / f"run{self.runs:03d}.err").read_text()[-2000:]

    def run_killed(self, delay: float | None = None, after_writes: int | None = None) -> None:
        """A child killed ``delay`` s after it is ready, or right after the CRM accepted its
        ``after_writes``-th write (before the outbox marked it done)."""
        p = self.child("--report-writes")
        assert p.stdout is not None
        ready = p.stdout.readline().strip()
        assert ready == "ready", f"child did not start: {ready!r} {self.stderr()}"
        if after_writes is not None:
            seen = 0
            while seen < after_writes:
                line = p.stdout.readline()
                assert line, f"child ended before {after_writes} writes: {self.stderr()}"
                seen += line.strip() == "write"
        else:
            time.sleep(delay or 0.0)
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        assert alive, f"child exited {p.returncode} on its own: {self.stderr()}"

    def converge(self) -> list[dict[str, int]]:
        """Clean cycles until one changes, sends and fails nothing; their summaries."""
        p = self.child("--until-quiet")
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"child exited {p.returncode}: {self.stderr()}"
        return [json.loads(line) for line in out.splitlines()[1:]]

    def store(self) -> Store:
        return Store.open(self.state_url)


def _person_sets(rng: random.Random, n: int) -> list[str]:
    return [f"crash{n:02d}.{i:03d}.{rng.randrange(10**6):06d}@example.org" for i in range(PER_KIND)]


def build(sb: Sandbox) -> list[list[tuple[str, str]]]:
    """Seed a realistic base plus quiet people that each wave will stir. Deterministic."""
    seed(
        sb.hubspot,
        sb.salesforce,
        SeedSpec(seed=SEED % 1000, people=BASE_PEOPLE, deals=BASE_PEOPLE // 5, start=START),
    )
    rng = random.Random(SEED)
    hs, sf = sb.hubspot, sb.salesforce
    at = START + timedelta(days=1)
    waves: list[list[tuple[str, str]]] = []
    for w in range(WAVES):
        wave: list[tuple[str, str]] = []
        for k, kind in enumerate(KINDS):
            for email in _person_sets(rng, w * 4 + k):
                first, last = "Pat", f"W{w}{kind.title()}"
                if kind == "score":  # HubSpot-only lead; its score will cross the threshold
                    hid = hs.add(
                        "contacts",
                        {
                            "email": email,
                            "firstname": first,
                            "lastname": last,
                            "lifecyclestage": "lead",
                            "hubspotscore": "20",
                        },
                        at=at,
                    )
                    wave.append((kind, hid))
                    continue
                lead = sf.insert(
                    "Lead",
                    {
                        "Email": email,
                        "FirstName": first,
                        "LastName": last,
                        "Company": f"Co {w}",
                        "Status": "Open - Not Contacted",
                        "Lifecycle_Stage__c": "MQL",
                        "Lead_Score__c": 60,
                    },
                    at=at,
                )
                if kind == "reverse":  # Salesforce-only lead; sales will return it
                    wave.append((kind, lead))
                    continue
                hid = hs.add(
                    "contacts",
                    {
                        "email": email,
                        "firstname": first,
                        "lastname": last,
                        "lifecyclestage": "marketingqualifiedlead",
                        "hubspotscore": "60",
                        "hs_lead_status": "NEW",
                    },
                    at=at,
                )
                wave.append((kind, hid if kind == "ahead" else lead))
        waves.append(wave)
    return waves


def apply_wave(sb: Sandbox, wave: list[tuple[str, str]]) -> None:
    """One-sided human changes on disjoint people (the order of cycles cannot matter)."""
    for kind, rid in wave:
        if kind == "score":
            sb.hubspot.modify("contacts", rid, {"hubspotscore": "77"})
        elif kind == "ahead":
            sb.hubspot.modify("contacts", rid, {"lifecyclestage": "salesqualifiedlead"})
        else:  # return / reverse
            sb.salesforce.modify(
                "Lead",
                rid,
                {"Status": "Returned - Not Ready", "Return_Reason__c": "no budget this year"},
            )


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Any]:
    opened: list[Sandbox] = []

    def _make(name: str) -> World:
        d = tmp_path / name
        d.mkdir()
        sb = Sandbox(d / "sandbox").start()
        opened.append(sb)
        waves = build(sb)
        state_url = f"sqlite:///{d / 'state.db'}"
        cfg = sb.write_config(
            d / "syncd.toml",
            state_url=state_url,
            # one clock for CRMs and syncd here: a 1 s overlap, small write batches (more
            # commit points to be killed between)
            extra="\n[sync]\noverlap_s = 1\nwrite_batch = 40\nretry_max_attempts = 3\nretry_cap_s = 1\n",
        )
        logs = d / "logs"
        logs.mkdir()
        return World(sb, cfg, state_url, {**os.environ, **sb.env()}, logs, waves)

    yield _make
    for sb in opened:
        sb.stop()


# -- what we compare ------------------------------------------------------------------------------


def crm_state(sb: Sandbox) -> dict[str, list[str]]:
    """Every record of both CRMs, ids and clocks aside, as sorted JSON lines per object."""
    out: dict[str, list[str]] = {}
    for obj in HS_OBJECTS:
        out[f"hubspot.{obj}"] = sorted(_canon(r) for r in sb.hubspot.all(obj))
    for obj in SF_OBJECTS:
        out[f"salesforce.{obj}"] = sorted(_canon(r) for r in sb.salesforce.all(obj))
    return out


def _canon(rec: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in rec.items() if k not in VOLATILE and v not in (None, "")},
        sort_keys=True,
        default=str,
    )


def audit_multiset(store: Store) -> Counter[tuple[Any, ...]]:
    with store.tx() as tx:
        rows = tx.query_audit(limit=10**7)
    return Counter((a.system, a.object, a.rule, a.field, json.dumps(a.before), json.dumps(a.after)) for a in rows)


def created_emails(sb: Sandbox) -> Counter[tuple[str, str]]:
    """(system, normalised email) of every record syncd created through the APIs."""
    c: Counter[tuple[str, str]] = Counter()
    for w in sb.salesforce.write_log:
        if w["endpoint"].endswith("create"):
            c[("salesforce", str(w["fields"].get("Email") or "").strip().lower())] += 1
    for w in sb.hubspot.write_log:
        if "create" in w["endpoint"]:
            c[("hubspot", str(w["properties"].get("email") or "").strip().lower())] += 1
    return c


# -- the test -------------------------------------------------------------------------------------


def test_kill_9_at_random_points_then_restart_applies_every_write_exactly_once(
    make_world: Any,
) -> None:
    # The reference: identical seed and waves, no crash. Its one-wave cycle sets the kill range.
    ref = make_world("reference")
    ref.converge()
    apply_wave(ref.sb, ref.waves[0])
    [one_wave, *_] = ref.converge()
    for wave in ref.waves[1:]:
        apply_wave(ref.sb, wave)
    [rest, *_] = ref.converge()
    assert one_wave["sent"] + rest["sent"] > 1000, "the workload must produce writes"
    max_delay = 1.5 * float(one_wave["elapsed_s"])

    # The crash run: a wave of changes, then a child killed at a random point (fixed seed).
    world = make_world("crash")
    world.converge()
    rng = random.Random(SEED)
    in_write_back = 0
    for i in range(KILLS):
        apply_wave(world.sb, world.waves[i])
        if i % 2:  # anywhere: pull, map, link, decide or write-back
            world.run_killed(delay=rng.uniform(0.0, max_delay))
        else:  # right after the CRM accepted a write, before the outbox commit
            world.run_killed(after_writes=rng.randint(1, 60))
        with world.store() as st, st.tx() as tx:
            in_write_back += tx.outbox_depth() > 0
    # the hard case happened: kills left intended writes not yet done (pending or in flight)
    assert in_write_back >= KILLS // 2, f"only {in_write_back} of {KILLS} kills landed in write-back"
    world.converge()

    # 1. Every intended write applied: the final CRMs equal the crash-free reference.
    got, want = crm_state(world.sb), crm_state(ref.sb)
    for key in want:
        missing = sorted(set(want[key]) - set(got[key]))[:3]
        extra = sorted(set(got[key]) - set(want[key]))[:3]
        assert got[key] == want[key], f"{key} differs; missing {missing}; unexpected {extra}"

    # 2. No create twice: every (system, normalised email) created once, as in the reference.
    created = created_emails(world.sb)
    assert [k for k, n in created.items() if n > 1] == []
    assert created == created_emails(ref.sb)

    # 3. The audit holds each change exactly once, none missing; the outbox is drained.
    store, ref_store = world.store(), ref.store()
    try:
        eng = store.engine
        with eng.connect() as conn:
            o, a = schema.outbox, schema.audit
            dup_keys = conn.execute(sa.select(o.c.key).group_by(o.c.key).having(sa.func.count() > 1)).all()
            assert dup_keys == []
            dup_audit = conn.execute(
                sa.select(a.c.outbox_id, a.c.field).group_by(a.c.outbox_id, a.c.field).having(sa.func.count() > 1)
            ).all()
            assert dup_audit == [], "an outbox entry was audited twice"
            states = dict(conn.execute(sa.select(o.c.state, sa.func.count()).group_by(o.c.state)).all())
            assert not {"pending", "sending", "quarantined"} & set(states), states
            done = conn.execute(sa.select(o.c.id, o.c.canonical).where(o.c.state == "done")).all()
            per_entry = Counter(oid for (oid,) in conn.execute(sa.select(a.c.outbox_id)))
            for oid, canonical in done:
                assert per_entry[oid] == len(canonical), f"outbox {oid}: audit rows missing"
        got_audit, want_audit = audit_multiset(store), audit_multiset(ref_store)
        assert got_audit == want_audit, (
            f"audit differs from the reference: extra {list((got_audit - want_audit).items())[:5]},"
            f" missing {list((want_audit - got_audit).items())[:5]}"
        )

        # 4. Nothing missing, cursors consistent: the store holds every CRM record.
        with store.tx() as tx:
            for obj in HS_OBJECTS:
                assert tx.count_records("hubspot", obj) == len(world.sb.hubspot.all(obj)), obj
                assert tx.get_cursor("hubspot", obj) is not None
            for obj in ("Lead", "Contact", "Opportunity", "Task"):
                assert tx.count_records("salesforce", obj) == len(world.sb.salesforce.all(obj)), obj
                assert tx.get_cursor("salesforce", obj) is not None
    finally:
        store.close()
        ref_store.close()
    [last] = world.converge()  # and it stays converged
    assert (last["sent"], last["changed"], last["failed"]) == (0, 0, 0), last


# -- the same crash, placed deterministically -----------------------------------------------------


def _cycle_killed_after_send(e2e: Any, sent: int | None = None) -> None:
    """One cycle whose writes reach the CRMs but whose process dies before marking them done
    (the outbox rows stay ``sending``): what a kill -9 right after the HTTP response does.
    With ``sent``, only the first ``sent`` writes reached the CRMs before the kill."""
    stats = e2e.decide_only()
    for system, conn in e2e.rt.connectors.items():
        with e2e.rt.store.tx() as tx:
            due = tx.due(system, None, datetime.now(UTC), 1000)
            tx.mark_sending([r.id for r in due])
        for r in due:
            if sent is not None:
                if sent <= 0:
                    break
                sent -= 1
            if r.op == "create":
                conn.create(r.object, [RecordCreate(key=str(r.id), fields=r.fields)])
            else:
                conn.write(
                    r.object,
                    [
                        FieldUpdate(
                            key=str(r.id), record_id=str(r.record_id), fields=r.fields, clear_first=tuple(r.clear_first)
                        )
                    ],
                )
    assert stats.decisions > 0


def _assert_each_outbox_entry_audited_once(e2e: Any) -> None:
    with e2e.rt.store.engine.connect() as conn:
        a = schema.audit
        dup = conn.execute(
            sa.select(a.c.outbox_id, a.c.field).group_by(a.c.outbox_id, a.c.field).having(sa.func.count() > 1)
        ).all()
    assert dup == []
    assert e2e.outbox_depth() == 0


def test_kill_after_reverse_handoff_create_keeps_the_person_returned(e2e: Any) -> None:
    lid = e2e.sf.insert(
        "Lead",
        {
            "Email": "una.crash@example.com",
            "FirstName": "Una",
            "LastName": "Crash",
            "Company": "U",
            "Status": "Returned - Not Ready",
            "Lead_Score__c": 60,
            "Return_Reason__c": "no budget",
            "Lifecycle_Stage__c": "MQL",
        },
    )
    _cycle_killed_after_send(e2e)
    e2e.converge()
    [c] = [c for c in e2e.hs.all("contacts") if c["email"] == "una.crash@example.com"]
    assert (c["lifecyclestage"], c["hs_lead_status"]) == ("lead", "BAD_TIMING")
    sf = e2e.sf.get("Lead", lid)
    assert (sf["Status"], sf["Lifecycle_Stage__c"]) == ("Returned - Not Ready", "Lead")
    _assert_each_outbox_entry_audited_once(e2e)


def _mql_on_both_sides_then_returned_by_sales(e2e: Any, first: str) -> tuple[str, str]:
    """A person at MQL in both CRMs, linked and settled; then sales returns the Lead (not yet
    synced). (HubSpot id, Salesforce id)."""
    email = f"{first.lower()}.crash@example.com"
    hid = e2e.hs.add(
        "contacts",
        {
            "email": email,
            "firstname": first,
            "lastname": "Crash",
            "lifecyclestage": "marketingqualifiedlead",
            "hubspotscore": "60",
        },
    )
    lid = e2e.sf.insert(
        "Lead",
        {
            "Email": email,
            "LastName": "Crash",
            "Company": first[0],
            "Status": "Open - Not Contacted",
            "Lifecycle_Stage__c": "MQL",
        },
    )
    e2e.converge()
    e2e.sf.modify("Lead", lid, {"Status": "Returned - Not Ready", "Return_Reason__c": "later"})
    return hid, lid


def test_kill_after_return_writes_keeps_the_person_returned(e2e: Any) -> None:
    hid, lid = _mql_on_both_sides_then_returned_by_sales(e2e, "Vic")
    _cycle_killed_after_send(e2e)
    e2e.converge()
    hs = e2e.hs.get("contacts", hid)
    assert (hs["lifecyclestage"], hs["hs_lead_status"]) == ("lead", "BAD_TIMING")
    sf = e2e.sf.get("Lead", lid)
    assert (sf["Status"], sf["Lifecycle_Stage__c"]) == ("Returned - Not Ready", "Lead")
    _assert_each_outbox_entry_audited_once(e2e)


def test_pending_own_write_is_not_read_as_a_promotion(e2e: Any) -> None:
    lid = e2e.sf.insert(
        "Lead",
        {
            "Email": "wes.crash@example.com",
            "FirstName": "Wes",
            "LastName": "Crash",
            "Company": "W",
            "Status": "Returned - Not Ready",
            "Lead_Score__c": 60,
            "Return_Reason__c": "no budget",
            "Lifecycle_Stage__c": "MQL",
        },
    )
    # The Salesforce lifecycle write fails once (per-record error): it waits for its retry
    # while the next cycle pulls the HubSpot contact the reverse hand-off created.
    e2e.sb.salesforce_server.inject("partial", count=1, endpoint="collections.update", ids=frozenset({lid}))
    e2e.cycle()
    e2e.cycle()
    e2e.converge(clock=lambda: datetime.now(UTC) + timedelta(minutes=10))  # retry is due
    [c] = [c for c in e2e.hs.all("contacts") if c["email"] == "wes.crash@example.com"]
    assert (c["lifecyclestage"], c["hs_lead_status"]) == ("lead", "BAD_TIMING")
    sf = e2e.sf.get("Lead", lid)
    assert (sf["Status"], sf["Lifecycle_Stage__c"]) == ("Returned - Not Ready", "Lead")
    assert not e2e.audit(rule="R3-rehandoff-guard")


def test_kill_between_two_writes_of_one_decision_audits_each_change_once(e2e: Any) -> None:
    hid = e2e.hs.add(
        "contacts",
        {
            "email": "xia.crash@example.com",
            "firstname": "Xia",
            "lastname": "Crash",
            "lifecyclestage": "lead",
            "hubspotscore": "80",
        },
    )
    _cycle_killed_after_send(e2e, sent=1)  # HubSpot took the MQL stage, then the process died
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    assert len([r for r in e2e.sf.all("Lead") if r["Email"] == "xia.crash@example.com"]) == 1
    changes = Counter((a.system, a.record_id, a.field, json.dumps(a.after)) for a in e2e.audit())
    assert [k for k, n in changes.items() if n > 1] == []
    _assert_each_outbox_entry_audited_once(e2e)


def test_kill_between_the_clear_and_the_set_of_a_backwards_move_is_not_read_as_a_human_change(
    e2e: Any,
) -> None:
    """HubSpot moves a stage backwards in two requests (clear, then set). A kill between them
    leaves the contact with no stage: that is syncd's own half-done write, so the next cycle
    finishes it (the R2 return is audited once) instead of superseding it as if a person had
    cleared the stage and then deciding the person again from nothing (R1 null -> lead)."""
    hid, lid = _mql_on_both_sides_then_returned_by_sales(e2e, "Yan")
    e2e.decide_only()
    with e2e.rt.store.tx() as tx:
        [back] = [r for r in tx.due("hubspot", None, datetime.now(UTC), 1000) if r.clear_first]
        tx.mark_sending([back.id])
    # the clear request reached HubSpot; the process died before the set
    e2e.rt.connectors["hubspot"].write(
        "contacts", [FieldUpdate(key=str(back.id), record_id=hid, fields={k: "" for k in back.clear_first})]
    )
    assert not e2e.hs.get("contacts", hid).get("lifecyclestage")
    e2e.converge()
    hs = e2e.hs.get("contacts", hid)
    assert (hs["lifecyclestage"], hs["hs_lead_status"]) == ("lead", "BAD_TIMING")
    lifecycle = [(a.rule, a.before, a.after) for a in e2e.audit() if a.system == "hubspot" and a.field == "lifecycle"]
    assert ("R2-returned", "mql", "lead") in lifecycle
    assert [r for r in lifecycle if r[0] in ("superseded", "R1-forward-only")] == []
    _assert_each_outbox_entry_audited_once(e2e)
