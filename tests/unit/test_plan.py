"""The one cap check of cost plans (``syncd.plan.would_exceed``): the configured daily_budget less
this process's calls, and what the CRM itself reports left."""

from __future__ import annotations

from syncd.config import Config, HubSpotConfig, SalesforceConfig
from syncd.model import ApiUsage
from syncd.plan import would_exceed

CFG = Config(hubspot=HubSpotConfig(base_url="https://h.invalid", daily_budget=1000),
             salesforce=SalesforceConfig(instance_url="https://s.invalid", daily_budget=500))


def test_within_the_budget_is_fine() -> None:
    assert would_exceed("hubspot", 1000, CFG) is None
    assert would_exceed("salesforce", 499, CFG, ApiUsage(calls={"query": 1})) is None


def test_over_daily_budget_counting_this_process_calls() -> None:
    why = would_exceed("salesforce", 450, CFG, ApiUsage(calls={"query": 60}))
    assert why is not None and "daily_budget 500" in why and "60 spent" in why
    assert would_exceed("hubspot", 1001, CFG) is not None


def test_over_what_the_crm_reports_left() -> None:
    usage = ApiUsage(reported_used=99_950, reported_limit=100_000)
    why = would_exceed("salesforce", 60, CFG, usage)
    assert why is not None and "only 50 of 100,000 left" in why
    assert would_exceed("salesforce", 50, CFG, usage) is None
