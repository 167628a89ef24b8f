"""The SLA rules: canonical state in, intended writes and events out. Pure.

No I/O, no clock reads (``now`` is passed in), nothing imported that does I/O.
Each :class:`Decision` carries a rule id and a human reason; the engine turns
``set``/``create`` decisions into outbox writes (canonical -> raw through the
mapping layer) and ``event`` decisions into records, metrics and log lines.

Rule ids:
  R1-forward-only     the canonical stage is the furthest either system holds
  R2-returned         sales returned the person: back to the returned stage
  R3-rehandoff-guard  a returned person is not re-promoted without new evidence
  R4-lead-score       score at/over the threshold -> the score stage (mql)
  R5-attempts         N unanswered connection attempts -> returned (rule 2)
  R6-deals            open deal -> opportunity, won deal -> customer; deal stage sync
  R7-ownership        both sides changed a field: the owner wins (audited)
  R8-handoff          an MQL unknown to Salesforce is created there (and the reverse)
  R9-followup-sla     an MQL handed to sales with no attempt within the window

Values conventions (see :class:`syncd.model.CanonicalRecord`):
  * an *unknown* term is one the CRM holds with a value no mapping names: the
    term is None and the record lists unmapped values. It never causes a write,
    never counts as behind, and is never overwritten (:func:`is_unknown`);
  * an *empty* term (absent, or None with nothing unmapped) may be filled,
    unless ``RuleContext.writable`` says the object cannot hold it;
  * a plain value (``values``) is written only when the record carries the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from syncd.model import CanonicalRecord
from syncd.sla import SLA

#: canonical fields that are glossary terms (live in ``CanonicalRecord.terms``)
TERM_FIELDS = frozenset({"lifecycle", "lead_status", "lead_type", "deal_stage"})

HUBSPOT = "hubspot"
SALESFORCE = "salesforce"
_OTHER = {HUBSPOT: SALESFORCE, SALESFORCE: HUBSPOT}
_UNSET = object()


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What the rules need from the mappings and the SLA file.

    ``stages``: the lifecycle terms in funnel order (mappings/terms.toml).
    ``closed_won_terms`` / ``closed_terms``: deal-stage terms meaning won /
    closed (won or lost); every other known deal stage is open.
    ``writable``: optional {(system, object): canonical fields that object can
    hold}; when given, decisions never set a field the target cannot hold
    (e.g. ``lead_status`` on a converted Salesforce Contact). None = no limit.
    """

    sla: SLA
    stages: tuple[str, ...] = ("subscriber", "lead", "mql", "sal", "sql", "opportunity",
                               "customer")
    closed_won_terms: frozenset[str] = frozenset({"closed_won"})
    closed_terms: frozenset[str] = frozenset({"closed_won", "closed_lost"})
    writable: Mapping[tuple[str, str], frozenset[str]] | None = None

    def rank(self, stage: str | None) -> int | None:
        """Position of a stage in the funnel; None when unknown."""
        if stage is None or stage not in self.stages:
            return None
        return self.stages.index(stage)

    def can_hold(self, system: str, obj: str, name: str) -> bool:
        if self.writable is None:
            return True
        return name in self.writable.get((system, obj), frozenset())


