"""The sync spine end to end: real clients against the sandbox CRMs, through open_runtime/Engine.

Each test seeds a fresh :class:`~syncd.sandbox.Sandbox` (both simulators on
127.0.0.1 over TLS), points a config at it and runs cycles with the same code
``syncd sync --once`` runs. Assertions compare the state store with the
simulators' ground truth (their direct-access API), and API costs with the
simulators' request counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.engine import CycleStats
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import CASE_VARIANT, DUPLICATE, SeedSpec, SeedSummary, seed
from syncd.store import RecordRow

HS_OBJECTS = ("contacts", "deals")
SF_OBJECTS = ("Lead", "Contact", "Opportunity", "Task")

# HubSpot lifecyclestage / Salesforce StageName → glossary term (mappings/*.toml, written out
# independently here so a mapping regression shows up as a wrong term).
HS_LIFECYCLE = {
    "subscriber": "subscriber",
    "lead": "lead",
    "marketingqualifiedlead": "mql",
    "salesacceptedlead": "sal",
    "salesqualifiedlead": "sql",
    "opportunity": "opportunity",
    "customer": "customer",
}
SF_LIFECYCLE = {
    "Subscriber": "subscriber",
    "Lead": "lead",
    "MQL": "mql",
    "SAL": "sal",
    "SQL": "sql",
    "Opportunity": "opportunity",
    "Customer": "customer",
}


def norm(email: str | None) -> str | None:
    return email.strip().lower() if email and email.strip() else None


@dataclass
class World:
    sb: Sandbox
    rt: Runtime
    summary: SeedSummary

    def cycle(self, group: str | None = None) -> CycleStats:
        return self.rt.engine().cycle(group)

    def converge(self, max_cycles: int = 6) -> CycleStats:
        """Cycle until a cycle changes nothing (our own writes have come back as echoes)."""
        for _ in range(max_cycles):
            st = self.cycle()
            if st.changed == 0 and st.sent == 0:
                return st
        raise AssertionError(f"no quiet cycle after {max_cycles} cycles: last {st.summary()}")

    def reset_counts(self) -> None:
        self.sb.hubspot_server.reset_counts()
        self.sb.salesforce_server.reset_counts()

    def rows(self, system: str, obj: str) -> dict[str, RecordRow]:
        with self.rt.store.tx(readonly=True) as tx:
            return {r.id: r for r in tx.iter_records(system, obj)}

    def snapshot(self) -> dict[tuple[str, str, str], str]:
        with self.rt.store.tx(readonly=True) as tx:
            return {r.key: r.raw_hash for r in tx.iter_records()}


@contextmanager
def world(tmp: Path, state_url: str, spec: SeedSpec | None, extra: str = "") -> Iterator[World]:
    with Sandbox(tmp / "sandbox") as sb:
        summary = (
            seed(sb.hubspot, sb.salesforce, spec)
            if spec
            else SeedSummary(SeedSpec(people=0, deals=0), datetime.now(UTC), datetime.now(UTC))
        )
        cfg = sb.write_config(
            tmp / "syncd.toml", state_url=state_url, extra="\n[sync]\nretry_cap_s = 1\n" + extra
        )
        old = {k: os.environ.get(k) for k in sb.env()}
        sb.export_env()
        rt = open_runtime(load_config(cfg))
        try:
            yield World(sb, rt, summary)
        finally:
            rt.close()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def assert_store_matches_apps(w: World) -> None:
    """Counts per object equal the apps'; every record's raw values are the app's current ones."""
    for obj in HS_OBJECTS:
        app = {r["hs_object_id"]: r for r in w.sb.hubspot.all(obj)}
        rows = w.rows("hubspot", obj)
        assert set(rows) == set(app), f"hubspot {obj}: store and app differ"
    for obj in SF_OBJECTS:
        app_ids = {r["Id"] for r in w.sb.salesforce.all(obj)}
        rows = w.rows("salesforce", obj)
        assert set(rows) == app_ids, f"salesforce {obj}: store and app differ"


