"""Properties of the SLA rules over generated people (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rules import _MISSING as MISSING
from test_rules import CTX, NOW, apply, attempt, deal, person, writes

from syncd.model import CanonicalRecord
from syncd.rules import DealView, Memory, PersonView, decide_deal, decide_person, is_unknown

STAGES = list(CTX.stages)
STATUSES = ["new", "attempting", "connected", "returned_not_ready", "disqualified"]


times = st.integers(min_value=-30 * 24, max_value=0).map(lambda h: NOW + timedelta(hours=h))
opt_times = st.none() | times


@st.composite
def records(draw: st.DrawFn, system: str) -> CanonicalRecord | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    lifecycle = draw(st.sampled_from([*STAGES, None, "evangelist", MISSING]))
    status = draw(st.sampled_from([*STATUSES, None, MISSING]))
    kw: dict[str, Any] = {
        "score": draw(st.none() | st.integers(min_value=0, max_value=100)),
        "bofu_conversion_at": draw(opt_times),
        "company": draw(st.sampled_from([None, "", "Acme"])),
    }
    args = [a for a in (lifecycle, status)]
    # MISSING leaves the term out; a None term is unknown (unmapped) or empty
    return person(system, *args, unknown=draw(st.booleans()), **kw)


@st.composite
def memories(draw: st.DrawFn) -> Memory:
    returned = draw(opt_times)
    last: dict[str, dict[str, Any]] = {}
    for system in ("hubspot", "salesforce"):
        if draw(st.booleans()):
            last[system] = {"lifecycle": draw(st.sampled_from([*STAGES, None])),
                            "lead_status": draw(st.sampled_from([*STATUSES, None]))}
    return Memory(
        returned_at=returned,
        score_at_return=draw(st.none() | st.integers(0, 100)) if returned else None,
        return_reason="r" if returned else None,
        released_at=draw(opt_times),
        handed_off_at=draw(opt_times),
        last_seen=last)


@st.composite
def views(draw: st.DrawFn) -> PersonView:
    deals = tuple(deal(draw(st.sampled_from(["hubspot", "salesforce"])),
                       draw(st.sampled_from(["exploration", "closed_won", "closed_lost", None])),
                       id=f"d{i}", modified_at=draw(times))
                  for i in range(draw(st.integers(0, 2))))
    attempts = tuple(attempt(draw(times), draw(st.sampled_from(["Call", "Email", "Meeting"])),
                             id=f"t{i}")
                     for i in range(draw(st.integers(0, 4))))
    salesforce = draw(records("salesforce"))
    return PersonView("e1", draw(records("hubspot")), salesforce, deals=deals,
                      attempts=attempts if salesforce else (),  # Tasks hang off the SF record
                      memory=draw(memories()))


# derandomize: CI runs the same 400 examples every time (a red run is reproducible, never luck);
# the counterexample random runs once found is kept below as its own test.
COMMON = settings(max_examples=400, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(views())
def test_stages_never_move_backwards_except_through_a_return(v: PersonView) -> None:
    out = decide_person(v, CTX, NOW)
    for d in writes(out):
        if d.action != "set" or "lifecycle" not in d.changes:
            continue
        old = CTX.rank(d.before.get("lifecycle"))
        new = CTX.rank(d.changes["lifecycle"])
        assert new is not None
        if d.backwards:
            assert d.rule in ("R2-returned", "R5-attempts")
        elif old is not None:
            assert new > old, d


@COMMON
@given(views())
def test_no_decision_writes_none_or_an_unknown_term(v: PersonView) -> None:
    out = decide_person(v, CTX, NOW)
    for d in writes(out):
        assert d.reason and d.rule
        for name, value in d.changes.items():
            assert value is not None and value != "", (name, d)
        if "lifecycle" in d.changes:
            assert d.changes["lifecycle"] in CTX.stages
        if "lead_status" in d.changes:
            assert d.changes["lead_status"] in STATUSES
        if d.action == "set":
            rec = v.record(d.system or "")
            assert rec is not None
            for name in d.changes:
                # a term the CRM holds with an unmapped value is never overwritten
                assert not is_unknown(rec, name), (name, d)


@COMMON
@given(views())
def test_deciding_again_after_applying_changes_nothing(v: PersonView) -> None:
    first = decide_person(v, CTX, NOW)
    after = apply(v, first)
    again = decide_person(after, CTX, NOW)
    assert writes(again) == [], (first.decisions, again.decisions)


def test_a_promotion_with_unanswered_attempts_settles_in_one_cycle() -> None:
    """Found by hypothesis: score at the threshold, SF Lead at lead, three counting attempts after
    an earlier hand-off."""
    values = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace", "company": None,
              "lead_source": "Web", "return_reason": None, "bofu_conversion_at": None}
    at = datetime(2026, 3, 9, 12, tzinfo=UTC)
    hs = CanonicalRecord("hubspot", "contacts", "101", "person", at, {"lifecycle": "subscriber", "lead_status": "new"},
                         {**values, "score": 50})
    sf = CanonicalRecord("salesforce", "Lead", "00Q1", "person", at, {"lifecycle": "lead", "lead_status": "new"},
                         {**values, "score": None})
    calls = tuple(CanonicalRecord("salesforce", "Task", f"t{i}", "attempt", NOW, {},
                                  {"who_id": "00Q1", "type": "Call", "at": NOW, "counts": True}) for i in range(3))
    v = PersonView("e1", hs, sf, (), calls, Memory(handed_off_at=NOW - timedelta(hours=1)), False)
    first = decide_person(v, CTX, NOW)
    assert {d.rule for d in writes(first)} == {"R5-attempts"}  # no MQL write for a later cycle to undo
    assert writes(decide_person(apply(v, first), CTX, NOW)) == []


DEAL_STAGES = ["exploration", "quote_building", "quote_presented", "closed_won", "closed_lost",
               "on_hold", None]


@COMMON
@given(st.sampled_from(DEAL_STAGES), st.sampled_from(DEAL_STAGES),
       st.none() | st.tuples(st.sampled_from(DEAL_STAGES), st.sampled_from(DEAL_STAGES)))
def test_deal_stages_settle_in_one_cycle(a: str | None, b: str | None,
                                         last: tuple[str | None, str | None] | None) -> None:
    mem = Memory() if last is None else Memory(
        last_seen={"hubspot": {"deal_stage": last[0]}, "salesforce": {"deal_stage": last[1]}})
    v = DealView("d", deal("hubspot", a), deal("salesforce", b, "006"), mem)
    out = decide_deal(v, CTX, NOW)
    for d in writes(out):
        assert d.changes["deal_stage"] is not None
    after = apply(v, out)
    assert writes(decide_deal(after, CTX, NOW)) == []
    if a is not None and b is not None:
        assert after.hubspot.terms["deal_stage"] == after.salesforce.terms["deal_stage"]


@COMMON
@given(memories())
def test_memory_survives_json(m: Memory) -> None:
    assert Memory.from_json(m.to_json()) == m
