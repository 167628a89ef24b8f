"""`syncd mappings impact` on a temporary git repository of mappings and a seeded state store.

The store is filled by real cycles (the real clients over HTTPS) against a
seeded sandbox, run until nothing more is written, so it mirrors the sandbox.
The sandbox is then stopped: impact must work without any CRM. Expected counts
are taken from the sandbox's own records, not from the store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncd.config import load_config
from syncd.errors import MappingError
from syncd.impact import format_impact, impact, transition_line
from syncd.mapping import default_mappings_dir
from syncd.model import normalise_email
from syncd.runtime import open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import Store

SYNCD = str(Path(sys.executable).with_name("syncd"))

# The two mapping changes under review (edits of the default files).
HS_OLD = 'new = ["NEW", "OPEN"]\nattempting = ["ATTEMPTED_TO_CONTACT", "IN_PROGRESS"]'
HS_NEW = 'new = ["NEW"]\nattempting = ["ATTEMPTED_TO_CONTACT", "IN_PROGRESS", "OPEN"]'
SF_OLD = 'connected = ["Working - Contacted"]'
SF_NEW = 'attempting = ["Working - Contacted"]'


@dataclass
class World:
    state_url: str
    config_base: str  # config text without [mappings]
    env: dict[str, str]
    hs_open: dict[str, str]  # HubSpot contact id -> email, hs_lead_status OPEN
    sf_working: dict[str, str]  # Salesforce Lead id -> email, Status 'Working - Contacted'
    hs_emails: set[str]
    sf_proposal: set[str]  # Opportunity ids in 'Proposal/Price Quote'
    hs_deals: dict[str, str]  # HubSpot deal id -> dealstage
    sf_calls: dict[str, str]  # Task id -> WhoId, Type 'Call'
    hs_near: dict[str, str]  # HubSpot contact id -> email: subscriber/lead, score 40..49
    sf_emails: set[str]
    n_records: int


def build_world(d: Path, state_url: str) -> World:
    """Seed a sandbox, sync it into the store at ``state_url`` until converged, stop it."""
    with Sandbox(d / "sb") as sb, pytest.MonkeyPatch.context() as mp:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=7, people=150, deals=30))
        cfg = sb.write_config(d / "syncd.toml", state_url=state_url)
        for k, v in sb.env().items():
            mp.setenv(k, v)
        rt = open_runtime(load_config(cfg))
        try:
            for _ in range(6):  # until converged: the store then mirrors the sandbox
                st = rt.engine().cycle()
                if st.sent == 0 and st.decisions == 0 and st.changed == 0:
                    break
            else:
                pytest.fail("the seeded sandbox did not converge in 6 cycles")
        finally:
            rt.close()
        contacts = sb.hubspot.all("contacts")
        leads = sb.salesforce.all("Lead")
        n = (len(contacts) + len(sb.hubspot.all("deals")) + len(leads)
             + sum(len(sb.salesforce.all(o)) for o in ("Contact", "Opportunity", "Task")))
        w = World(
            state_url=state_url,
            config_base=sb.config_text(state_url=state_url),
            env=sb.env(),
            hs_open={c["hs_object_id"]: c["email"] for c in contacts
                     if c.get("hs_lead_status") == "OPEN"},
            sf_working={r["Id"]: r["Email"] for r in leads if r["Status"] == "Working - Contacted"},
            hs_emails={e for c in contacts if (e := normalise_email(c.get("email")))},
            sf_proposal={o["Id"] for o in sb.salesforce.all("Opportunity")
                         if o["StageName"] == "Proposal/Price Quote"},
            hs_deals={d["hs_object_id"]: d["dealstage"] for d in sb.hubspot.all("deals")},
            sf_calls={t["Id"]: t["WhoId"] for t in sb.salesforce.all("Task")
                      if t["Type"] == "Call"},
            hs_near={c["hs_object_id"]: c["email"] for c in contacts
                     if c.get("lifecyclestage") in ("subscriber", "lead")
                     and 40 <= int(c.get("hubspotscore") or 0) < 50},
            sf_emails={e for o in ("Lead", "Contact") for r in sb.salesforce.all(o)
                       if (e := normalise_email(r.get("Email")))},
            n_records=n,
        )
    # The sandbox is stopped from here on: impact must not need a CRM.
    assert w.hs_open and w.sf_working and w.sf_proposal and w.sf_calls and w.hs_near, \
        "the seed must give every transition something to count"
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("impact")
    return build_world(d, f"sqlite:///{d}/state.db")


def git(repo: Path, *args: str) -> str:
    who = ("-c", "user.name=t", "-c", "user.email=t@example.com")
    r = subprocess.run(["git", "-C", str(repo), *who, *args], capture_output=True, text=True,
                       check=True)
    return r.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding a committed copy of the default mappings/ (returns the folder)."""
    root = tmp_path / "repo"
    shutil.copytree(default_mappings_dir(), root / "mappings")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "default mappings")
    return root / "mappings"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer contains {old!r}"
    path.write_text(text.replace(old, new))