def _dt(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def _pdt(v: Any) -> datetime | None:
    return datetime.fromisoformat(v) if isinstance(v, str) else None


@dataclass(frozen=True, slots=True)
class Memory:
    """What syncd remembers about one person (or deal) between cycles.

    The engine persists it as JSON (:meth:`to_json` / :meth:`from_json`) and
    hands the one returned in :class:`Outcome` back next cycle.

    ``returned_at`` / ``return_reason`` / ``score_at_return``: the latest return
    to marketing (rule 2). ``released_at``: when new evidence lifted the
    re-hand-off guard (rule 3); the guard is active while ``returned_at`` is
    later than ``released_at``. ``handed_off_at``: when the MQL was handed to
    sales (rule 8/4). ``first_attempt_at``: the first counting connection
    attempt after that hand-off. ``sla_breach_at``: when the follow-up breach
    was recorded (rule 9). ``blocked_promotion_at`` / ``blocked_promotion_why``:
    the last blocked re-hand-off (rule 3). ``last_seen``: {system: {canonical
    field: value}} at the end of the previous cycle (after the writes decided
    then), to tell which side changed a field since.
    """

    returned_at: datetime | None = None
    return_reason: str | None = None
    score_at_return: int | None = None
    released_at: datetime | None = None
    handed_off_at: datetime | None = None
    first_attempt_at: datetime | None = None
    sla_breach_at: datetime | None = None
    blocked_promotion_at: datetime | None = None
    blocked_promotion_why: str | None = None
    last_seen: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def guarded(self) -> bool:
        """True while a returned person waits for new evidence (rule 3)."""
        return self.returned_at is not None and (
            self.released_at is None or self.released_at < self.returned_at)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form the state store keeps (see :meth:`from_dict`)."""
        return {
            "returned_at": _dt(self.returned_at), "return_reason": self.return_reason,
            "score_at_return": self.score_at_return, "released_at": _dt(self.released_at),
            "handed_off_at": _dt(self.handed_off_at),
            "first_attempt_at": _dt(self.first_attempt_at),
            "sla_breach_at": _dt(self.sla_breach_at),
            "blocked_promotion_at": _dt(self.blocked_promotion_at),
            "blocked_promotion_why": self.blocked_promotion_why,
            "last_seen": {s: dict(v) for s, v in self.last_seen.items()},
        }

    @classmethod
    def from_json(cls, text: str | None) -> Memory:
        return cls.from_dict(json.loads(text)) if text else cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Memory:
        if not d:
            return cls()
        return cls(
            returned_at=_pdt(d.get("returned_at")), return_reason=d.get("return_reason"),
            score_at_return=d.get("score_at_return"), released_at=_pdt(d.get("released_at")),
            handed_off_at=_pdt(d.get("handed_off_at")),
            first_attempt_at=_pdt(d.get("first_attempt_at")),
            sla_breach_at=_pdt(d.get("sla_breach_at")),
            blocked_promotion_at=_pdt(d.get("blocked_promotion_at")),
            blocked_promotion_why=d.get("blocked_promotion_why"),
            last_seen=d.get("last_seen") or {},
        )


@dataclass(frozen=True, slots=True)
class PersonView:
    """One linked person as both systems hold it now.

    ``salesforce`` is the Lead, or the Contact when the lead was converted.
    ``deals``: linked deals/opportunities from both systems (kind "deal").
    ``attempts``: Salesforce Tasks on the lead/contact (kind "attempt").
    """

    entity_id: str
    hubspot: CanonicalRecord | None
    salesforce: CanonicalRecord | None
    deals: tuple[CanonicalRecord, ...] = ()
    attempts: tuple[CanonicalRecord, ...] = ()
    memory: Memory = field(default_factory=Memory)
    # An open identity conflict on this person's email (two candidate records in one CRM):
    # no hand-off creates a record for them until RevOps resolves it (it would pick one at random).
    link_conflict: bool = False

    def record(self, system: str) -> CanonicalRecord | None:
        return self.hubspot if system == HUBSPOT else self.salesforce


@dataclass(frozen=True, slots=True)
class DealView:
    """One linked deal: the HubSpot deal and the Salesforce Opportunity."""

    entity_id: str
    hubspot: CanonicalRecord | None
    salesforce: CanonicalRecord | None
    memory: Memory = field(default_factory=Memory)

    def record(self, system: str) -> CanonicalRecord | None:
        return self.hubspot if system == HUBSPOT else self.salesforce


@dataclass(frozen=True, slots=True)
class Decision:
    """One intended write or event.

    ``action``: "set" (update ``record_id``), "create" (``changes`` is the full
    canonical field set; ``key`` is the stable idempotency key) or "event"
    (``event`` names it: returned, promotion_blocked, conflict, sla_breach).
    ``changes``/``before``: canonical field -> new / previous value.
    ``backwards``: a deliberate backwards lifecycle move (rule 2); HubSpot
    needs the stage cleared first (``FieldUpdate.clear_first``).
    """

    rule: str
    reason: str
    action: Literal["set", "create", "event"]
    system: str | None = None
    object: str | None = None
    record_id: str | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)
    before: Mapping[str, Any] = field(default_factory=dict)
    event: str | None = None
    backwards: bool = False
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    decisions: list[Decision]
    memory: Memory


def value_of(rec: CanonicalRecord | None, name: str, default: Any = _UNSET) -> Any:
    """A canonical field of a record (term or value); ``default`` when absent."""
    if rec is None:
        return default
    src = rec.terms if name in TERM_FIELDS else rec.values
    return src.get(name, default)


def is_unknown(rec: CanonicalRecord | None, name: str) -> bool:
    """The record holds a CRM value for this term that no mapping names.

    ``CanonicalRecord.unmapped`` does not say which term a raw value belonged
    to, so when anything is unmapped every None term counts as unknown.
    """
    return (rec is not None and name in TERM_FIELDS and name in rec.terms
            and rec.terms[name] is None and bool(rec.unmapped))


def is_empty(rec: CanonicalRecord | None, name: str) -> bool:
    """The record holds no value for this term (absent, or None with nothing unmapped)."""
    if rec is None or name not in TERM_FIELDS:
        return False
    v = rec.terms.get(name, _UNSET)
    return v is _UNSET or (v is None and not rec.unmapped)


class _Plan:
    """Intended field values per system, each with the rule and reason that set it."""

    def __init__(self, view: PersonView | DealView, ctx: RuleContext) -> None:
        self.view = view
        self.ctx = ctx
        self.sets: dict[str, dict[str, tuple[Any, str, str, bool]]] = {HUBSPOT: {}, SALESFORCE: {}}
        self.events: list[Decision] = []
        self.creates: list[Decision] = []

    def current(self, system: str, name: str) -> Any:
        planned = self.sets[system].get(name)
        if planned is not None:
            return planned[0]
        return value_of(self.view.record(system), name)

    def set(self, system: str, name: str, value: Any, rule: str, reason: str,
            backwards: bool = False) -> None:
        """Intend ``name := value`` on ``system``; the first rule to plan a field wins.

        Skipped: no record, a None value, a field the object cannot hold, an
        unmapped CRM value, a value the target already holds.
        """
        rec = self.view.record(system)
        if rec is None or value is None or value is _UNSET:
            return
        if not self.ctx.can_hold(system, rec.object, name):
            return
        now_v = value_of(rec, name)
        if is_unknown(rec, name):  # an unmapped CRM value is never overwritten
            return
        if name not in TERM_FIELDS and now_v is _UNSET:  # the record does not carry it
            return
        if name in self.sets[system]:
            return
        if now_v == value:
            self.sets[system].pop(name, None)
            return
        self.sets[system][name] = (value, rule, reason, backwards)

    def event(self, rule: str, reason: str, event: str, system: str | None = None,
              changes: Mapping[str, Any] | None = None) -> None:
        rec = self.view.record(system) if system else None
        self.events.append(Decision(
            rule=rule, reason=reason, action="event", system=system,
            object=rec.object if rec else None, record_id=rec.id if rec else None,
            changes=dict(changes or {}), event=event))

    def decisions(self) -> list[Decision]:
        out: list[Decision] = []
        for system in (HUBSPOT, SALESFORCE):
            rec = self.view.record(system)
            if rec is None:
                continue
            # one decision per (rule, reason, backwards) group, stable order
            groups: dict[tuple[str, str, bool], dict[str, Any]] = {}
            for name, (value, rule, reason, backwards) in self.sets[system].items():
                groups.setdefault((rule, reason, backwards), {})[name] = value
            for (rule, reason, backwards), changes in groups.items():
                out.append(Decision(
                    rule=rule, reason=reason, action="set", system=system, object=rec.object,
                    record_id=rec.id, changes=changes,
                    before={n: value_of(rec, n, None) for n in changes}, backwards=backwards))
        return out + self.creates + self.events

    def end_state(self) -> dict[str, dict[str, Any]]:
        """{system: {field: value}} after the planned writes (the next last_seen)."""
        out: dict[str, dict[str, Any]] = {}
        for system in (HUBSPOT, SALESFORCE):
            rec = self.view.record(system)
            if rec is None:
                continue
            vals: dict[str, Any] = {k: v for k, v in rec.terms.items()}
            for k in ("score",):
                if k in rec.values:
                    vals[k] = rec.values[k]
            for name, (value, *_rest) in self.sets[system].items():
                vals[name] = value
            out[system] = vals
        for c in self.creates:
            if c.system is not None:
                out[c.system] = {k: v for k, v in c.changes.items()
                                 if k in TERM_FIELDS or k == "score"}
        return out


def _changed(mem: Memory, system: str, name: str, value: Any) -> bool | None:
    """Did ``system`` change ``name`` since last cycle? None when nothing was remembered."""
    seen = mem.last_seen.get(system)
    if seen is None or name not in seen:
        return None
    return bool(seen[name] != value)


def _score(view: PersonView, sla: SLA) -> int | None:
    order = [sla.owner_of("score") or HUBSPOT]
    order += [s for s in (HUBSPOT, SALESFORCE) if s not in order]
    for system in order:
        v = value_of(view.record(system), "score", None)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return int(v)
    return None


def _bofu_at(view: PersonView) -> datetime | None:
    times = [value_of(r, "bofu_conversion_at", None) for r in (view.hubspot, view.salesforce)]
    known = [t for t in times if isinstance(t, datetime)]
    return max(known) if known else None


def _max_stage(ctx: RuleContext, stages: list[str | None]) -> str | None:
    ranked = [(ctx.rank(s), s) for s in stages if ctx.rank(s) is not None]
    return max(ranked)[1] if ranked else None  # type: ignore[type-var]


def _counting_attempts(view: PersonView, ctx: RuleContext, since: datetime | None,
                       now: datetime) -> list[datetime]:
    types = {t.lower() for t in ctx.sla.attempts.task_types}
    window_start = now - timedelta(days=ctx.sla.attempts.window_days)
    out: list[datetime] = []
    for a in view.attempts:
        at = a.values.get("at")
        if not isinstance(at, datetime) or at > now or at < window_start:
            continue
        if since is not None and at <= since:
            continue  # attempts from before the (re-)hand-off belong to the earlier episode
        kind = a.values.get("type")
        counts = (kind.lower() in types) if isinstance(kind, str) else bool(a.values.get("counts"))
        if counts:
            out.append(at)
    return sorted(out)


def _first_attempt(view: PersonView, ctx: RuleContext, since: datetime) -> datetime | None:
    types = {t.lower() for t in ctx.sla.attempts.task_types}
    found: list[datetime] = []
    for a in view.attempts:
        at = a.values.get("at")
        kind = a.values.get("type")
        counts = (kind.lower() in types) if isinstance(kind, str) else bool(a.values.get("counts"))
        if isinstance(at, datetime) and at >= since and counts:
            found.append(at)
    return min(found) if found else None


class _Candidate(NamedTuple):
    """A stage some rule says the person should reach this cycle."""

    stage: str
    rule: str
    reason: str
    source: str | None = None  # the system holding it (rule 1)


def decide_person(view: PersonView, ctx: RuleContext, now: datetime) -> Outcome:
    """All person rules (R1-R9) for one linked person. Pure."""
    sla = ctx.sla
    t = sla.terms
    mem = view.memory
    plan = _Plan(view, ctx)
    present = [s for s in (HUBSPOT, SALESFORCE) if view.record(s) is not None]
    stage = {s: value_of(view.record(s), "lifecycle", None) for s in present}
    status = {s: value_of(view.record(s), "lead_status", None) for s in present}
    score = _score(view, sla)
    returned_rank = ctx.rank(t.returned_stage)
    score_rank = ctx.rank(t.score_stage)
    opp_rank = ctx.rank(t.open_deal_stage)

    # ---- R2 / R5: returns to marketing ------------------------------------------
    returned_by: str | None = None
    for s in present:
        if status[s] == t.returned_status and (
            _changed(mem, s, "lead_status", status[s])
            or (_changed(mem, s, "lead_status", status[s]) is None and not mem.guarded)
        ):
            returned_by = s
            break
    return_reason: str | None = None
    return_rule = "R2-returned"
    if returned_by is not None:
        rec = view.record(returned_by)
        given = value_of(rec, "return_reason", None)
        return_reason = given if isinstance(given, str) and given else f"returned by {returned_by}"
    elif SALESFORCE in present and not mem.guarded:
        # R5: N unanswered attempts while sales holds the person
        sf_rank = ctx.rank(stage.get(SALESFORCE))
        cur_rank = _prospective_rank(view, ctx, list(stage.values()), score)
        in_sales = (cur_rank is not None and score_rank is not None and cur_rank >= score_rank
                    and (opp_rank is None or cur_rank < opp_rank))
        connected = _resolved_status(view, ctx, mem) in t.connected_statuses
        since = max([d for d in (mem.returned_at, mem.released_at, mem.handed_off_at) if d],
                    default=None)
        attempts = _counting_attempts(view, ctx, since, now)
        if in_sales and not connected and not is_unknown(view.salesforce, "lead_status") \
                and len(attempts) >= sla.attempts.count and sf_rank != returned_rank:
            return_rule = "R5-attempts"
            return_reason = f"{len(attempts)} unanswered attempts"

    if return_reason is not None:
        for s in present:
            plan.set(s, "lead_status", t.returned_status, return_rule,
                     f"returned – not ready: {return_reason}")
            cur_rank = ctx.rank(stage[s])
            if cur_rank is not None and returned_rank is not None and cur_rank > returned_rank:
                plan.set(s, "lifecycle", t.returned_stage, return_rule,
                         f"returned – not ready: {return_reason}; back to {t.returned_stage}",
                         backwards=True)
            elif cur_rank != returned_rank and (
                    cur_rank is not None or is_empty(view.record(s), "lifecycle")):
                plan.set(s, "lifecycle", t.returned_stage, return_rule,
                         f"returned – not ready: {return_reason}; to {t.returned_stage}")
        for s in present:  # marketing nurtures with the reason in view, sales keeps its record of it
            plan.set(s, "return_reason", return_reason, return_rule,
                     f"returned – not ready: {return_reason}; reason recorded for marketing")
        plan.event(return_rule, f"returned to marketing for nurture: {return_reason}", "returned",
                   returned_by or SALESFORCE, {"return_reason": return_reason})
        mem = _followup(view, ctx, plan, mem, now)  # a breach before the return still counts
        mem = replace(mem, returned_at=now, return_reason=return_reason, score_at_return=score,
                      released_at=None, blocked_promotion_at=None, blocked_promotion_why=None)
        _reverse_handoff(view, ctx, plan, now)
        return Outcome(plan.decisions(), replace(mem, last_seen=plan.end_state()))

    # ---- R1 / R4 / R6: where the person should be --------------------------------
    candidates: list[_Candidate] = []
    for s in present:
        held = stage[s]
        if held is not None and ctx.rank(held) is not None:
            candidates.append(_Candidate(held, "R1-forward-only", f"{s} holds {held}", s))
    if score is not None and score >= sla.score.threshold and score_rank is not None:
        candidates.append(_Candidate(t.score_stage, "R4-lead-score",
                           f"lead score {score} ≥ threshold {sla.score.threshold}"))
    bofu = _bofu_at(view)
    if sla.score.bofu_conversion_is_mql and bofu is not None and score_rank is not None:
        candidates.append(_Candidate(t.score_stage, "R4-lead-score",
                           f"bottom-of-funnel conversion at {bofu.isoformat()}"))
    won = [d for d in view.deals if value_of(d, "deal_stage", None) in ctx.closed_won_terms]
    open_ = [d for d in view.deals if (ds := value_of(d, "deal_stage", None)) is not None
             and ds not in ctx.closed_terms]
    if won and ctx.rank(t.won_deal_stage) is not None:
        candidates.append(_Candidate(t.won_deal_stage, "R6-deals", f"deal {won[0].id} is won"))
    if open_ and opp_rank is not None:
        candidates.append(_Candidate(t.open_deal_stage, "R6-deals",
                                     f"deal {open_[0].id} is open"))

    # ---- R3: the re-hand-off guard --------------------------------------------------
    released = False
    if mem.guarded and returned_rank is not None:
        evidence = _evidence(view, ctx, mem, score)
        allowed: list[_Candidate] = []
        blocked: list[_Candidate] = []
        for c in candidates:
            r = ctx.rank(c.stage)
            assert r is not None
            if r <= returned_rank:
                allowed.append(c)
            elif c.rule == "R6-deals" and _deal_after_return(view, mem):
                allowed.append(c)
                released = True
            elif c.source == SALESFORCE and _changed(mem, SALESFORCE, "lifecycle", c.stage):
                allowed.append(c)  # sales moved it forward itself
                released = True
            elif evidence is not None:
                allowed.append(_Candidate(c.stage, "R3-rehandoff-guard",
                                          f"{c.reason}; new evidence: {evidence}"))
                released = True
            else:
                blocked.append(c)
        # once the guard is lifted this cycle, every promotion goes through
        candidates = allowed + blocked if released else allowed
        if blocked and not released:
            why = "; ".join(f"{c.stage} ({c.reason})" for c in blocked)
            if mem.blocked_promotion_at is None:
                plan.event("R3-rehandoff-guard",
                           f"promotion blocked after return ({mem.return_reason}) without new "
                           f"evidence: {why}", "promotion_blocked",
                           HUBSPOT if HUBSPOT in present else SALESFORCE)
                mem = replace(mem, blocked_promotion_at=now, blocked_promotion_why=why)
        if released:
            mem = replace(mem, released_at=now)

    target = _max_stage(ctx, [c.stage for c in candidates])
    target_reason: str | None = None
    target_rank = ctx.rank(target)
    if target is not None and target_rank is not None:
        # the rule credited is the first candidate reaching the target that is not R1
        best = [c for c in candidates if c.stage == target]
        best.sort(key=lambda c: c.rule == "R1-forward-only")
        rule, reason = best[0].rule, best[0].reason
        target_reason = reason
        for s in present:
            r = ctx.rank(stage[s])
            if r is not None and r < target_rank or (
                    is_empty(view.record(s), "lifecycle")):
                plan.set(s, "lifecycle", target, rule, f"{reason}: {s} moves to {target}")
        if released:
            for s in present:
                if status[s] == t.returned_status:
                    plan.set(s, "lead_status", sla.handoff.status, "R3-rehandoff-guard",
                             "re-handed to sales after new evidence")

    # ---- R7: field ownership / synced fields ----------------------------------------
    if len(present) == 2:
        _lifecycle_conflict(view, ctx, plan, mem, stage)
        for name in sla.sync.fields:
            _sync_field(view, ctx, plan, mem, name)

    # ---- R8: hand-off ----------------------------------------------------------------
    mem = _handoff(view, ctx, plan, mem, now, target, target_reason)
    # a person reaching the score stage in Salesforce through us is handed to sales
    if SALESFORCE in present and score_rank is not None and target_rank is not None \
            and target_rank >= score_rank and (mem.handed_off_at is None or (
                mem.returned_at is not None and mem.handed_off_at < mem.returned_at)):
        sf_rank = ctx.rank(stage[SALESFORCE])
        if sf_rank is None or sf_rank < score_rank or released:
            mem = replace(mem, handed_off_at=now, first_attempt_at=None, sla_breach_at=None)
    mem = _followup(view, ctx, plan, mem, now)
    return Outcome(plan.decisions(), replace(mem, last_seen=plan.end_state()))


def _term(rec: CanonicalRecord | None, name: str) -> str | None:
    v = value_of(rec, name, None)
    return v if isinstance(v, str) else None


def _resolved_status(view: PersonView, ctx: RuleContext, mem: Memory) -> str | None:
    """The lead status this cycle will settle on (rule 7's choice when both hold one)."""
    sf = _term(view.salesforce, "lead_status")
    if "lead_status" not in ctx.sla.sync.fields or view.hubspot is None:
        return sf
    hs = _term(view.hubspot, "lead_status")
    if sf is None or hs is None or hs == sf:
        return hs if sf is None else sf
    ch = _changed(mem, HUBSPOT, "lead_status", hs)
    cs = _changed(mem, SALESFORCE, "lead_status", sf)
    if ch and not cs:
        return hs
    if cs and not ch:
        return sf
    return hs if ctx.sla.owner_of("lead_status") == HUBSPOT else sf


def _prospective_rank(view: PersonView, ctx: RuleContext, stages: list[str | None],
                      score: int | None) -> int | None:
    """The furthest stage rules 1/4/6 would reach this cycle (before any return)."""
    t = ctx.sla.terms
    cands = list(stages)
    if score is not None and score >= ctx.sla.score.threshold:
        cands.append(t.score_stage)
    if ctx.sla.score.bofu_conversion_is_mql and _bofu_at(view) is not None:
        cands.append(t.score_stage)
    for d in view.deals:
        ds = value_of(d, "deal_stage", None)
        if ds in ctx.closed_won_terms:
            cands.append(t.won_deal_stage)
        elif ds is not None and ds not in ctx.closed_terms:
            cands.append(t.open_deal_stage)
    return ctx.rank(_max_stage(ctx, cands))


def _evidence(view: PersonView, ctx: RuleContext, mem: Memory, score: int | None) -> str | None:
    sla = ctx.sla
    base = max(sla.score.threshold, mem.score_at_return or 0)
    need = base + sla.score.rehandoff_margin
    if score is not None and score >= need:
        return f"score {score} ≥ {need} (max(threshold, score at return) {base} + margin " \
               f"{sla.score.rehandoff_margin})"
    bofu = _bofu_at(view)
    if sla.score.bofu_conversion_rehandoff and bofu is not None and mem.returned_at is not None \
            and bofu > mem.returned_at:
        return f"bottom-of-funnel conversion at {bofu.isoformat()}"
    return None


def _deal_after_return(view: PersonView, mem: Memory) -> bool:
    return mem.returned_at is not None and any(d.modified_at > mem.returned_at for d in view.deals)


def _lifecycle_conflict(view: PersonView, ctx: RuleContext, plan: _Plan, mem: Memory,
                        stage: Mapping[str, str | None]) -> None:
    hs, sf = stage.get(HUBSPOT), stage.get(SALESFORCE)
    if hs is None or sf is None or hs == sf:
        return
    if _changed(mem, HUBSPOT, "lifecycle", hs) and _changed(mem, SALESFORCE, "lifecycle", sf):
        kept = _max_stage(ctx, [hs, sf])
        owner = ctx.sla.owner_of(kept) if kept else None
        plan.event("R7-ownership",
                   f"both systems changed lifecycle (hubspot: {hs}, salesforce: {sf}); "
                   f"stages only move forward, {kept} kept (owner of {kept}: {owner})",
                   "conflict", owner, {"lifecycle": kept})


def _sync_field(view: PersonView, ctx: RuleContext, plan: _Plan, mem: Memory, name: str) -> None:
    if is_unknown(view.hubspot, name) or is_unknown(view.salesforce, name):
        return
    a = plan.current(HUBSPOT, name)
    b = plan.current(SALESFORCE, name)
    a = None if a is _UNSET or a == "" else a
    b = None if b is _UNSET or b == "" else b
    if a == b:
        return
    planned = [s for s in (HUBSPOT, SALESFORCE) if name in plan.sets[s]]
    if len(planned) == 2:
        return
    if planned:  # an SLA rule decided this field on one side this cycle: the other follows
        src = planned[0]
        _v, rule, reason, _b = plan.sets[src][name]
        plan.set(_OTHER[src], name, plan.current(src, name), rule, reason)
        return
    if a is None or b is None:  # one side holds nothing: it gets the other's value
        empty = HUBSPOT if a is None else SALESFORCE
        plan.set(empty, name, b if a is None else a, "R7-ownership",
                 f"{empty} holds no {name}; {_OTHER[empty]} has it")
        return
    ca = _changed(mem, HUBSPOT, name, a)
    cb = _changed(mem, SALESFORCE, name, b)
    owner = ctx.sla.owner_of(name)
    if ca and not cb:
        plan.set(SALESFORCE, name, a, "R7-ownership", f"hubspot changed {name} to {a}")
    elif cb and not ca:
        plan.set(HUBSPOT, name, b, "R7-ownership", f"salesforce changed {name} to {b}")
    elif owner in (HUBSPOT, SALESFORCE):
        winner = a if owner == HUBSPOT else b
        loser = _OTHER[owner]
        if ca and cb:
            plan.set(loser, name, winner, "R7-ownership",
                     f"both systems changed {name}; owner {owner} wins")
            plan.event("R7-ownership",
                       f"conflicting edits of {name} (hubspot: {a}, salesforce: {b}); "
                       f"owner {owner} wins with {winner}", "conflict", owner, {name: winner})
        else:
            plan.set(loser, name, winner, "R7-ownership",
                     f"{name} differs; owner {owner} holds {winner}")


def _travelling(rec: CanonicalRecord, fields: tuple[str, ...], placeholders: Mapping[str, str],
                extra: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        v = extra[f] if f in extra else value_of(rec, f, None)
        if v is None or v == "":
            v = placeholders.get(f)
        if v is not None:
            out[f] = v
    return out


def _handoff(view: PersonView, ctx: RuleContext, plan: _Plan, mem: Memory, now: datetime,
             target: str | None, target_reason: str | None) -> Memory:
    sla = ctx.sla
    h = sla.handoff
    hs = view.hubspot
    score_rank = ctx.rank(sla.terms.score_stage)
    target_rank = ctx.rank(target)
    if not h.enabled or hs is None or view.salesforce is not None or score_rank is None \
            or target_rank is None or target_rank < score_rank or view.link_conflict:
        return mem
    why = target_reason or f"lifecycle {target} in hubspot"
    changes = _travelling(hs, h.fields, h.placeholders, {"qualification_reason": why,
                                                         "score": _score(view, sla)})
    changes["lifecycle"] = target
    changes["lead_status"] = h.status
    plan.set(HUBSPOT, "lead_status", h.status, "R8-handoff", "handed to sales")
    plan.creates.append(Decision(
        rule="R8-handoff", reason=f"MQL handed to sales: {why}", action="create",
        system=SALESFORCE, object=h.object, changes=changes, key=f"handoff:{view.entity_id}"))
    if mem.handed_off_at is None or (mem.returned_at and mem.handed_off_at < mem.returned_at):
        mem = replace(mem, handed_off_at=now, first_attempt_at=None, sla_breach_at=None)
    return mem


def _reverse_handoff(view: PersonView, ctx: RuleContext, plan: _Plan, now: datetime) -> None:
    r = ctx.sla.reverse_handoff
    sf = view.salesforce
    if not r.enabled or sf is None or view.hubspot is not None or view.link_conflict:
        return
    reason = plan.current(SALESFORCE, "return_reason")
    changes = _travelling(sf, r.fields, {}, {"return_reason": reason if reason is not _UNSET
                                             else value_of(sf, "return_reason", None)})
    changes["lifecycle"] = ctx.sla.terms.returned_stage
    changes["lead_status"] = ctx.sla.terms.returned_status
    plan.creates.append(Decision(
        rule="R8-handoff", reason="returned lead unknown to hubspot: created there for nurture",
        action="create", system=HUBSPOT, object=r.object, changes=changes,
        key=f"reverse-handoff:{view.entity_id}"))


def _followup(view: PersonView, ctx: RuleContext, plan: _Plan, mem: Memory,
              now: datetime) -> Memory:
    handed = mem.handed_off_at
    if handed is None or (mem.returned_at is not None and mem.returned_at >= handed):
        return mem  # not handed off, or sales already returned it
    if mem.first_attempt_at is None:
        first = _first_attempt(view, ctx, handed)
        if first is not None:
            mem = replace(mem, first_attempt_at=first)
    window = timedelta(hours=ctx.sla.followup.window_hours)
    deadline = handed + window
    late = mem.first_attempt_at is None and now > deadline or (
        mem.first_attempt_at is not None and mem.first_attempt_at > deadline)
    if late and mem.sla_breach_at is None:
        plan.event("R9-followup-sla",
                   f"MQL handed to sales at {handed.isoformat()} had no connection "
                   f"attempt within {ctx.sla.followup.window_hours:g} h"
                   + (f" (first at {mem.first_attempt_at.isoformat()})"
                      if mem.first_attempt_at else ""),
                   "sla_breach", SALESFORCE if view.salesforce else HUBSPOT,
                   {"handed_off_at": handed, "deadline": deadline,
                    "first_attempt_at": mem.first_attempt_at})
        mem = replace(mem, sla_breach_at=now)
    return mem


def decide_deal(view: DealView, ctx: RuleContext, now: datetime) -> Outcome:
    """R6/R7 for one linked deal: keep the deal stage equal in both systems.

    A change on one side since the last cycle is copied to the other; when both
    changed (or nothing is remembered and they differ) the owner of
    ``deal_stage`` wins, and a double change is an audited conflict event.
    """
    plan = _Plan(view, ctx)
    a = value_of(view.hubspot, "deal_stage", None)
    b = value_of(view.salesforce, "deal_stage", None)
    mem = view.memory
    if a is not None and b is not None and a != b:
        ca = _changed(mem, HUBSPOT, "deal_stage", a)
        cb = _changed(mem, SALESFORCE, "deal_stage", b)
        owner = ctx.sla.owner_of("deal_stage") or SALESFORCE
        if ca and not cb:
            plan.set(SALESFORCE, "deal_stage", a, "R6-deals", f"hubspot moved the deal to {a}")
        elif cb and not ca:
            plan.set(HUBSPOT, "deal_stage", b, "R6-deals", f"salesforce moved the deal to {b}")
        else:
            winner = a if owner == HUBSPOT else b
            plan.set(_OTHER[owner], "deal_stage", winner, "R7-ownership",
                     f"deal stage differs; owner {owner} holds {winner}")
            if ca and cb:
                plan.event("R7-ownership",
                           f"conflicting deal stage edits (hubspot: {a}, salesforce: {b}); "
                           f"owner {owner} wins with {winner}", "conflict", owner,
                           {"deal_stage": winner})
    end = {s: dict(r.terms) for s in (HUBSPOT, SALESFORCE) if (r := view.record(s)) is not None}
    for s, sets in plan.sets.items():
        for name, (value, *_r) in sets.items():
            end[s][name] = value
    return Outcome(plan.decisions(), replace(mem, last_seen=end))
