"""Deterministic sample data for the sandbox CRMs (``syncd demo --seed``, tests, benchmarks).

:func:`seed` fills a :class:`~syncd.sandbox.hubspot.HubSpotApp` and a
:class:`~syncd.sandbox.salesforce.SalesforceApp` through their direct-access API
(no HTTP) with a population of people and deals that is mostly consistent
across the two systems, plus a known number of deliberate inconsistencies that
syncd must resolve or report. The same :class:`SeedSpec` always gives the same
data: one ``random.Random(spec.seed)``, no global random state, no wall clock
except for the default start (see :attr:`SeedSpec.start`).

Time: every seeded timestamp lies in ``[start, start + span]``. When
``spec.start`` is None it is ``today 00:00 UTC - span``, so all seeded data is
in the past (incremental pulls and the story's later wall-clock writes come
after it), stays within Salesforce's 30-day ``updated()`` look-back, and is
identical for every run on the same UTC day. Pass ``start`` for data that is
identical on every day.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

log = structlog.get_logger()

# HubSpot lifecyclestage internal value -> Salesforce Lifecycle_Stage__c (seeded consistent pairs).
STAGES: tuple[tuple[str, str], ...] = (
    ("subscriber", "Subscriber"),
    ("lead", "Lead"),
    ("marketingqualifiedlead", "MQL"),
    ("salesacceptedlead", "SAL"),
    ("salesqualifiedlead", "SQL"),
    ("opportunity", "Opportunity"),
    ("customer", "Customer"),
)
SF_STAGE = dict(STAGES)
MQL, SAL = "marketingqualifiedlead", "salesacceptedlead"
STAGE_RANK = {hs: i for i, (hs, _) in enumerate(STAGES)}

# HubSpot dealstage -> Salesforce StageName (same glossary deal stage).
DEAL_STAGES: tuple[tuple[str, str], ...] = (
    ("appointmentscheduled", "Prospecting"),  # exploration / meeting booked
    ("qualifiedtobuy", "Qualification"),  # exploration
    ("presentationscheduled", "Value Proposition"),  # quote being built
    ("decisionmakerboughtin", "Id. Decision Makers"),  # quote being built
    ("contractsent", "Proposal/Price Quote"),  # quote presented
    ("closedwon", "Closed Won"),
    ("closedlost", "Closed Lost"),
    ("onhold", "On Hold"),
)
SF_DEAL_STAGE = dict(DEAL_STAGES)
OPEN_DEAL_STAGES = (
    "appointmentscheduled",
    "qualifiedtobuy",
    "presentationscheduled",
    "decisionmakerboughtin",
    "contractsent",
)

LEAD_TYPES = (
    ("new_business", "New Business", 0.7),
    ("existing_customer", "Existing Customer", 0.2),
    ("maintenance", "Maintenance", 0.1),
)
SOURCES = (
    ("ORGANIC_SEARCH", "Web"),
    ("DIRECT_TRAFFIC", "Web"),
    ("PAID_SEARCH", "Web"),
    ("REFERRALS", "Partner Referral"),
    ("OFFLINE", "Phone Inquiry"),
    ("EMAIL_MARKETING", "Other"),
    ("SOCIAL_MEDIA", "Other"),
)
CONVERSIONS = (
    "Newsletter sign-up",
    "Ebook: The RevOps playbook",
    "Webinar: Pipeline hygiene",
    "Buyer's guide download",
    "Pricing page visit",
)
BOFU_CONVERSION = "Demo request"
RETURN_REASONS = (
    "No budget this quarter",
    "Not the decision maker",
    "Timing: revisit next year",
    "Evaluating in-house build",
)


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


FIRST_NAMES = _words(
    "Ava Liam Maya Noah Zoe Ethan Chloe Lucas Amara Mateo Ingrid Kenji Priya Omar Sofia Jonas "
    "Fatima Diego Hana Ravi Elena Tomas Aisha Felix Nora Kwame Lena Yusuf Clara Arjun Mei "
    "Oscar Leila Samuel Ines Hugo Grace Mikael Sana Pablo Freya Dmitri Alice Jamal Rosa Theo "
    "Anika Marco Wen Nadia"
)
LAST_NAMES = _words(
    "Chen Okafor Silva Müller Nakamura Patel Haddad Johansson Garcia Kowalski Nguyen Dubois "
    "Rossi Kim Ibrahim Novak Andersen Costa O'Brien Schmidt Tanaka Mensah Larsen Moreau "
    "Fischer Alvarez Singh Yilmaz Walsh Bauer Ivanova Mwangi Lindqvist Romero Sato Kaur "
    "Popescu Hughes Ortiz Varga"
)
COMPANIES = _words(
    "Northwind Traders|Contoso Freight|Fabrikam Robotics|Initech Systems|Globex Energy|"
    "Umbrella Biotech|Stark Fabrication|Wayne Logistics|Acme Tooling|Tailspin Air|"
    "Litware Analytics|Proseware Health|Adventure Works|Blue Yonder Foods|Coho Vineyard|"
    "Lucerne Publishing|Margie's Travel|Wide World Importers|Trey Research|Fourth Coffee|"
    "Alpine Ski House|Woodgrove Bank|Humongous Insurance|Graphic Design Institute|"
    "Southridge Video|Relecloud|VanArsdel Ltd|Bellows College|Datum Corporation|"
    "Consolidated Messenger",
    "|",
)
_ASCII = str.maketrans({"ü": "u", "'": "", " ": "-", ".": ""})


@dataclass(frozen=True, slots=True)
class SeedSpec:
    """What to seed. Shares are of the population named and exact (rounded); the planted
    counts (duplicates … won_lags) are exact when the population has enough candidates
    (e.g. open Leads in Salesforce), otherwise as many as it has."""

    seed: int = 1
    people: int = 1_000
    deals: int = 200
    overlap: float = 0.6  # share of people that also exist in Salesforce
    converted: float = 0.35  # share of the overlapping people whose SF Lead was converted
    # share of the overlapping people whose SF email differs only in case/whitespace
    case_variants: float = 0.05
    duplicates: int = 3  # people with a second SF Lead of the same normalised email (conflict)
    handoffs: int = 5  # HubSpot lead over the threshold, no SF record (syncd hands off)
    returns: int = 5  # SF "Returned - Not Ready", HubSpot still an MQL (syncd returns)
    exhausted: int = 3  # SF Lead with `return_after_attempts` unanswered calls, not returned
    won_lags: int = 3  # SF Opportunity Closed Won, HubSpot contact still opportunity
    # Keep these two equal to mappings/sla.toml ([score] threshold, [attempts] count): the
    # planted cases sit just under/over them.
    mql_threshold: int = 50
    return_after_attempts: int = 3
    # P(0, 1, 2, ... unanswered call attempts) for each SF Lead that sales is working.
    attempts_weights: tuple[float, ...] = (0.35, 0.35, 0.3)
    # (hubspot stage, weight, min score, max score): stage mix and score distribution.
    stage_mix: tuple[tuple[str, float, int, int], ...] = (
        ("subscriber", 0.15, 0, 20),
        ("lead", 0.30, 5, 45),
        ("marketingqualifiedlead", 0.15, 50, 80),
        ("salesacceptedlead", 0.08, 55, 85),
        ("salesqualifiedlead", 0.08, 60, 90),
        ("opportunity", 0.12, 60, 95),
        ("customer", 0.12, 60, 100),
    )
    start: datetime | None = None
    span: timedelta = timedelta(days=20)

    def __post_init__(self) -> None:
        for name in ("overlap", "converted", "case_variants"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SeedSpec.{name} must be a share between 0 and 1")
        counts = ("people", "deals", "duplicates", "handoffs", "returns", "exhausted", "won_lags")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"SeedSpec.{name} must not be negative")
        if self.return_after_attempts < 1 or not self.attempts_weights:
            raise ValueError("SeedSpec needs return_after_attempts >= 1 and attempts_weights")
        if self.start is not None and self.start.tzinfo is None:
            raise ValueError("SeedSpec.start must be timezone-aware (UTC)")

    def resolved_start(self, now: datetime | None = None) -> datetime:
        if self.start is not None:
            return self.start.astimezone(UTC)
        now = now or datetime.now(UTC)
        midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - self.span


@dataclass(frozen=True, slots=True)
class Case:
    """One interesting record (or person) the seed planted, with its ids in both systems."""

    kind: str
    email: str
    name: str  # "First Last (Company)": what the demo prints (no emails on screen)
    hubspot_id: str | None = None
    sf_lead_id: str | None = None
    sf_contact_id: str | None = None
    hubspot_deal_id: str | None = None
    sf_opportunity_id: str | None = None
    sf_duplicate_lead_id: str | None = None


# Case kinds. Deliberate inconsistencies (syncd must act or report):
HANDOFF = "handoff"  # HubSpot lead, score >= threshold, no SF record -> create SF Lead
RETURN = "return"  # SF Returned - Not Ready, HubSpot still MQL -> lead + BAD_TIMING
EXHAUSTED = "attempts_exhausted"  # N unanswered calls on an SF Lead -> returned - not ready
WON_LAG = "won_lag"  # SF Closed Won, HubSpot still opportunity -> customer
DUPLICATE = "duplicate"  # two SF Leads, same normalised email -> conflict reported
CASE_VARIANT = "case_variant"  # SF email differs only in case/whitespace -> linked anyway
# Reserved, consistent records the story (syncd.sandbox.story) changes:
STORY_SCORE = "story_score"  # HubSpot lead just under the threshold, not in SF
STORY_ATTEMPTS = "story_attempts"  # SF Lead Open - Not Contacted (MQL in both), no tasks
STORY_RETURN = "story_return"  # SF Lead Open - Not Contacted (SAL in both), score threshold+2
STORY_WIN = "story_win"  # deal contractsent + opportunity Proposal/Price Quote (converted)
STORY_CONTRACT = "story_contract"  # deal decisionmakerboughtin + Id. Decision Makers

STORY_KINDS = (STORY_SCORE, STORY_ATTEMPTS, STORY_RETURN, STORY_WIN, STORY_CONTRACT)


@dataclass(slots=True)
class SeedSummary:
    spec: SeedSpec
    start: datetime
    end: datetime
    counts: dict[str, int] = field(default_factory=dict)
    cases: dict[str, list[Case]] = field(default_factory=dict)

    def __str__(self) -> str:
        c = self.counts
        planted = ", ".join(f"{len(v)} {k}" for k, v in sorted(self.cases.items()) if v)
        return (
            f"{c.get('hubspot.contacts', 0)} HubSpot contacts,"
            f" {c.get('hubspot.deals', 0)} deals;"
            f" {c.get('salesforce.leads', 0)} Salesforce Leads"
            f" ({c.get('salesforce.conversions', 0)} converted to Contacts),"
            f" {c.get('salesforce.opportunities', 0)} Opportunities,"
            f" {c.get('salesforce.tasks', 0)} call Tasks; planted: {planted}"
        )

    def first(self, kind: str) -> Case:
        found = self.cases.get(kind)
        if not found:
            raise LookupError(f"the seed planted no {kind!r} case (population too small?)")
        return found[0]


class HubSpotDirect(Protocol):
    """The part of HubSpotApp's direct-access API the seed and story use."""

    def add(
        self, object_type: str, properties: dict[str, str], /, *, at: datetime | None = None
    ) -> str: ...

    def modify(
        self,
        object_type: str,
        record_id: str,
        properties: dict[str, str],
        /,
        *,
        at: datetime | None = None,
    ) -> None: ...

    def get(self, object_type: str, record_id: str, /) -> dict[str, Any]: ...

    def associate(
        self, contact_id: str, deal_id: str, /, *, at: datetime | None = None
    ) -> None: ...


