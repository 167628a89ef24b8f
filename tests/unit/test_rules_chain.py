"""The shape of the person rules (syncd.rules.PERSON_STEPS): which steps run, in which order,
and that each step plans only for its own rules. What the rules decide is test_rules.py's."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_rules import CTX, NOW, attempt, deal, hs, seen, sf, view

from syncd import rules
from syncd.rules import (
    PERSON_STEPS,
    RETURN_STEPS,
    Memory,
    PersonPlan,
    PersonView,
    Step,
    decide_person,
    plan_person,
)

MAIN_ORDER = ["returns", "stage candidates", "re-hand-off guard", "apply the target", "ownership",
              "hand-off", "follow-up"]
RETURN_ORDER = ["plan the return", "follow-up", "remember the return", "reverse hand-off"]


def _guarded(**kw: Any) -> Memory:
    """Returned three days ago, not released: the re-hand-off guard is on."""
    last = {"lifecycle": "lead", "lead_status": "returned_not_ready"}
    return Memory(returned_at=NOW - timedelta(days=3), return_reason="not ready", score_at_return=40,
                  last_seen={"hubspot": dict(last), "salesforce": {**last, **kw}})


_WORKED = seen({"lifecycle": "sql", "lead_status": "attempting"}, {"lifecycle": "sql", "lead_status": "attempting"})

# One view per thing a step can plan; together they reach every rule id.
CASES: dict[str, PersonView] = {
    "R1 behind": view(hs("mql", "new"), sf("lead", "new")),
    "R4 score": view(hs("lead", "new", score=60), sf("lead", "new")),
    "R6 open deal": view(hs("sql", "connected"), sf("sql", "connected"),
                         deals=(deal("salesforce", "exploration"),)),
    "R2 return after a late follow-up": view(
        hs("sql", "attempting", score=70), sf("sql", "returned_not_ready", return_reason="no budget"),
        Memory(handed_off_at=NOW - timedelta(days=2), last_seen=_WORKED.last_seen)),
    "R5 attempts": view(hs("mql", "attempting"), sf("mql", "attempting"),
                        attempts=tuple(attempt(NOW - timedelta(days=5, hours=-i), id=f"t{i}") for i in range(3))),
    "R3 released": view(hs("lead", "returned_not_ready", score=60), sf("lead", "returned_not_ready"), _guarded()),
    "R3 released, R7 copies": view(hs("lead", "returned_not_ready", score=60), sf("lead", "attempting"),
                                   _guarded(lead_status="attempting")),
    "R3 blocked": view(hs("lead", "returned_not_ready", score=55), sf("lead", "returned_not_ready"), _guarded()),
    "R7 one-sided change": view(hs("mql", "attempting"), sf("mql", "new"),
                                seen({"lifecycle": "mql", "lead_status": "new"},
                                     {"lifecycle": "mql", "lead_status": "new"})),
    "R7 lifecycle conflict": view(hs("mql"), sf("sql"), seen({"lifecycle": "lead"}, {"lifecycle": "lead"})),
    "R8 hand-off": view(hs("lead", "new", score=72), None),
    "R8 reverse hand-off": view(None, sf("sql", "returned_not_ready", return_reason="no budget")),
    "R9 late follow-up": view(hs("mql", "new"), sf("mql", "new"), Memory(handed_off_at=NOW - timedelta(hours=25))),
}


@dataclass
class Planned:
    """What one step added to the plan: (system, field) -> (value, rule, reason, backwards), creates, events."""

    sets: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    creates: list[rules.Decision] = field(default_factory=list)
    events: list[rules.Decision] = field(default_factory=list)

    def rules(self) -> set[str]:
        return {v[1] for v in self.sets.values()} | {d.rule for d in self.creates + self.events}


class Recorder:
    """``on_step``: each step that ran, with what it added to the plan."""

    def __init__(self) -> None:
        self.ran: list[tuple[Step, Planned]] = []
        self._sets: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._creates = 0
        self._events = 0

    def __call__(self, step: Step, p: PersonPlan) -> None:
        now = {(s, n): v for s, planned in p.sets.items() for n, v in planned.items()}
        for k, v in self._sets.items():
            assert now.get(k) == v, f"step {step.name!r} replaced {k} planned before it (first wins)"
        added = Planned({k: v for k, v in now.items() if k not in self._sets},
                        p.creates[self._creates:], p.events[self._events:])
        self.ran.append((step, added))
        self._sets, self._creates, self._events = now, len(p.creates), len(p.events)

    def names(self) -> list[str]:
        return [s.name for s, _ in self.ran]


def record(v: PersonView, steps: tuple[Step, ...] = PERSON_STEPS) -> tuple[Recorder, PersonPlan]:
    rec = Recorder()
    return rec, plan_person(v, CTX, NOW, steps, on_step=rec)


def test_the_steps_are_in_the_documented_order() -> None:
    assert [s.name for s in PERSON_STEPS] == MAIN_ORDER
    assert [s.name for s in RETURN_STEPS] == RETURN_ORDER
    doc = rules.__doc__ or ""
    at = [doc.index(f"  {name}  ") for name in MAIN_ORDER]
    assert at == sorted(at), "the module docstring lists the steps in another order"


@pytest.mark.parametrize("case", ["R2 return after a late follow-up", "R5 attempts", "R8 reverse hand-off"])
def test_a_return_runs_the_return_steps_and_ends_the_chain(case: str) -> None:
    rec, p = record(CASES[case])
    assert rec.names() == [*RETURN_ORDER, "returns"]  # the return's own steps, then nothing after it
    assert p.returned is not None and p.candidates == [] and p.target is None


@pytest.mark.parametrize("case", ["R1 behind", "R3 blocked", "R8 hand-off", "R9 late follow-up"])
def test_without_a_return_every_main_step_runs_once(case: str) -> None:
    rec, p = record(CASES[case])
    assert rec.names() == MAIN_ORDER
    assert p.returned is None


def test_a_step_returning_true_ends_the_chain() -> None:
    stop = Step("stop", (), lambda p: True)
    rec, p = record(CASES["R1 behind"], (PERSON_STEPS[0], stop, *PERSON_STEPS[1:]))
    assert rec.names() == ["returns", "stop"]
    assert p.outcome().decisions == []


def test_the_follow_up_of_the_episode_a_return_ends_is_still_judged() -> None:
    # follow-up runs before the return is remembered: afterwards returned_at >= handed_off_at
    out = decide_person(CASES["R2 return after a late follow-up"], CTX, NOW)
    assert [d.event for d in out.decisions if d.action == "event"] == ["returned", "sla_breach"]
    assert out.memory.returned_at == NOW and out.memory.sla_breach_at == NOW


def _credits(step: Step, added: Planned, p: PersonPlan) -> list[str]:
    """The rules ``added`` credits that ``step`` does not own (empty when all is well)."""
    stray = sorted(r for r in {d.rule for d in added.creates + added.events} if r not in step.rules)
    for (system, name), (_v, rule, reason, _b) in added.sets.items():
        if rule in step.rules:
            continue
        other = p.sets["salesforce" if system == "hubspot" else "hubspot"].get(name)
        # ownership makes a synced field equal by copying what an SLA rule planned on the other side
        if step.name == "ownership" and other is not None and other[1:3] == (rule, reason):
            continue
        stray.append(rule)
    return stray


@pytest.mark.parametrize("case", list(CASES))
def test_each_step_plans_only_for_its_own_rules(case: str) -> None:
    rec, p = record(CASES[case])
    for step, added in rec.ran:
        assert _credits(step, added, p) == [], f"{step.name} credited another rule in {case!r}"
    assert plan_person(CASES[case], CTX, NOW).outcome() == decide_person(CASES[case], CTX, NOW)


def test_the_cases_reach_every_rule_and_every_planning_step() -> None:
    """Keeps the test above honest: every step that can plan something did so in some case."""
    by_step: dict[str, set[str]] = {}
    for v in CASES.values():
        rec, _p = record(v)
        for step, added in rec.ran:
            by_step.setdefault(step.name, set()).update(added.rules())
    assert set().union(*by_step.values()) == {
        "R1-forward-only", "R2-returned", "R3-rehandoff-guard", "R4-lead-score", "R5-attempts", "R6-deals",
        "R7-ownership", "R8-handoff", "R9-followup-sla"}
    planners = {name for name, got in by_step.items() if got}
    assert planners == {"plan the return", "follow-up", "reverse hand-off", "re-hand-off guard",
                        "apply the target", "ownership", "hand-off"}
    assert "R3-rehandoff-guard" in by_step["ownership"]  # the copy case is exercised


def _extra_step(rule: str) -> Step:
    def run(p: PersonPlan) -> None:
        p.set("salesforce", "lifecycle", "customer", rule, "a new SLA rule")
    return Step("new rule", (rule,), run)


def test_a_new_step_wins_or_loses_by_its_place_in_the_chain() -> None:
    v = CASES["R1 behind"]  # R1 plans salesforce lifecycle := mql in "apply the target"
    i = MAIN_ORDER.index("apply the target")
    late = (*PERSON_STEPS[:i + 1], _extra_step("R10-new"), *PERSON_STEPS[i + 1:])
    early = (*PERSON_STEPS[:i], _extra_step("R10-new"), *PERSON_STEPS[i:])
    planned_late = plan_person(v, CTX, NOW, late).sets["salesforce"]["lifecycle"]
    planned_early = plan_person(v, CTX, NOW, early).sets["salesforce"]["lifecycle"]
    assert planned_late[:2] == ("mql", "R1-forward-only")
    assert planned_early[:2] == ("customer", "R10-new")


def test_rules_import_nothing_that_does_io() -> None:
    tree = ast.parse(Path(rules.__file__).read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert imported <= {"__future__", "json", "collections.abc", "dataclasses", "datetime", "typing",
                        "syncd.model", "syncd.sla"}