def change_hubspot(m: Path) -> None:
    edit(m / "hubspot.toml", HS_OLD, HS_NEW)


def change_salesforce(m: Path) -> None:
    edit(m / "salesforce.toml", 'cannot_hold = ["attempting"]\n', "")
    edit(m / "salesforce.toml", SF_OLD, SF_NEW)


def store_snapshot(url: str) -> dict[str, Any]:
    store = Store.open(url)
    try:
        with store.tx() as tx:
            return {"records": sorted((r.key, r.raw_hash, json.dumps(r.canonical, sort_keys=True))
                                      for r in tx.iter_records()),
                    "outbox": tx.outbox_depth(), "audit": len(tx.query_audit(limit=100_000)),
                    "events": len(tx.open_events())}
    finally:
        store.close()


def run_impact(world: World, m: Path, rev_from: str = "HEAD", rev_to: str | None = None,
               samples: int = 3) -> dict[str, Any]:
    store = Store.open(world.state_url)
    try:
        return impact(store, m, rev_from, rev_to, samples=samples)
    finally:
        store.close()


def cli(world: World, m: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = m.parent.parent / "syncd.toml"
    cfg.write_text(world.config_base + f'[mappings]\ndir = "{m}"\n')
    cmd = [SYNCD, "--config", str(cfg), "--log-format", "json", "mappings", "impact", *args]
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def by_key(result: dict[str, Any]) -> dict[tuple[str, str, str, str, str, str], dict[str, Any]]:
    return {(t["system"], t["object"], t["raw_value"], t["term_field"], t["old"], t["new"]): t
            for t in result["transitions"]}


# -- tests ---------------------------------------------------------------------------------------


def test_working_tree_change_counts_exactly_the_records_holding_the_remapped_values(
        world: World, repo: Path) -> None:
    change_hubspot(repo)
    change_salesforce(repo)
    before = store_snapshot(world.state_url)

    result = run_impact(world, repo, samples=2)

    assert result["from"]["rev"] == "HEAD"
    assert result["from"]["revision"] == git(repo.parent, "rev-parse", "HEAD")
    assert result["to"]["rev"] == "working tree"
    to_rev = result["to"]["revision"]
    assert to_rev.startswith("sha256:") and to_rev.endswith("+dirty")
    assert result["records_scanned"] == world.n_records
    got = by_key(result)
    assert set(got) == {
        ("hubspot", "contacts", "OPEN", "lead_status", "new", "attempting"),
        ("salesforce", "Lead", "Working - Contacted", "lead_status", "connected", "attempting"),
    }
    hs = got[("hubspot", "contacts", "OPEN", "lead_status", "new", "attempting")]
    sf = got[("salesforce", "Lead", "Working - Contacted", "lead_status", "connected",
              "attempting")]
    assert (hs["count"], hs["unit"], hs["raw_field"]) == (len(world.hs_open), "people",
                                                          "hs_lead_status")
    assert (sf["count"], sf["unit"], sf["raw_field"]) == (len(world.sf_working), "people",
                                                          "Status")
    assert result["records_changed"] == len(world.hs_open) + len(world.sf_working)
    assert result["value_changes"] == [] and result["unmappable"] == []
    for t, ids in ((hs, world.hs_open), (sf, world.sf_working)):
        assert len(t["samples"]) == 2
        for s in t["samples"]:
            assert s["record_id"] in ids
            assert s["email"] is not None and "***@" in s["email"]
            assert s["email"] != ids[s["record_id"]]
    assert transition_line(sf) == ("Salesforce Lead Status 'Working - Contacted' : "
                                   f"connected → attempting  {len(world.sf_working)} people")
    # Nothing was written: the store is exactly as before.
    assert store_snapshot(world.state_url) == before


def test_rules_that_would_fire_propagate_the_remapped_status_and_none_fired_before(
        world: World, repo: Path) -> None:
    change_salesforce(repo)

    result = run_impact(world, repo)

    # Salesforce now says "attempting" for these leads; the ones whose person also has a
    # HubSpot contact get that contact's lead status set (HubSpot can hold "attempting").
    linked = [i for i, e in world.sf_working.items() if normalise_email(e) in world.hs_emails]
    assert linked, "the seed must link some working leads to HubSpot contacts"
    sets = [r for r in result["rules"] if r["action"] == "set"]
    assert sum(r["count"] for r in sets) == len(linked)
    assert all(r["baseline"] == 0 for r in result["rules"]), result["rules"]  # converged store
    assert any("lead_status" in r["example"] for r in sets)
    assert result["people_affected"] == len(world.sf_working)
    assert result["unwritable_writes"] == 0


def test_committed_revisions_compare_without_touching_the_working_tree(
        world: World, repo: Path) -> None:
    change_hubspot(repo)
    git(repo.parent, "commit", "-qam", "hubspot: OPEN means attempting")
    change_salesforce(repo)  # uncommitted: must not count between two commits

    result = run_impact(world, repo, "HEAD~1", "HEAD")

    assert result["to"]["revision"] == git(repo.parent, "rev-parse", "HEAD")
    assert result["from"]["revision"] == git(repo.parent, "rev-parse", "HEAD~1")
    assert [(t["system"], t["raw_value"], t["count"]) for t in result["transitions"]] == [
        ("hubspot", "OPEN", len(world.hs_open))]
    # And backwards: the same records move the other way.
    back = run_impact(world, repo, "HEAD", "HEAD~1")
    assert [(t["old"], t["new"], t["count"]) for t in back["transitions"]] == [
        ("attempting", "new", len(world.hs_open))]


def test_no_change_means_no_transition_and_no_rule(world: World, repo: Path) -> None:
    result = run_impact(world, repo)
    assert result["records_scanned"] == world.n_records
    assert (result["transitions"], result["rules"], result["records_changed"]) == ([], [], 0)
    assert "No stored record changes term." in format_impact(result)


def test_a_value_no_longer_mapped_shows_as_unmapped(world: World, repo: Path) -> None:
    edit(repo / "hubspot.toml", 'new = ["NEW", "OPEN"]', 'new = ["NEW"]')
    result = run_impact(world, repo)
    assert [(t["raw_value"], t["old"], t["new"], t["count"]) for t in result["transitions"]] == [
        ("OPEN", "new", "(unmapped)", len(world.hs_open))]


def test_an_invalid_mapping_folder_is_a_mapping_error_with_file_and_line(
        world: World, repo: Path) -> None:
    edit(repo / "salesforce.toml", SF_OLD,
         'connected = ["Working - Contacted", "Working - Contacted"]')
    with pytest.raises(MappingError, match=r"salesforce\.toml:\d+:\d+: .*Working - Contacted"):
        run_impact(world, repo)
    # A broken OLD revision points at the revision, not at a temporary directory.
    git(repo.parent, "commit", "-qam", "broken")
    with pytest.raises(MappingError, match=r"^HEAD:mappings/salesforce\.toml:\d+:\d+: "):
        run_impact(world, repo, "HEAD", None)


def test_unknown_revision_and_folder_outside_git_are_clear_errors(world: World, repo: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="unknown git revision 'no-such-branch'"):
        run_impact(world, repo, "no-such-branch")
    with pytest.raises(MappingError, match="'--output=x' is not a git revision"):
        run_impact(world, repo, "HEAD", "--output=x")
    outside = tmp_path / "plain"
    shutil.copytree(default_mappings_dir(), outside)
    with pytest.raises(MappingError, match="not inside a git repository"):
        run_impact(world, outside)


def test_cli_json_shape_and_markdown(world: World, repo: Path) -> None:
    change_salesforce(repo)
    r = cli(world, repo, "--json", "--samples", "1")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) >= {"from", "to", "records_scanned", "records_changed", "people_affected",
                         "deals_affected",
                         "transitions", "value_changes", "unmappable", "rules", "unwritable_writes"}
    (t,) = data["transitions"]
    assert set(t) == {"system", "object", "kind", "raw_field", "raw_value", "term_field", "old",
                      "new", "count", "unit", "samples"}
    assert t["count"] == len(world.sf_working) and len(t["samples"]) == 1
    assert set(data["rules"][0]) == {"rule", "action", "count", "baseline", "example", "samples"}

    r = cli(world, repo)
    assert r.returncode == 0, r.stderr
    line = ("Salesforce Lead Status 'Working - Contacted' : connected → attempting  "
            f"{len(world.sf_working)} people")
    assert line in r.stdout
    assert "| Salesforce | Lead | Status | 'Working - Contacted' | lead_status |" in r.stdout
    for email in world.sf_working.values():
        assert email not in r.stdout  # samples are masked