def check_pulled_mapped_linked(w: World) -> None:
    assert_store_matches_apps(w)
    hs_contacts = w.rows("hubspot", "contacts")
    leads = w.rows("salesforce", "Lead")
    contacts = w.rows("salesforce", "Contact")

    # Mapped: each HubSpot contact and SF Lead carries the glossary term of its current raw value.
    for r in hs_contacts.values():
        assert r.raw["lifecyclestage"] == w.sb.hubspot.get("contacts", r.id)["lifecyclestage"]
        assert r.canonical["terms"].get("lifecycle") == HS_LIFECYCLE[r.raw["lifecyclestage"]], r.id
        assert r.canonical["unmapped"] == []
    for r in leads.values():
        assert r.canonical["terms"].get("lifecycle") == SF_LIFECYCLE[r.raw["Lifecycle_Stage__c"]], (
            r.id
        )
        assert r.entity_id is not None

    # Converted Leads share the entity of the Contact they became.
    converted = [r for r in leads.values() if r.raw["IsConverted"]]
    assert len(converted) == w.summary.counts["salesforce.conversions"]
    for r in converted:
        assert r.entity_id == contacts[r.raw["ConvertedContactId"]].entity_id, r.id

    # Linked by normalised email, except the planted duplicates (reported as conflicts).
    sf_by_email: dict[str, list[RecordRow]] = {}
    for r in [*leads.values(), *contacts.values()]:
        e = norm(r.raw["Email"])
        if e:
            sf_by_email.setdefault(e, []).append(r)
    dup_emails = {norm(c.email) for c in w.summary.cases[DUPLICATE]}
    assert len(dup_emails) == w.summary.spec.duplicates
    linked = 0
    for h in hs_contacts.values():
        e = norm(h.raw["email"])
        assert e is not None
        sf = sf_by_email.get(e, [])
        if e in dup_emails:
            assert len(sf) == 2  # not merging them is test_duplicate_candidates_are_never_merged
            continue
        for s in sf:
            assert s.entity_id == h.entity_id, f"hubspot {h.id} not linked to {s.object} {s.id}"
        linked += bool(sf)
    assert linked >= w.summary.counts["salesforce.leads"] - 2 * w.summary.spec.duplicates
    # case/whitespace variants are linked although the raw emails differ
    variants = w.summary.cases[CASE_VARIANT]
    assert variants
    for c in variants:
        assert c.hubspot_id and c.sf_lead_id
        h, lead = hs_contacts[c.hubspot_id], leads[c.sf_lead_id]
        assert h.raw["email"] != lead.raw["Email"]
        assert h.entity_id == lead.entity_id
    with w.rt.store.tx(readonly=True) as tx:
        conflicts = tx.open_link_conflicts()
    assert {c.email_norm for c in conflicts} == dup_emails

    # Deals ↔ Opportunities: every Opportunity shares its entity with the HubSpot deal of its name.
    deals = {r.raw["dealname"]: r for r in w.rows("hubspot", "deals").values()}
    opps = w.rows("salesforce", "Opportunity")
    assert opps
    for o in opps.values():
        d = deals[o.raw["Name"]]
        assert d.entity_id is not None and d.entity_id == o.entity_id, o.raw["Name"]
    opp_entities = {o.entity_id for o in opps.values()}
    unpaired = [
        d for d in deals.values() if d.raw["dealname"] not in {o.raw["Name"] for o in opps.values()}
    ]
    assert all(d.entity_id not in opp_entities for d in unpaired)


# -- the seeded population, on both store backends ------------------------------------------


