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

:func:`decide_person` runs :data:`PERSON_STEPS`, small named steps over one
:class:`PersonPlan`, in the spirit of structlog's processors:

  returns            R2/R5; a return runs :data:`RETURN_STEPS` and ends the chain
  stage candidates   R1/R4/R6: the stages the person could reach
  re-hand-off guard  R3: drops (or lets through) promotions of a returned person
  apply the target   the furthest candidate is written where a system is behind
  ownership          R7
  hand-off           R8
  follow-up          R9

The first rule to plan a field wins, so the order of the steps is the rules'
precedence; a new SLA rule is a new step in the place it should take.

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
from collections.abc import Callable, Mapping, Sequence
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
    the last blocked re-hand-off (rule 3). ``release_requested_at`` / ``release_requested_by``:
    an operator's ``syncd blocked release`` (rule 3 takes it as new evidence when it is later
    than the return). ``last_seen``: {system: {canonical
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
    release_requested_at: datetime | None = None
    release_requested_by: str | None = None

    @property
    def guarded(self) -> bool:
        """True while a returned person waits for new evidence (rule 3)."""
        return self.returned_at is not None and (
            self.released_at is None or self.released_at < self.returned_at)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form the state store keeps (see :meth:`from_dict`)."""
        released = {"release_requested_at": _dt(self.release_requested_at),
                    "release_requested_by": self.release_requested_by} if self.release_requested_at else {}
        return {
            **released,
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
            release_requested_at=_pdt(d.get("release_requested_at")),
            release_requested_by=d.get("release_requested_by"),
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
    # Systems where this person's record was deleted (syncd.deletions.blocked_creates): no
    # hand-off re-creates them there because of the deletion.
    no_create_in: frozenset[str] = frozenset()

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


class _Return(NamedTuple):
    """Sales returned the person this cycle (rule 2), or the attempts ran out (rule 5)."""

    rule: str
    reason: str
    by: str | None  # the system holding the returned status (None: rule 5)


class PersonPlan(_Plan):
    """One person's decision in the making: what the steps of :data:`PERSON_STEPS` read and write.

    Set up once from the view: ``present`` (the systems holding a record), ``stage`` and
    ``status`` (lifecycle and lead status each holds), ``score``. Filled in by the steps, in
    order: ``returned`` (rule 2/5), ``candidates`` (rules 1/4/6, then filtered by rule 3),
    ``released`` (rule 3 lifted the guard), ``target`` / ``target_reason`` (the stage applied).
    ``mem`` is the memory as the steps so far left it; the planned writes and events are the
    :class:`_Plan` underneath (the first rule to plan a field wins).
    """

    def __init__(self, view: PersonView, ctx: RuleContext, now: datetime) -> None:
        super().__init__(view, ctx)
        self.person = view
        self.now = now
        self.mem = view.memory
        self.present = [s for s in (HUBSPOT, SALESFORCE) if view.record(s) is not None]
        self.stage: dict[str, str | None] = {s: value_of(view.record(s), "lifecycle", None) for s in self.present}
        self.status: dict[str, Any] = {s: value_of(view.record(s), "lead_status", None) for s in self.present}
        self.score = _score(view, ctx.sla)
        self.returned: _Return | None = None
        self.candidates: list[_Candidate] = []
        self.released = False
        self.target: str | None = None
        self.target_reason: str | None = None
        self.on_step: Callable[[Step, PersonPlan], None] | None = None

    def outcome(self) -> Outcome:
        return Outcome(self.decisions(), replace(self.mem, last_seen=self.end_state()))


class Step(NamedTuple):
    """One named step of the person rules: ``run`` plans writes/events for ``rules`` only.

    ``run`` returns True to end the chain (nothing after it runs), None/False to go on.
    """

    name: str
    rules: tuple[str, ...]
    run: Callable[[PersonPlan], bool | None]


def _run(p: PersonPlan, steps: Sequence[Step]) -> bool:
    """Run ``steps`` in order over ``p``; True when one of them ended the chain."""
    for step in steps:
        stop = step.run(p)
        if p.on_step is not None:
            p.on_step(step, p)
        if stop:
            return True
    return False


# ---- R2 / R5: returns to marketing ----------------------------------------------------------

def _returns(p: PersonPlan) -> bool:
    """R2 (sales set the returned status) or R5 (N unanswered attempts): when either holds,
    :data:`RETURN_STEPS` run and the chain ends (nothing is promoted in the cycle of a return)."""
    p.returned = _returned_by_sales(p) or _attempts_exhausted(p)
    if p.returned is None:
        return False
    _run(p, RETURN_STEPS)
    return True


def _returned_by_sales(p: PersonPlan) -> _Return | None:
    t, mem = p.ctx.sla.terms, p.mem
    for s in p.present:
        if p.status[s] == t.returned_status and (
            _changed(mem, s, "lead_status", p.status[s])
            or (_changed(mem, s, "lead_status", p.status[s]) is None and not mem.guarded)
        ):
            given = value_of(p.person.record(s), "return_reason", None)
            return _Return("R2-returned", given if isinstance(given, str) and given else f"returned by {s}", s)
    return None


def _attempts_exhausted(p: PersonPlan) -> _Return | None:
    """R5: N unanswered attempts while sales holds the person."""
    view, ctx, mem, t = p.person, p.ctx, p.mem, p.ctx.sla.terms
    if SALESFORCE not in p.present or mem.guarded:
        return None
    score_rank, opp_rank = ctx.rank(t.score_stage), ctx.rank(t.open_deal_stage)
    sf_rank = ctx.rank(p.stage.get(SALESFORCE))
    cur_rank = _prospective_rank(view, ctx, list(p.stage.values()), p.score)
    in_sales = (cur_rank is not None and score_rank is not None and cur_rank >= score_rank
                and (opp_rank is None or cur_rank < opp_rank))
    connected = _resolved_status(view, ctx, mem) in t.connected_statuses
    since = max([d for d in (mem.returned_at, mem.released_at, mem.handed_off_at) if d], default=None)
    attempts = _counting_attempts(view, ctx, since, p.now)
    # Salesforce at the returned stage: the attempts count only if the hand-off they answer is
    # the current one. When this cycle's promotion hands the person to sales anew (rule 8), they
    # belong to before it; otherwise they are the current episode's, and the return is decided
    # now rather than after a promotion the next cycle would undo.
    at_returned_stage = sf_rank == ctx.rank(t.returned_stage)
    if in_sales and not connected and not is_unknown(view.salesforce, "lead_status") \
            and len(attempts) >= ctx.sla.attempts.count \
            and not (at_returned_stage and _starts_handoff(mem, sf_rank, score_rank, p.released)):
        return _Return("R5-attempts", f"{len(attempts)} unanswered attempts", None)
    return None


def _plan_return(p: PersonPlan) -> None:
    """Both systems: the returned status, back to the returned stage, the reason recorded."""
    assert p.returned is not None
    t = p.ctx.sla.terms
    rule, reason = p.returned.rule, p.returned.reason
    returned_rank = p.ctx.rank(t.returned_stage)
    for s in p.present:
        p.set(s, "lead_status", t.returned_status, rule, f"returned – not ready: {reason}")
        cur_rank = p.ctx.rank(p.stage[s])
        if cur_rank is not None and returned_rank is not None and cur_rank > returned_rank:
            p.set(s, "lifecycle", t.returned_stage, rule,
                  f"returned – not ready: {reason}; back to {t.returned_stage}", backwards=True)
        elif cur_rank != returned_rank and (
                cur_rank is not None or is_empty(p.person.record(s), "lifecycle")):
            p.set(s, "lifecycle", t.returned_stage, rule, f"returned – not ready: {reason}; to {t.returned_stage}")
    for s in p.present:  # marketing nurtures with the reason in view, sales keeps its record of it
        p.set(s, "return_reason", reason, rule, f"returned – not ready: {reason}; reason recorded for marketing")
    p.event(rule, f"returned to marketing for nurture: {reason}", "returned",
            p.returned.by or SALESFORCE, {"return_reason": reason})


def _remember_return(p: PersonPlan) -> None:
    """The return starts the re-hand-off guard (rule 3); an earlier block or release is forgotten."""
    assert p.returned is not None
    p.mem = replace(p.mem, returned_at=p.now, return_reason=p.returned.reason, score_at_return=p.score,
                    released_at=None, blocked_promotion_at=None, blocked_promotion_why=None)


def _reverse_handoff(p: PersonPlan) -> None:
    """A returned person Salesforce alone holds is created in HubSpot for nurture."""
    r = p.ctx.sla.reverse_handoff
    view = p.person
    sf = view.salesforce
    if not r.enabled or sf is None or view.hubspot is not None or view.link_conflict \
            or HUBSPOT in view.no_create_in:
        return
    reason = p.current(SALESFORCE, "return_reason")
    changes = _travelling(sf, r.fields, {}, {"return_reason": reason if reason is not _UNSET
                                             else value_of(sf, "return_reason", None)})
    changes["lifecycle"] = p.ctx.sla.terms.returned_stage
    changes["lead_status"] = p.ctx.sla.terms.returned_status
    p.creates.append(Decision(
        rule="R8-handoff", reason="returned lead unknown to hubspot: created there for nurture",
        action="create", system=HUBSPOT, object=r.object, changes=changes,
        key=f"reverse-handoff:{view.entity_id}"))


# ---- R1 / R4 / R6: where the person should be -----------------------------------------------

def _stage_candidates(p: PersonPlan) -> None:
    """The stages rules 1 (held), 4 (score, BOFU conversion) and 6 (deals) would move the person to."""
    ctx, sla, view = p.ctx, p.ctx.sla, p.person
    t = sla.terms
    score_rank = ctx.rank(t.score_stage)
    for s in p.present:
        held = p.stage[s]
        if held is not None and ctx.rank(held) is not None:
            p.candidates.append(_Candidate(held, "R1-forward-only", f"{s} holds {held}", s))
    if p.score is not None and p.score >= sla.score.threshold and score_rank is not None:
        p.candidates.append(_Candidate(t.score_stage, "R4-lead-score",
                                       f"lead score {p.score} ≥ threshold {sla.score.threshold}"))
    bofu = _bofu_at(view)
    if sla.score.bofu_conversion_is_mql and bofu is not None and score_rank is not None:
        p.candidates.append(_Candidate(t.score_stage, "R4-lead-score",
                                       f"bottom-of-funnel conversion at {bofu.isoformat()}"))
    won = [d for d in view.deals if value_of(d, "deal_stage", None) in ctx.closed_won_terms]
    open_ = [d for d in view.deals if (ds := value_of(d, "deal_stage", None)) is not None
             and ds not in ctx.closed_terms]
    if won and ctx.rank(t.won_deal_stage) is not None:
        p.candidates.append(_Candidate(t.won_deal_stage, "R6-deals", f"deal {won[0].id} is won"))
    if open_ and ctx.rank(t.open_deal_stage) is not None:
        p.candidates.append(_Candidate(t.open_deal_stage, "R6-deals", f"deal {open_[0].id} is open"))


# ---- R3: the re-hand-off guard -----------------------------------------------------------------

def _rehandoff_guard(p: PersonPlan) -> None:
    """A returned person is not promoted past the returned stage without new evidence.

    Promotions pass when a deal changed after the return, when sales moved the stage itself,
    or with new evidence (then credited to rule 3); once one passes, the guard is lifted and
    every promotion goes through. Otherwise they are dropped, and the block recorded once.
    """
    ctx, mem, view = p.ctx, p.mem, p.person
    returned_rank = ctx.rank(ctx.sla.terms.returned_stage)
    if not mem.guarded or returned_rank is None:
        return
    evidence = _evidence(view, ctx, mem, p.score) or _operator_release(mem)
    allowed: list[_Candidate] = []
    blocked: list[_Candidate] = []
    for c in p.candidates:
        r = ctx.rank(c.stage)
        assert r is not None
        if r <= returned_rank:
            allowed.append(c)
        elif c.rule == "R6-deals" and _deal_after_return(view, mem):
            allowed.append(c)
            p.released = True
        elif c.source == SALESFORCE and _changed(mem, SALESFORCE, "lifecycle", c.stage):
            allowed.append(c)  # sales moved it forward itself
            p.released = True
        elif evidence is not None:
            allowed.append(_Candidate(c.stage, "R3-rehandoff-guard", f"{c.reason}; new evidence: {evidence}"))
            p.released = True
        else:
            blocked.append(c)
    # once the guard is lifted this cycle, every promotion goes through
    p.candidates = allowed + blocked if p.released else allowed
    if blocked and not p.released:
        why = "; ".join(f"{c.stage} ({c.reason})" for c in blocked)
        if mem.blocked_promotion_at is None:
            p.event("R3-rehandoff-guard",
                    f"promotion blocked after return ({mem.return_reason}) without new "
                    f"evidence: {why}", "promotion_blocked", HUBSPOT if HUBSPOT in p.present else SALESFORCE)
            p.mem = replace(p.mem, blocked_promotion_at=p.now, blocked_promotion_why=why)
    if p.released:
        p.mem = replace(p.mem, released_at=p.now)


def _apply_target(p: PersonPlan) -> None:
    """Every system behind the furthest candidate (or holding no stage) moves to it.

    The rule credited is the first candidate reaching the target that is not rule 1. A
    person the guard released also leaves the returned status (rule 3).
    """
    ctx, t = p.ctx, p.ctx.sla.terms
    p.target = _max_stage(ctx, [c.stage for c in p.candidates])
    target_rank = ctx.rank(p.target)
    if p.target is None or target_rank is None:
        return
    best = [c for c in p.candidates if c.stage == p.target]
    best.sort(key=lambda c: c.rule == "R1-forward-only")
    rule, reason = best[0].rule, best[0].reason
    p.target_reason = reason
    for s in p.present:
        r = ctx.rank(p.stage[s])
        if r is not None and r < target_rank or is_empty(p.person.record(s), "lifecycle"):
            p.set(s, "lifecycle", p.target, rule, f"{reason}: {s} moves to {p.target}")
    if p.released:
        for s in p.present:
            if p.status[s] == t.returned_status:
                p.set(s, "lead_status", ctx.sla.handoff.status, "R3-rehandoff-guard",
                      "re-handed to sales after new evidence")


# ---- R7: field ownership / synced fields -------------------------------------------------------

def _ownership(p: PersonPlan) -> None:
    """Both systems hold the person: lifecycle conflicts reported, the synced fields made equal."""
    if len(p.present) != 2:
        return
    _lifecycle_conflict(p.person, p.ctx, p, p.mem, p.stage)
    for name in p.ctx.sla.sync.fields:
        _sync_field(p.person, p.ctx, p, p.mem, name)


# ---- R8: hand-off ------------------------------------------------------------------------------

def _handoff(p: PersonPlan) -> None:
    """An MQL unknown to Salesforce is created there; a person reaching the score stage in
    Salesforce through us counts as handed to sales. Either starts the follow-up clock (rule 9)."""
    ctx = p.ctx
    score_rank = ctx.rank(ctx.sla.terms.score_stage)
    target_rank = ctx.rank(p.target)
    _create_in_salesforce(p, score_rank, target_rank)
    mem = p.mem
    if SALESFORCE in p.present and score_rank is not None and target_rank is not None \
            and target_rank >= score_rank \
            and _starts_handoff(mem, ctx.rank(p.stage[SALESFORCE]), score_rank, p.released):
        p.mem = replace(mem, handed_off_at=p.now, first_attempt_at=None, sla_breach_at=None)


def _starts_handoff(mem: Memory, sf_rank: int | None, score_rank: int | None, released: bool) -> bool:
    """A person reaching the score stage this cycle is handed to sales anew (rule 8): no hand-off
    since the last return, and Salesforce below the score stage (or the guard was just lifted)."""
    stale = mem.handed_off_at is None or (mem.returned_at is not None and mem.handed_off_at < mem.returned_at)
    return stale and (sf_rank is None or score_rank is None or sf_rank < score_rank or released)


def _create_in_salesforce(p: PersonPlan, score_rank: int | None, target_rank: int | None) -> None:
    sla = p.ctx.sla
    h = sla.handoff
    view = p.person
    hs = view.hubspot
    if not h.enabled or hs is None or view.salesforce is not None or score_rank is None \
            or target_rank is None or target_rank < score_rank or view.link_conflict \
            or SALESFORCE in view.no_create_in:
        return
    why = p.target_reason or f"lifecycle {p.target} in hubspot"
    changes = _travelling(hs, h.fields, h.placeholders, {"qualification_reason": why,
                                                         "score": _score(view, sla)})
    changes["lifecycle"] = p.target
    changes["lead_status"] = h.status
    p.set(HUBSPOT, "lead_status", h.status, "R8-handoff", "handed to sales")
    p.creates.append(Decision(
        rule="R8-handoff", reason=f"MQL handed to sales: {why}", action="create",
        system=SALESFORCE, object=h.object, changes=changes, key=f"handoff:{view.entity_id}"))
    mem = p.mem
    if mem.handed_off_at is None or (mem.returned_at and mem.handed_off_at < mem.returned_at):
        p.mem = replace(mem, handed_off_at=p.now, first_attempt_at=None, sla_breach_at=None)


# ---- R9: follow-up SLA ------------------------------------------------------------------------

def _followup(p: PersonPlan) -> None:
    """An MQL handed to sales with no counting attempt within the window: one breach event."""
    mem, view, ctx = p.mem, p.person, p.ctx
    handed = mem.handed_off_at
    if handed is None or (mem.returned_at is not None and mem.returned_at >= handed):
        return  # not handed off, or sales already returned it
    if SALESFORCE in view.no_create_in and view.salesforce is None:
        return  # sales deleted the Lead it was handed off as: nothing is waiting for follow-up
    if mem.first_attempt_at is None:
        first = _first_attempt(view, ctx, handed)
        if first is not None:
            mem = replace(mem, first_attempt_at=first)
    window = timedelta(hours=ctx.sla.followup.window_hours)
    deadline = handed + window
    late = mem.first_attempt_at is None and p.now > deadline or (
        mem.first_attempt_at is not None and mem.first_attempt_at > deadline)
    if late and mem.sla_breach_at is None:
        p.event("R9-followup-sla",
                f"MQL handed to sales at {handed.isoformat()} had no connection "
                f"attempt within {ctx.sla.followup.window_hours:g} h"
                + (f" (first at {mem.first_attempt_at.isoformat()})"
                   if mem.first_attempt_at else ""),
                "sla_breach", SALESFORCE if view.salesforce else HUBSPOT,
                {"handed_off_at": handed, "deadline": deadline,
                 "first_attempt_at": mem.first_attempt_at})
        mem = replace(mem, sla_breach_at=p.now)
    p.mem = mem


# ---- helpers of the steps ---------------------------------------------------------------------

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


def _operator_release(mem: Memory) -> str | None:
    """An operator released the person after the return (``syncd blocked release``)."""
    at, returned = mem.release_requested_at, mem.returned_at
    if at is None or returned is None or at <= returned:
        return None
    return f"released by {mem.release_requested_by or 'an operator'} at {at.isoformat()}"


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


# ---- the chain ---------------------------------------------------------------------------------

#: What a return (rule 2/5) sets off; :func:`_returns` runs these, then the chain ends.
RETURN_STEPS: tuple[Step, ...] = (
    Step("plan the return", ("R2-returned", "R5-attempts"), _plan_return),
    # the episode the return ends: a follow-up breach before the return still counts
    Step("follow-up", ("R9-followup-sla",), _followup),
    Step("remember the return", ("R2-returned", "R5-attempts"), _remember_return),
    Step("reverse hand-off", ("R8-handoff",), _reverse_handoff),
)

#: The person rules, in order. Each step plans writes/events for its own rules only (the
#: ownership step also copies a field another rule planned on one side to the other), and
#: the first rule to plan a field wins, so the order is the precedence: a new SLA rule is a
#: step placed where it should win or lose against its neighbours.
PERSON_STEPS: tuple[Step, ...] = (
    Step("returns", ("R2-returned", "R5-attempts"), _returns),  # a return ends the chain
    Step("stage candidates", ("R1-forward-only", "R4-lead-score", "R6-deals"), _stage_candidates),
    Step("re-hand-off guard", ("R3-rehandoff-guard",), _rehandoff_guard),
    Step("apply the target", ("R1-forward-only", "R4-lead-score", "R6-deals", "R3-rehandoff-guard"),
         _apply_target),
    Step("ownership", ("R7-ownership",), _ownership),
    Step("hand-off", ("R8-handoff",), _handoff),
    Step("follow-up", ("R9-followup-sla",), _followup),
)


def plan_person(view: PersonView, ctx: RuleContext, now: datetime, steps: Sequence[Step] = PERSON_STEPS,
                on_step: Callable[[Step, PersonPlan], None] | None = None) -> PersonPlan:
    """Run ``steps`` over a fresh :class:`PersonPlan`; ``on_step`` sees the plan after each step
    (the steps of a return included). :func:`decide_person` is this with the defaults."""
    p = PersonPlan(view, ctx, now)
    p.on_step = on_step
    _run(p, steps)
    return p


def decide_person(view: PersonView, ctx: RuleContext, now: datetime) -> Outcome:
    """All person rules (R1-R9) for one linked person: :data:`PERSON_STEPS` in order. Pure."""
    return plan_person(view, ctx, now).outcome()


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
