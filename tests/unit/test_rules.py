"""SLA rules (syncd.rules): a table of cases per rule, the edges, idempotence.

The builders at the top are reused by test_rules_properties.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncd.model import CanonicalRecord
from syncd.rules import (
    TERM_FIELDS,
    DealView,
    Memory,
    Outcome,
    PersonView,
    RuleContext,
    decide_deal,
    decide_person,
)
from syncd.sla import SLA

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(days=1)
CTX = RuleContext(sla=SLA())
_MISSING = object()


def person(system: str, lifecycle: Any = _MISSING, lead_status: Any = _MISSING, *,
           id: str | None = None, object: str | None = None, unknown: bool = True,
           **values: Any) -> CanonicalRecord:
    """A person record. A None term is *unknown* (an unmapped CRM value) unless
    ``unknown=False``, which makes it *empty*."""
    terms: dict[str, Any] = {}
    if lifecycle is not _MISSING:
        terms["lifecycle"] = lifecycle
    if lead_status is not _MISSING:
        terms["lead_status"] = lead_status
    base = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace",
            "company": "Analytical", "lead_source": "Web", "score": None,
            "return_reason": None, "bofu_conversion_at": None}
    for k in list(values):
        if k in TERM_FIELDS:
            terms[k] = values.pop(k)
    base.update(values)
    return CanonicalRecord(
        system=system, object=object or ("contacts" if system == "hubspot" else "Lead"),
        id=id or ("101" if system == "hubspot" else "00Q1"), kind="person",
        modified_at=EARLIER, terms=terms, values=base,
        unmapped=(("raw_field", "UNMAPPED"),) if unknown and None in terms.values() else ())


def hs(lifecycle: Any = _MISSING, lead_status: Any = _MISSING, **values: Any) -> CanonicalRecord:
    return person("hubspot", lifecycle, lead_status, **values)


def sf(lifecycle: Any = _MISSING, lead_status: Any = _MISSING, **values: Any) -> CanonicalRecord:
    return person("salesforce", lifecycle, lead_status, **values)


def deal(system: str, stage: str | None, id: str = "d1",
         modified_at: datetime = EARLIER) -> CanonicalRecord:
    return CanonicalRecord(system=system, object="deals" if system == "hubspot" else "Opportunity",
                           id=id, kind="deal", modified_at=modified_at,
                           terms={"deal_stage": stage}, values={"name": "Deal"})


def attempt(at: datetime, type: str = "Call", id: str = "t") -> CanonicalRecord:
    return CanonicalRecord(system="salesforce", object="Task", id=f"{id}{at.timestamp()}",
                           kind="attempt", modified_at=at,
                           values={"who_id": "00Q1", "type": type, "at": at, "counts": True})


def _apply_record(rec: CanonicalRecord, changes: Any) -> CanonicalRecord:
    terms = dict(rec.terms)
    values = dict(rec.values)
    for k, v in changes.items():
        (terms if k in TERM_FIELDS else values)[k] = v
    return replace(rec, terms=terms, values=values)


def apply(view: PersonView | DealView, out: Outcome) -> Any:
    """The view as the CRMs would hold it after the engine applied every write."""
    recs = {"hubspot": view.hubspot, "salesforce": view.salesforce}
    for d in out.decisions:
        if d.action == "set":
            rec = recs[d.system or ""]
            assert rec is not None and rec.id == d.record_id
            recs[d.system or ""] = _apply_record(rec, d.changes)
        elif d.action == "create":
            assert recs[d.system or ""] is None, "create over an existing record"
            recs[d.system or ""] = _apply_record(
                person(d.system or "", id=f"new-{d.system}", object=d.object,
                       email=None, first_name=None, last_name=None, company=None,
                       lead_source=None), d.changes)
    return replace(view, hubspot=recs["hubspot"], salesforce=recs["salesforce"],
                   memory=out.memory)


def writes(out: Outcome) -> list[Any]:
    return [d for d in out.decisions if d.action != "event"]


def events(out: Outcome, name: str | None = None) -> list[Any]:
    return [d for d in out.decisions if d.action == "event" and (name is None or d.event == name)]


def sets(out: Outcome, system: str) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for d in out.decisions:
        if d.action == "set" and d.system == system:
            got.update(d.changes)
    return got


def decide(view: PersonView, ctx: RuleContext = CTX, now: datetime = NOW) -> Outcome:
    return decide_person(view, ctx, now)


def view(hubspot: CanonicalRecord | None, salesforce: CanonicalRecord | None,
         memory: Memory | None = None, deals: tuple[CanonicalRecord, ...] = (),
         attempts: tuple[CanonicalRecord, ...] = ()) -> PersonView:
    return PersonView("e1", hubspot, salesforce, deals=deals, attempts=attempts,
                      memory=memory or Memory())


def seen(hs_values: dict[str, Any] | None, sf_values: dict[str, Any] | None) -> Memory:
    last: dict[str, dict[str, Any]] = {}
    if hs_values is not None:
        last["hubspot"] = hs_values
    if sf_values is not None:
        last["salesforce"] = sf_values
    return Memory(last_seen=last)


def assert_settled(v: PersonView, ctx: RuleContext = CTX, now: datetime = NOW) -> PersonView:
    """Apply the decisions, decide again: nothing more to write. Returns the settled view."""
    out = decide(v, ctx, now)
    after = apply(v, out)
    again = decide(after, ctx, now)
    assert writes(again) == [], f"not idempotent: {writes(again)}"
    return after


# ---- R1: forward only ---------------------------------------------------------------------

@pytest.mark.parametrize(("hs_stage", "sf_stage", "hs_expect", "sf_expect"), [
    ("mql", "lead", {}, {"lifecycle": "mql"}),
    ("lead", "sql", {"lifecycle": "sql"}, {}),
    ("customer", "subscriber", {}, {"lifecycle": "customer"}),
    ("sal", "sal", {}, {}),
    (None, "mql", {}, {}),            # unknown in HubSpot: never written, never behind
    ("mql", None, {}, {}),
    ("evangelist", "lead", {}, {}),   # not a glossary stage: unknown, ignored
], ids=["hs-ahead", "sf-ahead", "far-ahead", "equal", "hs-unknown", "sf-unknown", "off-glossary"])
def test_r1_the_system_behind_is_written(hs_stage: Any, sf_stage: Any,
                                         hs_expect: dict[str, Any],
                                         sf_expect: dict[str, Any]) -> None:
    out = decide(view(hs(hs_stage, "new"), sf(sf_stage, "new")))
    assert sets(out, "hubspot") == hs_expect
    assert sets(out, "salesforce") == sf_expect
    for d in writes(out):
        assert d.rule == "R1-forward-only" and not d.backwards and d.reason


def test_r1_an_empty_stage_is_filled_but_never_pulls_back() -> None:
    out = decide(view(hs("sql"), sf(lead_status="new")))  # Lead holds no stage at all
    assert sets(out, "salesforce") == {"lifecycle": "sql"}
    out = decide(view(hs("lead"), sf("sql"), seen({"lifecycle": "sql"}, {"lifecycle": "sql"})))
    assert sets(out, "salesforce") == {}  # HubSpot dropping to lead does not pull SF back
    assert sets(out, "hubspot") == {"lifecycle": "sql"}


def test_r1_an_empty_term_is_filled_an_unmapped_one_is_not() -> None:
    empty = person("hubspot", None, None, unknown=False)
    out = decide(view(empty, sf("sql", "attempting")))
    assert sets(out, "hubspot") == {"lifecycle": "sql", "lead_status": "attempting"}
    unmapped = person("hubspot", None, None, unknown=True)
    assert writes(decide(view(unmapped, sf("sql", "attempting")))) == []


def test_r1_writable_limits_what_a_target_can_hold() -> None:
    ctx = replace(CTX, writable={("salesforce", "Contact"): frozenset({"lifecycle"}),
                                 ("hubspot", "contacts"): frozenset({"lifecycle", "lead_status"})})
    contact = person("salesforce", "sql", object="Contact", id="003X")
    out = decide(view(hs("mql", "attempting"), contact), ctx)
    assert sets(out, "hubspot") == {"lifecycle": "sql"}
    assert "lead_status" not in sets(out, "salesforce")


# ---- R2: returned - not ready -------------------------------------------------------------

def test_r2_sales_returns_the_person_to_lead_in_both_systems() -> None:
    mem = seen({"lifecycle": "sql", "lead_status": "attempting"},
               {"lifecycle": "sql", "lead_status": "attempting"})
    v = view(hs("sql", "attempting", score=70),
             sf("sql", "returned_not_ready", return_reason="no budget this year"), mem)
    out = decide(v)
    assert sets(out, "hubspot") == {"lifecycle": "lead", "lead_status": "returned_not_ready",
                                    "return_reason": "no budget this year"}
    assert sets(out, "salesforce") == {"lifecycle": "lead"}
    for d in writes(out):
        assert d.rule == "R2-returned"
        assert d.backwards == ("lifecycle" in d.changes)
    (ev,) = events(out, "returned")
    assert "no budget this year" in ev.reason
    assert out.memory.returned_at == NOW
    assert out.memory.return_reason == "no budget this year"
    assert out.memory.score_at_return == 70
    assert out.memory.guarded
    assert_settled(v)


def test_r2_returned_status_set_in_hubspot_counts_too() -> None:
    v = view(hs("mql", "returned_not_ready"), sf("mql", "new"),
             seen({"lifecycle": "mql", "lead_status": "new"},
                  {"lifecycle": "mql", "lead_status": "new"}))
    out = decide(v)
    assert sets(out, "salesforce") == {"lifecycle": "lead", "lead_status": "returned_not_ready",
                                       "return_reason": "returned by hubspot"}
    assert sets(out, "hubspot") == {"lifecycle": "lead", "return_reason": "returned by hubspot"}
    assert out.memory.return_reason == "returned by hubspot"


def test_r2_an_old_return_is_not_replayed() -> None:
    returned = Memory(returned_at=EARLIER, return_reason="x",
                      last_seen={"hubspot": {"lifecycle": "lead",
                                             "lead_status": "returned_not_ready"},
                                 "salesforce": {"lifecycle": "lead",
                                                "lead_status": "returned_not_ready"}})
    out = decide(view(hs("lead", "returned_not_ready"), sf("lead", "returned_not_ready"),
                      returned))
    assert out.decisions == []
    assert out.memory.returned_at == EARLIER


# ---- R3: re-hand-off guard ----------------------------------------------------------------

def _returned_view(score: int | None, bofu: datetime | None = None,
                   hs_stage: str = "lead") -> PersonView:
    at = NOW - timedelta(days=3)
    last = {"lifecycle": "lead", "lead_status": "returned_not_ready"}
    mem = Memory(returned_at=at, return_reason="not ready", score_at_return=40,
                 last_seen={"hubspot": dict(last), "salesforce": dict(last)})
    return view(hs(hs_stage, "returned_not_ready", score=score, bofu_conversion_at=bofu),
                sf("lead", "returned_not_ready"), mem)


@pytest.mark.parametrize(("score", "bofu", "promoted"), [
    (55, None, False),                              # over threshold, under the margin
    (59, None, False),
    (60, None, True),                               # threshold 50 + margin 10
    (30, NOW - timedelta(hours=1), True),           # demo request after the return
    (30, NOW - timedelta(days=10), False),          # conversion from before the return
    (None, None, False),
])
def test_r3_rehandoff_needs_new_evidence(score: int | None, bofu: datetime | None,
                                         promoted: bool) -> None:
    v = _returned_view(score, bofu)
    out = decide(v)
    if promoted:
        assert sets(out, "salesforce") == {"lifecycle": "mql", "lead_status": "new"}
        assert sets(out, "hubspot") == {"lifecycle": "mql", "lead_status": "new"}
        assert {d.rule for d in writes(out)} == {"R3-rehandoff-guard"}
        assert "new evidence" in writes(out)[0].reason
        assert not out.memory.guarded
        assert out.memory.handed_off_at == NOW
        assert_settled(v)
    else:
        assert writes(out) == []
        assert out.memory.guarded


def test_r3_a_blocked_promotion_is_recorded_once() -> None:
    v = _returned_view(55)
    out = decide(v)
    (ev,) = events(out)
    assert ev.event == "promotion_blocked" and ev.rule == "R3-rehandoff-guard"
    assert "not ready" in ev.reason and "mql" in ev.reason
    assert out.memory.blocked_promotion_at == NOW
    again = decide(apply(v, out), now=NOW + timedelta(hours=1))
    assert again.decisions == []
    # later new evidence still releases it
    later = apply(v, out)
    later = replace(later, hubspot=_apply_record(later.hubspot, {"score": 75}))  # type: ignore[arg-type]
    assert sets(decide(later), "salesforce")["lifecycle"] == "mql"


def test_r3_marketing_setting_mql_by_hand_is_blocked_too() -> None:
    out = decide(_returned_view(20, hs_stage="mql"))
    assert writes(out) == []
    assert [e.event for e in events(out)] == ["promotion_blocked"]


def test_r3_sales_moving_forward_itself_releases_the_guard() -> None:
    v = _returned_view(20)
    v = replace(v, salesforce=sf("sql", "connected"))
    out = decide(v)
    assert sets(out, "hubspot")["lifecycle"] == "sql"
    assert not out.memory.guarded


# ---- R4: lead score ------------------------------------------------------------------------

@pytest.mark.parametrize(("score", "expect"), [
    (50, "mql"), (99, "mql"), (49, None), (None, None), (0, None),
])
def test_r4_score_at_threshold_makes_an_mql_in_both(score: int | None, expect: str | None) -> None:
    out = decide(view(hs("lead", "new", score=score), sf("lead", "new")))
    if expect is None:
        assert writes(out) == []
    else:
        assert sets(out, "hubspot") == {"lifecycle": expect}
        assert sets(out, "salesforce") == {"lifecycle": expect}
        assert {d.rule for d in writes(out)} == {"R4-lead-score"}
        assert "score" in writes(out)[0].reason


def test_r4_score_never_pulls_a_later_stage_back() -> None:
    out = decide(view(hs("sql", "connected", score=80), sf("sql", "connected")))
    assert writes(out) == []


def test_r4_threshold_comes_from_the_sla() -> None:
    ctx = RuleContext(sla=SLA.model_validate({"score": {"threshold": 80}}))
    assert writes(decide(view(hs("lead", score=60), sf("lead")), ctx)) == []


# ---- R5: unanswered connection attempts --------------------------------------------------

def _attempts(n: int, type: str = "Call", start: datetime = NOW - timedelta(days=5)) -> tuple[
        CanonicalRecord, ...]:
    return tuple(attempt(start + timedelta(hours=i), type, id=f"t{i}") for i in range(n))


@pytest.mark.parametrize(("attempts", "status", "returned"), [
    (_attempts(3), "attempting", True),
    (_attempts(4, "Email"), "new", True),
    (_attempts(2), "attempting", False),
    (_attempts(3), "connected", False),                       # they did connect
    (_attempts(3, "Meeting"), "attempting", False),            # not an agreed attempt type
    (_attempts(3, start=NOW - timedelta(days=30)), "attempting", False),  # outside the window
])
def test_r5_n_unanswered_attempts_return_the_lead(attempts: tuple[CanonicalRecord, ...],
                                                  status: str, returned: bool) -> None:
    v = view(hs("mql", status), sf("mql", status), attempts=attempts)
    out = decide(v)
    if returned:
        n = len(attempts)
        assert sets(out, "salesforce") == {"lifecycle": "lead",
                                           "lead_status": "returned_not_ready",
                                           "return_reason": f"{n} unanswered attempts"}
        assert sets(out, "hubspot") == {"lifecycle": "lead",
                                        "lead_status": "returned_not_ready",
                                        "return_reason": f"{n} unanswered attempts"}
        assert all(d.rule == "R5-attempts" for d in out.decisions)
        assert out.memory.return_reason == f"{n} unanswered attempts"
        assert_settled(v)
    else:
        assert writes(out) == []


def test_r5_attempts_before_a_rehandoff_do_not_count_again() -> None:
    mem = Memory(returned_at=NOW - timedelta(days=4), released_at=NOW - timedelta(days=2),
                 handed_off_at=NOW - timedelta(days=2))
    out = decide(view(hs("mql", "new"), sf("mql", "new"), mem,
                      attempts=_attempts(3, start=NOW - timedelta(days=3))))
    assert writes(out) == []


def _calls_since(t: datetime) -> tuple[CanonicalRecord, ...]:
    return tuple(attempt(t + timedelta(minutes=m), id=f"t{m}") for m in (10, 20, 30))


def test_r5_a_promotion_that_already_has_its_unanswered_attempts_is_returned_in_the_same_cycle() -> None:
    """Handed to sales an hour ago, Salesforce still at lead, three unanswered calls since, and
    the score now crosses the threshold: the SLA's answer is the return, decided at once, not an
    MQL promotion that the next cycle takes back."""
    mem = Memory(handed_off_at=NOW - timedelta(hours=1))
    v = view(hs("subscriber", "new", score=50), sf("lead", "new"), mem,
             attempts=_calls_since(NOW - timedelta(hours=1)))
    out = decide(v)
    assert {d.rule for d in writes(out)} == {"R5-attempts"}
    assert sets(out, "salesforce") == {"lead_status": "returned_not_ready",
                                       "return_reason": "3 unanswered attempts"}
    assert sets(out, "hubspot") == {"lifecycle": "lead", "lead_status": "returned_not_ready",
                                    "return_reason": "3 unanswered attempts"}
    assert [e.rule for e in events(out, "returned")] == ["R5-attempts"]
    assert out.memory.returned_at == NOW
    assert_settled(v)


def test_r5_attempts_made_before_this_cycles_handoff_do_not_return_the_promoted_person() -> None:
    """Salesforce at lead with no hand-off remembered: the promotion hands the person to sales
    now (rule 8), and the calls made before belong to before that hand-off."""
    v = view(hs("subscriber", "new", score=50), sf("lead", "new"),
             attempts=_calls_since(NOW - timedelta(hours=1)))
    out = decide(v)
    assert sets(out, "salesforce") == {"lifecycle": "mql"}
    assert out.memory.handed_off_at == NOW and out.memory.returned_at is None
    assert events(out, "returned") == []
    assert_settled(v)


# ---- R6: deals -----------------------------------------------------------------------------

@pytest.mark.parametrize(("deals", "expect"), [
    ((deal("salesforce", "exploration"),), "opportunity"),
    ((deal("hubspot", "quote_presented"),), "opportunity"),
    ((deal("hubspot", "closed_won"),), "customer"),
    ((deal("hubspot", "exploration"), deal("salesforce", "closed_won", "d2")), "customer"),
    ((deal("salesforce", "closed_lost"),), None),
    ((deal("salesforce", None),), None),      # unknown deal stage: no promotion
])
def test_r6_open_deal_opportunity_won_deal_customer(deals: tuple[CanonicalRecord, ...],
                                                    expect: str | None) -> None:
    out = decide(view(hs("sql", "connected"), sf("sql", "connected"), deals=deals))
    if expect is None:
        assert writes(out) == []
    else:
        assert sets(out, "hubspot") == {"lifecycle": expect}
        assert sets(out, "salesforce") == {"lifecycle": expect}
        assert {d.rule for d in writes(out)} == {"R6-deals"}


def _deal_view(a: str | None, b: str | None, last: tuple[str, str] | None) -> DealView:
    mem = Memory() if last is None else Memory(
        last_seen={"hubspot": {"deal_stage": last[0]}, "salesforce": {"deal_stage": last[1]}})
    return DealView("deal1", deal("hubspot", a), deal("salesforce", b, "006A"), mem)


@pytest.mark.parametrize(("a", "b", "last", "hs_expect", "sf_expect", "conflict"), [
    ("quote_presented", "exploration", ("exploration", "exploration"),
     {}, {"deal_stage": "quote_presented"}, False),                  # HubSpot moved
    ("exploration", "closed_won", ("exploration", "exploration"),
     {"deal_stage": "closed_won"}, {}, False),                       # Salesforce moved
    ("on_hold", "closed_lost", ("exploration", "exploration"),
     {"deal_stage": "closed_lost"}, {}, True),                       # both: owner (SF) wins
    ("on_hold", "exploration", None, {"deal_stage": "exploration"}, {}, False),  # no memory
    (None, "exploration", None, {}, {}, False),                      # unknown: untouched
    ("exploration", "exploration", None, {}, {}, False),
])
def test_r6_deal_stage_sync_both_directions(a: Any, b: Any, last: Any, hs_expect: Any,
                                            sf_expect: Any, conflict: bool) -> None:
    v = _deal_view(a, b, last)
    out = decide_deal(v, CTX, NOW)
    assert sets(out, "hubspot") == hs_expect
    assert sets(out, "salesforce") == sf_expect
    assert bool(events(out, "conflict")) == conflict
    again = decide_deal(apply(v, out), CTX, NOW)
    assert writes(again) == [] and events(again) == []


def test_r6_deal_owner_is_configurable() -> None:
    sla = SLA.model_validate({"ownership": {"hubspot": ["deal_stage"], "salesforce": []}})
    out = decide_deal(_deal_view("on_hold", "closed_lost", ("exploration", "exploration")),
                      RuleContext(sla=sla), NOW)
    assert sets(out, "salesforce") == {"deal_stage": "on_hold"}


# ---- R7: ownership ---------------------------------------------------------------------------

def test_r7_conflicting_edits_owner_wins_and_is_audited() -> None:
    mem = seen({"lifecycle": "mql", "lead_status": "new"},
               {"lifecycle": "mql", "lead_status": "new"})
    out = decide(view(hs("mql", "disqualified"), sf("mql", "attempting"), mem))
    assert sets(out, "hubspot") == {"lead_status": "attempting"}   # sales owns lead_status
    assert sets(out, "salesforce") == {}
    (ev,) = events(out, "conflict")
    assert ev.rule == "R7-ownership" and "salesforce" in ev.reason


@pytest.mark.parametrize(("hs_status", "sf_status", "hs_expect", "sf_expect"), [
    ("attempting", "new", {}, {"lead_status": "attempting"}),   # only HubSpot changed
    ("new", "connected", {"lead_status": "connected"}, {}),     # only Salesforce changed
    (None, "connected", {}, {}),                                # unknown in HubSpot
])
def test_r7_a_one_sided_change_is_copied(hs_status: Any, sf_status: Any, hs_expect: Any,
                                         sf_expect: Any) -> None:
    mem = seen({"lifecycle": "mql", "lead_status": "new"},
               {"lifecycle": "mql", "lead_status": "new"})
    out = decide(view(hs("mql", hs_status), sf("mql", sf_status), mem))
    assert sets(out, "hubspot") == hs_expect
    assert sets(out, "salesforce") == sf_expect
    assert events(out) == []


def test_r7_both_changed_lifecycle_is_audited_and_stays_forward() -> None:
    mem = seen({"lifecycle": "lead"}, {"lifecycle": "lead"})
    out = decide(view(hs("mql"), sf("sql"), mem))
    assert sets(out, "hubspot") == {"lifecycle": "sql"}
    (ev,) = events(out, "conflict")
    assert "sql kept" in ev.reason


# ---- R8: hand-off ------------------------------------------------------------------------------

def test_r8_an_mql_unknown_to_salesforce_is_created_there() -> None:
    v = view(hs("lead", "new", score=72, company=None, last_name="", lead_type="new_business"),
             None)
    out = decide(v)
    assert sets(out, "hubspot") == {"lifecycle": "mql"}
    (c,) = [d for d in out.decisions if d.action == "create"]
    assert (c.system, c.object, c.key, c.rule) == ("salesforce", "Lead", "handoff:e1",
                                                   "R8-handoff")
    assert c.changes == {
        "first_name": "Ada", "last_name": "[not provided]", "email": "ada@example.com",
        "company": "[not provided]", "lead_source": "Web", "score": 72,
        "lead_type": "new_business", "qualification_reason": "lead score 72 ≥ threshold 50",
        "lifecycle": "mql", "lead_status": "new"}
    assert out.memory.handed_off_at == NOW
    assert_settled(v)


@pytest.mark.parametrize(("record", "sla"), [
    (hs("lead", score=10), SLA()),                                   # not an MQL
    (hs("mql", score=90), SLA.model_validate({"handoff": {"enabled": False}})),
    (hs(None, score=None), SLA()),                                   # unknown stage
])
def test_r8_no_handoff(record: CanonicalRecord, sla: SLA) -> None:
    out = decide(view(record, None), RuleContext(sla=sla))
    assert [d for d in out.decisions if d.action == "create"] == []


def test_r8_reverse_handoff_creates_a_returned_lead_in_hubspot() -> None:
    v = view(None, sf("sql", "returned_not_ready", return_reason="no budget"))
    out = decide(v)
    (c,) = [d for d in out.decisions if d.action == "create"]
    assert (c.system, c.object, c.key) == ("hubspot", "contacts", "reverse-handoff:e1")
    assert c.changes["lifecycle"] == "lead"
    assert c.changes["lead_status"] == "returned_not_ready"
    assert c.changes["return_reason"] == "no budget"
    assert sets(out, "salesforce") == {"lifecycle": "lead"}
    assert_settled(v)


def test_r8_reverse_handoff_can_be_disabled() -> None:
    sla = SLA.model_validate({"reverse_handoff": {"enabled": False}})
    out = decide(view(None, sf("sql", "returned_not_ready")), RuleContext(sla=sla))
    assert [d for d in out.decisions if d.action == "create"] == []
    assert events(out, "returned")


# ---- R9: follow-up SLA -------------------------------------------------------------------------

@pytest.mark.parametrize(("handed_ago", "attempt_after", "breach"), [
    (timedelta(hours=25), None, True),
    (timedelta(hours=23), None, False),
    (timedelta(hours=30), timedelta(hours=2), False),
    (timedelta(hours=30), timedelta(hours=26), True),    # attempted, but late
])
def test_r9_followup_breach(handed_ago: timedelta, attempt_after: timedelta | None,
                            breach: bool) -> None:
    handed = NOW - handed_ago
    atts = () if attempt_after is None else (attempt(handed + attempt_after),)
    mem = Memory(handed_off_at=handed)
    v = view(hs("mql", "new"), sf("mql", "new"), mem, attempts=atts)
    out = decide(v)
    got = events(out, "sla_breach")
    assert len(got) == int(breach)
    if breach:
        assert got[0].rule == "R9-followup-sla"
        assert got[0].changes["handed_off_at"] == handed
        assert out.memory.sla_breach_at == NOW
        assert events(decide(apply(v, out), now=NOW + timedelta(hours=5)), "sla_breach") == []


def test_r9_window_comes_from_the_sla() -> None:
    ctx = RuleContext(sla=SLA.model_validate({"followup": {"window_hours": 1}}))
    mem = Memory(handed_off_at=NOW - timedelta(hours=2))
    assert events(decide(view(hs("mql"), sf("mql", "new"), mem), ctx), "sla_breach")


def test_r9_a_handoff_starts_the_clock() -> None:
    v = view(hs("lead", score=70), sf("lead", "new"))
    out = decide(v)
    assert out.memory.handed_off_at == NOW
    later = apply(v, out)
    assert events(decide(later, now=NOW + timedelta(hours=2)), "sla_breach") == []
    assert events(decide(later, now=NOW + timedelta(hours=25)), "sla_breach")


# ---- one system only, memory --------------------------------------------------------------------

@pytest.mark.parametrize("v", [
    view(hs("lead", "new", score=10), None),
    view(None, sf("sql", "attempting")),
    view(hs("customer"), None, deals=(deal("hubspot", "closed_won"),)),
    view(None, sf("lead", "new"), deals=(deal("salesforce", "exploration"),)),
])
def test_a_person_in_one_system_works_and_settles(v: PersonView) -> None:
    out = decide(v)
    for d in writes(out):
        assert d.system == ("hubspot" if v.hubspot else "salesforce") or d.action == "create"
    assert_settled(v)


def test_memory_round_trips_through_json() -> None:
    m = Memory(returned_at=NOW, return_reason="r", score_at_return=3, released_at=EARLIER,
               handed_off_at=NOW, first_attempt_at=NOW, sla_breach_at=NOW,
               blocked_promotion_at=NOW, blocked_promotion_why="w",
               last_seen={"hubspot": {"lifecycle": "mql", "score": 5}})
    assert Memory.from_json(m.to_json()) == m
    assert Memory.from_json(None) == Memory()


def test_r4_a_bofu_conversion_makes_an_mql() -> None:
    out = decide(view(hs("lead", score=5, bofu_conversion_at=EARLIER), sf("lead", "new")))
    assert sets(out, "salesforce") == {"lifecycle": "mql"}
    assert "bottom-of-funnel" in writes(out)[0].reason


def test_returned_then_repromoted_over_several_cycles() -> None:
    """SQL -> returned -> score 55 (blocked, once) -> score 65 (re-handed) -> settled."""
    last = {"lifecycle": "sql", "lead_status": "attempting"}
    v = view(hs("sql", "attempting", score=45), sf("sql", "returned_not_ready"),
             Memory(last_seen={"hubspot": dict(last), "salesforce": dict(last)}))
    v = apply(v, decide(v))
    assert (v.hubspot.terms["lifecycle"], v.salesforce.terms["lifecycle"]) == ("lead", "lead")
    assert v.memory.score_at_return == 45
    v = replace(v, hubspot=_apply_record(v.hubspot, {"score": 55}))  # type: ignore[arg-type]
    out = decide(v, now=NOW + timedelta(days=1))
    assert writes(out) == [] and [e.event for e in events(out)] == ["promotion_blocked"]
    v = apply(v, out)
    assert decide(v, now=NOW + timedelta(days=2)).decisions == []
    v = replace(v, hubspot=_apply_record(v.hubspot, {"score": 65}))  # type: ignore[arg-type]
    out = decide(v, now=NOW + timedelta(days=3))
    assert sets(out, "salesforce") == {"lifecycle": "mql", "lead_status": "new"}
    v = apply(v, out)
    assert v.memory.handed_off_at == NOW + timedelta(days=3)
    assert writes(decide(v, now=NOW + timedelta(days=3))) == []