@pytest.mark.slow
def test_seeded_sandbox_pulled_mapped_linked_then_incremental(
    tmp_path: Path, store_url: str
) -> None:
    with world(tmp_path, store_url, SeedSpec(seed=1, people=5000, deals=1000)) as w:
        first = w.cycle()
        assert first.quarantined == 0 and first.unmapped == 0
        assert first.pulled["hubspot.contacts"] == 5000
        assert first.pulled["hubspot.deals"] == 1000
        assert first.conflicts == w.summary.spec.duplicates
        w.converge()
        check_pulled_mapped_linked(w)

        # A cycle with no changes costs at most 2 calls per object per system.
        w.reset_counts()
        quiet = w.cycle()
        assert quiet.changed == 0
        hs = w.sb.hubspot_server
        assert hs.request_count("contacts.*") <= 2
        assert hs.request_count("deals.*") + hs.request_count("associations.*") <= 2
        assert hs.request_count() <= 2 * len(HS_OBJECTS)
        assert w.sb.salesforce_server.request_count() <= 2 * len(SF_OBJECTS)

        # 10 records change (5 in each CRM): the next cycle picks up exactly those.
        before = w.snapshot()
        hs_ids = sorted(w.rows("hubspot", "contacts"))[:5]
        lead_ids = sorted(
            i for i, r in w.rows("salesforce", "Lead").items() if not r.raw["IsConverted"]
        )[:5]
        for i in hs_ids:
            w.sb.hubspot.modify("contacts", i, {"company": f"Renamed {i}"})
        for i in lead_ids:
            w.sb.salesforce.modify("Lead", i, {"Company": f"Renamed {i}"})
        st = w.cycle()
        assert st.changed == 10
        after = w.snapshot()
        changed = {k for k, h in after.items() if before.get(k) != h}
        expected = {("hubspot", "contacts", i) for i in hs_ids} | {
            ("salesforce", "Lead", i) for i in lead_ids
        }
        assert changed == expected
        hsr, sfr = w.rows("hubspot", "contacts"), w.rows("salesforce", "Lead")
        assert all(hsr[i].raw["company"] == f"Renamed {i}" for i in hs_ids)
        assert all(sfr[i].raw["Company"] == f"Renamed {i}" for i in lead_ids)
        with w.rt.store.tx(readonly=True) as tx:
            assert tx.dirty_records() == []


# -- cursors: ties across a page boundary ---------------------------------------------------------


def test_equal_timestamps_across_page_boundaries_are_not_lost(tmp_path: Path) -> None:
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with world(tmp_path, f"sqlite:///{tmp_path / 's.db'}", None) as w:
        hs_ids = [
            w.sb.hubspot.add(
                "contacts", {"email": f"tie{i}@ties.test", "lifecyclestage": "lead"}, at=at
            )
            for i in range(450)
        ]
        lead_ids = [
            w.sb.salesforce.insert(
                "Lead",
                {
                    "LastName": f"Tie{i}",
                    "Company": "Ties",
                    "Email": f"sftie{i}@ties.test",
                    "Status": "Open - Not Contacted",
                },
                at=at,
            )
            for i in range(2500)
        ]
        st = w.cycle("contacts")
        assert st.pulled["hubspot.contacts"] >= 450 and st.pulled["salesforce.Lead"] >= 2500
        # the pages really were split inside the tie
        assert w.sb.hubspot_server.request_count("contacts.search") > 1
        assert w.sb.salesforce_server.request_count("query_more") >= 1
        assert set(w.rows("hubspot", "contacts")) == set(hs_ids)
        assert set(w.rows("salesforce", "Lead")) == set(lead_ids)

        # More records at the cursor's own timestamp, after the cursor was stored: still picked up.
        late_hs = [
            w.sb.hubspot.add("contacts", {"email": f"late{i}@ties.test"}, at=at) for i in range(3)
        ]
        late_sf = [
            w.sb.salesforce.insert(
                "Lead",
                {"LastName": f"Late{i}", "Company": "Ties", "Status": "Open - Not Contacted"},
                at=at,
            )
            for i in range(3)
        ]
        w.cycle("contacts")
        assert set(late_hs) <= set(w.rows("hubspot", "contacts"))
        assert set(late_sf) <= set(w.rows("salesforce", "Lead"))


# -- faults are ridden out ------------------------------------------------------------------------


def test_429_burst_and_503s_are_ridden_out_without_losing_data(tmp_path: Path) -> None:
    with world(
        tmp_path, f"sqlite:///{tmp_path / 's.db'}", SeedSpec(seed=2, people=300, deals=60)
    ) as w:
        hs, sf = w.sb.hubspot_server, w.sb.salesforce_server
        hs.inject("rate_limit", count=4, endpoint="contacts.search", retry_after=0.2)
        hs.inject("server_error", count=1, endpoint="deals.search", status=503)
        sf.inject("server_error", count=2, endpoint="query", status=503)
        w.cycle()
        # the faults were served (the cycle really met them) ...
        assert hs.request_count("contacts.search") >= 1 + 4
        assert sf.request_count("query") >= len(SF_OBJECTS) + 2
        # ... and nothing was lost
        w.converge()
        assert_store_matches_apps(w)
        with w.rt.store.tx(readonly=True) as tx:
            assert tx.open_quarantine() == []


