"""The review loop end to end, through the `syncd` command against the sandbox CRMs (real clients
over HTTPS): what syncd will not decide alone is listed, shown and resolved by a person, each
resolution is in the audit with the operator's name, and the next cycle decides on it. Every
`--json` document is validated against the schema in docs/json.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _docs_json import documented, schemas
from jsonschema import Draft202012Validator

from syncd.mapping import default_mappings_dir
from syncd.rules import Memory
from syncd.sandbox import hubspot as hubspot_sim

if TYPE_CHECKING:
    from conftest import E2E

pytestmark = pytest.mark.slow

def syncd(e2e: E2E, *args: str, user: str = "alice", code: int = 0) -> subprocess.CompletedProcess[str]:
    """``syncd --config <config> ARGS`` as operator ``user`` ($USER)."""
    env = {**os.environ, **e2e.sb.env(), "USER": user}
    p = subprocess.run([sys.executable, "-m", "syncd", "--config", str(e2e.config), *args], env=env,
                       capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == code, f"syncd {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


RESOLVING = {"resolve", "retry", "dismiss", "release"}


def as_json(e2e: E2E, name: str, *args: str, **kw: Any) -> Any:
    schema = "resolution" if name.split()[-1] in RESOLVING else name
    return documented(schema, syncd(e2e, *name.split(), *args, "--json", **kw).stdout)


def operator_rows(e2e: E2E) -> list[dict[str, Any]]:
    return documented("audit", syncd(e2e, "audit", "--rule", "operator", "--json").stdout)


def memory_of(e2e: E2E, system: str, obj: str, rid: str) -> Memory:
    with e2e.rt.store.tx() as tx:
        entity = tx.entity_ids([(system, obj, rid)])[(system, obj, rid)]
        assert entity is not None
        return Memory.from_dict(tx.get_memory([entity])[entity])


def lead(e2e: E2E, email: str, company: str = "Acme", stage: str = "Lead",
         status: str = "Open - Not Contacted") -> str:
    first, last = email.split("@")[0].split(".")
    return e2e.sf.insert("Lead", {"Email": email, "FirstName": first.title(), "LastName": last.title(),
                                  "Company": company, "Status": status, "Lifecycle_Stage__c": stage})


def leads_with_email(e2e: E2E, email: str) -> list[dict[str, Any]]:
    return [r for r in e2e.sf.all("Lead") if (r.get("Email") or "").strip().lower() == email]


# -- conflicts ------------------------------------------------------------------------------------


def test_a_conflict_resolved_by_pick_makes_the_next_cycle_hand_off(e2e: E2E) -> None:
    email = "dana.dup@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Dana", "lastname": "Dup",
                                  "lifecyclestage": "lead", "hubspotscore": "80"})
    l1, l2 = lead(e2e, email, "Acme"), lead(e2e, email, "Acme Old Import")
    documented("sync", syncd(e2e, "sync", "--once", "--json").stdout)
    e2e.converge()
    # Two Leads could be this MQL: syncd refuses to guess, nothing is handed to sales.
    assert {r["Lifecycle_Stage__c"] for r in leads_with_email(e2e, email)} == {"Lead"}
    assert memory_of(e2e, "hubspot", "contacts", hid).handed_off_at is None

    (conflict,) = as_json(e2e, "conflicts")["conflicts"]
    keys = {c["key"]: c for c in conflict["candidates"]}
    assert set(keys) == {f"hubspot:contacts:{hid}", f"salesforce:Lead:{l1}", f"salesforce:Lead:{l2}"}
    assert keys[f"salesforce:Lead:{l2}"]["company"] == "Acme Old Import"  # side by side, to tell them apart
    shown = as_json(e2e, "conflicts show", str(conflict["id"]))
    assert shown["conflict"] == conflict
    text = syncd(e2e, "conflicts").stdout
    assert l1 in text and l2 in text and "Acme Old Import" in text

    # a pick that is no candidate is refused (exit 2), and nothing changes
    p = syncd(e2e, "conflicts", "resolve", str(conflict["id"]), "--pick", "salesforce:00Qnothere", code=2)
    assert "not one of this conflict's candidates" in p.stderr

    done = documented("resolution", syncd(e2e, "conflicts", "resolve", str(conflict["id"]),
                                           "--pick", f"salesforce:{l1}", "--json").stdout)["resolution"]
    assert (done["action"], done["by"]) == ("pick", "alice")  # $USER
    assert as_json(e2e, "conflicts")["conflicts"] == []

    # The pick changed the input (a stored link); the next cycle decides: the MQL is handed to
    # sales on the Lead picked, the other Lead is left alone, no duplicate Lead is created.
    e2e.converge()
    assert e2e.sf.get("Lead", l1)["Lifecycle_Stage__c"] == "MQL"
    assert e2e.sf.get("Lead", l2)["Lifecycle_Stage__c"] == "Lead"
    assert len(leads_with_email(e2e, email)) == 2
    assert memory_of(e2e, "salesforce", "Lead", l1).handed_off_at is not None
    assert as_json(e2e, "conflicts")["conflicts"] == []  # the link holds: the conflict is not found again
    (row,) = [r for r in operator_rows(e2e) if r["field"] == "link"]
    assert row["after"]["by"] == "alice" and f"salesforce:Lead:{l1}" in row["after"]["linked"]
    assert row["email_norm"] == email and row["record_id"] == l1


def test_a_dismissed_conflict_is_audited_with_the_by_name(e2e: E2E) -> None:
    email = "dee.twice@example.com"
    e2e.hs.add("contacts", {"email": email, "firstname": "Dee", "lastname": "Twice", "lifecyclestage": "lead"})
    lead(e2e, email), lead(e2e, email, "Other")
    e2e.converge()
    (conflict,) = as_json(e2e, "conflicts")["conflicts"]
    done = as_json(e2e, "conflicts resolve", str(conflict["id"]), "--dismiss", "--by", "bob")["resolution"]
    assert (done["action"], done["by"]) == ("dismiss", "bob")
    (row,) = operator_rows(e2e)
    assert (row["field"], row["after"]["action"], row["after"]["by"]) == ("link", "dismiss", "bob")
    syncd(e2e, "conflicts", "resolve", str(conflict["id"]), "--dismiss", code=2)  # already resolved


# -- quarantine -----------------------------------------------------------------------------------


def test_a_quarantined_write_retried_lands(e2e: E2E, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sales accepted the lead in Salesforce; HubSpot has no "salesacceptedlead" stage yet (a
    # custom stage the admin must add), so it refuses the write: quarantined with its reason.
    prop = hubspot_sim.CATALOGUE["contacts"]["lifecyclestage"]
    without = replace(prop, options=tuple(o for o in prop.options if o[0] != "salesacceptedlead"))
    monkeypatch.setitem(hubspot_sim.CATALOGUE["contacts"], "lifecyclestage", without)
    email = "sal.accepted@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Sal", "lastname": "Accepted",
                                  "lifecyclestage": "marketingqualifiedlead"})
    lead(e2e, email, stage="SAL")
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    # (decided again after the refusal, on a record that changed meanwhile: the same write twice)
    entries = as_json(e2e, "quarantine")["quarantine"]
    assert entries and all((q["kind"], q["record_id"], q["write"]["fields"]) ==
                           ("write", hid, {"lifecyclestage": "salesacceptedlead"}) for q in entries)
    entry = entries[0]
    assert "salesacceptedlead" in entry["reason"] and "INVALID_OPTION" in entry["reason"]
    assert as_json(e2e, "quarantine show", str(entry["id"]))["entry"] == entry
    assert "salesacceptedlead" in syncd(e2e, "quarantine").stdout

    # The admin adds the stage in HubSpot; the operator retries; the next cycle sends it.
    monkeypatch.setitem(hubspot_sim.CATALOGUE["contacts"], "lifecyclestage", prop)
    for q in entries:
        done = as_json(e2e, "quarantine retry", str(q["id"]), user="carol")["resolution"]
        assert (done["action"], done["by"], done["changed"]) == ("retry", "carol", {"requeued_write": q["outbox_id"]})
    assert as_json(e2e, "quarantine")["quarantine"] == []
    st = documented("sync", syncd(e2e, "sync", "--once", "--json").stdout)
    assert st["status"] == "ok" and st["summary"]["sent"] >= 1
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "salesacceptedlead"
    assert any(a.field == "lifecycle" and a.after == "sal" for a in e2e.audit(record_id=hid))
    rows = operator_rows(e2e)
    assert len(rows) == len(entries)
    assert {(r["field"], r["record_id"], json.dumps(r["after"])) for r in rows} == \
        {("quarantine", hid, json.dumps({"action": "retry", "by": "carol"}))}


def test_a_dismissed_write_is_never_sent_even_by_a_resync(e2e: E2E, monkeypatch: pytest.MonkeyPatch) -> None:
    prop = hubspot_sim.CATALOGUE["contacts"]["lifecyclestage"]
    monkeypatch.setitem(hubspot_sim.CATALOGUE["contacts"], "lifecyclestage",
                        replace(prop, options=tuple(o for o in prop.options if o[0] != "salesacceptedlead")))
    email = "sal.dismissed@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Sal", "lastname": "Dismissed",
                                  "lifecyclestage": "marketingqualifiedlead"})
    lead(e2e, email, stage="SAL")
    e2e.converge()
    for entry in as_json(e2e, "quarantine")["quarantine"]:
        done = as_json(e2e, "quarantine dismiss", str(entry["id"]))["resolution"]
        assert done["changed"] == {"dismissed_write": entry["outbox_id"]}
    assert as_json(e2e, "quarantine")["quarantine"] == []
    monkeypatch.setitem(hubspot_sim.CATALOGUE["contacts"], "lifecyclestage", prop)
    out = as_json(e2e, "resync", "--inline")
    assert out["queued"] is False and out["result"]["requeued_writes"] == 0
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"


def test_a_quarantined_record_retried_is_fetched_again_and_leaves_quarantine(
        e2e: E2E, monkeypatch: pytest.MonkeyPatch) -> None:
    # an admin turned the score property into free text: a record syncd cannot read arrives
    score = hubspot_sim.CATALOGUE["contacts"]["hubspotscore"]
    monkeypatch.setitem(hubspot_sim.CATALOGUE["contacts"], "hubspotscore", replace(score, type="string"))
    hid = e2e.hs.add("contacts", {"email": "bad.score@example.com", "firstname": "Bad", "lastname": "Score",
                                  "lifecyclestage": "lead", "hubspotscore": "lots"})
    syncd(e2e, "sync", "--once")
    (entry,) = as_json(e2e, "quarantine")["quarantine"]
    assert (entry["kind"], entry["record_id"], entry["outbox_id"], entry["write"]) == ("record", hid, None, None)
    assert "hubspotscore" in entry["reason"]
    e2e.hs.modify("contacts", hid, {"hubspotscore": "20"})  # fixed in the CRM
    done = as_json(e2e, "quarantine retry", str(entry["id"]))["resolution"]
    assert done["changed"]["resync"] == f"hubspot:{hid}"
    outcome = done["changed"]["resync_outcome"]
    assert outcome["queued"] is False and outcome["result"]["retried_records"] == 1  # no service: run here
    assert as_json(e2e, "quarantine")["quarantine"] == []
    (row,) = operator_rows(e2e)
    assert (row["field"], row["record_id"], row["after"]) == ("quarantine", hid, {"action": "retry", "by": "alice"})


# -- unmapped -------------------------------------------------------------------------------------


def test_unmapped_prints_the_toml_line_that_makes_mappings_check_clean(e2e: E2E) -> None:
    mdir = e2e.tmp / "mappings"
    shutil.copytree(default_mappings_dir(), mdir)
    hubspot_toml = mdir / "hubspot.toml"
    text = hubspot_toml.read_text()
    assert 'customer = ["customer", "evangelist"]' in text
    hubspot_toml.write_text(text.replace('customer = ["customer", "evangelist"]', 'customer = ["customer"]'))
    with e2e.config.open("a") as f:
        f.write(f'\n[mappings]\ndir = "{mdir}"\n')
    hid = e2e.hs.add("contacts", {"email": "eva.promoter@example.com", "firstname": "Eva",
                                  "lastname": "Promoter", "lifecyclestage": "evangelist"})
    syncd(e2e, "sync", "--once")
    # the CRM has a value the mappings do not name
    problems = documented("mappings check", syncd(e2e, "mappings", "check", "--live", "--json", code=1).stdout)
    assert any("evangelist" in p["message"] for p in problems)

    (value,) = [u for u in as_json(e2e, "unmapped")["unmapped"] if u["value"] == "evangelist"]
    assert (value["key"], value["count"], value["samples"]) == \
        ("hubspot:contacts:lifecyclestage=evangelist", 1, [hid])
    assert (Path(value["file"]).name, value["section"]) == ("hubspot.toml", "contacts.terms.lifecycle.values")
    text_out = syncd(e2e, "unmapped").stdout
    assert "hubspot:contacts:lifecyclestage=evangelist" in text_out and "hubspot.toml" in text_out
    shown = as_json(e2e, "unmapped show", value["key"], "--term", "customer")
    fix = shown["fix"]
    assert fix["replaces"] and fix["toml"].startswith('customer = ["customer", "evangelist"]  # an evangelist')
    line_text = syncd(e2e, "unmapped", "show", value["key"], "--term", "customer").stdout
    assert f"replace line {fix['line']}" in line_text and fix["toml"] in line_text

    lines = Path(fix["file"]).read_text().splitlines()
    lines[fix["line"] - 1] = fix["toml"]
    Path(fix["file"]).write_text("\n".join(lines) + "\n")
    assert documented("mappings check", syncd(e2e, "mappings", "check", "--live", "--json").stdout) == []
    assert documented("mappings check", syncd(e2e, "mappings", "check", "--live", "--format", "json").stdout) == []

    done = as_json(e2e, "unmapped dismiss", value["key"], "--by", "dave")["resolution"]
    assert done["changed"] == {"forgotten": 1}
    assert [u for u in as_json(e2e, "unmapped")["unmapped"] if u["value"] == "evangelist"] == []
    (row,) = operator_rows(e2e)
    assert (row["field"], row["after"]) == ("lifecyclestage", {"action": "dismiss", "by": "dave"})


def test_a_term_that_is_not_in_the_glossary_is_refused(e2e: E2E) -> None:
    e2e.hs.add("contacts", {"email": "oth.er@example.com", "firstname": "Oth", "lastname": "Er",
                            "lifecyclestage": "other"})
    syncd(e2e, "sync", "--once")
    (value,) = [u for u in as_json(e2e, "unmapped")["unmapped"] if u["value"] == "other"]
    assert value["deliberate"]  # "other" is left unmapped on purpose
    p = syncd(e2e, "unmapped", "show", value["key"], "--term", "nonsense", code=2)
    assert "nonsense" in p.stderr and "not a glossary term" in p.stderr


# -- blocked --------------------------------------------------------------------------------------


def test_blocked_then_release_then_the_next_cycle_re_hands_off(e2e: E2E) -> None:
    email = "cleo.blocked@example.com"
    hid = e2e.hs.add("contacts", {"email": email, "firstname": "Cleo", "lastname": "Blocked",
                                  "lifecyclestage": "marketingqualifiedlead", "hubspotscore": "55"})
    lid = lead(e2e, email, stage="MQL")
    e2e.converge()
    e2e.sf.modify("Lead", lid, {"Status": "Returned - Not Ready", "Return_Reason__c": "not a buyer yet"})
    e2e.converge()
    e2e.hs.modify("contacts", hid, {"hubspotscore": "60"})  # over the threshold, not new evidence
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "lead"

    (person,) = as_json(e2e, "blocked")["blocked"]
    assert person["email"] == email and f"salesforce:Lead:{lid}" in person["records"]
    assert person["return_reason"] == "not a buyer yet" and "mql" in person["why"]
    assert as_json(e2e, "blocked show", str(person["id"]))["person"] == person
    assert email in syncd(e2e, "blocked").stdout

    done = as_json(e2e, "blocked release", str(person["id"]), user="erin")["resolution"]
    assert (done["action"], done["by"]) == ("release", "erin")
    e2e.converge()
    assert e2e.hs.get("contacts", hid)["lifecyclestage"] == "marketingqualifiedlead"
    sf = e2e.sf.get("Lead", lid)
    assert sf["Lifecycle_Stage__c"] == "MQL" and sf["Status"] != "Returned - Not Ready"
    assert as_json(e2e, "blocked")["blocked"] == []
    # the rules credited the release: rule 3, its reason naming the operator
    assert any(a.rule == "R3-rehandoff-guard" and "released by erin" in a.reason for a in e2e.audit(record_id=lid))
    (row,) = operator_rows(e2e)
    assert (row["field"], row["after"], row["email_norm"]) == ("guard", {"action": "release", "by": "erin"}, email)


# -- every command's --json -----------------------------------------------------------------------


def test_json_of_the_reports_and_work_commands_matches_the_documented_schema(e2e: E2E) -> None:
    e2e.hs.add("contacts", {"email": "json.one@example.com", "firstname": "Json", "lastname": "One",
                            "lifecyclestage": "lead", "hubspotscore": "90"})
    planned = documented("sync", syncd(e2e, "sync", "--dry-run", "--once", "--json").stdout)
    assert planned["mode"] == "dry_run" and planned["planned"]
    assert all(len(v) == 2 for p in planned["planned"] for v in p["changes"].values())
    assert syncd(e2e, "sync", "--once").stdout.startswith("pulled=")  # the text default is unchanged
    once = documented("sync", syncd(e2e, "sync", "--once", "--json").stdout)
    assert once["mode"] == "once" and once["planned"] == []
    status = documented("status", syncd(e2e, "status", "--json").stdout)
    assert status["runs"] and status["last_success"]
    rows = documented("audit", syncd(e2e, "audit", "--json").stdout)
    assert rows and all("T" in r["at"] for r in rows)
    documented("resync", syncd(e2e, "resync", "--inline", "--json").stdout)
    documented("mappings check", syncd(e2e, "mappings", "check", "--json").stdout)
    repo = e2e.tmp / "repo"
    shutil.copytree(default_mappings_dir(), repo / "mappings")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@example.com",
                                                 "commit", "-qm", "m"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    with e2e.config.open("a") as f:
        f.write(f'\n[mappings]\ndir = "{repo / "mappings"}"\n')
    documented("mappings impact", syncd(e2e, "mappings", "impact", "--json").stdout)
    for name in ("conflicts", "quarantine", "unmapped", "blocked"):
        as_json(e2e, name)


def test_a_partial_cycle_prints_its_json_then_exits_1(e2e: E2E) -> None:
    with e2e.config.open("a") as f:
        f.write("\n[sync]\nretry_cap_s = 0.2\nretry_max_attempts = 2\n")
    e2e.hs.add("contacts", {"email": "half.seen@example.com", "firstname": "Half", "lastname": "Seen",
                            "lifecyclestage": "lead", "hubspotscore": "90"})
    e2e.sb.salesforce_server.inject("server_error", count=1000)  # Salesforce is down
    p = syncd(e2e, "sync", "--once", "--json", code=1)
    out = documented("sync", p.stdout)
    assert out["status"] == "partial" and "salesforce" in out["reason"] and "503" in out["reason"]
    assert out["summary"]["sent"] == 0  # nothing decided on half a picture
    assert "partial cycle" in p.stderr


def test_sandbox_serve_json_tells_where_and_how_then_serves_until_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "syncd", "sandbox", "serve", "--people", "20", "--dir",
                             str(tmp_path / "sb"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for ln in proc.stdout:  # one indented document; its last line is the closing brace
            lines.append(ln)
            if ln.rstrip("\n") == "}":
                break
        doc = documented("sandbox serve", "".join(lines))
        assert doc["seeded"]["hubspot.contacts"] == 20 and Path(doc["config"]).is_file()
        ctx = ssl.create_default_context(cafile=doc["ca_bundle"])
        req = urllib.request.Request(f"{doc['hubspot']['url']}/crm/v3/objects/contacts?limit=1",
                                     headers={"Authorization": f"Bearer {doc['hubspot']['token']}"})
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0


def test_every_command_with_json_is_documented() -> None:
    """Each command's --json has a schema in docs/json.md, and each schema is valid JSON Schema."""
    from click import Group

    from syncd.cli import main

    def walk(cmd: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        out = [path] if any(p.name == "as_json" for p in cmd.params) else []
        if isinstance(cmd, Group):
            for name, sub in cmd.commands.items():
                out += walk(sub, (*path, name))
        return out

    with_json = {" ".join(p) for p in walk(main, ())}
    resolutions = {"conflicts resolve", "quarantine retry", "quarantine dismiss", "unmapped dismiss",
                   "blocked release"}
    assert resolutions <= with_json
    for name in with_json - resolutions:
        assert name in schemas(), f"`syncd {name} --json` has no schema in docs/json.md"
        Draft202012Validator.check_schema(schemas()[name])
    assert "resolution" in schemas()