def test_cli_bad_mapping_exits_2_with_file_line(world: World, repo: Path) -> None:
    edit(repo / "hubspot.toml", "[contacts.terms.lead_status]",
         "[contacts.terms.lead_status]\nbogus = 1")
    r = cli(world, repo)
    assert r.returncode == 2
    assert "hubspot.toml:" in r.stderr and "Traceback" not in r.stderr
    r = cli(world, repo, "--from", "v9.9")
    assert r.returncode == 2 and "unknown git revision 'v9.9'" in r.stderr


def test_deal_stage_change_counts_deals_and_decides_them(world: World, repo: Path) -> None:
    edit(repo / "salesforce.toml",
         'quote_building = ["Value Proposition", "Id. Decision Makers", "Perception Analysis"]\n'
         'quote_presented = ["Proposal/Price Quote", "Negotiation/Review"]',
         'quote_building = ["Value Proposition", "Id. Decision Makers", "Perception Analysis", '
         '"Proposal/Price Quote"]\nquote_presented = ["Negotiation/Review"]')

    result = run_impact(world, repo)

    (t,) = result["transitions"]
    assert (t["system"], t["object"], t["raw_field"], t["raw_value"], t["old"], t["new"]) == (
        "salesforce", "Opportunity", "StageName", "Proposal/Price Quote", "quote_presented",
        "quote_building")
    assert (t["count"], t["unit"]) == (len(world.sf_proposal), "deals")
    assert {s["record_id"] for s in t["samples"]} <= world.sf_proposal
    # Every such opportunity is linked to a HubSpot deal in this seed: sales owns the deal
    # stage, so each HubSpot deal would be moved to the new term (rule R6), and nothing else.
    assert result["deals_affected"] == len(world.sf_proposal)
    (r,) = result["rules"]
    assert (r["rule"], r["action"], r["count"], r["baseline"]) == (
        "R6-deals", "set", len(world.sf_proposal), 0)
    assert "quote_building" in r["example"]
    for s in r["samples"]:
        assert world.hs_deals[s["record_id"]] == "contractsent"  # quote_presented in HubSpot