# -- values syncd cannot read --------------------------------------------------------------


def test_unmapped_value_is_counted_and_shown_never_guessed(tmp_path: Path) -> None:
    from syncd.report import status_data

    with world(
        tmp_path, f"sqlite:///{tmp_path / 's.db'}", SeedSpec(seed=3, people=50, deals=10)
    ) as w:
        w.converge()
        cid = sorted(w.rows("hubspot", "contacts"))[0]
        w.sb.hubspot.modify("contacts", cid, {"lifecyclestage": "other"})
        st = w.cycle()
        assert st.unmapped == 1
        row = w.rows("hubspot", "contacts")[cid]
        assert row.raw["lifecyclestage"] == "other"
        assert (
            "lifecycle" not in row.canonical["terms"] or row.canonical["terms"]["lifecycle"] is None
        )
        assert ["lifecyclestage", "other"] in row.canonical["unmapped"]
        with w.rt.store.tx(readonly=True) as tx:
            unmapped = tx.unmapped_values()
        assert [(u.system, u.object, u.field, u.value) for u in unmapped] == [
            ("hubspot", "contacts", "lifecyclestage", "other")
        ]
        shown = status_data(w.rt.store, datetime.now(UTC))
        assert shown["unmapped_values"] == [
            {
                "system": "hubspot",
                "object": "contacts",
                "field": "lifecyclestage",
                "value": "other",
                "count": 1,
            }
        ]
        contacts_row = next(o for o in shown["objects"] if o["object"] == "contacts")
        assert contacts_row["unmapped"] == 1


def _plant_raw(w: World, obj: str, record_id: str, prop: str, value: str) -> None:
    """Make the HubSpot simulator hand out a value its own write path refuses (a CRM returning
    garbage): bump the record through the app, then put the bad value in its stored properties."""
    app = w.sb.hubspot
    app.modify(obj, record_id, {"company": "Garbage Inc"})
    with app._lock:  # the simulator's state, not a client library
        app._store(obj).records[record_id].props[prop] = value


def test_bad_value_is_quarantined_with_reason_rest_of_page_goes_on(tmp_path: Path) -> None:
    with world(
        tmp_path, f"sqlite:///{tmp_path / 's.db'}", SeedSpec(seed=4, people=50, deals=10)
    ) as w:
        w.converge()
        ids = sorted(w.rows("hubspot", "contacts"))
        bad, good = ids[0], ids[1:4]
        _plant_raw(w, "contacts", bad, "hubspotscore", "abc")
        for i in good:
            w.sb.hubspot.modify("contacts", i, {"company": f"Fine {i}"})
        st = w.cycle("contacts")
        assert st.quarantined == 1
        with w.rt.store.tx(readonly=True) as tx:
            q = tx.open_quarantine()
        assert [(x.system, x.object, x.record_id) for x in q] == [("hubspot", "contacts", bad)]
        assert "hubspotscore" in q[0].reason and "abc" in q[0].reason
        rows = w.rows("hubspot", "contacts")
        assert all(rows[i].raw["company"] == f"Fine {i}" for i in good)
        assert rows[bad].raw["company"] != "Garbage Inc"  # the bad record was not stored as-is


def test_duplicate_candidates_are_never_merged(tmp_path: Path) -> None:
    """A HubSpot contact and two SF Leads of the same normalised email: a conflict, no link."""
    with world(tmp_path, f"sqlite:///{tmp_path / 's.db'}", None) as w:
        hs = w.sb.hubspot.add("contacts", {"email": "dup@dups.test", "lifecyclestage": "lead"})
        fields = {"LastName": "Dup", "Company": "Dups", "Status": "Open - Not Contacted"}
        a = w.sb.salesforce.insert("Lead", {**fields, "Email": "dup@dups.test"})
        b = w.sb.salesforce.insert("Lead", {**fields, "Email": " DUP@dups.test"})
        st = w.cycle("contacts")
        assert st.conflicts >= 1
        with w.rt.store.tx(readonly=True) as tx:
            assert [c.email_norm for c in tx.open_link_conflicts()] == ["dup@dups.test"]
        contact = w.rows("hubspot", "contacts")[hs]
        leads = w.rows("salesforce", "Lead")
        assert contact.entity_id not in {leads[a].entity_id, leads[b].entity_id}
