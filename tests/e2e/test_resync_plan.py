"""``syncd resync --plan``: the estimate from counts is within 10 % of the calls the resync then
makes (counted by the sandbox), for a full resync and for ``--since``; a resync that would cross
the daily cap refuses to start unless ``--force``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from syncd import plan
from syncd.config import load_config
from syncd.resync import ResyncRequest, request_resync
from syncd.sandbox.seed import SeedSpec, seed

if TYPE_CHECKING:
    from conftest import E2E


def _calls(e2e: E2E) -> dict[str, int]:
    return {"hubspot": e2e.sb.hubspot_server.request_count(), "salesforce": e2e.sb.salesforce_server.request_count()}


def _within_10_percent(estimated: dict[str, int], made: dict[str, int]) -> None:
    for system, n in made.items():
        assert abs(estimated[system] - n) <= 0.1 * n, (system, estimated, made)


@pytest.mark.parametrize("mode", ["full", "since"])
def test_plan_is_within_10_percent_of_the_calls_made(e2e: E2E, mode: str) -> None:
    seed(e2e.hs, e2e.sf, SeedSpec(seed=5, people=2500, deals=500))
    e2e.converge()
    since = datetime.now(UTC) - timedelta(days=15) if mode == "since" else None  # the seed spans 20 days
    req = ResyncRequest(full=mode == "full", since=since)

    estimate = plan.estimate(e2e.rt, full=req.full, since=req.since)
    before = _calls(e2e)
    request_resync(load_config(e2e.config), req, inline=True)
    after = _calls(e2e)

    made = {s: after[s] - before[s] for s in after}
    assert made["hubspot"] >= 8  # a meaningful sample: pages of 200 contacts, deals + associations
    _within_10_percent({s: estimate.calls(s) for s in made}, made)
    assert all(o.records > 0 for o in estimate.objects if o.system == "hubspot")
    if mode == "since":
        assert estimate.calls("hubspot") < plan.estimate(e2e.rt, full=True).calls("hubspot")


def test_resync_plan_prints_a_table_and_resyncs_nothing(e2e: E2E) -> None:
    seed(e2e.hs, e2e.sf, SeedSpec(seed=5, people=300, deals=60))
    e2e.converge()
    before = _calls(e2e)

    r = e2e.syncd("resync", "--full", "--plan")

    assert r.returncode == 0, r.stderr
    assert "cost plan" in r.stdout and "hubspot" in r.stdout and "Opportunity" in r.stdout
    after = _calls(e2e)
    # one count per object, and Salesforce's /limits read by the process's API budget
    assert {s: after[s] - before[s] for s in after} == {"hubspot": 2, "salesforce": 5}


def test_a_resync_over_the_cap_refuses_unless_forced(e2e: E2E) -> None:
    seed(e2e.hs, e2e.sf, SeedSpec(seed=5, people=2500, deals=500))
    text = e2e.config.read_text().replace("\n[salesforce]\n", "daily_budget = 5\n\n[salesforce]\n", 1)
    e2e.config.write_text(text)
    before = e2e.sb.hubspot_server.request_count("contacts.search")

    r = e2e.syncd("resync", "--full", "--inline")

    assert r.returncode == 1
    assert "resync refused" in r.stderr and "syncd's API share of 5 " in r.stderr and "--force" in r.stderr
    assert e2e.sb.hubspot_server.request_count("contacts.search") == before + 1  # only its count
    # --force starts it anyway; the shared ledger still holds the cap: HubSpot pauses at 5 calls
    r = e2e.syncd("resync", "--full", "--inline", "--force")
    assert r.returncode == 1 and "daily API share 5/5 used — paused until" in r.stderr, r.stderr[-2000:]
    assert e2e.sb.hubspot_server.request_count("contacts.search") <= before + 5
