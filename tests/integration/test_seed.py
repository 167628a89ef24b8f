"""The sandbox seed (``syncd demo --seed``) and the demo story, on the real simulators."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest_salesforce import SalesforceSandbox
from hubspot import HubSpot
from hubspot.crm.contacts import PublicObjectSearchRequest

from syncd.mapping import default_mappings_dir, load_mappings
from syncd.model import RawRecord, normalise_email
from syncd.sandbox.hubspot import HubSpotApp
from syncd.sandbox.salesforce import SalesforceApp
from syncd.sandbox.seed import (
    CASE_VARIANT,
    DUPLICATE,
    EXHAUSTED,
    HANDOFF,
    RETURN,
    SF_DEAL_STAGE,
    SF_STAGE,
    STORY_KINDS,
    WON_LAG,
    SeedSpec,
    SeedSummary,
    seed,
)
from syncd.sandbox.story import RETURN_REASON, SCORE_BUMP, Played, Story

START = datetime(2026, 1, 5, tzinfo=UTC)
SPEC = SeedSpec(seed=7, people=600, deals=150, start=START)
SF_OBJECTS = ("Lead", "Contact", "Account", "Opportunity", "Task")


def _seeded(spec: SeedSpec = SPEC) -> tuple[HubSpotApp, SalesforceApp, SeedSummary]:
    hs, sf = HubSpotApp(), SalesforceApp()
    return hs, sf, seed(hs, sf, spec)


def _snapshot(hs: HubSpotApp, sf: SalesforceApp) -> dict[str, Any]:
    snap: dict[str, Any] = {f"hs.{o}": hs.all(o) for o in ("contacts", "deals")}
    snap["hs.associations"] = {c["hs_object_id"]: hs.associations("contacts", c["hs_object_id"])
                               for c in snap["hs.contacts"]}
    snap.update({f"sf.{o}": sf.all(o) for o in SF_OBJECTS})
    return snap


def _sf_people(sf: SalesforceApp) -> list[dict[str, Any]]:
    """One SF row per person record: open (unconverted) Leads and Contacts."""
    return [r for r in sf.all("Lead") if not r["IsConverted"]] + sf.all("Contact")


# ---- determinism ------------------------------------------------------------------------------
def test_same_spec_gives_identical_data_in_both_apps() -> None:
    hs1, sf1, s1 = _seeded()
    hs2, sf2, s2 = _seeded()
    assert _snapshot(hs1, sf1) == _snapshot(hs2, sf2)
    assert s1.cases == s2.cases
    assert s1.counts == s2.counts


def test_a_different_seed_gives_different_people() -> None:
    hs1, _, _ = _seeded()
    hs2, _, _ = _seeded(SeedSpec(seed=8, people=600, deals=150, start=START))
    emails1 = sorted(c["email"] for c in hs1.all("contacts"))
    emails2 = sorted(c["email"] for c in hs2.all("contacts"))
    assert emails1 != emails2


def test_default_start_is_in_the_past_and_stable_within_a_day() -> None:
    now = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
    start = SeedSpec().resolved_start(now)
    assert start == datetime(2026, 2, 18, tzinfo=UTC)  # midnight of "now", minus the 20-day span
    assert SeedSpec().resolved_start(now + timedelta(hours=8)) == start
    assert start + SeedSpec().span <= now


# ---- counts and shares ------------------------------------------------------------------------
def test_counts_match_what_the_apps_hold() -> None:
    hs, sf, s = _seeded()
    assert len(hs.all("contacts")) == SPEC.people == s.counts["hubspot.contacts"]
    assert len(hs.all("deals")) == SPEC.deals == s.counts["hubspot.deals"]
    assert len(sf.all("Lead")) == s.counts["salesforce.leads"]
    assert len(sf.all("Contact")) == s.counts["salesforce.contacts"]
    assert len(sf.all("Opportunity")) == s.counts["salesforce.opportunities"] > 0
    assert len(sf.all("Task")) == s.counts["salesforce.tasks"] > 0
    # every deal belongs to someone
    linked = {d for c in hs.all("contacts") for d in hs.associations("contacts", c["hs_object_id"])}
    assert linked == {d["hs_object_id"] for d in hs.all("deals")}


def test_every_lifecycle_stage_and_deal_stage_is_present() -> None:
    hs, sf, _ = _seeded()
    stages = Counter(c["lifecyclestage"] for c in hs.all("contacts"))
    assert set(stages) == {"subscriber", "lead", "marketingqualifiedlead", "salesacceptedlead",
                           "salesqualifiedlead", "opportunity", "customer"}
    deal_stages = {d["dealstage"] for d in hs.all("deals")}
    assert {"closedwon", "closedlost", "contractsent", "decisionmakerboughtin"} <= deal_stages
    assert {"Closed Won", "Proposal/Price Quote"} <= {o["StageName"] for o in sf.all("Opportunity")}


def test_overlap_converted_case_variant_and_duplicate_shares_are_honoured() -> None:
    spec = SeedSpec(seed=3, people=800, deals=100, overlap=0.5, converted=0.4,
                    case_variants=0.1, duplicates=4, start=START)
    hs, sf, s = _seeded(spec)
    hs_emails = {c["email"] for c in hs.all("contacts")}
    assert len(hs_emails) == spec.people  # unique identity keys in HubSpot
    people = _sf_people(sf)
    by_email = Counter(normalise_email(r["Email"]) for r in people)
    n_overlap = round(spec.people * spec.overlap)
    assert len(set(by_email) & hs_emails) == n_overlap
    assert set(by_email) <= hs_emails  # the seed invents nobody only Salesforce knows
    assert sum(1 for r in sf.all("Lead") if r["IsConverted"]) == round(n_overlap * spec.converted)
    dup_ids = {c.sf_duplicate_lead_id for c in s.cases[DUPLICATE]}
    assert [n for n in by_email.values() if n > 1] == [2] * spec.duplicates
    variants = [r for r in people
                if r["Id"] not in dup_ids and r["Email"] != r["Email"].strip().lower()]
    assert len(variants) == round(n_overlap * spec.case_variants) == len(s.cases[CASE_VARIANT])
    emails = [r["Email"] for r in people] + list(hs_emails)
    assert all(e.strip().lower().endswith((".test", "@example.com")) for e in emails)


def test_seeded_timestamps_lie_in_the_seeded_window() -> None:
    hs, sf, s = _seeded()
    assert (s.start, s.end) == (START, START + SPEC.span)
    for c in hs.all("contacts"):
        assert START <= datetime.fromisoformat(c["lastmodifieddate"]) <= s.end
    for o in SF_OBJECTS:
        for r in sf.all(o):
            assert START <= datetime.fromisoformat(r["SystemModstamp"]) <= s.end, (o, r)


def test_unplanted_people_and_deals_agree_across_the_systems() -> None:
    hs, sf, s = _seeded()
    planted = {c.email for cases in s.cases.values() for c in cases if c.kind != CASE_VARIANT}
    hs_by_email = {c["email"]: c for c in hs.all("contacts")}
    agreeing_status = {("NEW", "Open - Not Contacted"), ("CONNECTED", "Working - Contacted")}
    checked = 0
    for r in _sf_people(sf):
        email = normalise_email(r["Email"])
        if email in planted:
            continue
        h = hs_by_email[email]
        assert SF_STAGE[h["lifecyclestage"]] == r["Lifecycle_Stage__c"]
        if "Status" in r:
            assert (h["hs_lead_status"], r["Status"]) in agreeing_status
        checked += 1
    assert checked > SPEC.people * SPEC.overlap * 0.9
    deals = {d["dealname"]: d for d in hs.all("deals")}
    opps = [o for o in sf.all("Opportunity")
            if o["Id"] not in {c.sf_opportunity_id for c in s.cases[WON_LAG]}]
    assert opps
    for o in opps:
        assert SF_DEAL_STAGE[deals[o["Name"]]["dealstage"]] == o["StageName"]


def test_every_seeded_value_is_named_by_the_default_mapping_files() -> None:
    hs, sf, _ = _seeded()
    mappings = load_mappings(default_mappings_dir())
    at = datetime.now(UTC)
    raws = [RawRecord("hubspot", o, r["hs_object_id"], at, r)
            for o in ("contacts", "deals") for r in hs.all(o)]
    raws += [RawRecord("salesforce", o, r["Id"], at, r)
             for o in ("Lead", "Contact", "Opportunity", "Task") for r in sf.all(o)]
    canon = [mappings.to_canonical(r) for r in raws]
    assert [(c.object, c.unmapped) for c in canon if c.unmapped] == []
    deal_terms = {c.terms.get("deal_stage") for c in canon if c.kind == "deal"}
    assert deal_terms == {"exploration", "quote_building", "quote_presented", "closed_won",
                          "closed_lost", "on_hold"}


# ---- the planted inconsistencies --------------------------------------------------------------
def test_planted_cases_hold_the_raw_values_syncd_must_act_on() -> None:
    hs, sf, s = _seeded()
    sf_emails = {normalise_email(r["Email"]) for r in sf.all("Lead") + sf.all("Contact")}
    assert len(s.cases[HANDOFF]) == SPEC.handoffs
    for c in s.cases[HANDOFF]:
        assert c.hubspot_id is not None
        p = hs.get("contacts", c.hubspot_id)
        assert p["lifecyclestage"] == "lead"
        assert int(p["hubspotscore"]) >= SPEC.mql_threshold
        assert c.sf_lead_id is None and normalise_email(p["email"]) not in sf_emails
    assert len(s.cases[RETURN]) == SPEC.returns
    for c in s.cases[RETURN]:
        assert c.hubspot_id is not None and c.sf_lead_id is not None
        assert hs.get("contacts", c.hubspot_id)["lifecyclestage"] == "marketingqualifiedlead"
        lead = sf.get("Lead", c.sf_lead_id)
        assert lead["Status"] == "Returned - Not Ready" and lead["Return_Reason__c"]
    tasks = Counter(t["WhoId"] for t in sf.all("Task"))
    assert len(s.cases[EXHAUSTED]) == SPEC.exhausted
    for c in s.cases[EXHAUSTED]:
        assert tasks[c.sf_lead_id] >= SPEC.return_after_attempts
        # not connected: the SLA's attempt rule applies (mappings/sla.toml connected_statuses)
        assert sf.get("Lead", str(c.sf_lead_id))["Status"] == "Open - Not Contacted"
    # nobody else has reached the attempt limit (calls of any outcome) without being returned
    exhausted = {c.sf_lead_id for c in s.cases[EXHAUSTED]}
    assert {w for w, n in tasks.items() if n >= SPEC.return_after_attempts} - exhausted == set()
    assert len(s.cases[WON_LAG]) == SPEC.won_lags
    for c in s.cases[WON_LAG]:
        assert c.hubspot_id is not None and c.sf_opportunity_id is not None
        assert hs.get("contacts", c.hubspot_id)["lifecyclestage"] == "opportunity"
        assert sf.get("Opportunity", c.sf_opportunity_id)["StageName"] == "Closed Won"
    for kind in STORY_KINDS:
        assert len(s.cases[kind]) == 1


# ---- the real clients see the seed ------------------------------------------------------------
def test_hubspot_client_searches_the_seeded_contacts(hubspot_sandbox: Any) -> None:
    seed(hubspot_sandbox.app, SalesforceApp(), SPEC)
    contacts = hubspot_sandbox.app.all("contacts")
    expected = sum(1 for c in contacts if c["lifecyclestage"] == "customer")
    client = HubSpot(access_token=hubspot_sandbox.token, host=hubspot_sandbox.url,
                     ssl_ca_cert=hubspot_sandbox.ca_path)
    req = PublicObjectSearchRequest(
        filter_groups=[{"filters": [{"propertyName": "lifecyclestage", "operator": "EQ",
                                     "value": "customer"}]}],
        properties=["email", "lifecyclestage"], limit=100)
    page = client.crm.contacts.search_api.do_search(public_object_search_request=req)
    assert page.total == expected > 0
    assert {r.properties["lifecyclestage"] for r in page.results} == {"customer"}


def test_simple_salesforce_queries_the_seeded_leads(sf_sandbox: SalesforceSandbox) -> None:
    s = seed(HubSpotApp(), sf_sandbox.app, SPEC)
    res = sf_sandbox.client().query_all(
        "SELECT Id, Email, Return_Reason__c FROM Lead WHERE Status = 'Returned - Not Ready'")
    assert {r["Id"] for r in res["records"]} == {c.sf_lead_id for c in s.cases[RETURN]}
    assert all(r["Return_Reason__c"] for r in res["records"])


# ---- the story --------------------------------------------------------------------------------
def _play(hs: HubSpotApp, sf: SalesforceApp, s: SeedSummary, stop: threading.Event) -> Story:
    story = Story()
    story.play(hs, sf, s, speed=1e9, stop=stop)  # no waiting between steps
    story.join(timeout=60)
    return story


def test_story_applies_each_step_and_leaves_the_expected_raw_values() -> None:
    hs, sf, s = _seeded()
    before_score = int(hs.get("contacts", str(s.first("story_return").hubspot_id))["hubspotscore"])
    tasks_before = len(sf.all("Task"))
    story = _play(hs, sf, s, threading.Event())

    played: list[Played] = story.played
    assert [p.error for p in played] == [None] * len(story.steps) == [None] * 7
    assert [p.index for p in played] == list(range(7))
    assert s.first("story_score").name in played[0].text and "{" not in played[0].text

    score = hs.get("contacts", str(s.first("story_score").hubspot_id))
    assert int(score["hubspotscore"]) > SPEC.mql_threshold
    attempts = s.first("story_attempts").sf_lead_id
    new_tasks = sf.all("Task")[tasks_before:]
    assert [t["WhoId"] for t in new_tasks] == [attempts] * SPEC.return_after_attempts
    assert {(t["Type"], t["Status"]) for t in new_tasks} == {("Call", "Completed")}
    ret = s.first("story_return")
    lead = sf.get("Lead", str(ret.sf_lead_id))
    assert (lead["Status"], lead["Return_Reason__c"]) == ("Returned - Not Ready", RETURN_REASON)
    person = hs.get("contacts", str(ret.hubspot_id))
    assert int(person["hubspotscore"]) == before_score + SCORE_BUMP
    assert person["recent_conversion_event_name"] == "Demo request"
    won = sf.get("Opportunity", str(s.first("story_win").sf_opportunity_id))
    assert (won["StageName"], won["IsWon"]) == ("Closed Won", True)
    deal = hs.get("deals", str(s.first("story_contract").hubspot_deal_id))
    assert deal["dealstage"] == "contractsent"


def test_story_changes_are_stamped_after_the_seed_so_incremental_pulls_see_them() -> None:
    hs, sf, s = _seeded()
    _play(hs, sf, s, threading.Event())
    lead = sf.get("Lead", str(s.first("story_return").sf_lead_id))
    assert datetime.fromisoformat(lead["SystemModstamp"]) > s.end


def test_a_stopped_story_applies_nothing() -> None:
    hs, sf, s = _seeded()
    stop = threading.Event()
    stop.set()
    story = _play(hs, sf, s, stop)
    assert story.played == []
    lead = sf.get("Lead", str(s.first("story_return").sf_lead_id))
    assert lead["Status"] == "Open - Not Contacted"


def test_a_failing_step_is_recorded_and_the_story_goes_on() -> None:
    hs, sf, s = _seeded()
    s.cases["story_win"] = []  # e.g. a population too small to reserve it
    story = _play(hs, sf, s, threading.Event())
    errors = [p.error for p in story.played]
    assert len(errors) == 7
    assert errors[5] is not None and "story_win" in errors[5]
    assert [e for i, e in enumerate(errors) if i != 5] == [None] * 6


@pytest.mark.parametrize("speed", [0, -1])
def test_story_refuses_a_non_positive_speed(speed: float) -> None:
    hs, sf, s = _seeded()
    with pytest.raises(ValueError, match="speed"):
        Story().play(hs, sf, s, speed=speed, stop=threading.Event())


# ---- edges ------------------------------------------------------------------------------------
@pytest.mark.parametrize("people,deals", [(0, 0), (10, 3), (200, 0)])
def test_small_populations_seed_exactly_the_requested_people_and_deals(people: int,
                                                                       deals: int) -> None:
    hs, _, _ = _seeded(SeedSpec(people=people, deals=deals, start=START))
    assert (len(hs.all("contacts")), len(hs.all("deals"))) == (people, deals)


@pytest.mark.parametrize("bad", [{"overlap": 1.5}, {"converted": -0.1}, {"people": -1},
                                 {"start": datetime(2026, 1, 1)}, {"return_after_attempts": 0}])
def test_an_impossible_spec_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SeedSpec"):
        SeedSpec(**bad)


def test_summary_reads_as_a_sentence_for_the_demo() -> None:
    _, _, s = _seeded()
    text = str(s)
    assert text.startswith(f"{SPEC.people} HubSpot contacts, {SPEC.deals} deals;")
    assert f"{SPEC.handoffs} handoff" in text and "@" not in text


def test_on_step_sees_every_step_as_it_is_played() -> None:
    hs, sf, s = _seeded()
    seen: list[str] = []
    story = Story(on_step=lambda p: seen.append(p.text))
    story.play(hs, sf, s, speed=1e9, stop=threading.Event())
    story.join(timeout=60)
    assert seen == [p.text for p in story.played] and len(seen) == 7
