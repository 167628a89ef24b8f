"""The scripted story ``syncd demo`` plays while the real daemon runs.

Each :class:`Step` is what a marketer (in HubSpot) or a sales rep (in
Salesforce) does, applied to the simulators through their direct-access API at
the wall clock, so the daemon's next incremental pull sees it as a fresh
change. The steps act on the records :func:`syncd.sandbox.seed.seed` reserved
for the story (``story_*`` cases), never on anything else. ``syncd`` itself is
not involved: the story only makes the changes a human would; ``expect`` says,
for the narrative, what syncd should do about each one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog

from syncd.sandbox.seed import (
    BOFU_CONVERSION,
    STORY_ATTEMPTS,
    STORY_CONTRACT,
    STORY_RETURN,
    STORY_SCORE,
    STORY_WIN,
    HubSpotDirect,
    SalesforceDirect,
    SeedSummary,
)

log = structlog.get_logger()

Actor = Literal["marketing", "sales"]
Apply = Callable[[HubSpotDirect, SalesforceDirect, SeedSummary], None]

RETURN_REASON = "No budget until Q3"
SCORE_BUMP = 3  # a nurture email opened: a little interest, not new evidence


@dataclass(frozen=True, slots=True)
class Step:
    """One human change. ``after_s`` is seconds after the story starts (at speed 1)."""

    after_s: float
    actor: Actor
    description: str  # may name story people: {story_score}, {story_return}, … and {threshold}
    apply: Apply
    expect: str = ""  # what syncd should do about it (narrative only)

    def describe(self, summary: SeedSummary) -> str:
        names = _Names({k: v[0].name for k, v in summary.cases.items() if v})
        names["threshold"] = str(summary.spec.mql_threshold)
        return self.description.format_map(names)


class _Names(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "someone"


@dataclass(frozen=True, slots=True)
class Played:
    """A step the story applied (or failed to apply), when, and in plain words."""

    index: int
    step: Step
    at: datetime
    text: str
    error: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _hs_id(summary: SeedSummary, kind: str) -> str:
    hid = summary.first(kind).hubspot_id
    if hid is None:
        raise LookupError(f"story case {kind!r} has no HubSpot contact")
    return hid


def _lead_id(summary: SeedSummary, kind: str) -> str:
    lid = summary.first(kind).sf_lead_id
    if lid is None:
        raise LookupError(f"story case {kind!r} has no Salesforce Lead")
    return lid


# ---- the steps ------------------------------------------------------------------------------
def score_crosses_threshold(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    hs.modify(
        "contacts",
        _hs_id(s, STORY_SCORE),
        {
            "hubspotscore": str(s.spec.mql_threshold + 8),
            "recent_conversion_event_name": "Buyer's guide download",
            "recent_conversion_date": _iso(_now()),
        },
    )


def unanswered_calls(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    lead = _lead_id(s, STORY_ATTEMPTS)
    for k in range(s.spec.return_after_attempts):
        sf.log_task(lead, "Call", "Completed", subject=f"Call attempt {k + 1}: no answer")


def returned_not_ready(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    sf.modify(
        "Lead",
        _lead_id(s, STORY_RETURN),
        {"Status": "Returned - Not Ready", "Return_Reason__c": RETURN_REASON},
    )


def small_score_bump(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    hid = _hs_id(s, STORY_RETURN)
    score = int(hs.get("contacts", hid).get("hubspotscore") or 0)
    hs.modify("contacts", hid, {"hubspotscore": str(score + SCORE_BUMP)})


def demo_request(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    hs.modify(
        "contacts",
        _hs_id(s, STORY_RETURN),
        {
            "recent_conversion_event_name": BOFU_CONVERSION,
            "recent_conversion_date": _iso(_now()),
        },
    )


def opportunity_won(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    opp = s.first(STORY_WIN).sf_opportunity_id
    if opp is None:
        raise LookupError("story case 'story_win' has no Salesforce Opportunity")
    sf.modify("Opportunity", opp, {"StageName": "Closed Won"})


def contract_sent(hs: HubSpotDirect, sf: SalesforceDirect, s: SeedSummary) -> None:
    deal = s.first(STORY_CONTRACT).hubspot_deal_id
    if deal is None:
        raise LookupError("story case 'story_contract' has no HubSpot deal")
    hs.modify("deals", deal, {"dealstage": "contractsent"})


DEFAULT_STEPS: tuple[Step, ...] = (
    Step(
        5,
        "marketing",
        "{story_score} downloads the buyer's guide in HubSpot; their lead score rises over the "
        "MQL threshold ({threshold}).",
        score_crosses_threshold,
        "MQL in HubSpot and handed to sales: a new Salesforce Lead.",
    ),
    Step(
        15,
        "sales",
        "A sales rep calls {story_attempts} three times in Salesforce; nobody answers.",
        unanswered_calls,
        "Returned - not ready after the agreed number of attempts; back to lead in HubSpot.",
    ),
    Step(
        25,
        "sales",
        f"A sales rep returns {{story_return}} in Salesforce: Lead status "
        f"'Returned - Not Ready', reason '{RETURN_REASON}'.",
        returned_not_ready,
        "Back to lead in HubSpot with lead status BAD_TIMING (nurture).",
    ),
    Step(
        35,
        "marketing",
        f"{{story_return}} opens a nurture email; HubSpot adds {SCORE_BUMP} points to their "
        "lead score.",
        small_score_bump,
        "Nothing: a small score change is not new evidence, so no re-hand-off.",
    ),
    Step(
        45,
        "marketing",
        "{story_return} requests a demo (a bottom-of-funnel conversion in HubSpot).",
        demo_request,
        "New evidence: MQL again and handed back to sales.",
    ),
    Step(
        55,
        "sales",
        "Sales wins {story_win}'s opportunity in Salesforce (Closed Won).",
        opportunity_won,
        "Customer in HubSpot; the HubSpot deal becomes closed won.",
    ),
    Step(
        65,
        "sales",
        "The deal with {story_contract} moves to 'Contract sent' in HubSpot.",
        contract_sent,
        "Quote presented in Salesforce (Proposal/Price Quote).",
    ),
)


class Story:
    """Plays steps in a background thread; :attr:`played` says what it did, in order."""

    def __init__(
        self, steps: Sequence[Step] = DEFAULT_STEPS, on_step: Callable[[Played], None] | None = None
    ) -> None:
        self.steps = tuple(sorted(steps, key=lambda s: s.after_s))
        self.on_step = on_step
        self._played: list[Played] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def played(self) -> list[Played]:
        with self._lock:
            return list(self._played)

    def play(
        self,
        hubspot: HubSpotDirect,
        salesforce: SalesforceDirect,
        summary: SeedSummary,
        *,
        speed: float = 1.0,
        stop: threading.Event,
    ) -> threading.Thread:
        """Start the story in a daemon thread and return it. ``speed`` 2.0 plays twice as
        fast; setting ``stop`` ends it before the next step. A failing step is recorded
        (``Played.error``) and the story goes on."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._thread = threading.Thread(
            target=self._run,
            name="sandbox-story",
            daemon=True,
            args=(hubspot, salesforce, summary, speed, stop),
        )
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(
        self,
        hubspot: HubSpotDirect,
        salesforce: SalesforceDirect,
        summary: SeedSummary,
        speed: float,
        stop: threading.Event,
    ) -> None:
        started = _now()
        for i, step in enumerate(self.steps):
            due = step.after_s / speed - (_now() - started).total_seconds()
            if (due > 0 and stop.wait(due)) or stop.is_set():
                break
            error = None
            try:
                text = step.describe(summary)
                step.apply(hubspot, salesforce, summary)
            except Exception as exc:  # noqa: BLE001 - a demo step failing must not end the demo
                text = step.description
                error = f"{type(exc).__name__}: {exc}"
                log.warning("story step failed", step=i, error=error)
            played = Played(i, step, _now(), text, error)
            with self._lock:
                self._played.append(played)
            log.info("story step", step=i, actor=step.actor, ok=error is None)
            if self.on_step is not None:
                try:
                    self.on_step(played)
                except Exception:  # noqa: BLE001 - a broken printer must not stop the story
                    log.exception("story on_step callback failed", step=i)