class SalesforceDirect(Protocol):
    """The part of SalesforceApp's direct-access API the seed and story use."""

    def insert(
        self, sobject: str, fields: dict[str, Any], /, *, at: datetime | None = None
    ) -> str: ...

    def modify(
        self, sobject: str, record_id: str, fields: dict[str, Any], /, *, at: datetime | None = None
    ) -> None: ...

    def get(self, sobject: str, record_id: str, /) -> dict[str, Any]: ...

    def convert_lead(
        self, lead_id: str, /, *, at: datetime | None = None, create_opportunity: bool = True
    ) -> dict[str, str | None]: ...

    def log_task(
        self,
        who_id: str,
        type: str = "Call",
        status: str = "Completed",
        /,
        *,
        at: datetime | None = None,
        subject: str | None = None,
    ) -> str: ...


@dataclass(slots=True)
class _Person:
    i: int
    first: str
    last: str
    company: str
    email: str
    stage: str
    score: int
    lead_type: int
    source: int
    created: datetime
    in_sf: bool = False
    converted: bool = False
    kind: str | None = None
    hs_id: str = ""
    lead_id: str | None = None
    contact_id: str | None = None
    account_id: str | None = None
    deal_ids: list[str] = field(default_factory=list)


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


class _Seeder:
    def __init__(
        self, hubspot: HubSpotDirect, salesforce: SalesforceDirect, spec: SeedSpec
    ) -> None:
        self.hs = hubspot
        self.sf = salesforce
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.start = spec.resolved_start()
        self.end = self.start + spec.span
        self.summary = SeedSummary(spec, self.start, self.end)
        self.counts: dict[str, int] = {}

    # ---- planning (pure, deterministic) ----------------------------------------------------
    def _at(self, lo: float, hi: float) -> datetime:
        """A moment between fractions ``lo`` and ``hi`` of the seeded span, whole milliseconds."""
        secs = self.spec.span.total_seconds() * (lo + self.rng.random() * (hi - lo))
        return self.start + timedelta(milliseconds=int(secs * 1000))

    def _people(self) -> list[_Person]:
        rng, spec = self.rng, self.spec
        stages = [s[0] for s in spec.stage_mix]
        weights = [s[1] for s in spec.stage_mix]
        ranges = {s[0]: (s[2], s[3]) for s in spec.stage_mix}
        seen: dict[str, int] = {}
        people: list[_Person] = []
        for i, stage in enumerate(rng.choices(stages, weights, k=spec.people)):
            first, last, company = (
                rng.choice(FIRST_NAMES),
                rng.choice(LAST_NAMES),
                rng.choice(COMPANIES),
            )
            local = f"{first}.{last}".lower().translate(_ASCII)
            domain = (
                company.lower().translate(_ASCII) + ".test" if rng.random() < 0.8 else "example.com"
            )
            base = f"{local}@{domain}"
            n = seen.get(base, 0)
            seen[base] = n + 1
            email = base if n == 0 else f"{local}{n + 1}@{domain}"
            lo, hi = ranges[stage]
            people.append(
                _Person(
                    i,
                    first,
                    last,
                    company,
                    email,
                    stage,
                    rng.randint(lo, hi),
                    rng.choices(range(len(LEAD_TYPES)), [t[2] for t in LEAD_TYPES])[0],
                    rng.randrange(len(SOURCES)),
                    self._at(0.0, 0.55),
                )
            )
        return people

    def _plan_overlap(self, people: list[_Person]) -> None:
        """SF holds the people marketing handed over: the latest stages first (random tiebreak)."""
        spec, rng = self.spec, self.rng
        order = sorted(people, key=lambda p: (-STAGE_RANK[p.stage], rng.random()))
        n_overlap = round(spec.people * spec.overlap)
        overlap = order[:n_overlap]
        for p in overlap:
            p.in_sf = True
        for p in overlap[: round(n_overlap * spec.converted)]:
            p.converted = True

    # ---- writing ----------------------------------------------------------------------------
    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def _case(self, kind: str, p: _Person, **ids: str | None) -> None:
        self.summary.cases.setdefault(kind, []).append(
            Case(
                kind,
                p.email,
                f"{p.first} {p.last} ({p.company})",
                p.hs_id,
                p.lead_id,
                p.contact_id,
                **ids,
            )
        )

    def _hs_contact(self, p: _Person) -> None:
        rng = self.rng
        hs_status = self._hs_lead_status(p)
        conv = rng.choice(CONVERSIONS[:1] if p.stage == "subscriber" else CONVERSIONS)
        if STAGE_RANK[p.stage] >= STAGE_RANK["marketingqualifiedlead"] and rng.random() < 0.3:
            conv = BOFU_CONVERSION
        props = {
            "email": p.email,
            "firstname": p.first,
            "lastname": p.last,
            "company": p.company,
            "lifecyclestage": p.stage,
            "hubspotscore": str(p.score),
            "hs_analytics_source": SOURCES[p.source][0],
            "recent_conversion_event_name": conv,
            "recent_conversion_date": _iso(p.created),
            "syncd_lead_type": LEAD_TYPES[p.lead_type][0],
        }
        if hs_status:
            props["hs_lead_status"] = hs_status
        p.hs_id = self.hs.add("contacts", props, at=p.created)
        self._count("hubspot.contacts")

    def _hs_lead_status(self, p: _Person) -> str:
        """HubSpot's lead status, agreeing with the SF Lead (mappings/*.toml) when there is one."""
        if p.in_sf and not p.converted:
            return {"Open - Not Contacted": "NEW", "Working - Contacted": "CONNECTED"}[
                self._sf_status(p)
            ]
        if p.in_sf and p.stage not in ("opportunity", "customer"):
            return "CONNECTED"
        return {
            "subscriber": "",
            "lead": "OPEN" if self.rng.random() < 0.5 else "NEW",
            "marketingqualifiedlead": "NEW",
            "salesacceptedlead": "ATTEMPTED_TO_CONTACT",
            "salesqualifiedlead": "CONNECTED",
            "opportunity": "OPEN_DEAL",
            "customer": "OPEN_DEAL",
        }[p.stage]

    @staticmethod
    def _sf_status(p: _Person) -> str:
        """Open - Not Contacted until sales reached them (SQL and later): connection attempts are
        Tasks, the default picklist has no "attempting" value (mappings/salesforce.toml)."""
        if STAGE_RANK[p.stage] >= STAGE_RANK["salesqualifiedlead"]:
            return "Working - Contacted"
        return "Open - Not Contacted"

    def _sf_lead_fields(self, p: _Person, email: str) -> dict[str, Any]:
        status = self._sf_status(p)
        return {
            "FirstName": p.first,
            "LastName": p.last,
            "Company": p.company,
            "Email": email,
            "Status": status,
            "LeadSource": SOURCES[p.source][1],
            "Lifecycle_Stage__c": SF_STAGE[p.stage],
            "Lead_Score__c": p.score,
            "Lead_Type__c": LEAD_TYPES[p.lead_type][1],
        }

    def _sf_person(self, p: _Person, sf_email: str) -> None:
        handed = p.created + timedelta(hours=1 + self.rng.random() * 48)
        p.lead_id = self.sf.insert("Lead", self._sf_lead_fields(p, sf_email), at=handed)
        self._count("salesforce.leads")
        if p.converted:
            res = self.sf.convert_lead(
                p.lead_id, at=handed + timedelta(days=1), create_opportunity=False
            )
            p.contact_id = res["contact_id"]  # the Lead's fields are copied to the Contact
            p.account_id = res["account_id"]
            self._count("salesforce.conversions")
            self._count("salesforce.contacts")
            return
        if p.stage in ("salesacceptedlead", "salesqualifiedlead") and p.kind is None:
            w = self.spec.attempts_weights
            n = self.rng.choices(range(len(w)), w)[0]
            # Stay under the return limit, counting the connected call of an SQL: only the
            # planted EXHAUSTED leads have reached it (whatever counts as an attempt).
            n = min(n, self.spec.return_after_attempts - 1 - (p.stage == "salesqualifiedlead"))
            self._calls(p, n, handed, "no answer")
            if p.stage == "salesqualifiedlead":
                self._calls(p, 1, handed + timedelta(days=2), "connected")

    def _calls(self, p: _Person, n: int, after: datetime, outcome: str) -> None:
        assert p.lead_id is not None
        for k in range(n):
            at = after + timedelta(hours=4 * (k + 1))
            subject = f"Call attempt {k + 1}: {outcome}"
            self.sf.log_task(p.lead_id, "Call", "Completed", at=at, subject=subject)
            self._count("salesforce.tasks")

    def run(self) -> SeedSummary:
        spec = self.spec
        people = self._people()
        self._plan_overlap(people)
        self._plant(people)
        for p in people:
            self._hs_contact(p)
        in_sf = [p for p in people if p.in_sf]
        n_case = round(len(in_sf) * spec.case_variants)
        variants = {p.i for p in self.rng.sample(in_sf, n_case)} if n_case else set()
        for p in in_sf:
            sf_email = p.email
            if p.i in variants:
                sf_email = self._variant(p.email)
            self._sf_person(p, sf_email)
            if p.i in variants:
                self._case(CASE_VARIANT, p)
        self._deals(people)
        self._apply_plants(people)
        self.summary.counts = self.counts
        return self.summary

    @staticmethod
    def _variant(email: str) -> str:
        local, _, domain = email.partition("@")
        return f" {local.title()}@{domain.upper()} "

    # ---- deliberate inconsistencies and story reservations ---------------------------------
    def _plant(self, people: list[_Person]) -> None:
        """Pick the people for each planted kind (before anything is written)."""
        spec, rng = self.spec, self.rng
        free = list(people)
        rng.shuffle(free)

        def take(n: int, ok: Callable[[_Person], bool], kind: str) -> int:
            got = 0
            for p in free:
                if got >= n:
                    break
                if p.kind is None and ok(p):
                    p.kind = kind
                    got += 1
            return got

        def hs_only_lead(p: _Person) -> bool:
            return not p.in_sf and p.stage == "lead"

        def open_lead(p: _Person) -> bool:
            return p.in_sf and not p.converted and p.stage in (MQL, SAL)

        def converted_opportunity(p: _Person) -> bool:
            return p.converted and p.stage == "opportunity"

        take(1, hs_only_lead, STORY_SCORE)
        take(spec.handoffs, hs_only_lead, HANDOFF)
        take(1, lambda p: open_lead(p) and p.stage == MQL, STORY_ATTEMPTS)
        take(1, lambda p: open_lead(p) and p.stage == SAL, STORY_RETURN)
        take(spec.returns, open_lead, RETURN)
        take(spec.exhausted, open_lead, EXHAUSTED)
        take(spec.duplicates, open_lead, DUPLICATE)
        deal_budget = spec.deals  # these kinds each need a deal of their own
        for n, kind in ((1, STORY_WIN), (1, STORY_CONTRACT), (spec.won_lags, WON_LAG)):
            deal_budget -= take(min(n, deal_budget), converted_opportunity, kind)
        for p in people:
            if p.kind == STORY_SCORE:
                p.score = spec.mql_threshold - 4
            elif p.kind == HANDOFF:
                p.score = spec.mql_threshold + rng.randint(1, 30)
            elif p.kind in (STORY_ATTEMPTS, RETURN):
                p.stage = "marketingqualifiedlead"
            elif p.kind in (STORY_RETURN, EXHAUSTED):
                p.stage = "salesacceptedlead"
            if p.kind == STORY_RETURN:
                # after the return, +SCORE_BUMP must stay under threshold + re-hand-off margin
                p.score = spec.mql_threshold + 2
        for p in people:
            if p.kind in (RETURN, STORY_ATTEMPTS):
                p.score = max(p.score, spec.mql_threshold)

    def _apply_plants(self, people: list[_Person]) -> None:
        spec, rng = self.spec, self.rng
        late = self.start + spec.span * 0.9
        for p in people:
            kind = p.kind
            if kind is None:
                continue
            if kind in (HANDOFF, STORY_SCORE, STORY_ATTEMPTS, STORY_RETURN):
                self._case(kind, p)
            elif kind == RETURN:
                assert p.lead_id is not None
                self.sf.modify(
                    "Lead",
                    p.lead_id,
                    {
                        "Status": "Returned - Not Ready",
                        "Return_Reason__c": rng.choice(RETURN_REASONS),
                    },
                    at=late,
                )
                self._case(kind, p)
            elif kind == EXHAUSTED:
                self._calls(p, spec.return_after_attempts, late - timedelta(days=1), "no answer")
                self._case(kind, p)
            elif kind == DUPLICATE:
                email = p.email.upper() if rng.random() < 0.5 else f"{p.email} "
                dup = self.sf.insert("Lead", self._sf_lead_fields(p, email), at=late)
                self._count("salesforce.leads")
                self._case(kind, p, sf_duplicate_lead_id=dup)
            elif kind in (STORY_WIN, STORY_CONTRACT, WON_LAG):
                stage = {
                    STORY_WIN: "contractsent",
                    STORY_CONTRACT: "decisionmakerboughtin",
                    WON_LAG: "contractsent",
                }[kind]
                deal, opp = self._deal(p, stage, late)
                if kind == WON_LAG and opp is not None:
                    self.sf.modify(
                        "Opportunity",
                        opp,
                        {"StageName": "Closed Won"},
                        at=late + timedelta(hours=2),
                    )
                self._case(kind, p, hubspot_deal_id=deal, sf_opportunity_id=opp)

    # ---- deals -----------------------------------------------------------------------------
    def _deal(self, p: _Person, stage: str, at: datetime) -> tuple[str, str | None]:
        rng = self.rng
        amount = rng.randrange(20, 400) * 250
        close = (at + timedelta(days=rng.randint(-10, 60))).date().isoformat()
        name = (
            f"{p.company} - {rng.choice(('Platform', 'Renewal', 'Expansion', 'Pilot', 'Services'))}"
        )
        name = f"{name} #{self.counts.get('hubspot.deals', 0) + 1}"
        deal = self.hs.add(
            "deals",
            {
                "dealname": name,
                "dealstage": stage,
                "pipeline": "default",
                "amount": str(amount),
                "closedate": close + "T00:00:00.000Z",
            },
            at=at,
        )
        self.hs.associate(p.hs_id, deal, at=at)
        self._count("hubspot.deals")
        self._count("hubspot.associations")
        p.deal_ids.append(deal)
        opp = None
        if p.contact_id is not None:
            opp = self.sf.insert(
                "Opportunity",
                {
                    "Name": name,
                    "StageName": SF_DEAL_STAGE[stage],
                    "Amount": amount,
                    "CloseDate": close,
                    "ContactId": p.contact_id,
                    "AccountId": p.account_id,
                },
                at=at,
            )
            self._count("salesforce.opportunities")
        return deal, opp

    def _deals(self, people: list[_Person]) -> None:
        """One deal per opportunity/customer person (won for customers, open for opportunities),
        a tenth of the budget lost (SQLs, or a customer's earlier deal), the rest spread."""
        rng = self.rng
        reserved = sum(1 for p in people if p.kind in (STORY_WIN, STORY_CONTRACT, WON_LAG))
        budget = max(0, self.spec.deals - reserved)
        owners = [p for p in people if p.kind is None and p.stage in ("opportunity", "customer")]
        sqls = [p for p in people if p.kind is None and p.stage == "salesqualifiedlead"]
        rng.shuffle(owners)
        main = owners[: budget - budget // 10]
        plan = [(p, self._deal_stage(p, first=True)) for p in main]
        lost_pool = sqls + [p for p in main if p.stage == "customer"]
        plan += [
            (p, "closedlost") for p in rng.sample(lost_pool, min(budget // 10, len(lost_pool)))
        ]
        extra_pool = owners + sqls
        while len(plan) < budget and extra_pool:
            p = rng.choice(extra_pool)
            plan.append((p, self._deal_stage(p, first=False)))
        for p, stage in plan:
            self._deal(p, stage, p.created + timedelta(days=3 + rng.random() * 5))

    def _deal_stage(self, p: _Person, *, first: bool) -> str:
        if p.stage == "customer":
            return "closedwon" if first else self.rng.choice(("closedwon", "closedlost"))
        if p.stage == "opportunity":
            return self.rng.choice(
                (*OPEN_DEAL_STAGES, "onhold", *(() if first else ("closedlost",)))
            )
        return "closedlost"


def seed(hubspot: HubSpotDirect, salesforce: SalesforceDirect, spec: SeedSpec) -> SeedSummary:
    """Fill both simulators per ``spec``; deterministic. Returns what was created and the cases."""
    summary = _Seeder(hubspot, salesforce, spec).run()
    log.info(
        "sandbox seeded",
        seed=spec.seed,
        **{k.replace(".", "_"): v for k, v in summary.counts.items()},
        cases={k: len(v) for k, v in summary.cases.items()},
    )
    return summary
