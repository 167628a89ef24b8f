"""The one cap check of cost plans (``syncd.plan.would_exceed``): what is left of syncd's API
share in the shared ledger, whichever process spent it."""

from __future__ import annotations

from syncd.config import Config, HubSpotConfig, SalesforceConfig
from syncd.connectors._pacing import Budget, Pace, Settings, Window
from syncd.plan import would_exceed
from syncd.store import Store

CFG = Config(hubspot=HubSpotConfig(base_url="https://h.invalid", daily_budget=1000),
             salesforce=SalesforceConfig(instance_url="https://s.invalid", daily_budget=500))


def test_a_plan_within_what_is_left_fits(store: Store) -> None:
    assert would_exceed(store, CFG, {"hubspot": 1000, "salesforce": 500}) == {}


def test_calls_another_process_spent_count_against_the_plan(store: Store) -> None:
    other = Budget(store, Settings("salesforce", Window("rolling"), daily_budget=500, flush_every=10,
                                   paces={"api": Pace(10_000.0)}))
    for _ in range(60):
        other.before("query")
    other.settle()  # another process spent 60 of the 500
    why = would_exceed(store, CFG, {"salesforce": 450, "hubspot": 10})
    assert list(why) == ["salesforce"] and "only 440 of syncd's API share of 500" in why["salesforce"]
    assert would_exceed(store, CFG, {"salesforce": 440}) == {}
