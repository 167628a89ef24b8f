"""`syncd audit` as a user runs it: why did this person change, under which mapping files?

One person goes through a returned–not-ready round trip (HubSpot lead over the
score threshold → MQL handed to sales → returned by sales → nurture → new
evidence → MQL again), with `syncd sync --once` run as a command after each
human change and a mapping change committed in between. The audit trail must
hold every write, in order, each with the mapping revision in force when it
was decided: the commit before the change for the first half, the commit after
it for the second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncd.mapping import default_mappings_dir
from syncd.sandbox import Sandbox

pytestmark = pytest.mark.slow

SYNCD = str(Path(sys.executable).with_name("syncd"))
EMAIL = "Pat.Round@Example.test"
QUERY = "  pat.round@EXAMPLE.TEST "  # matched on the normalised value
RETURN_REASON = "No budget until Q3"


def git(repo: Path, *args: str) -> str:
    who = ("-c", "user.name=t", "-c", "user.email=t@example.com")
    r = subprocess.run(["git", "-C", str(repo), *who, *args], capture_output=True, text=True,
                       check=True)
    return r.stdout.strip()


@dataclass
class Env:
    sb: Sandbox
    config: Path
    repo: Path
    env: dict[str, str]

    def syncd(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([SYNCD, "--config", str(self.config), "--log-format", "json", *args],
                           capture_output=True, text=True, env=self.env, timeout=120, check=False)
        assert r.returncode == 0, f"syncd {' '.join(args)} failed: {r.stderr}"
        return r

    def sync(self) -> None:
        self.syncd("sync", "--once")

    def audit(self, *args: str) -> list[dict[str, Any]]:
        rows = json.loads(self.syncd("audit", "--json", *args).stdout)
        assert isinstance(rows, list)
        return rows


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    repo = tmp_path / "repo"
    shutil.copytree(default_mappings_dir(), repo / "mappings")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "default mappings")
    with Sandbox(tmp_path / "sb") as sb:
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path}/state.db",
                              mappings_dir=repo / "mappings")
        yield Env(sb, cfg, repo, {**os.environ, **sb.env()})


def hubspot_contact(sb: Sandbox) -> dict[str, Any]:
    (c,) = [c for c in sb.hubspot.all("contacts") if c.get("email") == EMAIL]
    return c


def salesforce_lead(sb: Sandbox) -> dict[str, Any]:
    (lead,) = [r for r in sb.salesforce.all("Lead")
               if (r.get("Email") or "").lower() == EMAIL.lower()]
    return lead


def test_returned_not_ready_round_trip_keeps_the_revision_in_force_at_each_step(env: Env) -> None:
    sb = env.sb
    rev_a = git(env.repo, "rev-parse", "HEAD")
    hs_id = sb.hubspot.add("contacts", {
        "email": EMAIL, "firstname": "Pat", "lastname": "Round", "company": "Roundabout",
        "lifecyclestage": "lead", "hubspotscore": "60"})

    # 1. Over the threshold: MQL in HubSpot, handed to sales (a Salesforce Lead is created).
    env.sync()
    env.sync()  # the echo of our own writes changes nothing
    assert hubspot_contact(sb)["lifecyclestage"] == "marketingqualifiedlead"
    lead = salesforce_lead(sb)
    assert lead["Lifecycle_Stage__c"] == "MQL"
    step1 = env.audit("--email", QUERY)
    assert step1, "the hand-off wrote nothing to the audit trail"

    # 2. Sales returns it: back to lead + nurture on both sides.
    sb.salesforce.modify("Lead", lead["Id"], {"Status": "Returned - Not Ready",
                                             "Return_Reason__c": RETURN_REASON})
    env.sync()
    env.sync()
    assert hubspot_contact(sb)["lifecyclestage"] == "lead"
    assert hubspot_contact(sb)["hs_lead_status"] == "BAD_TIMING"
    step2 = env.audit("--email", QUERY)[len(step1):]
    assert step2 and {r["rule"] for r in step2} == {"R2-returned"}

    # A mapping change is reviewed and committed; the next runs load it.
    hs_file = env.repo / "mappings" / "hubspot.toml"
    text = hs_file.read_text()
    old = 'attempting = ["ATTEMPTED_TO_CONTACT", "IN_PROGRESS"]\nconnected = ["CONNECTED"]'
    assert old in text
    hs_file.write_text(text.replace(
        old, 'attempting = ["ATTEMPTED_TO_CONTACT"]\nconnected = ["CONNECTED", "IN_PROGRESS"]'))
    git(env.repo, "commit", "-qam", "hubspot: IN_PROGRESS means connected")
    rev_b = git(env.repo, "rev-parse", "HEAD")
    assert rev_b != rev_a

    # 3. Nurture: a little interest is not new evidence; nothing is written.
    sb.hubspot.modify("contacts", hs_id, {"hubspotscore": "65"})
    env.sync()
    assert len(env.audit("--email", QUERY)) == len(step1) + len(step2)
    assert hubspot_contact(sb)["lifecyclestage"] == "lead"

    # 4. New evidence: the score rises past max(threshold, score at return) + margin: MQL again.
    sb.hubspot.modify("contacts", hs_id, {"hubspotscore": "75"})
    env.sync()
    env.sync()
    assert hubspot_contact(sb)["lifecyclestage"] == "marketingqualifiedlead"
    assert salesforce_lead(sb)["Status"] == "Open - Not Contacted"

    history = env.audit("--email", QUERY)
    step4 = history[len(step1) + len(step2):]
    assert step4, "the re-hand-off wrote nothing to the audit trail"
    # The full history, in order, each write under the revision in force when it was decided.
    assert history[:len(step1)] == step1
    assert [r["mapping_rev"] for r in history] == \
        [rev_a] * (len(step1) + len(step2)) + [rev_b] * len(step4)
    assert [r["at"] for r in history] == sorted(r["at"] for r in history)
    assert {r["email_norm"] for r in history} == {EMAIL.lower()}

    a, b = rev_a, rev_b
    assert [(r["mapping_rev"], r["system"], r["field"], r["before"], r["after"], r["rule"])
            for r in history] == [
        # 1. MQL by score, handed to sales
        (a, "hubspot", "lifecycle", "lead", "mql", "R4-lead-score"),
        (a, "hubspot", "lead_status", None, "new", "R8-handoff"),
        (a, "salesforce", "company", None, "Roundabout", "R8-handoff"),
        (a, "salesforce", "email", None, EMAIL.lower(), "R8-handoff"),
        (a, "salesforce", "first_name", None, "Pat", "R8-handoff"),
        (a, "salesforce", "last_name", None, "Round", "R8-handoff"),
        (a, "salesforce", "lead_status", None, "new", "R8-handoff"),
        (a, "salesforce", "lifecycle", None, "mql", "R8-handoff"),
        (a, "salesforce", "qualification_reason", None, "lead score 60 ≥ threshold 50",
         "R8-handoff"),
        (a, "salesforce", "score", None, 60, "R8-handoff"),
        # 2. returned – not ready by sales: back to lead + nurture
        (a, "hubspot", "lead_status", "new", "returned_not_ready", "R2-returned"),
        (a, "hubspot", "lifecycle", "mql", "lead", "R2-returned"),
        (a, "hubspot", "return_reason", None, RETURN_REASON, "R2-returned"),
        (a, "salesforce", "lifecycle", "mql", "lead", "R2-returned"),
        # 4. new evidence, under the committed mapping change: MQL again, back to sales
        (b, "hubspot", "lifecycle", "lead", "mql", "R3-rehandoff-guard"),
        (b, "hubspot", "lead_status", "returned_not_ready", "new", "R3-rehandoff-guard"),
        (b, "salesforce", "lifecycle", "lead", "mql", "R3-rehandoff-guard"),
        (b, "salesforce", "lead_status", "returned_not_ready", "new", "R3-rehandoff-guard"),
    ]
    lead_id = salesforce_lead(sb)["Id"]
    assert {r["record_id"] for r in history} == {hs_id, lead_id}
    assert all(RETURN_REASON in r["reason"] for r in step2)
    assert all("new evidence" in r["reason"] for r in step4)

    # The other filters answer the same question from another side.
    assert env.audit("--email", QUERY, "--rule", "R2-returned") == step2
    assert env.audit("--id", hs_id) == [r for r in history if r["record_id"] == hs_id]
    assert env.audit("--email", QUERY, "--system", "salesforce") == \
        [r for r in history if r["system"] == "salesforce"]
    assert env.audit("--email", "someone.else@example.test") == []
    # --limit keeps the most recent writes ("why did this change?" is about the latest).
    assert env.audit("--email", QUERY, "--limit", "4") == history[-4:]
    # The table names the revision too (a commit's first 12 hex digits).
    table = env.syncd("audit", "--email", QUERY).stdout
    assert rev_a[:12] in table and rev_b[:12] in table