def test_attempt_types_change_is_a_value_change_on_tasks_touching_their_people(
        world: World, repo: Path) -> None:
    edit(repo / "salesforce.toml", 'types = ["Call", "Email"]', 'types = ["Email"]')

    result = run_impact(world, repo)

    assert result["transitions"] == []
    (v,) = result["value_changes"]
    assert (v["system"], v["object"], v["field"], v["count"], v["unit"]) == (
        "salesforce", "Task", "counts", len(world.sf_calls), "tasks")
    assert {s["record_id"] for s in v["samples"]} <= set(world.sf_calls)
    # The people those calls were logged on (one Lead or Contact each in this seed).
    assert result["people_affected"] == len(set(world.sf_calls.values()))
    # Fewer counting attempts can only delay a return (R5): nothing fires now.
    assert result["rules"] == []


def test_sla_threshold_change_decides_everyone(world: World, repo: Path) -> None:
    edit(repo / "sla.toml", "threshold = 50", "threshold = 40")

    result = run_impact(world, repo)

    assert result["sla_changed"] is True and result["transitions"] == []
    assert result["deals_affected"] == len(world.hs_deals)  # every deal is decided again
    # Contacts at subscriber/lead with a score of 40..49 become MQLs (in HubSpot, and in
    # Salesforce when it holds them too) and those unknown to Salesforce are handed to sales.
    near_sf = [i for i, e in world.hs_near.items() if normalise_email(e) in world.sf_emails]
    got = {(r["rule"], r["action"]): (r["count"], r["baseline"]) for r in result["rules"]}
    assert got == {("R4-lead-score", "set"): (len(world.hs_near) + len(near_sf), 0),
                   ("R8-handoff", "create"): (len(world.hs_near) - len(near_sf), 0)}
    assert "sla.toml changed" in format_impact(result)


def test_impact_reads_every_store_backend(store_url: str, tmp_path: Path) -> None:
    """The same answer from SQLite and PostgreSQL (read-only transaction on both)."""
    w = build_world(tmp_path, store_url)
    m = tmp_path / "repo" / "mappings"
    shutil.copytree(default_mappings_dir(), m)
    git(m.parent, "init", "-q")
    git(m.parent, "add", ".")
    git(m.parent, "commit", "-qm", "default mappings")
    change_salesforce(m)
    before = store_snapshot(store_url)

    result = run_impact(w, m)

    assert [(t["raw_value"], t["old"], t["new"], t["count"]) for t in result["transitions"]] == [
        ("Working - Contacted", "connected", "attempting", len(w.sf_working))]
    assert result["records_scanned"] == w.n_records
    assert store_snapshot(store_url) == before
